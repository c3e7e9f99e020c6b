"""Wall time from launching a command to its milestones, measured from outside it.

    python -m experiments.bench.launch_timing --workdir=W [--target=1.47] \
        [--stop_at_first_step] -- python -m experiments.pretrain --workdir=W ...

Starts the command, stamps each evaluation row appearing in W/metrics.jsonl and the loop's
"first step done" line with the seconds since the launch, and prints one JSON line: the
first step, every evaluation (step, eval/loss, seconds), the best one, the first at or
below `--target`, and the total. `--stop_at_first_step` kills the command once its first
step is done (start-up benchmarks need no more), `--stop_at_target` once an evaluation
reaches the target. BENCHMARKS.md quotes these numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

FIRST_STEP = "first step done"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--stop_at_first_step", action="store_true")
    parser.add_argument("--stop_at_target", action="store_true", help="kill it once there")
    parser.add_argument("--log", default="", help="copy the command's stderr here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    metrics = Path(args.workdir) / "metrics.jsonl"

    launched = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    first_step: dict = {}
    log = open(args.log, "w") if args.log else None  # noqa: SIM115 - closed below

    def read_stderr() -> None:
        for line in proc.stderr:
            if log:
                log.write(line)
            if FIRST_STEP in line and not first_step:
                first_step["seconds"] = round(time.perf_counter() - launched, 2)
                first_step["line"] = line.strip()[-120:]
                if args.stop_at_first_step:
                    proc.kill()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    evals, seen = [], 0
    while True:
        done = proc.poll() is not None
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                row = json.loads(line)
                if "eval/loss" in row:
                    now = round(time.perf_counter() - launched, 2)
                    evals.append({"step": row["step"], "loss": row["eval/loss"], "s": now})
                    if args.stop_at_target and row["eval/loss"] <= (args.target or 0.0):
                        proc.kill()
            seen = len(lines)
        if done:
            break
        time.sleep(0.1)
    reader.join(timeout=5)
    if log:
        log.close()
    best = min(evals, key=lambda e: e["loss"], default=None)
    below = [e for e in evals if args.target is not None and e["loss"] <= args.target]
    result = {
        "returncode": proc.returncode,
        "total_s": round(time.perf_counter() - launched, 2),
        "first_step": first_step,
        "best": best,
        "first_at_target": below[0] if below else None,
        "evals": evals,
    }
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
