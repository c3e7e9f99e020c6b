"""Shared command-line plumbing: config files with overrides, logging, multi-process flags."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from absl import flags

from train import distributed

flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs")
flags.DEFINE_integer("num_processes", 0, "number of processes (0: env JAX_NUM_PROCESSES or 1)")
flags.DEFINE_integer("process_id", -1, "this process's index (-1: env JAX_PROCESS_ID or 0)")
flags.DEFINE_bool("distributed_auto", False, "let JAX find the cluster (TPU pods, SLURM)")

FLAGS = flags.FLAGS


def setup() -> None:
    """Logging for the run, then joins the process group if one is configured."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed_auto
    )


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """A refused resume (a checkpoint of another config) ends with its message and exit
    status 2, as experiments.pretrain does, not with a traceback."""
    from experiments.resume import ResumeMismatchError

    try:
        yield
    except ResumeMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
