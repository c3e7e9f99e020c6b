"""Continued pretraining of a model this project holds: an import (`experiments.convert import`)
or any stage directory.

    python -m experiments.pretrain \
        --config=experiments/configs/continue_pretraining.py:DIR --workdir=OUT \
        [--config.data.corpus=text:MORE.txt] [--config.train.num_steps=...]

The model section is DIR's model, read from its latest checkpoint, so nothing has to be
typed in; the data is tokenized with DIR's own tokenizer (data/tokenizer: the default when
`train.init_from` is set) and training starts from DIR's parameters with a fresh optimizer.
The rest is `base_config`'s, with a lower peak learning rate than training from scratch,
since the model is already trained.
"""

from pathlib import Path

from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_section


def get_config(source: str = "") -> ConfigDict:
    from train.saved_model import read_latest_meta  # reads files only, no JAX backend

    if not source:
        raise ValueError(
            "name the model to continue: --config=experiments/configs/continue_pretraining.py:DIR"
        )
    directory = Path(source).expanduser().absolute()
    c = base_config()
    c.model = model_section(read_latest_meta(directory)["model"])
    c.train.init_from = str(directory)
    c.data.seq_len = min(c.data.seq_len, c.model.max_len)
    c.optim.lr, c.optim.end_lr, c.optim.warmup_steps = 1e-4, 1e-5, 50
    return c
