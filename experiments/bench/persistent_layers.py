"""A probe, not a kernel the model uses: a decoding step's transformer layers for one
sequence (GPT-2 style: LayerNorm, multi-head attention over a KV cache, a GELU MLP, no
biases; gpt-1.3b's shapes) as ONE persistent Mosaic GPU kernel, timed against the tree's
decoding step (BENCHMARKS.md, "Speed round twenty-nine", change 105). Hopper only.

    python -m experiments.bench.persistent_layers [--layers 24] [--slots 6]
        [--variants "full,attn+combine,norm+mma+attn+combine,sync+norm+mma+attn+combine"]

Why: a decoding token of gpt-1.3b runs about eight kernels a layer, and each pays a ramp
and a tail during which the memory idles (rounds twenty-three to twenty-eight). Here the
layers are phases of one kernel: `programs` programs, one an SM, and five phases a layer
ordered by grid-wide barriers (a global semaphore every program adds 1 to, then waits on):

  1. the residual sum, the first norm (each program normalises the whole row itself), the
     q/k/v product (a program a 64-column tile); k and v go into the caches at slot pos;
  2. attention, a program a (head, 64-slot block of the cache): its normalised output
     and base-2 log-sum-exp;
  3. the blocks' combine and the attention output projection, split four ways over its
     inputs (a program a (column tile, split));
  4. the residual add, the second norm, the up-projection with GELU;
  5. the down-projection, split four ways over its inputs.

Each program's producer warpgroup streams every weight block the program will multiply,
layer after layer, with TMA copies into `slots` buffers, without waiting for the
barriers; the compute warpgroup takes the row as a wgmma operand of 64 equal rows, so a
product tile's rows are equal and its column maximum is the answer. Vectors go from phase
to phase through global memory (the kernel's extra outputs); the split products' partial
sums are added in a fixed order by every program that reads them, so the result does not
depend on timing.

`skip` leaves parts out to time the rest (the values are then wrong): "sync" the
barriers, "norm" the norms and residual sums, "mma" the products, "attn" the attention
phase, "combine" the blocks' combine.

Mosaic GPU's interpreter has no global semaphores: on the CPU the kernel is lowered, not
run (`tests/test_persistent_layers.py`).
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from model.kernels import mgpu_pipeline as mp
from model.kernels.partition import num_sms

CH = 64  # a chunk: the inputs one wgmma takes, the outputs a program owns
BK = 128  # weight rows a streamed block holds
HD = 128  # head dim
SPLITS = 4  # input splits of the attention output and down projections
SKIPPABLE = ("sync", "norm", "mma", "attn", "combine")
_LOG2_E = math.log2(math.e)
_NEG = -1e30


def layers_step(
    pos: jax.Array,
    x_D: jax.Array,
    ln: jax.Array,
    w_qkv: jax.Array,
    w_o: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    slots: int = 6,
    eps: float = 1e-5,
    programs: int = 128,
    skip: tuple[str, ...] = (),
) -> jax.Array:
    """x after every layer [D] (bf16) for the token at `pos` ([1] int32) with input x_D.

    ln [L, 4, D] float32 (norm 1 scale and bias, norm 2 scale and bias); weights [L, in,
    out] bf16; caches [L, S, D]. The caches are written in place at slot pos, as the
    model's decoding step writes them: the probe's caller passes arrays it can spare."""
    L, S, D = k_cache.shape
    F = w_up.shape[2]
    G = programs
    H, NB, DC, FC = D // HD, S // CH, D // CH, F // CH
    n_qkv, n_att, n_out, n_up, n_down = 3 * DC, H * NB, DC * SPLITS, FC, DC * SPLITS
    if D % HD or S % CH or H % SPLITS or FC % SPLITS or D % BK:
        raise ValueError(f"persistent_layers: shapes D={D}, F={F}, S={S} do not tile")
    if max(n_qkv, n_att, n_out, n_up, n_down) > G:
        raise ValueError(
            f"persistent_layers: {max(n_qkv, n_att, n_out, n_up, n_down)} work items a phase "
            f"do not fit {G} programs"
        )
    if G > num_sms():  # a program not yet resident would never arrive at the barrier
        raise ValueError(f"persistent_layers: {G} programs do not fit {num_sms()} SMs at once")
    if set(skip) - set(SKIPPABLE):
        raise ValueError(f"persistent_layers: skip takes {SKIPPABLE}, got {skip}")
    HS = H // SPLITS  # heads a split of the attention output projection reads
    KO, KD = D // SPLITS, F // SPLITS  # inputs a split reads
    nb_qkv, nb_out, nb_up, nb_down = D // BK, KO // BK, D // BK, KD // BK
    dt = w_qkv.dtype
    scale2 = HD**-0.5 * _LOG2_E

    def kernel(pos_ref, x_ref, ln_ref, wqkv_ref, wo_ref, wup_ref, wdown_ref, kc_ref, vc_ref,
               xb_ref, hb_ref, qb_ref, ao_ref, alse_ref, po_ref, ub_ref, pd_ref,
               base_s, parts_s, xl_s, xn_s, ln_s, w_s, k_s, v_s, q_s, ao_s, alse_s, u_s,
               ovec_f, ovec_h, olse_f, ld_bar, w_bar, consumed):  # fmt: skip
        p, wg = lax.axis_index("p"), lax.axis_index("wg")
        pos = pos_ref[0]

        # ---------------------------------------------------------------- producer
        def blocks(li):
            """(weight view of block j, blocks, valid) for each phase with weights."""
            ct_o, s_o = lax.rem(p, DC), lax.div(p, DC)
            return [
                (lambda j: wqkv_ref.at[li, pl.ds(j * BK, BK), pl.ds(p * CH, CH)],
                 nb_qkv, p < n_qkv),
                (lambda j: wo_ref.at[li, pl.ds(s_o * KO + j * BK, BK), pl.ds(ct_o * CH, CH)],
                 nb_out, p < n_out),
                (lambda j: wup_ref.at[li, pl.ds(j * BK, BK), pl.ds(p * CH, CH)], nb_up, p < n_up),
                (lambda j: wdown_ref.at[li, pl.ds(s_o * KD + j * BK, BK), pl.ds(ct_o * CH, CH)],
                 nb_down, p < n_down),
            ]  # fmt: skip

        @pl.when(wg == 1)
        def producer():
            plgpu.set_max_registers(40, action="decrease")

            def layer(li, t):
                for view, nb, valid in blocks(li):

                    @pl.when(valid)
                    def _(view=view, nb=nb, t=t):
                        def issue(j, _):
                            tt = t + j
                            slot = lax.rem(tt, slots)

                            @pl.when(tt >= slots)
                            def _():
                                plgpu.barrier_wait(consumed.at[slot])

                            plgpu.copy_gmem_to_smem(view(j), w_s.at[slot], w_bar.at[slot])

                        lax.fori_loop(0, nb, issue, None)

                    t = t + jnp.where(valid, nb, 0)
                return t

            total = lax.fori_loop(0, L, layer, jnp.int32(0))

            def drain(tt, _):
                plgpu.barrier_wait(consumed.at[lax.rem(tt, slots)])

            lax.fori_loop(jnp.maximum(total - slots, 0), total, drain, None)

        # ---------------------------------------------------------------- compute
        col = plgpu.Layout.WGMMA.reduce(0)  # a vector along a tile's columns
        tile = (64, CH)
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)

        def grid_sync(n):
            if "sync" in skip:
                return
            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
            plgpu.semaphore_wait(sem, n * G, decrement=False, memory_scope="gpu")

        def fetch(pairs):
            """Copies (gmem view, smem ref) pairs, one barrier each, and waits for all."""
            for i, (src, dst) in enumerate(pairs):
                plgpu.copy_gmem_to_smem(src, dst, ld_bar.at[i])
            for i in range(len(pairs)):
                plgpu.barrier_wait(ld_bar.at[i])

        def store(src_smem, dst):
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(src_smem, dst)
            plgpu.wait_smem_to_gmem(0)

        def vload(ref):
            return mp.load(ref, col, False).astype(jnp.float32)

        vt = (64, D // 64)  # a [D] vector as a [64, D / 64] register tile, D / 128 a thread
        W = plgpu.Layout.WGMMA

        def tload(ref):  # a few KB: bank conflicts do not matter
            return mp.load(ref.reshape(*vt), W, False, optimized=False).astype(jnp.float32)

        def everywhere(row_vec):
            """The sum of a row vector's entries, in every entry of a row vector."""
            col_total = jnp.sum(mp.rows(row_vec, tile), axis=0)
            return jnp.max(mp.cols(col_total, tile), axis=1)

        def residual_norm(npart, write_to):
            """x = round(base + round(sum of npart partials)) into xl_s; program 0 writes it
            to `write_to`; then its LayerNorm with the norm in ln_s into xn_s (bf16)."""
            if "norm" in skip:
                return
            y = tload(parts_s.at[0])
            for sp in range(1, npart):
                y = y + tload(parts_s.at[sp])
            x = (tload(base_s) + y.astype(dt).astype(jnp.float32)).astype(dt)
            xl_s.reshape(*vt)[...] = x
            x = x.astype(jnp.float32)
            mean = everywhere(jnp.sum(x, axis=1)) / D
            d = x - mp.rows(mean, vt)
            rstd = lax.rsqrt(everywhere(jnp.sum(d * d, axis=1)) / D + eps)
            xn = d * mp.rows(rstd, vt) * tload(ln_s.at[0]) + tload(ln_s.at[1])
            xn_s.reshape(*vt)[...] = xn.astype(dt)

            @pl.when(p == 0)
            def _():
                store(xl_s, write_to)

        def products(t, nb, a_smem):
            """[CH] float32: the row in chunks a_smem[...] times the next nb streamed blocks."""

            def step(j, acc):
                slot = lax.rem(t + j, slots)
                plgpu.barrier_wait(w_bar.at[slot])
                a = [
                    mp.cols(mp.load(a_smem.at[j * (BK // CH) + c], col, False), tile).astype(dt)
                    for c in range(BK // CH)
                ]

                def body(acc_ref):
                    for c in range(BK // CH):
                        plgpu.wgmma(acc_ref, a[c], w_s.at[slot, pl.ds(c * CH, CH)])

                if "mma" not in skip:
                    acc = pl.run_state(body)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(consumed.at[slot])
                return acc

            zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, nb, step, zeros)
            return jnp.max(acc, axis=0)  # every row is the answer

        @pl.when(wg == 0)
        def compute():
            plgpu.set_max_registers(232, action="increase")

            def layer(li, carry):
                t, n = carry
                first = li == 0

                # ---- phase 1: norm 1, q/k/v; k and v into the caches at slot pos
                @pl.when(first)
                def _():  # the token's input, nothing to add
                    fetch([(x_ref, base_s)])
                    parts_s[...] = jnp.zeros(parts_s.shape, jnp.float32)

                @pl.when(jnp.logical_not(first))
                def _():
                    fetch([(hb_ref, base_s), (pd_ref, parts_s)])

                fetch([(ln_ref.at[li, pl.ds(0, 2)], ln_s)])
                residual_norm(SPLITS, xb_ref)

                @pl.when(p < n_qkv)
                def _():
                    v = products(t, nb_qkv, xn_s)
                    ovec_h[...] = v.astype(dt)

                    @pl.when(p < DC)
                    def _():
                        store(ovec_h, qb_ref.at[p])

                    @pl.when((p >= DC) & (p < 2 * DC))
                    def _():
                        store(ovec_h, kc_ref.at[li, pos, pl.ds((p - DC) * CH, CH)])

                    @pl.when(p >= 2 * DC)
                    def _():
                        store(ovec_h, vc_ref.at[li, pos, pl.ds((p - 2 * DC) * CH, CH)])

                t = t + jnp.where(p < n_qkv, nb_qkv, 0)
                grid_sync(n + 1)

                # ---- phase 2: attention, a program a (head, block of 64 slots)
                @pl.when(p < (0 if "attn" in skip else n_att))
                def _():
                    hh, bb = lax.div(p, NB), lax.rem(p, NB)
                    keys = pl.ds(bb * CH, CH)
                    fetch([
                        (qb_ref.at[pl.ds(hh * 2, 2)], q_s),
                        (kc_ref.at[li, keys, pl.ds(hh * HD, CH)], k_s.at[0]),
                        (kc_ref.at[li, keys, pl.ds(hh * HD + CH, CH)], k_s.at[1]),
                        (vc_ref.at[li, keys, pl.ds(hh * HD, HD)], v_s),
                    ])  # fmt: skip
                    qa = [mp.cols(mp.load(q_s.at[c], col, False), tile).astype(dt) for c in (0, 1)]

                    def scores(acc_ref):
                        for c in (0, 1):
                            plgpu.wgmma(acc_ref, qa[c], mp.transposed(k_s.at[c]))

                    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)
                    s2 = pl.run_state(scores)(plgpu.ACC.init(zeros)) * scale2
                    key = plgpu.layout_cast(lax.iota(jnp.int32, CH), col) + bb * CH
                    visible = mp.cols(key, tile) <= pos
                    s2 = jnp.where(visible, s2, _NEG)
                    m = jnp.max(s2, axis=1)
                    pr = jnp.where(visible, jnp.exp2(s2 - mp.rows(m, tile)), 0.0)
                    lsum = jnp.sum(pr, axis=1)
                    zeros_o = plgpu.layout_cast(
                        jnp.zeros((64, HD), jnp.float32), plgpu.Layout.WGMMA
                    )
                    pa = pr.astype(dt)

                    def values(acc_ref):
                        plgpu.wgmma(acc_ref, pa, v_s)

                    o = pl.run_state(values)(plgpu.ACC.init(zeros_o))
                    seen = lsum > 0
                    o = o / mp.rows(jnp.where(seen, lsum, 1.0), o.shape)
                    ovec_f[...] = jnp.max(o, axis=0)
                    olse_f[...] = jnp.where(
                        seen, m + jnp.log(jnp.where(seen, lsum, 1.0)) * _LOG2_E, _NEG
                    )
                    store(ovec_f, ao_ref.at[p])
                    store(olse_f, alse_ref.at[p])

                grid_sync(n + 2)

                # ---- phase 3: combine the blocks, the attention output projection (a split)
                @pl.when(p < n_out)
                def _():
                    ct, sp = lax.rem(p, DC), lax.div(p, DC)
                    items = pl.ds(sp * HS * NB, HS * NB)
                    fetch([(ao_ref.at[items], ao_s), (alse_ref.at[items], alse_s)])
                    for h in range(HS if "combine" not in skip else 0):
                        lse = [vload(alse_s.at[h * NB + b]) for b in range(NB)]
                        mx = functools.reduce(jnp.maximum, lse)
                        w = [jnp.exp2(x - mx) for x in lse]
                        den = functools.reduce(jnp.add, w)
                        for c in (0, 1):
                            o = functools.reduce(
                                jnp.add,
                                [
                                    w[b] * vload(ao_s.at[h * NB + b, pl.ds(c * CH, CH)])
                                    for b in range(NB)
                                ],
                            )
                            u_s.at[h * 2 + c][...] = (o / den).astype(dt)
                    ovec_f[pl.ds(0, CH)] = products(t, nb_out, u_s)
                    store(ovec_f.at[pl.ds(0, CH)], po_ref.at[sp, ct])

                t = t + jnp.where(p < n_out, nb_out, 0)
                grid_sync(n + 3)

                # ---- phase 4: residual add, norm 2, up-projection with GELU
                fetch([(xb_ref, base_s), (po_ref, parts_s), (ln_ref.at[li, pl.ds(2, 2)], ln_s)])
                residual_norm(SPLITS, hb_ref)

                @pl.when(p < n_up)
                def _():
                    v = products(t, nb_up, xn_s)
                    ovec_h[...] = jax.nn.gelu(v, approximate=True).astype(dt)
                    store(ovec_h, ub_ref.at[p])

                t = t + jnp.where(p < n_up, nb_up, 0)
                grid_sync(n + 4)

                # ---- phase 5: down-projection (a split)
                @pl.when(p < n_down)
                def _():
                    ct, sp = lax.rem(p, DC), lax.div(p, DC)
                    fetch([(ub_ref.at[pl.ds(sp * (FC // SPLITS), FC // SPLITS)], u_s)])
                    ovec_f[pl.ds(0, CH)] = products(t, nb_down, u_s)
                    store(ovec_f.at[pl.ds(0, CH)], pd_ref.at[sp, ct])

                t = t + jnp.where(p < n_down, nb_down, 0)
                grid_sync(n + 5)
                return t, n + 5

            lax.fori_loop(0, L, layer, (jnp.int32(0), jnp.int32(0)))

    f32 = jnp.float32
    out_type = [
        jax.ShapeDtypeStruct((DC, CH), dt),  # xb: the layer's input
        jax.ShapeDtypeStruct((DC, CH), dt),  # hb: after attention
        jax.ShapeDtypeStruct((DC, CH), dt),  # q
        jax.ShapeDtypeStruct((n_att, HD), f32),  # attention blocks' outputs
        jax.ShapeDtypeStruct((n_att, CH), f32),  # and their base-2 log-sum-exp
        jax.ShapeDtypeStruct((SPLITS, DC, CH), f32),  # attention output projection partials
        jax.ShapeDtypeStruct((FC, CH), dt),  # u
        jax.ShapeDtypeStruct((SPLITS, DC, CH), f32),  # down projection partials
    ]
    scratch = [
        plgpu.SMEM((DC, CH), dt),  # base_s
        plgpu.SMEM((SPLITS, DC, CH), f32),  # parts_s
        plgpu.SMEM((DC, CH), dt),  # xl_s
        plgpu.SMEM((DC, CH), dt),  # xn_s
        plgpu.SMEM((2, DC, CH), f32),  # ln_s: a norm's scale and bias
        mp.tile_smem((slots, BK, CH), dt),  # w_s
        mp.tile_smem((2, CH, CH), dt),  # k_s: the block's keys, two halves of the head dim
        mp.tile_smem((CH, HD), dt),  # v_s
        plgpu.SMEM((2, CH), dt),  # q_s
        plgpu.SMEM((HS * NB, HD), f32),  # ao_s
        plgpu.SMEM((HS * NB, CH), f32),  # alse_s
        plgpu.SMEM((max(FC // SPLITS, 2 * HS), CH), dt),  # u_s: a split's inputs
        plgpu.SMEM((HD,), f32),  # ovec_f
        plgpu.SMEM((CH,), dt),  # ovec_h
        plgpu.SMEM((CH,), f32),  # olse_f
        plgpu.Barrier(num_barriers=4),  # ld_bar
        plgpu.Barrier(num_barriers=slots),  # w_bar
        plgpu.Barrier(num_barriers=slots),  # consumed
    ]
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(G,),
        grid_names=("p",),
        num_threads=2,
        thread_name="wg",
        compiler_params=mp.compiler_params(),
    )
    ln_c = ln.reshape(L, 4, DC, CH)
    outs = call(pos, x_D.reshape(DC, CH), ln_c, w_qkv, w_o, w_up, w_down, k_cache, v_cache)
    _, hb, *_, pd = outs
    y = pd.sum(0).astype(dt).astype(f32) + hb.astype(f32)
    return y.astype(dt).reshape(D)


def layers_reference(
    pos: jax.Array, x_D: jax.Array, ln: jax.Array, w_qkv: jax.Array, w_o: jax.Array,
    w_up: jax.Array, w_down: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
    *, eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """The same layers in plain JAX (float32 products of bf16 values, bf16 rounding where
    the model rounds); returns (x, k_cache, v_cache)."""
    L, D, _ = w_qkv.shape
    H = D // HD
    f32, dt = jnp.float32, x_D.dtype
    pos = pos[0]
    r = lambda v: v.astype(dt).astype(f32)  # noqa: E731

    def norm(x, s, b):
        m = x.mean()
        v = ((x - m) ** 2).mean()
        return r((x - m) * lax.rsqrt(v + eps) * s + b)

    x = x_D.astype(f32)
    for li in range(L):
        xn = norm(x, ln[li, 0], ln[li, 1])
        qkv = r(xn @ w_qkv[li].astype(f32))
        q, k, v = jnp.split(qkv, 3)
        k_cache = k_cache.at[li, pos].set(k.astype(dt))
        v_cache = v_cache.at[li, pos].set(v.astype(dt))
        K = k_cache[li].astype(f32).reshape(-1, H, HD)
        V = v_cache[li].astype(f32).reshape(-1, H, HD)
        s = jnp.einsum("hd,shd->hs", q.reshape(H, HD), K) * HD**-0.5
        s = jnp.where(jnp.arange(K.shape[0])[None] <= pos, s, -jnp.inf)
        a = jax.nn.softmax(s, -1)
        o = r(jnp.einsum("hs,shd->hd", a, V).reshape(D))
        x = r(x + r(o @ w_o[li].astype(f32)))
        hn = norm(x, ln[li, 2], ln[li, 3])
        u = r(jax.nn.gelu(hn @ w_up[li].astype(f32), approximate=True))
        x = r(x + r(u @ w_down[li].astype(f32)))
    return x.astype(dt), k_cache, v_cache


def _inputs(L: int, D: int = 2048, F: int = 8192, S: int = 384, seed: int = 0):
    """Random layers at gpt-1.3b's widths (weights scaled by fan-in) and full caches."""
    ks = jax.random.split(jax.random.key(seed), 8)
    bf = jnp.bfloat16
    w = lambda k, i, o: (jax.random.normal(k, (L, i, o)) / i**0.5).astype(bf)  # noqa: E731
    ln = jnp.stack(
        [1 + 0.1 * jax.random.normal(ks[0], (L, D)), 0.1 * jax.random.normal(ks[1], (L, D)),
         1 + 0.1 * jax.random.normal(ks[2], (L, D)), 0.1 * jax.random.normal(ks[3], (L, D))],
        1,
    )  # fmt: skip
    caches = [jax.random.normal(k, (L, S, D)).astype(bf) for k in ks[4:6]]
    x = jax.random.normal(ks[6], (D,)).astype(bf)
    kw = jax.random.split(ks[7], 4)
    weights = (w(kw[0], D, 3 * D), w(kw[1], D, D), w(kw[2], D, F), w(kw[3], F, D))
    return x, ln, weights, caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--slots", type=int, default=6)
    parser.add_argument("--pos", type=int, default=383, help="the token's slot, of 384")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default="full", help="'full' or parts to skip, a+b")
    args = parser.parse_args()
    x, ln, weights, (kc, vc) = _inputs(args.layers)
    pos = jnp.array([args.pos], jnp.int32)
    want, _, _ = jax.jit(layers_reference)(pos, x, ln, *weights, kc, vc)
    gb = sum(w.size for w in weights) * 2 / 1e9
    print("| variant | us a layer | weights' TB/s | largest difference from the reference |")
    print("| --- | ---: | ---: | ---: |")
    for variant in args.variants.split(","):
        skip = () if variant == "full" else tuple(variant.split("+"))
        step = jax.jit(functools.partial(layers_step, slots=args.slots, skip=skip))
        kc2, vc2 = kc.copy(), vc.copy()
        got = step(pos, x, ln, *weights, kc2, vc2)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        times = []
        for _ in range(args.iters + 3):
            start = time.perf_counter()
            jax.block_until_ready(step(pos, x, ln, *weights, kc2, vc2))
            times.append(time.perf_counter() - start)
        t = sorted(times[3:])[args.iters // 2]
        print(f"| {variant} | {t * 1e6 / args.layers:.2f} | {gb / t / 1e3:.2f} | {err:.3g} |")


if __name__ == "__main__":
    main()
