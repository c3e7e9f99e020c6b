"""Where the time goes: GPU kernel time by kernel and by kind, from a JAX profiler trace.

Runs `call` a few times under `jax.profiler` with a Perfetto trace, then sums
the duration of every event on the device's tracks by name. Given the compiled program's
HLO text, each kernel is also named by the JAX operation it came from (`fusion_origins`),
e.g. `loop_select_fusion` -> `jit(step)/jvp(LanguageModel)/jit(_where)/select_n`, so a
profile says which line of the model a kernel belongs to without dumping the HLO.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax

# Kernel name fragments -> kind, first match wins.
KINDS = (
    ("attention", ("cudnn", "flash", "fmha", "sdpa", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "matmul")),
    ("reduce/norm/softmax", ("reduce", "reduction")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset")),
)


def _kind(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other fusion"


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(")
_ASSIGNED = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+) = ")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def fusion_origins(hlo_text: str) -> dict[str, str]:
    """{kernel name: JAX op_name} from an optimised HLO module's text (`compiled.as_text()`).

    A GPU kernel is named after its HLO instruction, dots and dashes made underscores; its op_name
    is the instruction's own metadata, else that of the ROOT of the computation it calls.
    """
    root_op: dict[str, str] = {}
    pending: list[tuple[str, str | None, str | None]] = []  # (name, op_name, called)
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        assigned = _ASSIGNED.match(line)
        if not assigned:
            continue
        op = _OP_NAME.search(line)
        called = _CALLS.search(line)
        if assigned.group(1) and op:
            root_op[computation] = op.group(1)
        pending.append((assigned.group(2), op and op.group(1), called and called.group(1)))
    origins = {}
    for name, op, called in pending:
        origin = op or root_op.get(called or "", "")
        if origin:
            origins[name.replace(".", "_").replace("-", "_")] = origin
    return origins


def trace(call: Callable[[], Any], steps: int, log_dir: str, hlo_text: str = "") -> dict:
    """{per_step_ms_by_kind, top_kernels, trace_file} for `steps` calls of `call`; top
    kernels are [name, ms per step, op_name] when the program's `hlo_text` is given."""
    jax.block_until_ready(call())
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    for _ in range(steps):
        jax.block_until_ready(call())
    jax.profiler.stop_trace()
    loaded = _load_trace(log_dir)
    if loaded is None:
        return {"error": f"no perfetto trace under {log_dir}"}
    events, trace_file = loaded
    names = _process_names(events)
    device_pids = {pid for pid, n in names.items() if _is_device(n)}
    threads = {
        (e["pid"], e["tid"]): e["args"].get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device_pids
    }
    # kernels sit on "Stream" lines; derived lines (XLA Ops, Modules) would count them twice
    streams = {key for key, n in threads.items() if "stream" in n.lower()}
    by_name: dict[str, float] = collections.Counter()
    kernels = []  # (start us, end us, name)
    for e in events:
        on_stream = not streams or (e.get("pid"), e.get("tid")) in streams
        on_device = e.get("pid") in device_pids and on_stream
        if e.get("ph") == "X" and on_device:
            by_name[e["name"]] += e.get("dur", 0) / 1e3  # us -> ms
            kernels.append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    by_kind: dict[str, float] = collections.Counter()
    for name, ms in by_name.items():
        by_kind[_kind(name)] += ms
    total = sum(by_name.values())
    origins = fusion_origins(hlo_text)
    return {
        "device_tracks": sorted(names[p] for p in device_pids),
        "device_lines": sorted(set(threads.values()))[:20],
        "kernel_ms_per_step": total / steps,
        "by_kind_ms_per_step": {k: v / steps for k, v in by_kind.most_common()},
        "top_kernels_ms_per_step": [
            (n[:120], ms / steps, origins.get(n, "")[:160]) for n, ms in by_name.most_common(40)
        ],
        **idle_gaps(kernels, steps),
        "trace_file": trace_file,
    }


def idle_gaps(kernels: list, steps: int, top: int = 12) -> dict:
    """Where the GPU waits: the gaps between one kernel's end and the next kernel's start
    (all streams merged), those between calls (the host starting the next one) included.
    Under the profiler XLA launches kernel by kernel unless
    `--xla_enable_command_buffers_during_profiling=true` (which `python -m
    experiments.bench` sets) keeps the CUDA-graph launches of the timed calls."""
    idle, widest = 0.0, []
    reach, before = None, ""
    for start, end, name in sorted(kernels):
        if reach is not None and start > reach:
            idle += start - reach
            widest.append((start - reach, before[:60], name[:60]))
        if reach is None or end > reach:
            reach, before = end, name
    widest.sort(reverse=True)
    span = reach - min(k[0] for k in kernels) if kernels else 0.0
    return {
        "kernels_per_step": len(kernels) / steps,
        "span_ms_per_step": span / 1e3 / steps,
        "idle_ms_per_step": idle / 1e3 / steps,
        "widest_gaps_us": [(round(g, 1), a, b) for g, a, b in widest[:top]],
    }


def host_spans(call: Callable[[], Any], log_dir: str, top: int = 30) -> tuple[Any, dict]:
    """`call()` (e.g. an XLA compile) and where the host's time went in it: the `top` named
    spans of the profiler's host tracks (XLA's passes, autotuners, LLVM, ptxas), each as
    [name, summed seconds, wall seconds (their union), threads]. Spans nest, so a pass and
    its parent both count; summed above wall means the work ran on several threads."""
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    began = time.perf_counter()
    out = jax.block_until_ready(call())
    seconds = time.perf_counter() - began
    jax.profiler.stop_trace()
    loaded = _load_trace(log_dir)
    if loaded is None:
        return out, {"error": f"no perfetto trace under {log_dir}"}
    events, _ = loaded
    names = _process_names(events)
    spans: dict[str, list] = collections.defaultdict(list)
    for e in events:
        host = not _is_device(names.get(e.get("pid"), ""))
        if e.get("ph") == "X" and host and not e["name"].startswith("$"):  # "$": Python frames
            spans[e["name"][:100]].append((e["ts"], e["ts"] + e.get("dur", 0), e.get("tid")))
    rows = [
        [name, sum(b - a for a, b, _ in s) / 1e6, _union(s) / 1e6, len({t for *_, t in s})]
        for name, s in spans.items()
    ]
    rows.sort(key=lambda r: -r[1])
    top_rows = [[n, round(total, 3), round(wall, 3), threads] for n, total, wall, threads in rows]
    return out, {"seconds": round(seconds, 3), "top_spans": top_rows[:top]}


def _union(intervals: list) -> float:
    """The length of the union of (start, end, ...) intervals."""
    length, reach = 0.0, float("-inf")
    for start, end, *_ in sorted(intervals):
        if end > reach:
            length += end - max(start, reach)
            reach = end
    return length


def _load_trace(log_dir: str) -> tuple[list, str] | None:
    """The events of the newest Perfetto trace under `log_dir`, and its file."""
    files = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        return None
    with gzip.open(files[-1]) as f:
        events = json.load(f)
    return (events["traceEvents"] if isinstance(events, dict) else events), files[-1]


def _process_names(events: list) -> dict:
    return {
        e["pid"]: e["args"].get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }


def _is_device(process_name: str) -> bool:
    return "gpu" in process_name.lower() or "/device:" in process_name.lower()
