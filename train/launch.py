"""What a command does once at launch to reach its first step sooner, and the clock that
measures it.

The persistent compilation cache: XLA's compilation of a training step (autotuning
included) is most of the time from launch to the first step on a GPU (21.3 of gpt2-124m's
45.6 s, BENCHMARKS.md, "Speed round two"), and it is the same on every launch of the same
config. JAX stores each compiled executable under a key of its HLO, the backend and the flags, so a
later launch loads it instead of compiling. On by default for the commands
(experiments/cli.py), in `default_cache_dir()`; JAX_COMPILATION_CACHE_DIR or the
`--compilation_cache` flag choose another folder, an empty value turns it off. Library
callers (tests, notebooks) get JAX's own default: no cache.

Threefry as one GPU kernel: JAX's default GPU lowering unrolls threefry's rounds into
every fusion that draws random bits, and each such fusion takes about 0.75 s to compile
(gpt2-124m's state init: 55.9 s, against 4.3 s with the kernel, BENCHMARKS.md). On one
device the commands lower it to JAX's threefry kernel everywhere, so dropout masks (one
draw per dropout site) compile fast too. Same bits, so the same parameters and masks; the kernel
reads broadcast keys, more memory traffic per draw than the fused form.

The step compiled in the background: a stage knows its step's argument shapes and
shardings before it has a state (`jax.eval_shape` of the init, and one batch peeked), so
`CompiledAhead` traces, lowers and compiles the step in a thread while the main thread
initialises the state or reads a checkpoint. The step no longer waits for those.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)

# Executables that compiled faster than this are not worth a disk read and write (the
# many small jits of a run); a training step or a state init takes seconds.
MIN_COMPILE_SECONDS = 0.5
_IMPORTED = time.time()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME (else ~/.cache)/fromscratch-lm/jax."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fromscratch-lm" / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns JAX's persistent compilation cache on in `directory` (None: the environment's
    JAX_COMPILATION_CACHE_DIR, else `default_cache_dir()`; "": off). Returns the folder."""
    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(default_cache_dir()))
    if not str(directory):
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def configure_accelerator(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """What the commands set on a GPU/TPU before compiling anything: the compilation cache
    (returns its folder) and, with one device, threefry as one kernel (a GPU-only setting;
    with several, XLA's partitioner would run the kernel whole on every device)."""
    if jax.device_count() == 1:
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    return enable_compilation_cache(cache_dir)


def seconds_since_launch() -> float:
    """Seconds since this process started (Linux: from /proc, so interpreter start-up and
    imports count), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            # field 22, counting from 1, after the command name in parentheses
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


class CompiledAhead:
    """A jitted step (`train.sharding.jit_sharded`) compiled in a background thread for
    abstract arguments (`jax.ShapeDtypeStruct`s with shardings), started at construction.

    The first call waits for the compilation and re-raises its error, if any. Then every
    call runs the compiled executable, as long as the first call's arguments were the
    promised ones; if they were not (JAX checks shapes, dtypes and shardings before
    running anything, so nothing was donated), it warns once and calls the jitted step,
    which compiles for them: slower to start, never wrong. The thread is a daemon, so a
    run that stops before its first step does not wait for the compiler.
    """

    def __init__(self, step: Callable, *abstract_args: Any, name: str = "step"):
        self.step, self.name = step, name
        self.compiled: Any = None  # the executable while it is the one called
        self.seconds = 0.0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._compile, args=abstract_args, name=f"compile-{name}", daemon=True
        )
        self._thread.start()

    def _compile(self, *abstract_args: Any) -> None:
        began = time.perf_counter()
        try:
            self.compiled = self.step.lower(*abstract_args).compile()
        except BaseException as e:  # noqa: BLE001 - re-raised by the first call
            self._error = e
        self.seconds = time.perf_counter() - began

    def __call__(self, *args: Any) -> Any:
        if self._thread is None:
            return self.compiled(*args) if self.compiled is not None else self.step(*args)
        waited = time.perf_counter()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        log.info(
            "%s compiled in the background in %.1f s (%.1f s of it waited for)",
            self.name,
            self.seconds,
            time.perf_counter() - waited,
        )
        try:
            return self.compiled(*args)
        except (TypeError, ValueError) as e:  # raised before running: nothing donated
            log.warning("%s: compiled for other arguments (%s); compiling again", self.name, e)
            self.compiled = None
            return self.step(*args)


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs with the arrays' shardings: what `CompiledAhead` compiles for."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def peek(batches: Any) -> Any:
    """The next batch of an iterator with `get_state`/`set_state`, leaving it in place."""
    position = batches.get_state()
    try:
        return next(batches)
    finally:
        batches.set_state(position)
