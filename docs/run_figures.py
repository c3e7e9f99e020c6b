"""The guide's figures and tables from real runs: a pretraining workdir (loss curves, the
curation report, a packed batch's mask, attention patterns, the tokenizer) and a pipeline
workdir (PPO and GRPO curves, the held-out ground truth). docs/figures.py runs them."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from docs.plotting import output, read_jsonl, save, series

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
    png = save(fig, "pretrain_loss.png")

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
    md = output("pretrain_table.md")
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
    png = save(fig, "curation.png")

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
    md = output("curation_table.md")
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
    return save(fig, "packed_mask.png")


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
    return save(fig, "attention_patterns.png")


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
    md = output("tokenizer_table.md")
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
    return save(fig, f"{name}_curves.png")


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
    ("no_eos_frac", "answers cut off at the length limit"),
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
    "stopped_rate",
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
        "95% intervals; `stopped_rate` the answers that ended before the length limit, "
        "`verifiable_reward_mean` GRPO's reward (`rlhf/verifier.py`), "
        "`reward_mean` the normalised reward-model score. From `report/summary.json` of that run"
    )
    if checks:
        caption += f"; PPO's final KL to the SFT model: {checks.get('ppo_final_kl', 0):.2f} nats"
    md = output("ground_truth_table.md")
    md.write_text(markdown + "\n\n" + caption + ". {#tbl:ground-truth}\n")
    return md
