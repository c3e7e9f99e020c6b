"""What every entry point shares: flags for multi-process runs, logging, and the exit statuses.

A mistake a user can fix (a bad config value or flag, a missing file or stage, a workdir of
another experiment) ends with ONE line on stderr, `error: ...`, saying what is wrong and
what to do, and a documented exit status; `--verbose` shows the traceback too. Anything
else is a bug and keeps its traceback.

Exit statuses:
  0  done
  2  bad input: config, flags, files, workdir (nothing was overwritten)
  3  a non-finite loss, gradient or update stopped training (see train.skip_nonfinite)
  4  interrupted by SIGTERM/SIGINT after saving a checkpoint: rerun the same command
  5  the workdir is in use by another run
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags

from data.cli import fail
from train import distributed, launch

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_BUSY = 2, 3, 4, 5

flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs")
flags.DEFINE_integer("num_processes", 0, "number of processes (0: env JAX_NUM_PROCESSES or 1)")
flags.DEFINE_integer("process_id", -1, "this process's index (-1: env JAX_PROCESS_ID or 0)")
flags.DEFINE_bool("distributed_auto", False, "let JAX find the cluster (TPU pods, SLURM)")
flags.DEFINE_bool("verbose", False, "show tracebacks and library log messages")
flags.DEFINE_string(
    "compilation_cache",
    None,
    "folder of the persistent compilation cache on a GPU/TPU (default: "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/fromscratch-lm/jax); '' turns it off",
)

FLAGS = flags.FLAGS
_default_config = [""]  # the entry point's --config default, set by define_config
_QUIET_LOGGERS = ("absl", "jax._src", "orbax", "tensorstore", "tensorflow", "etils")


def setup() -> None:
    """Logging for the run, then joins the process group if one is configured. Nothing
    before this touches a JAX backend, so `jax.distributed.initialize` can run here.
    Then, on an accelerator, the persistent compilation cache and threefry as one kernel
    (train/launch.py); on the CPU neither (the small models and tests that run there
    gain little from a cache shared between processes)."""
    quiet_library_logs()
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed_auto
    )
    import jax

    if jax.default_backend() != "cpu":
        launch.configure_accelerator(FLAGS.compilation_cache)


def quiet_library_logs() -> None:
    """The project's own INFO messages; the libraries' only with --verbose (orbax alone logs
    dozens of lines a checkpoint read)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name in _QUIET_LOGGERS:  # their warnings must not drown the project's own messages
        logging.getLogger(name).setLevel(logging.WARNING if FLAGS.verbose else logging.CRITICAL)


def exit_status(error: BaseException) -> int | None:
    """The documented status of an error a user can act on; None for a bug."""
    from train.checkpoint import CheckpointError
    from train.loop import Interrupted, NonFiniteError
    from train.workdir import WorkdirBusy

    if isinstance(error, Interrupted):
        return EXIT_INTERRUPTED
    if isinstance(error, NonFiniteError):
        return EXIT_NONFINITE
    if isinstance(error, WorkdirBusy):
        return EXIT_BUSY
    if isinstance(error, ValueError | FileNotFoundError | FileExistsError | CheckpointError):
        return EXIT_BAD_INPUT
    if isinstance(error, PermissionError) or getattr(error, "errno", None) == errno.ENOSPC:
        return EXIT_BAD_INPUT
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad flag or config override reported in one line."""
    try:
        rest = FLAGS(argv)
        if "config" in FLAGS:
            # ml_collections defers the error of a config file whose get_config(ARG) failed
            # (--config=FILE:ARG) to the first use of the config: make that use now.
            FLAGS.config.keys()
        return rest
    except Exception as error:  # noqa: BLE001 - flag and config-file errors are the user's
        if "--verbose" in argv:
            raise
        cause = error.__cause__ or error
        if cause is not error:  # the config file's own error: it says what to do
            fail(_first_line(cause), EXIT_BAD_INPUT)
        path = _config_path(argv, _default_config[0])
        if isinstance(error, AttributeError) and "get_config" in str(error):
            fail(
                f"the config file {path!r} defines no get_config(): a config file returns its "
                "ConfigDict from get_config(); see experiments/configs/",
                EXIT_BAD_INPUT,
            )
        if any(arg.startswith("--config.") for arg in argv):
            fail(_config_problem(error, path), EXIT_BAD_INPUT)
        fail(f"{_first_line(error)} (see --helpfull)", EXIT_BAD_INPUT)
        raise  # unreachable


def define_config(default: str, help_text: str, **kwargs) -> None:
    """`--config=FILE` with `--config.FIELD=VALUE` overrides. ml_collections applies the
    overrides while the flag is defined, at import: a bad file or field is reported here."""
    from ml_collections import config_flags

    _default_config[0] = default
    path = _config_path(sys.argv, default)
    file = Path(path.split(":")[0])
    if file.is_dir():
        fail(f"--config={path!r} is a directory: name a config file in it", EXIT_BAD_INPUT)
    if not file.is_file():
        fail(f"the config file {path!r} does not exist; see experiments/configs/", EXIT_BAD_INPUT)
    try:
        config_flags.DEFINE_config_file("config", default, help_text, **kwargs)
    except Exception as error:  # noqa: BLE001 - the user's config file or override
        if "--verbose" in sys.argv:
            raise
        fail(_config_problem(error, path), EXIT_BAD_INPUT)


def _config_path(argv: list[str], default: str) -> str:
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), default)


def _config_problem(error: BaseException, path: str) -> str:
    """One line for a config that failed to load: the unknown field, or the file's error."""
    from experiments import configs

    try:
        config = configs.load(path)
    except Exception as load_error:  # noqa: BLE001
        return f"cannot load the config file {path!r}: {_first_line(load_error)}"
    for arg in sys.argv:
        if arg.startswith("--config."):
            problem = configs.override_problem(config, arg[len("--config.") :].split("=", 1)[0])
            if problem:
                return f"{problem} (in {arg})"
    return f"bad --config or --config.* override: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def main(run: Callable[[], None]) -> None:
    """Parses the flags, sets up, runs `run()` and maps user errors to exit statuses."""

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}", EXIT_BAD_INPUT)
        setup()
        run_mapped(run)

    app.run(wrapped, flags_parser=_parse_flags)


def run_mapped(run: Callable[[], None]) -> None:
    """`run()`, an error a user can act on ending in its one line and documented status; a
    bug (or any error with --verbose) keeps its traceback."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 - mapped, or re-raised as a bug
        status = exit_status(error)
        if status is None or FLAGS.verbose:
            raise
        fail(str(error), status)


def define_model_flags() -> None:
    """--workdir and --checkpoint: the model of a stage directory (or an import) to read."""
    flags.DEFINE_string("workdir", None, "a stage directory with checkpoints", required=True)
    flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "newest, or lowest eval loss")


def stage_main(run: Callable, needs: str) -> None:
    """`python -m experiments.STAGE --config=CONFIG --workdir=DIR`: one post-training stage of
    the pipeline directory DIR (which holds `needs`); prints its results as JSON."""
    import json

    from experiments.configs import posttrain_tiny

    define_config(posttrain_tiny.__file__, "pipeline config")
    flags.DEFINE_string("workdir", "runs/pipeline", f"the pipeline directory (holds {needs})")

    def go() -> None:
        workdir = Path(FLAGS.workdir).absolute()
        if not workdir.is_dir():
            raise FileNotFoundError(
                f"{workdir} is not a pipeline directory: give the one that holds {needs} "
                "(python -m experiments.pipeline makes one)"
            )
        from experiments.pipeline import validate_stage

        # the stage is named by its module's file: run as a script, its module is __main__
        validate_stage(FLAGS.config, Path(run.__code__.co_filename).stem)
        result = run(FLAGS.config, workdir)
        print(json.dumps(result, indent=2, default=str))

    main(go)
