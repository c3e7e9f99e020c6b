"""Regenerates every figure and generated table of the guide from real outputs of this code.

    python -m docs.figures --pretrain=/tmp/guide_runs/pretrain [--pipeline=/tmp/guide_runs/pipeline]

Inputs (nothing is drawn by hand or invented):
  --pretrain   a workdir of `python -m experiments.pretrain`: its metrics.jsonl and
               config.json (loss curves, schedule), its prepared data (config data.dir,
               else data/: the curation report, a real packed batch for the mask, the
               tokenizer), and its newest checkpoint (attention patterns of the trained
               model);
  --pipeline   a workdir of `python -m experiments.pipeline` (PPO curves); optional;
  the code     the mask rule (model/masking.py), the logical-axis rule table and a real
               parameter's sharding on an 8-device mesh (train/sharding.py, train/state.py),
               the learning-rate schedule (train/optim.py);
  BENCHMARKS.md the recorded GPU runs (the kernel-time breakdown).

The generators are in docs/run_figures.py (from the runs) and docs/code_figures.py (from the
code); this module runs them. It writes PNGs and small Markdown tables into docs/figures/,
plus provenance.json saying what produced each; if any generator fails, none of the files
there changes. The PNGs are committed, so the guide builds without rerunning anything.
"""

from __future__ import annotations

import os

# The sharding diagram needs an 8-device mesh; on a CPU that means 8 fake devices, which
# must be requested before JAX starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from docs import code_figures, plotting, run_figures  # noqa: E402
from docs.build import FIGURES, git_revision  # noqa: E402


def generate(pretrain: Path | None, pipeline: Path | None) -> dict[str, dict]:
    """Runs every generator whose input exists; returns provenance per output file."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[Callable, tuple, str]] = [
        (
            code_figures.sharding_diagram,
            (),
            "train/sharding.py rule table, gpt2-124m shapes, 8-device mesh",
        ),
        (
            code_figures.kernel_time_breakdown,
            (),
            "BENCHMARKS.md, 'Where the time goes', run 3 (H100)",
        ),
        (code_figures.lsh_curve, (), "data/dedup.py constants"),
        (
            code_figures.state_memory,
            (),
            "train/state.py abstract_train_state, llama-7b, 8-device meshes",
        ),
    ]
    if pretrain:
        src = f"pretraining workdir {pretrain}"
        jobs += [
            (run_figures.loss_curves, (pretrain,), src),
            (run_figures.curation, (pretrain,), src),
            (run_figures.packed_mask, (pretrain,), src),
            (run_figures.attention_patterns, (pretrain,), src),
            (run_figures.tokenizer_example, (pretrain,), src),
        ]
    if pipeline:
        src = f"pipeline workdir {pipeline}"
        jobs += [
            (run_figures.ppo_curves, (pipeline,), src),
            (run_figures.grpo_curves, (pipeline,), src),
            (run_figures.ground_truth, (pipeline,), src),
        ]
    provenance_file = FIGURES / "provenance.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    stamp = {"revision": git_revision(), "date": datetime.date.today().isoformat()}
    # Every generator writes into a staging folder; the committed files are replaced only
    # once all of them have succeeded, so a failure leaves docs/figures/ as it was.
    plotting.staging.append(Path(tempfile.mkdtemp(prefix=".staging-", dir=FIGURES)))
    try:
        made = []
        for fn, args, source in jobs:
            outputs = fn(*args)
            for path in outputs if isinstance(outputs, list) else [outputs]:
                made.append(path)
                provenance[path.name] = {
                    "generator": f"{fn.__module__.replace('.', '/')}.py:{fn.__name__}",
                    "source": source,
                    **stamp,
                }
        for path in made:
            os.replace(path, FIGURES / path.name)
            print(f"wrote {FIGURES / path.name}")
    finally:
        shutil.rmtree(plotting.staging.pop(), ignore_errors=True)
    provenance = dict(sorted(provenance.items()))
    provenance_file.write_text(json.dumps(provenance, indent=1) + "\n")
    provenance_table(provenance)
    return provenance


def provenance_table(provenance: dict[str, dict]) -> Path:
    """What produced each file in docs/figures/, as a Markdown table for chapter 10."""
    lines = ["| file | made by | from | generated at |", "| :--- | :--- | :--- | :--- |"]
    for name, p in provenance.items():
        generator = p["generator"].split(":")[-1]
        lines.append(
            f"| `{name}` | `{generator}` | {p['source']} | `{p['revision']}`, {p['date']} |"
        )
    caption = (
        ": Every generated file in `docs/figures/`, the function (in `docs/run_figures.py` or "
        "`docs/code_figures.py`) that made "
        "it, its input, and the repository revision and day of that run. {#tbl:provenance}"
    )
    md = FIGURES / "provenance_table.md"
    md.write_text("\n".join(lines) + "\n\n" + caption + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m docs.figures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pretrain", type=Path, help="workdir of python -m experiments.pretrain")
    parser.add_argument("--pipeline", type=Path, help="workdir of python -m experiments.pipeline")
    args = parser.parse_args(argv)
    for path in (args.pretrain, args.pipeline):
        if path is not None and not path.is_dir():
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
    try:
        generate(args.pretrain, args.pipeline)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
