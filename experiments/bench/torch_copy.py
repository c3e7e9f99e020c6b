"""The copy bandwidth PyTorch reaches on this GPU: the second ceiling decoding is compared
with (BENCHMARKS.md, Decoding). JAX's copy (experiments/bench/ceilings.py) is measured in
the benchmark's own process; this runs in its own, since the benchmark's JAX takes most of
the GPU's memory. Same definition: bytes read plus bytes written, float32, 2 GiB.

python -m experiments.bench.torch_copy   (prints one JSON row; needs torch with CUDA)
"""

from __future__ import annotations

import json
import statistics


def measure(size_mib: int = 2048, iters: int = 20) -> dict:
    import torch

    n = size_mib * 2**20 // 4
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:  # warm-up calls
            times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    return {"bench": "torch_copy", "torch": torch.__version__, "copy_GBps": 2 * 4 * n / t / 1e9}


if __name__ == "__main__":
    import sys

    import torch

    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU, and torch built with CUDA (the ceiling is the GPU's)")
    print(json.dumps(measure()))
