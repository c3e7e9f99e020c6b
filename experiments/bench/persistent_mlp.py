"""A probe, not a kernel the model uses: a decoding step's MLP (up-projection + GELU, then
the down-projection) for one row as ONE persistent Mosaic GPU kernel, measured in the
project's sampler against the tree's path (BENCHMARKS.md, "Speed round twenty-three",
change 89). Hopper only.

    python -m experiments.bench.persistent_mlp [--variants tree,128-8,256-4] [--rounds 2]
    python -m experiments.bench.persistent_mlp --profile --variants tree,128-8

Why persistent: between two products a decoding step's kernels end and start, and the
memory idles through each tail and ramp. Here the two products are phases of one kernel,
ordered by a grid-wide barrier (a global semaphore: every program adds 1 and waits for all),
while each program's producer warpgroup keeps streaming the next phase's weights with TMA
copies, so the down-projection's first blocks arrive during the barrier.

F/64 programs, one an SM (all resident at once, which the barrier needs). Up: program p
owns columns [64p, 64p + 64) of W_up. Down: program p owns 64 columns (p mod D/64) over
one of `splits` = F/D slices of the inputs; the float32 partial sums are added by XLA with
the bias. The row is a wgmma operand of 64 equal rows (the tensor cores' smallest tile).

A variant is "tree" (the model as committed, with `norm_impl="xla"`) or "bk-slots": weight
rows a streamed block holds, and blocks in flight. In the sampler, a batch-1 sequence runs as
two equal rows (`model/sampling.py`); the patch feeds the kernel row 0 and broadcasts its
output.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from model import layers
from model.kernels import mgpu_pipeline as mp
from model.kernels.partition import num_sms

BN = 64  # output columns a program owns
CH = 64  # inputs a wgmma takes: one 128-byte swizzle tile of bf16
_OUT_ROWS = 8  # rows of the [64, BN] result stored (one tile; row 0 is the answer)
# the model as the probe was measured: norms as kernels of their own, not inside the
# decoding products' kernels ("Speed round twenty-four"), so the MLP takes normed rows
SEPARATE_NORMS = (("norm_impl", "xla"),)


def persistent_mlp(
    x_D: jax.Array, w_up: jax.Array, b_up: jax.Array, w_down: jax.Array, b_down: jax.Array,
    *, bk: int = 128, slots: int = 8,
) -> jax.Array:  # fmt: skip
    """(gelu(x @ w_up + b_up) @ w_down + b_down) for one row x [D], bf16 weights [D, F] and
    [F, D]; GELU in its tanh form, as GPT-2."""
    (D,) = x_D.shape
    F = w_up.shape[1]
    P, down_cols = F // BN, D // BN
    if P % down_cols or D % bk or (F // (P // down_cols)) % bk:
        raise ValueError(f"persistent_mlp: shapes D={D}, F={F} do not tile by {BN} and {bk}")
    if P > num_sms():  # a program not yet resident would never arrive at the barrier
        raise ValueError(f"persistent_mlp: {P} programs do not fit {num_sms()} SMs at once")
    splits = P // down_cols
    kd = F // splits  # inputs of the down-projection a program reads
    n_up, n_down = D // bk, kd // bk
    dtype = w_up.dtype

    def kernel(x_ref, wu_ref, bu_ref, wd_ref, u_ref, part_ref,
               x_smem, u_smem, bu_smem, w_smem, u_out, part_out,
               x_bar, u_bar, bu_bar, w_bar, consumed):  # fmt: skip
        p, wg = lax.axis_index("p"), lax.axis_index("wg")
        col_block, split = lax.rem(p, down_cols), lax.div(p, down_cols)
        streamed = [wu_ref.at[pl.ds(j * bk, bk), pl.ds(p * BN, BN)] for j in range(n_up)]
        streamed += [
            wd_ref.at[pl.ds(split * kd + j * bk, bk), pl.ds(col_block * BN, BN)]
            for j in range(n_down)
        ]

        @pl.when(wg == 1)
        def producer():  # both phases' blocks, with no wait for the barrier between them
            plgpu.set_max_registers(40, action="decrease")
            for t, view in enumerate(streamed):
                if t >= slots:
                    plgpu.barrier_wait(consumed.at[t % slots])
                plgpu.copy_gmem_to_smem(view, w_smem.at[t % slots], w_bar.at[t % slots])
            for t in range(max(0, len(streamed) - slots), len(streamed)):
                plgpu.barrier_wait(consumed.at[t % slots])  # every barrier ends in one phase

        @pl.when(wg == 0)
        def compute():
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(x_ref, x_smem, x_bar.at[0])
            plgpu.copy_gmem_to_smem(bu_ref.at[pl.ds(p * BN, BN)], bu_smem, bu_bar.at[0])
            col = plgpu.Layout.WGMMA.reduce(0)

            def products(t0, n, in_smem):
                """acc [64, BN]: the row in in_smem (chunks of CH) times blocks t0.. t0+n-1."""

                def step(j, acc):
                    slot = lax.rem(t0 + j, slots)
                    plgpu.barrier_wait(w_bar.at[slot])
                    chunks = [in_smem.at[j * (bk // CH) + c] for c in range(bk // CH)]
                    rows = [mp.cols(mp.load(x, col, False), (64, CH)).astype(dtype) for x in chunks]

                    def body(acc_ref):
                        for c, a in enumerate(rows):
                            plgpu.wgmma(acc_ref, a, w_smem.at[slot, pl.ds(c * CH, CH)])

                    acc = pl.run_state(body)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(consumed.at[slot])
                    return acc

                zeros = plgpu.layout_cast(jnp.zeros((64, BN), jnp.float32), plgpu.Layout.WGMMA)
                return lax.fori_loop(0, n, step, zeros)

            plgpu.barrier_wait(x_bar.at[0])
            acc = products(0, n_up, x_smem)
            plgpu.barrier_wait(bu_bar.at[0])
            bias = mp.load(bu_smem, col, False).astype(jnp.float32)
            u_out[...] = jax.nn.gelu(acc + mp.cols(bias, acc.shape), approximate=True).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(u_out.at[pl.ds(0, _OUT_ROWS)], u_ref.at[p])
            plgpu.wait_smem_to_gmem(0)
            # the grid-wide barrier: once every program has added 1, all of u is in memory
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
            plgpu.semaphore_wait(sem, P, decrement=False, memory_scope="gpu")
            chunks = kd // CH
            plgpu.copy_gmem_to_smem(u_ref.at[pl.ds(split * chunks, chunks), 0], u_smem, u_bar.at[0])
            plgpu.barrier_wait(u_bar.at[0])
            part_out[...] = products(n_up, n_down, u_smem)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(part_out.at[pl.ds(0, _OUT_ROWS)], part_ref.at[split, col_block])
            plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct((P, _OUT_ROWS, BN), dtype),  # u: row 0 of each program's tile
            jax.ShapeDtypeStruct((splits, down_cols, _OUT_ROWS, BN), jnp.float32),
        ],
        scratch_types=[
            plgpu.SMEM((D // CH, CH), dtype),  # x in chunks
            plgpu.SMEM((kd // CH, CH), dtype),  # the chunks of u this program reads
            plgpu.SMEM((BN,), dtype),
            mp.tile_smem((slots, bk, BN), dtype),  # streamed weight blocks
            mp.tile_smem((64, BN), dtype),  # u on its way out
            plgpu.SMEM((64, BN), jnp.float32),  # the partial sums on their way out
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_barriers=slots),  # slot consumed
        ],
        grid=(P,),
        grid_names=("p",),
        num_threads=2,
        thread_name="wg",
        compiler_params=mp.compiler_params(),
    )
    _, part = call(x_D.reshape(D // CH, CH), w_up, b_up.astype(dtype), w_down)
    y = part[:, :, 0].reshape(splits, D).sum(0) + b_down.astype(jnp.float32)
    return y.astype(x_D.dtype)


def mlp_reference(
    x_D: jax.Array, w_up: jax.Array, b_up: jax.Array, w_down: jax.Array, b_down: jax.Array
) -> jax.Array:
    h = jax.nn.gelu(x_D[None] @ w_up + b_up, approximate=True)
    return (h @ w_down + b_down)[0]


@contextlib.contextmanager
def patched_model(bk: int, slots: int) -> Iterator[None]:
    """model.layers.MLP with the kernel in one-token GELU decoding steps of one sequence
    (the sampler's two equal rows), for the duration of the block."""
    original = layers.MLP.__call__

    def call(self, x_BLD, decoding=False, *folded):
        if folded:  # (the norm inside the up-projection's kernel: not this probe's form)
            raise ValueError("persistent_mlp's patch takes a model with norm_impl='xla'")
        cfg = self.cfg
        B, L, D = x_BLD.shape
        if not (decoding and B * L <= 2 and cfg.activation == "gelu"):
            return original(self, x_BLD, decoding)
        param = functools.partial(layers.dense_param, self)
        w_up = param("up", (D, cfg.d_ff), ("embed", "mlp"))
        w_down = param("down", (cfg.d_ff, D), ("mlp", "embed"))
        b_up, b_down = jnp.zeros((cfg.d_ff,), w_up.dtype), jnp.zeros((D,), w_up.dtype)
        if cfg.use_bias:
            b_up = param("up_bias", (cfg.d_ff,), ("mlp",), zeros=True)
            b_down = param("down_bias", (D,), ("embed",), zeros=True)
        x_D = x_BLD.reshape(B * L, D)[0].astype(w_up.dtype)
        y_D = persistent_mlp(x_D, w_up, b_up, w_down, b_down, bk=bk, slots=slots)
        return jnp.broadcast_to(y_D, (B, L, D)).astype(cfg.compute_dtype)

    layers.MLP.__call__ = call
    try:
        yield
    finally:
        layers.MLP.__call__ = original


def _variant(name: str):
    if name == "tree":
        return contextlib.nullcontext()
    bk, slots = map(int, name.split("-"))
    return patched_model(bk, slots)


def check(names: list[str]) -> None:
    """The kernel alone against the reference, gpt-1.3b's MLP shapes."""
    D, F = 2048, 8192
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (D,), jnp.bfloat16)
    w_up = (jax.random.normal(ks[1], (D, F)) / D**0.5).astype(jnp.bfloat16)
    b_up = (jax.random.normal(ks[2], (F,)) * 0.1).astype(jnp.bfloat16)
    w_down = (jax.random.normal(ks[3], (F, D)) / F**0.5).astype(jnp.bfloat16)
    b_down = (jax.random.normal(ks[4], (D,)) * 0.1).astype(jnp.bfloat16)
    ref = jax.jit(mlp_reference)(x, w_up, b_up, w_down, b_down).astype(jnp.float32)
    for name in names:
        if name == "tree":
            continue
        bk, slots = map(int, name.split("-"))
        f = jax.jit(functools.partial(persistent_mlp, bk=bk, slots=slots))
        out = f(x, w_up, b_up, w_down, b_down).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        print(f"{name}: largest difference from the reference {err:.2e} of its largest value")


def profile_variant(name: str, tokens: int = 64) -> None:
    """Kernel time a token in the sampler, by kernel (the largest twelve)."""
    from experiments.bench import decode, profile
    from model.sampling import SamplingConfig, sample

    v = decode.DecodeVariant("gpt-1.3b", 1, loop="sampler", model=SEPARATE_NORMS)
    with _variant(name):
        cfg, model, params, prompt = decode._setup(v)
        args = (params, prompt, jnp.full((1,), v.prompt_len, jnp.int32), jax.random.key(2))
        fn = functools.partial(sample, model, cfg=SamplingConfig(tokens, temperature=0))
        compiled = jax.jit(fn).lower(*args).compile()
        r = profile.trace(lambda: compiled(*args), 2, tempfile.mkdtemp(), compiled.as_text())
    print(f"{name}: {r['kernel_ms_per_step'] / tokens * 1e3:.1f} us of kernels a token")
    for kernel_name, ms, origin in r["top_kernels_ms_per_step"][:12]:
        print(f"  {ms / tokens * 1e3:8.2f} us  {kernel_name[:50]:50s} {origin[-60:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="tree,128-8,256-4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="kernel time by kernel instead")
    args = parser.parse_args()
    from experiments.bench import ceilings, decode

    names = args.variants.split(",")
    check(names)
    if args.profile:
        for name in names:
            profile_variant(name)
        return
    v = decode.DecodeVariant("gpt-1.3b", 1, loop="sampler", model=SEPARATE_NORMS)
    copy = ceilings.measure(size_mib=1024, iters=5)["copy_GBps"]
    rows = []
    for rnd in range(args.rounds):
        for name in names:
            with _variant(name):
                r = decode.run_sampler(v, copy, iters=args.iters)
            rows.append((rnd, name, r["step_ms"], r["roofline_frac"]))
    print(f"copy ceiling {copy:.0f} GB/s\n| round | variant | ms/token | of the copy roofline |")
    print("| --- | --- | ---: | ---: |")
    for rnd, name, ms, frac in rows:
        print(f"| {rnd} | {name} | {ms:.4f} | {100 * frac:.1f}% |")


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_enable_command_buffers_during_profiling=true")
    main()
