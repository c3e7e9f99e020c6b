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

Writes PNGs and small Markdown tables into docs/figures/, plus provenance.json saying what
produced each; if any generator fails, none of the files there changes. The PNGs are
committed, so the guide builds without rerunning anything.
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

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from docs.build import FIGURES, git_revision, table_under_heading  # noqa: E402

DPI = 160
plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": DPI})


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the stage that writes it first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows)
    return np.asarray(steps), np.asarray(values, dtype=float)


_staging: list[Path] = []  # where generate() has the generators write, until all succeed


def _output(name: str) -> Path:
    return (_staging[-1] if _staging else FIGURES) / name


def _save(fig, name: str) -> Path:
    path = _output(name)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------- pretraining run


def loss_curves(run: Path) -> Path:
    """Train and eval loss, gradient norm and learning rate of a pretraining run."""
    from train.optim import learning_rate_schedule, optim_config

    records = read_jsonl(run / "metrics.jsonl")
    config = json.loads((run / "config.json").read_text())
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 2.6))
    steps, train = series(records, "train/loss")
    axes[0].plot(steps, train, label="train (mean of the logged step)", lw=1.2)
    steps, ev = series(records, "eval/loss")
    axes[0].plot(steps, ev, "o-", label="eval (val split)", lw=1.2, ms=4)
    axes[0].set(xlabel="step", ylabel="nats / token", title="cross-entropy")
    axes[0].legend(frameon=False)
    steps, gn = series(records, "train/grad_norm")
    axes[1].plot(steps, gn, lw=1.2, color="C2")
    clip = config["optim"].get("clip_norm")
    if clip:
        axes[1].axhline(clip, ls="--", lw=0.8, color="gray", label=f"clip_norm = {clip}")
        axes[1].legend(frameon=False)
    axes[1].set(xlabel="step", title="gradient global norm (before clipping)")
    schedule = learning_rate_schedule(optim_config(config["optim"], config["train"]["num_steps"]))
    all_steps = np.arange(config["train"]["num_steps"])
    axes[2].plot(all_steps, [float(schedule(s)) for s in all_steps], lw=1.2, color="C3")
    axes[2].set(xlabel="step", title="learning rate (train/optim.py)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = _save(fig, "pretrain_loss.png")

    meta = json.loads((_prepared_dir(run) / "meta.json").read_text())
    evals = [r for r in records if "eval/loss" in r]
    if not evals:
        raise FileNotFoundError(
            f"{run / 'metrics.jsonl'} has no evaluation yet; let the run finish"
        )
    last_eval = evals[-1]
    _, tokens_per_s = series(records, "train/tokens_per_s")
    model, train_cfg, data_cfg = _model_fields(run), config["train"], config["data"]
    rows = [
        (
            "model",
            f"d_model {model['d_model']}, {model['n_layers']} layers, "
            f"{model['n_heads']} heads, d_ff {model['d_ff']}, vocabulary {model['vocab_size']}",
        ),
        ("batch", f"{train_cfg['global_batch_size']} rows of {data_cfg['seq_len']} tokens"),
        ("steps", f"{train_cfg['num_steps']}"),
        ("training tokens in the train split", f"{meta['splits']['train']['tokens']:,}"),
        ("final train loss (last logged step)", f"{train[-1]:.3f} nats/token"),
        (
            f"eval loss at step {last_eval['step']}",
            f"{last_eval['eval/loss']:.3f} nats/token, "
            f"perplexity {last_eval['eval/perplexity']:.0f}",
        ),
        ("eval bits per byte", f"{last_eval['eval/bits_per_byte']:.3f}"),
        ("held-out bytes per token", f"{meta['tokenizer']['heldout_bytes_per_token']}"),
        ("throughput (median of the logged steps)", f"{np.median(tokens_per_s):,.0f} tokens/s"),
    ]
    lines = ["| | value |", "| :--- | :--- |", *(f"| {k} | {v} |" for k, v in rows)]
    caption = (
        f": The pretraining run behind @fig:loss and @fig:attention (@sec:reproduce), corpus "
        f"`{data_cfg['corpus']}`, on the development machine's 2 CPU cores, shared with other "
        "work (so its throughput says little). {#tbl:pretrain-run}"
    )
    md = _output("pretrain_table.md")
    md.write_text("\n".join(lines) + "\n\n" + caption + "\n")
    return [png, md]


def curation(run: Path) -> list[Path]:
    """Drops by reason (documents and bytes) and the same as a Markdown table."""
    report = json.loads((_prepared_dir(run) / "curation_report.json").read_text())
    by_reason = report["dropped"]["by_reason"]
    names = ["kept"] + sorted(by_reason, key=lambda k: -by_reason[k]["bytes"])
    docs = [report["kept"]["docs"]] + [by_reason[k]["docs"] for k in names[1:]]
    mbs = [report["kept"]["bytes"] / 1e6] + [by_reason[k]["bytes"] / 1e6 for k in names[1:]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.35 * len(names) + 0.9), sharey=True)
    colors = ["C2"] + ["C3"] * (len(names) - 1)
    for ax, values, label in ((axes[0], docs, "documents"), (axes[1], mbs, "MB")):
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, [f"{v:,.0f}" if label == "documents" else f"{v:.2f}" for v in values])
        ax.set(xlabel=label, xscale="log")
        ax.grid(alpha=0.3, axis="x")
    axes[0].invert_yaxis()
    fig.suptitle(f"curation of corpus '{report['corpus']}': {report['input']['docs']:,} documents")
    fig.tight_layout()
    png = _save(fig, "curation.png")

    lines = [
        "| decision | documents | MB | examples |",
        "| :--- | ---: | ---: | :--- |",
        f"| kept | {report['kept']['docs']:,} | {report['kept']['bytes'] / 1e6:.2f} | |",
    ]
    for name in names[1:]:
        entry = by_reason[name]
        examples = ", ".join(f"`{Path(e).name}`" for e in entry["examples"][:2])
        lines.append(f"| `{name}` | {entry['docs']:,} | {entry['bytes'] / 1e6:.2f} | {examples} |")
    lines.append(
        f"| **input** | **{report['input']['docs']:,}** | **{report['input']['bytes'] / 1e6:.2f}**"
        " | |"
    )
    splits = report.get("splits", {})
    caption = (
        f": The curation report of corpus `{report['corpus']}` (this machine's Python standard "
        f"library), from `curation_report.json` in the data folder of the run in "
        f"@sec:reproduce. Kept + dropped = input, in documents and in bytes. After curation, "
        + ", ".join(
            f"{s}: {v['docs']} documents, {v['bytes'] / 1e6:.2f} MB" for s, v in splits.items()
        )
        + ". {#tbl:curation}"
    )
    md = _output("curation_table.md")
    md.write_text("\n".join(lines) + "\n\n" + caption + "\n")
    return [png, md]


def _prepared_dir(run: Path) -> Path:
    config = json.loads((run / "config.json").read_text())
    return Path(config["data"]["dir"]) if config["data"].get("dir") else run / "data"


def packed_mask(run: Path) -> Path:
    """The attention mask of a real packed row of the run's training data."""
    import jax.numpy as jnp

    from data.pipeline import PackedBatchIterator
    from model.masking import attention_mask

    config = json.loads((run / "config.json").read_text())
    it = PackedBatchIterator(
        _prepared_dir(run), "train", config["data"]["seq_len"], config["train"]["global_batch_size"]
    )
    # The (first) row with the most document pieces in the first 2000 batches: long files
    # make most rows one or two pieces.
    best, best_segments = None, 0
    for _, batch in zip(range(2000), it):
        counts = batch["segment_ids"].max(axis=1)
        r = int(np.argmax(counts))
        if counts[r] > best_segments:
            best, best_segments = {k: v[r : r + 1] for k, v in batch.items()}, int(counts[r])
    positions, segments = best["positions"], best["segment_ids"]
    mask = np.asarray(
        attention_mask(
            jnp.asarray(positions),
            jnp.asarray(positions),
            jnp.asarray(segments),
            jnp.asarray(segments),
        )
    )[0]
    L = mask.shape[0]
    seg = segments[0]
    fig = plt.figure(figsize=(6.4, 6.9))
    grid = fig.add_gridspec(3, 1, height_ratios=[0.35, 0.35, 6], hspace=0.08)
    cmap = plt.get_cmap("tab10")
    ax = fig.add_subplot(grid[2])
    ax_seg, ax_pos = (fig.add_subplot(grid[i], sharex=ax) for i in range(2))
    colored = np.ones((L, L, 3))
    for s in np.unique(seg):
        if s == 0:
            continue
        colored[mask & (seg[:, None] == s)] = cmap(int(s) % 10)[:3]
    ax.imshow(colored, interpolation="nearest", aspect="auto")
    ax.set(xlabel="key index k", ylabel="query index q")
    for boundary in np.flatnonzero(np.diff(seg)) + 0.5:
        ax.axvline(boundary, color="k", lw=0.4, ls=":")
        ax.axhline(boundary, color="k", lw=0.4, ls=":")
    ax_seg.imshow(seg[None], cmap="tab10", vmin=0, vmax=10, aspect="auto", interpolation="nearest")
    ax_seg.set_yticks([0], ["segment id"])
    ax_pos.imshow(positions, cmap="Greys", aspect="auto", interpolation="nearest")
    ax_pos.set_yticks([0], ["position"])
    for x in [0, *(np.flatnonzero(np.diff(seg)) + 1)]:
        ax_seg.text(x + 0.5, 0, str(seg[x]), va="center", fontsize=6)
        ax_pos.text(x + 0.5, 0, str(positions[0, x]), va="center", fontsize=6, color="C3")
    for a in (ax_seg, ax_pos):
        a.tick_params(axis="x", labelbottom=False, bottom=False)
    ax_seg.set_title(
        f"mask_BQK of one packed training row: {best_segments} document pieces, L = {L}"
    )
    return _save(fig, "packed_mask.png")


def _newest_checkpoint(run: Path) -> tuple[Path, int]:
    ckpt_root = run / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt_root.iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"{ckpt_root} holds no checkpoint")
    return ckpt_root / str(steps[-1]), steps[-1]


def _model_fields(run: Path) -> dict:
    """The model config the run trained: from its checkpoint's meta (train/checkpoint.py),
    which has the vocabulary size filled in, else from config.json."""
    meta = _newest_checkpoint(run)[0] / "meta" / "metadata"
    if meta.is_file():
        return json.loads(meta.read_text())["model"]
    return json.loads((run / "config.json").read_text())["model"]


def _restore_params(run: Path):
    """Parameters of the run's newest checkpoint (STEP/params, or STEP/state['params'])."""
    import orbax.checkpoint as ocp

    step_dir, step = _newest_checkpoint(run)
    with ocp.StandardCheckpointer() as checkpointer:
        if (step_dir / "params").is_dir():
            return checkpointer.restore(step_dir / "params"), step
        return checkpointer.restore(step_dir / "state")["params"], step


def attention_patterns(run: Path, num_tokens: int = 20) -> Path:
    """Attention probabilities of the trained model on the start of a val document.

    The model runs unjitted with `model.attention.reference_attention` wrapped, so the
    figure shows exactly the q, k and mask the model computed, per layer and head.
    """
    from unittest import mock

    import jax
    import jax.numpy as jnp

    from data.pipeline import make_eval_iterator
    from data.prepare import load_prepared_tokenizer
    from model import attention
    from model.config import ModelConfig
    from model.masking import MASK_VALUE
    from model.transformer import LanguageModel

    config = json.loads((run / "config.json").read_text())
    cfg = ModelConfig(**_model_fields(run))
    params, step = _restore_params(run)
    batch = next(make_eval_iterator(_prepared_dir(run), config["data"]["seq_len"], 1))
    tokens = batch["inputs"][:, :num_tokens]
    tokenizer = load_prepared_tokenizer(_prepared_dir(run))
    pieces = [tokenizer.decode([int(t)]) or tokenizer.piece(int(t)) for t in tokens[0]]
    pieces = [p.replace("\n", "\\n").replace(" ", "·") for p in pieces]

    recorded = []
    original = attention.reference_attention

    def recording(q_BQHD, k_BKGD, v_BKGD, mask_BQK, *rest, **options):
        B, Q, H, D = q_BQHD.shape
        G = k_BKGD.shape[2]
        k_BKHD = jnp.repeat(k_BKGD, H // G, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q_BQHD, k_BKHD) * D**-0.5
        scores = jnp.where(mask_BQK[:, None], scores, MASK_VALUE)
        recorded.append(np.asarray(jax.nn.softmax(scores, axis=-1))[0])
        return original(q_BQHD, k_BKGD, v_BKGD, mask_BQK, *rest, **options)

    with mock.patch.object(attention, "reference_attention", recording):
        LanguageModel(cfg.replace(attention_backend="reference")).apply(
            {"params": params}, jnp.asarray(tokens)
        )
    layers = [0, len(recorded) - 1]
    fig, axes = plt.subplots(len(layers), cfg.n_heads, figsize=(2.55 * cfg.n_heads, 5.6))
    ticks = np.arange(num_tokens)
    for row, layer in enumerate(layers):
        for head in range(cfg.n_heads):
            ax = axes[row, head]
            ax.imshow(recorded[layer][head], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ax.set_xticks(ticks, pieces, rotation=90, fontsize=6.5, family="monospace")
            ax.set_yticks(ticks, pieces, fontsize=6.5, family="monospace")
    fig.suptitle(
        f"attention probabilities of the trained model (step {step}), first {num_tokens} tokens "
        "of a val document; rows: queries, columns: keys",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, "attention_patterns.png")


def tokenizer_example(run: Path) -> Path:
    """A real line of code split by the run's tokenizer, as a Markdown table."""
    from data.prepare import load_prepared_tokenizer

    tokenizer = load_prepared_tokenizer(_prepared_dir(run))
    text = "def attention_mask(q_positions, kv_positions):\n    return kv <= q"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.piece(i) for i in ids]
    assert tokenizer.decode(ids) == text  # the round trip the chapter promises
    rows = ["| # | piece | id |", "| ---: | :--- | ---: |"]
    rows += [f"| {k} | `{p}` | {i} |" for k, (p, i) in enumerate(zip(pieces, ids))]
    half = (len(rows) - 2 + 1) // 2
    left, right = rows[2 : 2 + half], rows[2 + half :]
    merged = ["| # | piece | id | # | piece | id |", "| ---: | :--- | ---: | ---: | :--- | ---: |"]
    for k in range(half):
        r = right[k][1:] if k < len(right) else " | | |"
        merged.append(left[k] + r)
    caption = (
        f": The BPE tokenizer of the run in @sec:reproduce (vocabulary "
        f"{tokenizer.vocab_size}) on the {len(text)} characters "
        f"`{text.splitlines()[0]}` + newline + `{text.splitlines()[1].strip()}`: "
        f"{len(ids)} tokens. `▁` is sentencepiece's space; `<0x0A>` is the newline, a "
        "byte-fallback token. `decode(encode(text)) == text`. {#tbl:tokens}"
    )
    md = _output("tokenizer_table.md")
    md.write_text("\n".join(merged) + "\n\n" + caption + "\n")
    return md


# ----------------------------------------------------------------- pipeline run


def _stage_curves(records: list[dict], panels: list[tuple[str, str]], name: str) -> Path:
    """One panel per (metric suffix, title) found in a stage's metrics, over its steps."""
    counts: dict[str, int] = {}
    for record in records:
        for key in record:
            counts[key] = counts.get(key, 0) + 1

    def find(suffix: str) -> str | None:
        """The training series ending in `suffix` (the key most records have: not eval/)."""
        matches = [k for k in counts if has_panel({k}, suffix)]
        return max(matches, key=lambda k: (counts[k], -len(k)), default=None)

    found = [(find(suffix), title) for suffix, title in panels]
    found = [(k, t) for k, t in found if k]
    if not found:
        raise FileNotFoundError(f"no metric of {[p for p, _ in panels]} in the {name} run")
    fig, axes = plt.subplots(1, len(found), figsize=(2.35 * len(found), 2.3), squeeze=False)
    for ax, (key, title) in zip(axes[0], found):
        steps, values = series(records, key)
        ax.plot(steps, values, "o-", ms=2.5, lw=1.1)
        ax.set(xlabel="iteration", title=title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, f"{name}_curves.png")


def has_panel(keys: set[str], suffix: str) -> bool:
    """Whether a stage logged the series a panel shows (its name, or `stage/name`)."""
    return any(k == suffix or k.endswith("/" + suffix) for k in keys)


PPO_PANELS = [  # (metric suffix, title); tests/test_posttrain_resume.py checks PPO logs them
    ("score_mean", "reward-model score"),
    ("kl", "KL to the SFT model (nats)"),
    ("beta", "KL coefficient beta"),
    ("response_length", "response length (tokens)"),
    ("value_explained_variance", "value explained variance"),
]
GRPO_PANELS = [
    ("reward_mean", "verifiable reward (mean)"),
    ("check_parses", "sampled answers that parse"),
    ("frac_groups_all_equal", "groups with equal rewards"),
    ("kl", "k3 KL to the SFT model"),
    ("response_length", "response length (tokens)"),
]


def ppo_curves(pipeline: Path) -> Path:
    """Score, KL, KL coefficient, response length and clipping over PPO iterations."""
    return _stage_curves(read_jsonl(pipeline / "ppo" / "metrics.jsonl"), PPO_PANELS, "ppo")


def grpo_curves(pipeline: Path) -> Path:
    """Verifiable reward, all-equal groups, KL and response length over GRPO iterations."""
    return _stage_curves(read_jsonl(pipeline / "grpo" / "metrics.jsonl"), GRPO_PANELS, "grpo")


GROUND_TRUTH_COLUMNS = (
    "parse_rate",
    "defines_name_rate",
    "verifiable_reward_mean",
    "reward_mean",
    "n",
)


def ground_truth(pipeline: Path) -> Path:
    """The held-out ground truth of the pipeline's report (the main columns), with its checks."""
    from rlhf.ground_truth import comparison_table

    summary = json.loads((pipeline / "report" / "summary.json").read_text())
    table = summary["ground_truth"]
    order = [m for m in ("sft", "ppo", "grpo", "dpo") if m in table]
    order += sorted(set(table) - set(order))
    keep = lambda m: {
        k: v for k, v in table[m].items() if k.split("_ci95")[0] in GROUND_TRUTH_COLUMNS
    }  # noqa: E731
    markdown = comparison_table({m: keep(m) for m in order})
    checks = summary.get("checks", {})
    caption = (
        ": Held-out ground truth of every policy of the CPU pipeline run of @fig:ppo and "
        "@fig:grpo: greedy answers to the prompts of held-out files; rates and means with their "
        "95% intervals; `verifiable_reward_mean` is GRPO's reward (`rlhf/verifier.py`), "
        "`reward_mean` the normalised reward-model score. From `report/summary.json` of that run"
    )
    if checks:
        caption += f"; PPO's final KL to the SFT model: {checks.get('ppo_final_kl', 0):.2f} nats"
    md = _output("ground_truth_table.md")
    md.write_text(markdown + "\n\n" + caption + ". {#tbl:ground-truth}\n")
    return md


# ----------------------------------------------------------------- from the code


def sharding_diagram() -> Path:
    """How the rule table splits two real gpt2-124m weights over a (2, 2, 2) mesh."""
    import jax

    from model.config import get_preset
    from model.transformer import LanguageModel
    from train.sharding import LOGICAL_AXIS_RULES, MeshConfig, make_mesh
    from train.state import abstract_params

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    # Shapes and shardings exactly as training creates them (nothing allocated).
    params = abstract_params(LanguageModel(get_preset("gpt2-124m")), mesh)
    names = [
        ("decoder/block_0/mlp/up", ("embed", "mlp")),
        ("embed/embedding", ("vocab", "embed")),
    ]
    rules = dict(LOGICAL_AXIS_RULES)
    device_id = {d.id: i for i, d in enumerate(mesh.devices.flat)}
    coords = {
        int(d.id): idx for idx, d in np.ndenumerate(mesh.devices)
    }  # device -> (data, fsdp, tensor)

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6), gridspec_kw={"width_ratios": [1, 1.5, 1]})
    # The mesh.
    ax = axes[0]
    ax.set_title("mesh (data=2, fsdp=2, tensor=2)")
    for dev, (d, f, t) in coords.items():
        x, y = t + 2.6 * d, -f
        ax.add_patch(plt.Rectangle((x, y), 0.9, 0.9, fc=f"C{device_id[dev]}", alpha=0.35))
        ax.text(
            x + 0.45, y + 0.45, f"dev {dev}\n({d},{f},{t})", ha="center", va="center", fontsize=6.5
        )
    ax.text(0.95, 1.15, "data = 0", ha="center", fontsize=7)
    ax.text(3.55, 1.15, "data = 1", ha="center", fontsize=7)
    ax.text(-0.35, 0.45, "fsdp 0", rotation=90, va="center", fontsize=6.5)
    ax.text(-0.35, -0.55, "fsdp 1", rotation=90, va="center", fontsize=6.5)
    ax.set(xlim=(-0.6, 4.7), ylim=(-1.3, 1.5), aspect="equal")
    ax.axis("off")
    for ax, (name, logical) in zip(axes[1:], names):
        leaf = params
        for part in name.split("/"):
            leaf = leaf[part]
        shape, sh = leaf.shape, leaf.sharding
        index_map = sh.devices_indices_map(shape)
        blocks: dict[tuple, list[int]] = {}
        for dev, idx in index_map.items():
            key = tuple((s.start or 0, s.stop or n) for s, n in zip(idx, shape))
            blocks.setdefault(key, []).append(int(dev.id))
        for (rows, cols), devs in blocks.items():
            x0, x1 = cols[0] / shape[1], cols[1] / shape[1]
            y0, y1 = rows[0] / shape[0], rows[1] / shape[0]
            ax.add_patch(plt.Rectangle((x0, 1 - y1), x1 - x0, y1 - y0, fc="none", ec="k", lw=0.8))
            for k, dev in enumerate(sorted(devs)):
                ax.add_patch(
                    plt.Rectangle(
                        (x0 + 0.03 + k * (x1 - x0 - 0.06) / len(devs), 1 - y1 + 0.05),
                        (x1 - x0 - 0.06) / len(devs) - 0.01,
                        y1 - y0 - 0.25,
                        fc=f"C{device_id[dev]}",
                        alpha=0.35,
                    )
                )
            ax.text(
                (x0 + x1) / 2,
                1 - y0 - 0.1,
                f"[{rows[0]}:{rows[1]}, {cols[0]}:{cols[1]}]",
                ha="center",
                va="center",
                fontsize=6,
            )
            ax.text(
                (x0 + x1) / 2,
                1 - (y0 + y1) / 2 - 0.05,
                "on " + ", ".join(f"dev {d}" for d in sorted(devs)),
                ha="center",
                va="center",
                fontsize=6.5,
            )
        axis_text = [f"{a} -> {rules[a]}" for a in logical]
        ax.set_title(f"{name} {list(shape)}\nPartitionSpec{tuple(sh.spec)}", fontsize=8)
        ax.set_xlabel(f"dim 1: {axis_text[1]}", fontsize=7)
        ax.set_ylabel(f"dim 0: {axis_text[0]}", fontsize=7)
        ax.set(xlim=(0, 1), ylim=(0, 1), xticks=[], yticks=[])
    fig.tight_layout()
    return _save(fig, "sharding.png")


STATE_MESHES = ((8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8))


def state_memory(preset: str = "llama-7b") -> Path:
    """Bytes of the train state (float32 params and both Adam moments) each device holds,
    for one preset on 8-device meshes: the rule table's shardings, nothing allocated."""
    import jax

    from model.config import get_preset
    from model.transformer import LanguageModel
    from train.optim import OptimConfig, make_optimizer
    from train.sharding import MeshConfig, make_mesh
    from train.state import abstract_train_state, count_params, init_fn

    cfg = get_preset(preset)
    tx = make_optimizer(OptimConfig(total_steps=1000))
    rng = jax.eval_shape(jax.random.key, 0)
    rows = []
    for d, f, t in STATE_MESHES:
        mesh = make_mesh(MeshConfig(data=d, fsdp=f, tensor=t), jax.devices()[:8])
        state, _ = abstract_train_state(init_fn(LanguageModel(cfg)), tx, mesh, rng)
        per_device = sum(
            np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(state)
        )
        rows.append((f"data={d}, fsdp={f}, tensor={t}", per_device / 2**30))
    n_params = count_params(jax.eval_shape(init_fn(LanguageModel(cfg)), rng))
    fig, ax = plt.subplots(figsize=(6.4, 2.5))
    bars = ax.barh([r[0] for r in rows], [r[1] for r in rows], color="C0")
    ax.bar_label(bars, [f"{r[1]:.1f} GiB" for r in rows], fontsize=7, padding=2)
    ax.axvline(80, color="C3", ls="--", lw=0.9, label="80 GiB (one H100)")
    ax.invert_yaxis()
    ax.set(xlabel="GiB of train state per device", xlim=(0, max(r[1] for r in rows) * 1.2))
    ax.set_title(
        f"{preset}: {n_params / 1e9:.2f}B parameters, float32 params + Adam moments, 8 devices"
    )
    ax.legend(frameon=False, fontsize=7, loc="center right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, "state_memory.png")


def lsh_curve() -> Path:
    """P(two documents share a band) against their Jaccard similarity, from data/dedup.py."""
    from data import dedup

    s = np.linspace(0, 1, 201)
    p = 1 - (1 - s**dedup.ROWS) ** dedup.BANDS
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    ax.plot(s, p, lw=1.5, label=f"b = {dedup.BANDS} bands, r = {dedup.ROWS} rows")
    ax.axvline(
        dedup.NEAR_DUP_THRESHOLD,
        ls="--",
        color="gray",
        lw=0.9,
        label=f"threshold {dedup.NEAR_DUP_THRESHOLD}",
    )
    ax.set(xlabel="Jaccard similarity s of the 5-gram sets", ylabel="P(candidate pair)")
    ax.legend(frameon=False, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, "lsh_curve.png")


def kernel_time_breakdown() -> Path:
    """The recorded GPU profile table of BENCHMARKS.md as stacked bars."""
    table = table_under_heading("BENCHMARKS.md", "Where the time goes (kernel profiles, run 3)")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    header, body = rows[0], rows[2:]
    parts = header[1:5]
    fig, ax = plt.subplots(figsize=(7.5, 2.2))
    for i, row in enumerate(body):
        left = 0.0
        for j, part in enumerate(parts):
            value = float(row[1 + j])
            ax.barh(
                i, value, left=left, color=f"C{j}", label=part.split("(")[0] if i == 0 else None
            )
            if value > 6:
                ax.text(left + value / 2, i, f"{value:.0f}", ha="center", va="center", fontsize=6.5)
            left += value
        ax.text(left + 2, i, f"timed step {row[-1]} ms", va="center", fontsize=6.5)
    ax.set_yticks(range(len(body)), [r[0] for r in body], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="ms per step (kernel time, H100, BENCHMARKS.md run 3 profile)")
    ax.set_xlim(0, max(float(r[-2]) for r in body) * 1.3)
    ax.legend(frameon=False, fontsize=6.5, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, "kernel_time.png")


# ----------------------------------------------------------------- driver


def generate(pretrain: Path | None, pipeline: Path | None) -> dict[str, dict]:
    """Runs every generator whose input exists; returns provenance per output file."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[Callable, tuple, str]] = [
        (sharding_diagram, (), "train/sharding.py rule table, gpt2-124m shapes, 8-device mesh"),
        (kernel_time_breakdown, (), "BENCHMARKS.md, 'Where the time goes', run 3 (H100)"),
        (lsh_curve, (), "data/dedup.py constants"),
        (state_memory, (), "train/state.py abstract_train_state, llama-7b, 8-device meshes"),
    ]
    if pretrain:
        src = f"pretraining workdir {pretrain}"
        jobs += [
            (loss_curves, (pretrain,), src),
            (curation, (pretrain,), src),
            (packed_mask, (pretrain,), src),
            (attention_patterns, (pretrain,), src),
            (tokenizer_example, (pretrain,), src),
        ]
    if pipeline:
        src = f"pipeline workdir {pipeline}"
        jobs += [
            (ppo_curves, (pipeline,), src),
            (grpo_curves, (pipeline,), src),
            (ground_truth, (pipeline,), src),
        ]
    provenance_file = FIGURES / "provenance.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    stamp = {"revision": git_revision(), "date": datetime.date.today().isoformat()}
    # Every generator writes into a staging folder; the committed files are replaced only
    # once all of them have succeeded, so a failure leaves docs/figures/ as it was.
    _staging.append(Path(tempfile.mkdtemp(prefix=".staging-", dir=FIGURES)))
    try:
        made = []
        for fn, args, source in jobs:
            outputs = fn(*args)
            for path in outputs if isinstance(outputs, list) else [outputs]:
                made.append(path)
                provenance[path.name] = {
                    "generator": f"docs/figures.py:{fn.__name__}",
                    "source": source,
                    **stamp,
                }
        for path in made:
            os.replace(path, FIGURES / path.name)
            print(f"wrote {FIGURES / path.name}")
    finally:
        shutil.rmtree(_staging.pop(), ignore_errors=True)
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
        ": Every generated file in `docs/figures/`, the function of `docs/figures.py` that made "
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
