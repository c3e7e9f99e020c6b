"""The guide's figures made from the code and BENCHMARKS.md alone, no run needed: the
sharding rule table on a mesh, the train state's memory per mesh, the dedup LSH curve, and
the recorded kernel-time breakdown. docs/figures.py runs them."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from docs.build import table_under_heading
from docs.plotting import save

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
    return save(fig, "sharding.png")


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
    return save(fig, "state_memory.png")


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
    return save(fig, "lsh_curve.png")


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
    return save(fig, "kernel_time.png")
