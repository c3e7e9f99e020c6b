"""GPT-2 medium (350M) at context 1024."""

from ml_collections import ConfigDict

from experiments.configs.common import model_fields
from experiments.configs.gpt2_124m import get_config as gpt2_124m_config


def get_config() -> ConfigDict:
    c = gpt2_124m_config()
    c.model = model_fields("gpt2-350m")
    c.optim.lr = 3e-4
    c.optim.end_lr = 3e-5
    return c
