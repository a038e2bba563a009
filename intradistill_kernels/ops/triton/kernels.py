"""Triton kernels of the fused K-pass loss (DESIGN.md §1).

One program handles one token: its K logit rows are held together as a [K_PAD, BLOCK_V] tile, so
the mean logit z̄ of a class is a reduction over axis 0 and every per-pass quantity a reduction
over axis 1. The loop over V is sequential inside the program and no atomics are used, so every
result is bitwise reproducible.

Addressing: element (k, n, v) of the logits is at
    base + row_off[n] + k * stride_k + v * stride_v
which covers any strided [K, *B, V] view without a copy (row_off folds all batch dimensions).
Rows whose target is negative are inactive: their outputs (and gradients) are written as zeros.
ALIGN (host-computed) is a power of two dividing every row offset; without that hint the compiler
cannot prove 16-byte alignment of an offset loaded from memory and falls back to scalar loads.
"""

import triton
import triton.language as tl


@triton.jit
def _load_tile(row_ptr, ks, vs, kmask, V, stride_k, stride_v):
    msk = kmask[:, None] & (vs < V)[None, :]
    ptrs = row_ptr + ks[:, None] * stride_k + vs[None, :] * stride_v
    z = tl.load(ptrs, mask=msk, other=float("-inf")).to(tl.float32)
    return z, msk


@triton.jit
def _log_mean_prob(logp, kmask, K: tl.constexpr):
    """log p̄ per class from the [K_PAD, BLOCK_V] log-probabilities (padded passes are -inf)."""
    mx = tl.max(logp, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(logp - mx[None, :]), axis=0) / K)


@triton.jit
def _forward_kernel(
    logits_ptr, row_off_ptr, target_ptr,
    ce_ptr, div_ptr, lse_ptr, stat_ptr,
    N, V, stride_k, stride_v, label_smoothing,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_CE: tl.constexpr, SMOOTH: tl.constexpr, JS: tl.constexpr, ALIGN: tl.constexpr,
):
    n = tl.program_id(0)
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    y = tl.load(target_ptr + n)
    if y < 0:
        tl.store(ce_ptr + n, 0.0)
        tl.store(div_ptr + n, 0.0)
        tl.store(lse_ptr + ks * N + n, tl.zeros([K_PAD], tl.float32), mask=kmask)
        tl.store(stat_ptr + ks * N + n, tl.zeros([K_PAD], tl.float32), mask=kmask)
        return
    row = logits_ptr + tl.multiple_of(tl.load(row_off_ptr + n), ALIGN)

    # One online pass: running max m, S = Σ e^(z-m), A = Σ e^(z-m)·(z - z̄), row sum of z.
    m = tl.full([K_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([K_PAD], tl.float32)
    a_sum = tl.zeros([K_PAD], tl.float32)
    z_sum = tl.zeros([K_PAD], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        z, msk = _load_tile(row, ks, vs, kmask, V, stride_k, stride_v)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # A row that is -inf so far keeps m = -inf; shifting by 0 there avoids (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        s_sum = s_sum * scale + tl.sum(e, axis=1)
        if not JS:
            z_bar = tl.sum(tl.where(kmask[:, None], z, 0.0), axis=0) / K
            # e == 0 marks classes at -inf in this pass, where z - z̄ may be NaN; their term is 0.
            # (A NaN logit gives e = NaN, which is not 0 and so reaches the result.)
            ed = tl.where(e == 0.0, 0.0, e * (z - z_bar[None, :]))
            a_sum = a_sum * scale + tl.sum(ed, axis=1)
        if SMOOTH:
            z_sum += tl.sum(tl.where(msk, z, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s_sum)

    if JS:
        # Second pass: KL_k = Σ p_k (log p_k - log p̄); log p̄ needs every lse_k first.
        kl = tl.zeros([K_PAD], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            vs = v0 + tl.arange(0, BLOCK_V)
            z, msk = _load_tile(row, ks, vs, kmask, V, stride_k, stride_v)
            logp = tl.where(kmask[:, None], z - lse[:, None], float("-inf"))
            r = logp - _log_mean_prob(logp, kmask, K)[None, :]
            p = tl.exp(logp)
            kl += tl.sum(tl.where(p == 0.0, 0.0, p * r), axis=1)
        stat = kl
    else:
        stat = a_sum / s_sum
    div = tl.sum(tl.where(kmask, stat, 0.0), axis=0) / K
    tl.store(div_ptr + n, div)
    tl.store(lse_ptr + ks * N + n, lse, mask=kmask)
    tl.store(stat_ptr + ks * N + n, stat, mask=kmask)

    if HAS_CE:
        z_y = tl.load(row + ks * stride_k + y * stride_v, mask=kmask, other=0.0).to(tl.float32)
        if SMOOTH:
            ce_k = lse - (1.0 - label_smoothing) * z_y - (label_smoothing / V) * z_sum
        else:
            ce_k = lse - z_y
        tl.store(ce_ptr + n, tl.sum(tl.where(kmask, ce_k, 0.0), axis=0) / K)
    else:
        tl.store(ce_ptr + n, 0.0)


@triton.jit
def _backward_kernel(
    logits_ptr, row_off_ptr, target_ptr, lse_ptr, stat_ptr, g_ce_ptr, g_div_ptr,
    grad_ptr, grad_row_off_ptr,
    N, V, stride_k, stride_v, grad_stride_k, grad_stride_v, label_smoothing,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_CE: tl.constexpr, SMOOTH: tl.constexpr, JS: tl.constexpr, ALIGN: tl.constexpr,
):
    n = tl.program_id(0)
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    y = tl.load(target_ptr + n)
    grad_row = grad_ptr + tl.multiple_of(tl.load(grad_row_off_ptr + n), ALIGN)
    grad_ty = grad_ptr.dtype.element_ty
    if y < 0:
        for v0 in range(0, V, BLOCK_V):
            vs = v0 + tl.arange(0, BLOCK_V)
            msk = kmask[:, None] & (vs < V)[None, :]
            ptrs = grad_row + ks[:, None] * grad_stride_k + vs[None, :] * grad_stride_v
            tl.store(ptrs, tl.zeros([K_PAD, BLOCK_V], tl.float32).to(grad_ty), mask=msk)
        return
    row = logits_ptr + tl.multiple_of(tl.load(row_off_ptr + n), ALIGN)
    lse = tl.load(lse_ptr + ks * N + n, mask=kmask, other=0.0)
    stat = tl.load(stat_ptr + ks * N + n, mask=kmask, other=0.0)
    # d(row value)/d(per-pass value) is 1/K for both the mean CE and the divergence.
    g_div = tl.load(g_div_ptr + n) / K
    if HAS_CE:
        g_ce = tl.load(g_ce_ptr + n) / K
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        z, msk = _load_tile(row, ks, vs, kmask, V, stride_k, stride_v)
        logp = tl.where(kmask[:, None], z - lse[:, None], float("-inf"))
        p = tl.exp(logp)
        if JS:
            # ∂JS/∂z_j = (1/K) p_j ⊙ (r_j − KL_j)
            r = logp - _log_mean_prob(logp, kmask, K)[None, :]
            t = tl.where(p == 0.0, 0.0, p * (r - stat[:, None]))
        else:
            # ∂X/∂z_j = (1/K) [p_j ⊙ (d_j − s_j + 1) − p̄]
            z_bar = tl.sum(tl.where(kmask[:, None], z, 0.0), axis=0) / K
            p_bar = tl.sum(p, axis=0) / K
            t = tl.where(p == 0.0, 0.0, p * (z - z_bar[None, :] - stat[:, None] + 1.0)) - p_bar[None, :]
        g = g_div * t
        if HAS_CE:
            # ∂CE_k/∂z_k = p_k − (1−ε)·onehot(y) − ε/V
            onehot = tl.where(vs == y, 1.0 - label_smoothing, 0.0)
            if SMOOTH:
                g += g_ce * (p - onehot[None, :] - label_smoothing / V)
            else:
                g += g_ce * (p - onehot[None, :])
        ptrs = grad_row + ks[:, None] * grad_stride_k + vs[None, :] * grad_stride_v
        tl.store(ptrs, g.to(grad_ty), mask=msk)
