"""Device-synchronised timing, compile time and memory of one compiled program."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax

from train.flops import PEAK_FLOPS


def time_calls(call: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Seconds per call, each call waited for (block_until_ready) before the next starts."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def spread(times: list[float]) -> float:
    """(p90 - p10) / median: how noisy the repeated measurement was."""
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return (qs[-1] - qs[0]) / statistics.median(times)


def compile_timed(lowerable: Any, *args) -> tuple[Any, float]:
    """(compiled executable, seconds spent lowering and compiling)."""
    start = time.perf_counter()
    compiled = lowerable.lower(*args).compile()
    return compiled, time.perf_counter() - start


def program_bytes(compiled: Any) -> int | None:
    """XLA's buffer-assignment peak for one call: arguments + outputs - donated + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


def process_peak_bytes(devices: Iterable[jax.Device] | None = None) -> int | None:
    """The allocator's largest peak over `devices` (default: the first) since the process
    started (monotone across benchmarks)."""
    peaks = [
        (d.memory_stats() or {}).get("peak_bytes_in_use")
        for d in (devices if devices is not None else jax.devices()[:1])
    ]
    return max((p for p in peaks if p is not None), default=None)


def device_name() -> str:
    return jax.devices()[0].device_kind


def peak_flops() -> tuple[str | None, float | None]:
    """(key in train.flops.PEAK_FLOPS, dense bf16 FLOP/s) for the local accelerator, if known."""
    kind = device_name().lower()
    for needle, key in (("h100", "h100-sxm"), ("h200", "h200"), ("a100", "a100")):
        if needle in kind:
            return key, PEAK_FLOPS[key]
    return None, None
