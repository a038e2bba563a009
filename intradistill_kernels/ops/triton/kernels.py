"""Triton kernels of the fused K-pass loss: the same algorithm as the C++ kernels (reference.py is
the specification they are tested against).

One program handles one token: its K logit rows are held together as a [K_PAD, BLOCK_V] tile, so
the mean logit z̄ of a class is a reduction over axis 0 and every per-pass quantity a reduction
over axis 1. The loop over V is sequential inside the program and no atomics are used, so every
result is bitwise reproducible.

Sweeps (their sm_90 machine code is what benchmarks/gpu_model.py counts; docs/design.md §2.5):
every loop over V runs its full blocks unmasked and only the last, partial block masked, so the
bulk of a sweep does no bounds test and no -inf fill. The statistics sweep keeps its online max m,
S, A and Σ z per pass *and thread* ([K_PAD, BLOCK_V // G], G the classes of a row one thread
holds): a block rescales within the thread, and the threads' states are combined (max, rescale,
sum) once after the sweep. A reduction over the whole block per iteration cost 91 shuffles, 6
barriers and shared-memory round trips in every iteration (bf16, K = 3). The gradient sweep folds
its per-pass terms into c_k and its per-class ones into q (_grad_tile). Padded passes (K < K_PAD)
are constants the compiler sees, so their share of every reduction over passes folds away.

Addressing: element (k, n, v) of the logits is at
    base + row_off[n] + k * stride_k + v * stride_v
which covers any strided [K, *B, V] view without a copy (row_off folds all batch dimensions).
Every product of an index and a stride is formed in int64: a contiguous [3, N, 128256] tensor puts
pass 2 beyond 2^31 elements from N = 8373 tokens, where 32-bit offsets wrap to a wild address.
Rows whose target is negative are inactive: their outputs (and gradients) are written as zeros.
ALIGN (host-computed) is a power of two dividing every row offset; without that hint the compiler
cannot prove 16-byte alignment of an offset loaded from memory and falls back to scalar loads.

Precision: a common offset c of the logits (all classes, all passes) leaves every result unchanged,
and the kernels keep it so in fp32 by never rounding a value of c's magnitude before the
difference that cancels it. Each difference below is of two nearby fp32 numbers, hence exact
(Sterbenz): z − m_k for the softmax and for log p_k = (z − m_k) − log S_k, z − max_k z per class
for z − z̄, m_k − z_k[y] and z − z_k[y] for cross-entropy. Forming z̄ or lse_k first would round at c's magnitude (1e4: errors of 1e-3
absolute in z − z̄ and lse_k − z_k[y], i.e. 5e-4 relative in X and CE).
The saved lse_k is one fp32 number, so the backward's p_k = exp(z − lse_k) carries its rounding:
a relative error of at most 2^-24·|lse_k| (6e-8 at |lse| = 1, 6e-4 at a common offset of 1e4).
Exponentials are ex2.approx.ftz (_exp): results below 2^-126 (1.2e-38) are 0. S_k's largest term
is 1, so its flushed terms change it by at most V·2^-126 relative (1.5e-33 at V = 128256), and A_k
by as much relative to S_k; a flushed probability changes its gradient element by less than 2^-126
times its coefficient, where the tolerance table allows 2e-5 of the largest gradient. The -inf
rule is decided on the logits, not on e > 0, so flushing cannot turn +inf into a finite X
(tests/test_kernel_hardening.py). The CUDA kernels (--use_fast_math) flush the same way.

Logit transforms (constexprs SCALE, SOFTCAP; runtime floats logit_scale, softcap): every load goes
through _transform, so all statistics are of t = softcap·tanh(logit_scale·z / softcap) and the
gradient is taken w.r.t. t, then multiplied by dt/dz (_chain). -inf stays -inf (padding stays
masked; tanh would send it to -softcap) and its gradient is 0. HAS_Z adds the gradient of the
z-loss term (1/K) Σ_k lse_k², whose value the caller forms from the returned lse.

One-pass forward (EARLY): when the caller knows each row's weights before the forward (the loss is
the last op of the step), the forward kernel writes the gradient too, in one more sweep over the
token's rows right after the sweep(s) that produced lse_k and s_k. Bytes model: an element is
re-read one row-sweep after its first read, and in that time every resident program streams its
own rows through the same L2, so the re-read hits L2 when (resident programs)·K·V·bytes fits in
it: 132 SMs × 2 programs × K·V·2 bytes against H100/H200's 50 MB holds up to K·V ≈ 95k in bf16
(K = 3, V = 32000: 192 KB per row). Then each element costs one HBM read and one HBM write (4 bytes
per element in bf16) instead of the two-pass path's two reads and one write (6 bytes); beyond
that (K = 3, V = 128256: 770 KB per row, 200 MB in flight) the re-read goes to HBM and the
one-pass forward moves the two-pass bytes, saving only the backward launch and its lse/stat reads.
JS needs its KL_k sweep before the gradient sweep (KL_k enters every element's gradient), so it
sweeps the rows three times: still one HBM read where they fit in L2.
The gradient sweep is _grad_tile, the very code of the exact backward kernel, on the same fp32
lse_k and s_k the forward stores: both paths write the same bits. In place (grad is the logits),
each tile is loaded whole before its gradient is stored, and no later sweep reads it again.
"""

import os

import triton
import triton.language as tl

# The interpreter (the test suite without a GPU) passes every scalar argument as a tensor, so a
# kernel cannot see there that the launcher's unit class stride is a compile-time constant; it
# takes the unit-stride path, the one compiled for contiguous rows on a GPU.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp(x):
    """e^x as 2^(x·log2 e): ex2.approx.ftz, one MUFU.EX2 after the multiply. tl.exp's non-ftz ex2
    spends three more issue slots per element (a compare, halving the argument below -126 and
    squaring the result) on results below 2^-126, which this flushes to 0 (module docstring,
    Precision)."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _log(x):
    """ln x for x >= 2^-126 (sums of exponentials whose largest term is 1): lg2.approx.ftz."""
    return tl.log2(x) * LN2


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pass_max(x):
    """max over passes (axis 0), NaN-propagating: the max with a padded pass's constant -inf
    then folds away at compile time, which maxnum's NaN rule forbids. A NaN logit makes its
    class's statistics NaN either way."""
    return tl.reduce(x, 0, _max_nan)


@triton.jit
def _pass_sum(x, kmask):
    """Σ over the real passes (axis 0); padded passes add -0.0, which folds away (x + -0 = x)."""
    return tl.sum(tl.where(kmask[:, None], x, -0.0), axis=0)


@triton.jit
def _lane_sum(x, G: tl.constexpr, UNIT: tl.constexpr):
    """[R, BLOCK_V] -> [R, BLOCK_V // G]: the sums of the G classes of a row that one thread holds.
    At unit class stride a thread holds G consecutive classes (one 16-byte load, launch_config);
    at any other stride one class every BLOCK_V // G (the layout of unvectorised loads). Either
    way the reduction stays in the thread's registers."""
    if UNIT:
        return tl.sum(tl.reshape(x, [x.shape[0], x.shape[1] // G, G]), axis=2)
    return tl.sum(tl.reshape(x, [x.shape[0], G, x.shape[1] // G]), axis=1)


@triton.jit
def _lane_max(x, G: tl.constexpr, UNIT: tl.constexpr):
    """As _lane_sum, the maxima."""
    if UNIT:
        return tl.max(tl.reshape(x, [x.shape[0], x.shape[1] // G, G]), axis=2)
    return tl.max(tl.reshape(x, [x.shape[0], G, x.shape[1] // G]), axis=1)


@triton.jit
def _lane_expand(x, G: tl.constexpr, UNIT: tl.constexpr):
    """[R, BLOCK_V // G] -> [R, BLOCK_V]: each thread's value for each of its G classes."""
    if UNIT:
        y = tl.broadcast_to(x[:, :, None], (x.shape[0], x.shape[1], G))
    else:
        y = tl.broadcast_to(x[:, None, :], (x.shape[0], G, x.shape[1]))
    return tl.reshape(y, [x.shape[0], x.shape[1] * G])


@triton.jit
def _load_tile(row_ptr, ks, vs, kmask, V, stride_k, stride_v, MASKED: tl.constexpr):
    """The [K_PAD, BLOCK_V] tile of classes vs; -inf where masked. MASKED = False: every class of
    vs is below V (the sweep's full blocks), so the padded passes' mask is all there is and it is
    known at compile time: no per-element compare or -inf fill."""
    if MASKED:
        msk = kmask[:, None] & (vs < V)[None, :]
    else:
        msk = tl.broadcast_to(kmask[:, None], (kmask.shape[0], vs.shape[0]))
    offs = ks.to(tl.int64)[:, None] * stride_k + vs.to(tl.int64)[None, :] * stride_v
    z = tl.load(row_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
    # The padded passes as a constant the compiler sees (a masked load's fill is opaque to it):
    # their share of every reduction over passes, and their own accumulators, then fold away.
    return tl.where(kmask[:, None], z, float("-inf")), msk


@triton.jit
def _softcap(x, softcap):
    """softcap·tanh(x / softcap) in fp32 from one exp (tl.tanh is missing from some Triton
    versions); exp(-2|x|/softcap) <= 1 never overflows. Near 0 the result's absolute error is a
    few units of softcap·2^-24, the rounding any fp32 value of magnitude softcap carries anyway."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E / softcap))
    th = softcap * ((1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -th, th)


@triton.jit
def _transform(z, logit_scale, softcap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """t = softcap·tanh(logit_scale·z / softcap); a -inf logit (masked padding) stays -inf."""
    if SCALE:
        z = z * logit_scale
    if SOFTCAP:
        z = tl.where(z == float("-inf"), z, _softcap(z, softcap))
    return z


@triton.jit
def _load_t(row_ptr, ks, vs, kmask, V, stride_k, stride_v, logit_scale, softcap,
            SCALE: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    z, msk = _load_tile(row_ptr, ks, vs, kmask, V, stride_k, stride_v, MASKED)
    return _transform(z, logit_scale, softcap, SCALE, SOFTCAP), msk


@triton.jit
def _chain(g, t, logit_scale, softcap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """g·dt/dz: dt/dz = logit_scale·(1 − (t/softcap)²) from the transformed t, 0 at t = -inf."""
    if SOFTCAP:
        q = t * (1.0 / softcap)
        dt = (1.0 - q) * (1.0 + q)
        if SCALE:
            dt = dt * logit_scale
        g = tl.where(t == float("-inf"), 0.0, g * dt)
    elif SCALE:
        g = g * logit_scale
    return g


@triton.jit
def _deviation(z, kmask, K: tl.constexpr):
    """d = z − z̄ per class, from differences against the class's largest logit: exact where the
    K logits of a class are close, however large they are (z̄ itself would round at their size).
    Also returns, per class, whether some pass is at -inf and whether every pass is (padded
    passes hold -inf and are left out). d is NaN at a class at -inf everywhere: callers mask it."""
    top = _pass_max(z)
    t = z - tl.where(top == float("-inf"), 0.0, top)[None, :]
    t_bar = _pass_sum(t, kmask) * (1.0 / K)
    return t - t_bar[None, :], t_bar == float("-inf"), top == float("-inf")


@triton.jit
def _log_mean_prob(p, kmask, ln_k):
    """log p̄ per class from the [K_PAD, BLOCK_V] probabilities p_k (0 at padded passes), as
    log Σ_k p_k − ln K: p_k <= 1 needs no shift, and Σ_k p_k is at least its largest term, so it
    is never below 2^-126 where some p_k is not 0 (Σ_k p_k / K could be, and a flushed log
    argument would give -inf). A class whose p_k are all 0 gets -inf, which its p_k = 0 masks.
    ln_k is _log(K), not tl.log(K): the two differ in the last bit, and equal p_k (one class, or
    identical passes at p_k = 1) must give log p̄ = log p_k and a divergence of exactly 0."""
    return _log(_pass_sum(p, kmask)) - ln_k


@triton.jit
def _row_weights(w_ce_ptr, w_div_ptr, w_z_ptr, n, K: tl.constexpr, HAS_CE: tl.constexpr, HAS_Z: tl.constexpr):
    """The row's weights divided by K: d(row value)/d(per-pass value) is 1/K for the mean CE,
    the divergence and the mean of lse_k² alike."""
    w_div = tl.load(w_div_ptr + n) / K
    w_ce = w_div
    w_z = w_div
    if HAS_CE:
        w_ce = tl.load(w_ce_ptr + n) / K
    if HAS_Z:
        w_z = tl.load(w_z_ptr + n) / K
    return w_ce, w_div, w_z


# --------------------------------------------------------------------------- statistics sweep

@triton.jit
def _stats_tile(row, v0, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, ref_y, m, s, a, zs,
                K: tl.constexpr, BLOCK_V: tl.constexpr, G: tl.constexpr, UNIT: tl.constexpr, SMOOTH: tl.constexpr,
                JS: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """One block of the online statistics, into per-thread accumulators (one value per pass and
    thread, [K_PAD, BLOCK_V // G]): no value crosses a thread until the sweep ends."""
    vs = v0 + tl.arange(0, BLOCK_V)
    z, msk = _load_t(row, ks, vs, kmask, V, stride_k, stride_v, logit_scale, softcap, SCALE, SOFTCAP, MASKED)
    if SMOOTH:
        zs += _lane_sum(tl.where(msk, z - ref_y[:, None], 0.0), G, UNIT)
    m_new = tl.maximum(m, _lane_max(z, G, UNIT))
    # A thread whose classes are -inf so far keeps m = -inf; shifting by 0 avoids (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = _exp(m - m_safe)
    e = _exp(z - _lane_expand(m_safe, G, UNIT))
    s = s * scale + _lane_sum(e, G, UNIT)
    if not JS:
        # A class at -inf in every pass adds 0. One at -inf in some passes but not all makes
        # KL(p̄ ‖ p_k) = +inf exactly; deciding that on the logits, not on e > 0, keeps it +inf
        # where the finite passes' e underflows in fp32. A NaN logit gives e·d = NaN.
        d, some_inf, all_inf = _deviation(z, kmask, K)
        ed = tl.where(some_inf[None, :], tl.where(all_inf, 0.0, float("inf"))[None, :], e * d)
        # +inf stays +inf: rescaling it by a scale that underflowed to 0 would make it NaN.
        a = tl.where(a == float("inf"), a, a * scale + _lane_sum(ed, G, UNIT))
    return m_new, s, a, zs


@triton.jit
def _kl_tile(row, v0, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, mx, log_s, ln_k, kl,
             K: tl.constexpr, BLOCK_V: tl.constexpr, G: tl.constexpr, UNIT: tl.constexpr, SCALE: tl.constexpr,
             SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """One block of KL_k = Σ p_k (log p_k − log p̄), per pass and thread (summed after the sweep)."""
    vs = v0 + tl.arange(0, BLOCK_V)
    z, msk = _load_t(row, ks, vs, kmask, V, stride_k, stride_v, logit_scale, softcap, SCALE, SOFTCAP, MASKED)
    # log p_k = (z - m_k) - log S_k, both differences small whatever the logits' offset.
    logp = tl.where(kmask[:, None], (z - mx[:, None]) - log_s[:, None], float("-inf"))
    p = tl.where(kmask[:, None], _exp(logp), 0.0)
    r = logp - _log_mean_prob(p, kmask, ln_k)[None, :]
    return kl + _lane_sum(tl.where(p == 0.0, 0.0, p * r), G, UNIT)


# --------------------------------------------------------------------------- gradient sweep

@triton.jit
def _grad_coefficients(lse, stat, w_ce, w_div, w_z, kmask, HAS_CE: tl.constexpr, JS: tl.constexpr,
                       HAS_Z: tl.constexpr):
    """c_k of the gradient's per-pass part p_k ⊙ (w_div·u_k + c_k) (see _grad_tile); 0 at padded
    passes, so that their gradient is a constant the compiler drops."""
    if JS:
        c = -w_div * stat
    else:
        c = w_div * (1.0 - stat)
    if HAS_CE:
        c += w_ce
    if HAS_Z:
        c += 2.0 * w_z * lse
    return tl.where(kmask, c, 0.0)


@triton.jit
def _grad_tile(t, is_y, lse, c, w_ce, w_div, kmask, V, label_smoothing, logit_scale, softcap,
               K: tl.constexpr, HAS_CE: tl.constexpr, SMOOTH: tl.constexpr, JS: tl.constexpr,
               SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """The gradient w.r.t. the raw logits of one [K_PAD, BLOCK_V] tile of transformed logits t,
    shared by the backward kernel and the one-pass forward, with the per-pass terms folded into
    c_k (_grad_coefficients) and the per-class ones into q:
        X:  g_k = p_k ⊙ (w_div·d_k + c_k) − q,  c_k = w_div(1 − s_k) + w_ce + 2 w_z lse_k,
            q = w_div·p̄ + w_ce((1−ε)·onehot(y) + ε/V)
            (∂X/∂t_j = (1/K) [p_j ⊙ (d_j − s_j + 1) − p̄]; ∂CE_k/∂t_k = p_k − (1−ε)·onehot(y) − ε/V;
             ∂lse_k²/∂t_k = 2·lse_k·p_k; the weights carry the 1/K)
        JS: g_k = p_k ⊙ (w_div·r_k + c_k) − q,  c_k = −w_div KL_k + w_ce + 2 w_z lse_k,
            q = w_ce((1−ε)·onehot(y) + ε/V)     (∂JS/∂t_j = (1/K) p_j ⊙ (r_j − KL_j))
    The p_k-proportional part is 0 where p_k = 0 (a class at -inf, whose u_k is not finite)."""
    p = tl.where(kmask[:, None], _exp(t - lse[:, None]), 0.0)
    if JS:
        u = (t - lse[:, None]) - _log_mean_prob(p, kmask, _log(K * 1.0))[None, :]
        q = tl.zeros(is_y.shape, tl.float32)
    else:
        u, _, _ = _deviation(t, kmask, K)
        q = _pass_sum(p, kmask) * (w_div / K)
    g = tl.where(p == 0.0, 0.0, p * (w_div * u + c[:, None]))
    if HAS_CE:
        hot = w_ce * (1.0 - label_smoothing)
        if SMOOTH:
            q += tl.where(is_y, hot, 0.0) + w_ce * label_smoothing / V
        else:
            q += tl.where(is_y, hot, 0.0)
    return _chain(g - q[None, :], t, logit_scale, softcap, SCALE, SOFTCAP)


@triton.jit
def _grad_block(row, grad_row, grad_k_offs, v0, ks, kmask, y, lse, c, w_ce, w_div, V, stride_k, stride_v,
                grad_stride_v, label_smoothing, logit_scale, softcap,
                K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_CE: tl.constexpr, SMOOTH: tl.constexpr,
                JS: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    vs = v0 + tl.arange(0, BLOCK_V)
    t, msk = _load_t(row, ks, vs, kmask, V, stride_k, stride_v, logit_scale, softcap, SCALE, SOFTCAP, MASKED)
    # The target against the block's own class numbers, in 32 bits: compared with vs, which the
    # addresses widen to 64 bits anyway, LLVM compared in 64 bits (two instructions per class).
    is_y = tl.arange(0, BLOCK_V) == y - v0
    g = _grad_tile(t, is_y, lse, c, w_ce, w_div, kmask, V, label_smoothing, logit_scale, softcap,
                   K, HAS_CE, SMOOTH, JS, SCALE, SOFTCAP)
    ptrs = grad_row + grad_k_offs + vs.to(tl.int64)[None, :] * grad_stride_v
    tl.store(ptrs, g.to(grad_row.dtype.element_ty), mask=msk)


@triton.jit
def _store_zeros(grad_row, grad_k_offs, ks, kmask, V, grad_stride_v, BLOCK_V: tl.constexpr, K_PAD: tl.constexpr):
    grad_ty = grad_row.dtype.element_ty
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        msk = kmask[:, None] & (vs < V)[None, :]
        ptrs = grad_row + grad_k_offs + vs.to(tl.int64)[None, :] * grad_stride_v
        tl.store(ptrs, tl.zeros([K_PAD, BLOCK_V], tl.float32).to(grad_ty), mask=msk)


@triton.jit
def _grad_sweep(row, grad_row, ks, kmask, y, lse, stat, w_ce, w_div, w_z, V, stride_k, stride_v, grad_stride_k,
                grad_stride_v, label_smoothing, logit_scale, softcap,
                K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_CE: tl.constexpr, SMOOTH: tl.constexpr,
                JS: tl.constexpr, HAS_Z: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
                SPLIT: tl.constexpr):
    """One sweep over a token's rows writing their gradient: the exact backward's loop, and the
    one-pass forward's second sweep (same code, so both write the same bits). SPLIT: the full
    blocks run unmasked, the last partial one masked (see _split)."""
    grad_k_offs = ks.to(tl.int64)[:, None] * grad_stride_k
    c = _grad_coefficients(lse, stat, w_ce, w_div, w_z, kmask, HAS_CE, JS, HAS_Z)
    # 0 <= y < V < 2^31 for an active row: the class compare is in 32 bits (_grad_block).

    y = y.to(tl.int32)
    if SPLIT:
        v_full = tl.multiple_of((V // BLOCK_V) * BLOCK_V, BLOCK_V)
        for v0 in range(0, v_full, BLOCK_V):
            _grad_block(row, grad_row, grad_k_offs, v0, ks, kmask, y, lse, c, w_ce, w_div, V, stride_k, stride_v,
                        grad_stride_v, label_smoothing, logit_scale, softcap,
                        K, BLOCK_V, HAS_CE, SMOOTH, JS, SCALE, SOFTCAP, False)
        if v_full < V:
            _grad_block(row, grad_row, grad_k_offs, v_full, ks, kmask, y, lse, c, w_ce, w_div, V, stride_k, stride_v,
                        grad_stride_v, label_smoothing, logit_scale, softcap,
                        K, BLOCK_V, HAS_CE, SMOOTH, JS, SCALE, SOFTCAP, True)
    else:
        for v0 in range(0, V, BLOCK_V):
            _grad_block(row, grad_row, grad_k_offs, v0, ks, kmask, y, lse, c, w_ce, w_div, V, stride_k, stride_v,
                        grad_stride_v, label_smoothing, logit_scale, softcap,
                        K, BLOCK_V, HAS_CE, SMOOTH, JS, SCALE, SOFTCAP, True)


# --------------------------------------------------------------------------- kernels

@triton.jit
def _forward_kernel(
    logits_ptr, row_off_ptr, target_ptr,
    ce_ptr, div_ptr, lse_ptr, stat_ptr,
    w_ce_ptr, w_div_ptr, w_z_ptr, grad_ptr, grad_row_off_ptr,
    N, V, stride_k, stride_v, grad_stride_k, grad_stride_v, label_smoothing, logit_scale, softcap,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_CE: tl.constexpr, SMOOTH: tl.constexpr, JS: tl.constexpr, ALIGN: tl.constexpr,
    SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_Z: tl.constexpr, EARLY: tl.constexpr,
):
    # Classes of a row per thread: one 16-byte group (launch_config). UNIT: the launcher's unit
    # class stride, a compile-time constant, puts them side by side (see _lane_sum) and lets the
    # sweeps run their full blocks unmasked. At a run-time stride every block stays masked: the
    # unmasked loop's per-element 64-bit offsets are loop-invariant, and LLVM kept all of them
    # live (216 registers, bf16, K = 3).
    G: tl.constexpr = min(BLOCK_V, 128 // logits_ptr.dtype.element_ty.primitive_bitwidth)
    UNIT: tl.constexpr = INTERPRETED or not isinstance(stride_v, tl.tensor)
    SPLIT: tl.constexpr = UNIT and (INTERPRETED or not isinstance(grad_stride_v, tl.tensor))

    n = tl.program_id(0)
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    stat_offs = ks.to(tl.int64) * N + n
    y = tl.load(target_ptr + n)
    if y < 0:
        tl.store(ce_ptr + n, 0.0)
        tl.store(div_ptr + n, 0.0)
        tl.store(lse_ptr + stat_offs, tl.zeros([K_PAD], tl.float32), mask=kmask)
        tl.store(stat_ptr + stat_offs, tl.zeros([K_PAD], tl.float32), mask=kmask)
        if EARLY:
            grad_row = grad_ptr + tl.multiple_of(tl.load(grad_row_off_ptr + n), ALIGN)
            _store_zeros(grad_row, ks.to(tl.int64)[:, None] * grad_stride_k, ks, kmask, V, grad_stride_v,
                         BLOCK_V, K_PAD)
        return
    row = logits_ptr + tl.multiple_of(tl.load(row_off_ptr + n), ALIGN)
    ref_y = tl.zeros([K_PAD], tl.float32)
    if HAS_CE:
        z_y = tl.load(row + ks.to(tl.int64) * stride_k + y * stride_v, mask=kmask, other=0.0).to(tl.float32)
        z_y = _transform(z_y, logit_scale, softcap, SCALE, SOFTCAP)
        # Cross-entropy is taken relative to the target logit (any finite reference would do).
        ref_y = tl.where(z_y == float("-inf"), 0.0, z_y)

    # One online sweep: running max m, S = Σ e^(z-m), A = Σ e^(z-m)·(z - z̄), Σ (z - ref_y), each
    # per thread (one running max per pass and thread), combined once after the sweep.
    m = tl.full([K_PAD, BLOCK_V // G], float("-inf"), tl.float32)
    s = tl.zeros([K_PAD, BLOCK_V // G], tl.float32)
    a = tl.zeros([K_PAD, BLOCK_V // G], tl.float32)
    zs = tl.zeros([K_PAD, BLOCK_V // G], tl.float32)
    v_full = tl.multiple_of((V // BLOCK_V) * BLOCK_V, BLOCK_V)
    if UNIT:
        for v0 in range(0, v_full, BLOCK_V):
            m, s, a, zs = _stats_tile(row, v0, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, ref_y, m, s, a,
                                      zs, K, BLOCK_V, G, UNIT, SMOOTH, JS, SCALE, SOFTCAP, False)
        if v_full < V:
            m, s, a, zs = _stats_tile(row, v_full, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, ref_y, m, s,
                                      a, zs, K, BLOCK_V, G, UNIT, SMOOTH, JS, SCALE, SOFTCAP, True)
    else:
        for v0 in range(0, V, BLOCK_V):
            m, s, a, zs = _stats_tile(row, v0, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, ref_y, m, s, a,
                                      zs, K, BLOCK_V, G, UNIT, SMOOTH, JS, SCALE, SOFTCAP, True)
    mx = tl.max(m, axis=1)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    f = _exp(m - mx_safe[:, None])
    s_sum = tl.sum(s * f, axis=1)
    log_s = tl.log(s_sum)

    if JS:
        # Second sweep: KL_k = Σ p_k (log p_k - log p̄); log p̄ needs every lse_k first.
        kl = tl.zeros([K_PAD, BLOCK_V // G], tl.float32)
        ln_k = _log(K * 1.0)
        if UNIT:
            for v0 in range(0, v_full, BLOCK_V):
                kl = _kl_tile(row, v0, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, mx, log_s, ln_k, kl,
                              K, BLOCK_V, G, UNIT, SCALE, SOFTCAP, False)
            if v_full < V:
                kl = _kl_tile(row, v_full, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, mx, log_s, ln_k,
                              kl, K, BLOCK_V, G, UNIT, SCALE, SOFTCAP, True)
        else:
            for v0 in range(0, V, BLOCK_V):
                kl = _kl_tile(row, v0, ks, kmask, V, stride_k, stride_v, logit_scale, softcap, mx, log_s, ln_k, kl,
                              K, BLOCK_V, G, UNIT, SCALE, SOFTCAP, True)
        stat = tl.sum(kl, axis=1)
    else:
        stat = tl.sum(tl.where(a == float("inf"), a, a * f), axis=1) / s_sum
    # 0 at padded passes (what the exact backward loads there): as constants, their accumulators
    # are dead code.
    lse = tl.where(kmask, mx + log_s, 0.0)
    stat = tl.where(kmask, stat, 0.0)
    tl.store(div_ptr + n, tl.sum(stat, axis=0) / K)
    tl.store(lse_ptr + stat_offs, lse, mask=kmask)
    tl.store(stat_ptr + stat_offs, stat, mask=kmask)

    if HAS_CE:
        # CE_k = lse_k − (1−ε)·z_y − ε·mean_v z, every term relative to ref_y.
        ce_k = (mx - ref_y) + log_s
        if SMOOTH:
            ce_k = ce_k - (1.0 - label_smoothing) * (z_y - ref_y) - (label_smoothing / V) * tl.sum(zs, axis=1)
        else:
            ce_k = ce_k - (z_y - ref_y)
        tl.store(ce_ptr + n, tl.sum(tl.where(kmask, ce_k, 0.0), axis=0) / K)
    else:
        tl.store(ce_ptr + n, 0.0)

    if EARLY:
        # The gradient sweep, on the values the exact backward loads (padded passes: 0).
        w_ce, w_div, w_z = _row_weights(w_ce_ptr, w_div_ptr, w_z_ptr, n, K, HAS_CE, HAS_Z)
        grad_row = grad_ptr + tl.multiple_of(tl.load(grad_row_off_ptr + n), ALIGN)
        _grad_sweep(row, grad_row, ks, kmask, y, lse, stat, w_ce, w_div, w_z, V, stride_k, stride_v, grad_stride_k,
                    grad_stride_v, label_smoothing, logit_scale, softcap,
                    K, BLOCK_V, HAS_CE, SMOOTH, JS, HAS_Z, SCALE, SOFTCAP, SPLIT)


@triton.jit
def _backward_kernel(
    logits_ptr, row_off_ptr, target_ptr, lse_ptr, stat_ptr, w_ce_ptr, w_div_ptr, w_z_ptr,
    grad_ptr, grad_row_off_ptr,
    N, V, stride_k, stride_v, grad_stride_k, grad_stride_v, label_smoothing, logit_scale, softcap,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_CE: tl.constexpr, SMOOTH: tl.constexpr, JS: tl.constexpr, ALIGN: tl.constexpr,
    SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_Z: tl.constexpr,
):
    # As in the forward kernel: unmasked full blocks where both class strides are unit.
    SPLIT: tl.constexpr = INTERPRETED or not (isinstance(stride_v, tl.tensor) or isinstance(grad_stride_v, tl.tensor))
    n = tl.program_id(0)
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    y = tl.load(target_ptr + n)
    grad_row = grad_ptr + tl.multiple_of(tl.load(grad_row_off_ptr + n), ALIGN)
    grad_k_offs = ks.to(tl.int64)[:, None] * grad_stride_k
    if y < 0:
        _store_zeros(grad_row, grad_k_offs, ks, kmask, V, grad_stride_v, BLOCK_V, K_PAD)
        return
    row = logits_ptr + tl.multiple_of(tl.load(row_off_ptr + n), ALIGN)
    stat_offs = ks.to(tl.int64) * N + n
    lse = tl.load(lse_ptr + stat_offs, mask=kmask, other=0.0)
    stat = tl.load(stat_ptr + stat_offs, mask=kmask, other=0.0)
    w_ce, w_div, w_z = _row_weights(w_ce_ptr, w_div_ptr, w_z_ptr, n, K, HAS_CE, HAS_Z)
    _grad_sweep(row, grad_row, ks, kmask, y, lse, stat, w_ce, w_div, w_z, V, stride_k, stride_v, grad_stride_k,
                grad_stride_v, label_smoothing, logit_scale, softcap,
                K, BLOCK_V, HAS_CE, SMOOTH, JS, HAS_Z, SCALE, SOFTCAP, SPLIT)
