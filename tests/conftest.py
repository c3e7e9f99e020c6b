"""Tests run on CPU with 8 fake devices, so sharded steps are exercised without accelerators.

One persistent compilation cache for the whole session (a fresh folder, removed at the end):
the suite compiles the same tiny models' steps in many tests and in the CLI processes they
start, and each program is compiled once instead (the whole suite on the 2-core VM: 814 s
without it, 674 s with it). Programs are the same compiled or loaded, so no result
depends on it.

No test may make a step compiled ahead of time fall back to compiling again
(train/launch.py, CompiledAhead): that would mean a stage promised the wrong shapes or
shardings, which only costs time, so nothing else would notice.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.run_helpers import (
    FAST_COMPILE_FLAG,
    PretrainedPipeline,
    TrainedRun,
    shared_pretrained_pipeline,
    shared_trained_run,
)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count=8"
cpu_only = os.environ["JAX_PLATFORMS"] == "cpu"  # GPU runs of the tests compile as users do
if cpu_only and "xla_backend_optimization_level" not in flags:  # run_helpers.py says why
    flags = f"{flags} {FAST_COMPILE_FLAG}"
os.environ["XLA_FLAGS"] = flags.strip()
if not cpu_only:
    # the tests compare float32 results with float32 definitions; a GPU's XLA products
    # default to TF32 (10 mantissa bits), ~1e-3 off, where the kernels multiply in float32
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Set before JAX is imported, in pytest's first process: its workers and every subprocess a
# test starts inherit the variables, so they share the folder.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fromscratch-lm-tests-")
    os.environ["FROMSCRATCH_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# The slowest test files, slowest first, with their seconds in a whole run on the 2-core VM
# (pytest --durations=0, 2026-12-03). pyproject.toml has pytest-xdist hand out whole files
# (--dist loadfile: a module's fixtures are set up once) in collection order
# (--no-loadscope-reorder), so these start first and the quick files fill the end evenly,
# instead of one worker finishing a long file alone.
SLOWEST_FILES = (
    "test_posttrain_resume.py",  # 155
    "test_kernel_flash_attention_mgpu.py",  # 94
    "test_hf_stages.py",  # 93
    "test_multihost.py",  # 88
    "test_training_run.py",  # 78
    "test_kernel_flash_attention.py",  # 78
    "test_rlhf_sharded.py",  # 73
    "test_kernel_decode_matmul.py",  # 69
    "test_sweep_and_sample.py",  # 66
    "test_sharded_step.py",  # 60
    "test_user_errors.py",  # 56
    "test_shakespeare_char.py",  # 52
    "test_sampling.py",  # 47
    "test_lora_stages.py",  # 45
    "test_attention.py",  # 44
    "test_fused_head.py",  # 43
    "test_scan_layers.py",  # 36
    "test_hf_convert.py",  # 36
)


def pytest_collection_modifyitems(config, items):
    """The files of SLOWEST_FILES first, in its order; the others after them, as collected.
    The sort is stable: tests keep their order within a file."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("FROMSCRATCH_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _shared_folder(tmp_path_factory) -> Path:
    """The session's folder for what the tests share: pytest-xdist's workers have base
    folders in one parent."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One finished pretraining run for the tests that only read it or copy it, trained once
    per session."""
    return shared_trained_run(_shared_folder(tmp_path_factory))


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> PretrainedPipeline:
    """The post-training tests' pretrained model and data (to copy, never to change),
    made once per session."""
    return shared_pretrained_pipeline(_shared_folder(tmp_path_factory))


class _Fallbacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "compiled for other arguments" in record.getMessage():
            self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def strict_ranks(request):
    """Tests marked `strict_ranks` run with implicit rank promotion as an error, so a
    missing `[:, None]` in mask, advantage or loss code fails instead of broadcasting
    silently into a wrong shape (the model's own code broadcasts its norm scales and
    one-hot comparisons on purpose, so this is not global)."""
    if "strict_ranks" not in request.keywords:
        yield
        return
    import jax  # here: importing it above would read JAX_PLATFORMS before it is set

    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(autouse=True)
def no_compile_ahead_fallback(request):
    handler = _Fallbacks()
    logger = logging.getLogger("train.launch")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    if handler.messages and "allow_compile_fallback" not in request.keywords:
        pytest.fail(f"a step compiled ahead was compiled again: {handler.messages[0]}")
