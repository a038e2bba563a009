"""The fused-linear loss: the loss of hidden @ weight.T + bias with only a chunk of the [K, N, V]
logits alive at a time, behind one custom op (so torch.compile traces callers with fullgraph=True:
the chunk loop, the row selection and the chunk size are decided inside the op, at run time).

Per chunk of tokens (all K passes of a token in the same chunk: the divergence couples them):
one GEMM with fp32 output for the K passes, the backend's forward with the per-row weights of the
reduced loss, which writes d(logits) over the chunk's logits in the same sweep;
grad_hidden = dlogits @ W and grad_weight / grad_bias accumulate in fp32 across chunks. So when
the reduced loss is what gets differentiated (the usual last op of a step) the gradients exist at
the end of the forward and backward only scales them by grad_output.

The per-row terms are a node of their own (LinearRowTerms): only when something other than the
reduced loss uses them (reduction "none", or the ce / divergence terms in another expression)
does its backward recompute the chunks with their weights (one more pass of GEMMs); autograd adds
that gradient to the loss's. No host-device synchronisation either way.

With spec.group the weight (and bias) are this rank's rows of a vocabulary split over the group
(ops/sharded.py): each chunk's partial statistics are combined across the group before its
gradient is written, and grad_hidden, a sum over the shards, is all-reduced once at the end.
"""

from __future__ import annotations

import torch

from . import eager, registry
from .backend import EarlyGrad, RowWeights
from .logits_loss import weighted_rows
from .loss_terms import coef_grad, loss_weights, reduced_loss, rows_weights
from .sharded import all_reduce, combine, local_targets, process_group, shard_gradient, shard_range
from .spec import LossSpec, spec_of
from . import checks
from .checks import row_targets

Tensor = torch.Tensor

CPU_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk (and as much again for the kernels)


def default_chunk_size(k: int, n: int, v: int, device: torch.device) -> int:
    """Tokens per chunk: the chunk's fp32 logits take at most 1/8 of free GPU memory (at most
    2 GiB), or 256 MiB on CPU, and at most 1/8 of the whole [K, N, V] logits, so that the peak
    stays a small fraction of what a materialised call would hold, whatever the shape."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 8, 2 * 2**30)
    else:
        budget = CPU_CHUNK_BYTES
    row_bytes = k * v * 4
    budget = min(budget, n * row_bytes // 8)
    return int(max(1, min(n, budget // row_bytes)))


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (float64 for float64) result. 16-bit CUDA operands use the GEMM's fp32
    output directly; elsewhere the operands are upcast."""
    if b.is_cuda and b.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(dtype) @ b.to(dtype)


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with the GEMM adding into acc where the operands allow (no [V, H] temporary
    and no second pass over it per chunk)."""
    if b.is_cuda and b.dtype in (torch.bfloat16, torch.float16):
        acc += _mm_f32(a, b)  # the 16-bit GEMM's fp32 output, as _mm_f32
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _logits_f32(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """[K, c, H] @ [V, H].T -> fp32 [K, c, V] without rounding the products to 16 bits."""
    k, c, hdim = h.shape
    out = _mm_f32(h.reshape(k * c, hdim), w.T)
    if b is not None:
        out = out + b.to(out.dtype)
    return out.view(k, c, -1)


def _accumulate_chunk(grads, sel: slice, dlogits: Tensor, h: Tensor, w_fp: Tensor) -> None:
    """grad_hidden[:, sel] = dlogits @ W; grad_weight += dlogits.T @ h; grad_bias += Σ dlogits."""
    g_hidden, g_weight, g_bias = grads
    k, _, hdim = h.shape
    d = dlogits.reshape(-1, dlogits.shape[-1])
    if g_hidden is not None:
        g_hidden[:, sel] = _mm_f32(d, w_fp).view(k, -1, hdim).to(g_hidden.dtype)
    if g_weight is not None:
        _accumulate_mm(g_weight, d.T, h.reshape(-1, hdim))
    if g_bias is not None:
        g_bias += d.sum(0)


class _Shard:
    """Where this rank's rows of a vocabulary split over a group begin, and the global V."""

    def __init__(self, spec: LossSpec, v_local: int, like: Tensor):
        self.group = process_group(spec)
        self.v_start, self.v_total = shard_range(v_local, self.group, like)


def chunked_pass(hidden, weight, bias, target, spec: LossSpec, w: RowWeights | None = None, needs=(True, True, True),
                 shard: _Shard | None = None):
    """Runs every chunk over hidden [K, M, H] with row targets [M] (-1: inactive; local columns
    with `shard`); returns per-row (ce, raw div, zsq) and, when row weights are given, the
    gradients (grad_hidden [K, M, H] in hidden's dtype, grad_weight and grad_bias in fp32; each
    None where `needs` says that input wants none)."""
    k, m, hdim = hidden.shape
    rows_dtype = eager.compute_dtype(hidden.dtype)
    out_rows = [hidden.new_empty(m, dtype=rows_dtype) for _ in range(3)]
    grads = None
    if w is not None:
        need_h, need_w, need_b = needs
        grads = [torch.empty_like(hidden) if need_h else None,
                 torch.zeros(weight.shape, dtype=rows_dtype, device=weight.device) if need_w else None,
                 torch.zeros(bias.shape, dtype=rows_dtype, device=bias.device) if need_b and bias is not None else None]
    chunk = spec.chunk_size or default_chunk_size(k, max(m, 1), weight.shape[0], hidden.device)
    if shard is not None:  # every rank must cut the same chunks
        chunk = int(all_reduce(torch.tensor([chunk]), shard.group, torch.distributed.ReduceOp.MIN))
    impl = registry.get(spec.backend)
    w_fp = weight if weight.is_cuda or weight.dtype in (torch.float32, torch.float64) else weight.to(torch.float32)
    for start in range(0, m, chunk):
        sel = slice(start, min(m, start + chunk))
        h = hidden[:, sel]
        logits = _logits_f32(h, w_fp, bias)
        w_sel = None if w is None else RowWeights(*(None if x is None else x[sel] for x in w))
        if shard is None:
            stats = impl.forward(logits, target[sel], spec, None if w_sel is None else EarlyGrad(w_sel, logits))
        else:
            stats = combine(logits, target[sel], spec, shard.group, shard.v_total)
            if w_sel is not None:
                shard_gradient(logits, target[sel], stats.lse, stats.stat, w_sel, spec, shard.v_total, logits)
        for rows, values in zip(out_rows, (stats.ce, stats.div, stats.lse.square().mean(0))):
            rows[sel] = values
        if grads is not None:  # the chunk's logits now hold their gradient
            _accumulate_chunk(grads, sel, logits, h, w_fp)
        del logits  # before the next chunk's GEMM: one chunk of logits alive at a time
    if shard is not None and grads is not None and grads[0] is not None:
        grads[0] = all_reduce(grads[0], shard.group)
    return (*out_rows, grads)


def _rows_fake(hidden: Tensor, n: int) -> list[Tensor]:
    return [hidden.new_empty(n, dtype=eager.compute_dtype(hidden.dtype)) for _ in range(3)]


def _grads_or_empty(hidden, weight, bias, grads) -> tuple[Tensor, Tensor, Tensor]:
    """The three gradient outputs: the computed ones (grad_hidden in hidden's shape), and an empty
    tensor for each gradient not computed (custom ops cannot return None)."""
    grads = grads or (None, None, None)
    shapes = (hidden.shape, weight.shape, None if bias is None else bias.shape)
    return tuple(hidden.new_empty(0) if g is None else g.reshape(shape) for g, shape in zip(grads, shapes))


def _grads_fake(hidden, weight, bias, weights, needs) -> tuple[Tensor, Tensor, Tensor]:
    dtype = eager.compute_dtype(hidden.dtype)
    early = weights is not None
    return (torch.empty_like(hidden) if early and needs[0] else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=dtype) if early and needs[1] else hidden.new_empty(0),
            bias.new_empty(bias.shape, dtype=dtype) if early and needs[2] and bias is not None else hidden.new_empty(0))


N_SPEC_SCALARS = len(LossSpec("torch").scalars())


@torch.library.custom_op("intradistill::linear_rows", mutates_args=())
def linear_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, active: Tensor,
                weights: Tensor | None, key: str, scalars: list[float]
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ce [N], raw div [N], zsq [N], grad_hidden, grad_weight, grad_bias) of hidden [K, *B, H]:
    the gradients (of the rows weighted by `weights`) are empty tensors without weights or where
    not needed. scalars: the spec's, then whether hidden, weight and bias need gradients."""
    spec, needs = spec_of(key, scalars[:N_SPEC_SCALARS]), [bool(x) for x in scalars[N_SPEC_SCALARS:]]
    k, n = hidden.shape[0], target.numel()
    h = hidden.reshape(k, n, hidden.shape[-1])
    shard = _Shard(spec, weight.shape[0], hidden) if spec.group else None
    if shard is None:
        row_target = row_targets(target, active, weight.shape[0], spec)
    else:
        row_target = local_targets(target, active, shard.v_start, weight.shape[0], shard.v_total, spec)
    w = None if weights is None else RowWeights.unpacked(weights)
    keep = None
    if checks.host_reads_are_free(hidden.device):
        # Ignored tokens are dropped before any GEMM. (On an accelerator that would need their
        # count on the host, a synchronisation per call: there they are computed and zeroed.)
        keep = active.nonzero().squeeze(1)
        h, row_target = h[:, keep], row_target[keep]
        w = None if w is None else RowWeights(*(None if x is None else x[keep] for x in w))
    *rows, grads = chunked_pass(h, weight, bias, row_target, spec, w, needs, shard)
    if keep is not None:
        rows = [r.new_zeros(n).index_put_((keep,), r) for r in rows]
        if grads is not None and grads[0] is not None:
            full = grads[0].new_zeros((k, n, h.shape[-1]))
            full[:, keep] = grads[0]
            grads[0] = full
    return (*rows, *_grads_or_empty(hidden, weight, bias, grads))


@linear_rows.register_fake
def _(hidden, weight, bias, target, active, weights, key, scalars):
    needs = [bool(x) for x in scalars[N_SPEC_SCALARS:]]
    return (*_rows_fake(hidden, target.numel()), *_grads_fake(hidden, weight, bias, weights, needs))


def _as_grad(g: Tensor, like: Tensor, need: bool, factor: Tensor | None) -> Tensor | None:
    """A computed gradient in its input's dtype (times grad_output for the one-pass forward's,
    scaled in place: the forward's buffer serves one backward, and a copy would add [V, H])."""
    if not need:
        return None
    return (g if factor is None else g.mul_(factor.to(g.dtype))).to(like.dtype)


def _gradients(inputs, target, active, spec: LossSpec, weights: RowWeights, needs) -> tuple:
    """(grad_hidden, grad_weight, grad_bias) with the given row weights: the chunks recomputed by
    the op, or, when they are to be differentiated again, autograd's through the logits."""
    hidden, weight, bias = inputs
    if torch.is_grad_enabled():  # create_graph=True
        k, n = hidden.shape[0], target.numel()
        logits = hidden.reshape(k, n, -1) @ weight.T + (0 if bias is None else bias)
        total = weighted_rows(logits, row_targets(target, active, weight.shape[0], spec), spec, weights)
        wanted = [x for x, need in zip(inputs, needs) if need]
        found = iter(torch.autograd.grad(total, wanted, create_graph=True))
        return tuple(next(found) if need else None for need in needs)
    grads = linear_rows(hidden, weight, bias, target, active, weights.packed(), spec.key(),
                        spec.scalars() + [float(x) for x in needs])[3:]
    return tuple(_as_grad(g, x, need, None) for g, x, need in zip(grads, inputs, needs))


class LinearLoss(torch.autograd.Function):
    """The reduced loss of hidden [K, *B, H] @ weight.T + bias (target int64 [N], active bool [N],
    coef = [alpha, scale]) and, not differentiable here, the per-row [ce, div, zsq] [3, N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, active, coef, spec: LossSpec):
        needs = ctx.needs_input_grad[:3]
        one_pass = spec.one_pass and any(needs)
        k, n = hidden.shape[0], target.numel()
        weights = loss_weights(spec, k, n, coef).packed() if one_pass else None
        ce, div, zsq, g_h, g_w, g_b = linear_rows(hidden, weight, bias, target, active, weights, spec.key(),
                                                  spec.scalars() + [float(x) for x in needs])
        factor = spec.div_factor(k)
        rows_out = torch.stack([ce, div * factor if factor != 1.0 else div, zsq])
        loss = reduced_loss(spec, coef, *rows_out)
        ctx.mark_non_differentiable(rows_out)
        ctx.save_for_backward(hidden, weight, bias, target, active, coef, rows_out, g_h, g_w, g_b)
        ctx.spec, ctx.one_pass = spec, one_pass
        return loss, rows_out

    @staticmethod
    def backward(ctx, g_loss, _):
        hidden, weight, bias, target, active, coef, rows_out, g_h, g_w, g_b = ctx.saved_tensors
        spec, needs, inputs = ctx.spec, ctx.needs_input_grad[:3], (hidden, weight, bias)
        g_coef = coef_grad(coef, g_loss, rows_out[1]) if ctx.needs_input_grad[5] else None
        if not any(needs) or g_loss is None:
            return None, None, None, None, None, g_coef, None
        if ctx.one_pass and not torch.is_grad_enabled():  # the forward's gradients are those of `loss`
            grads = tuple(_as_grad(g, x, need, g_loss) for g, x, need in zip((g_h, g_w, g_b), inputs, needs))
        else:
            weights = loss_weights(spec, hidden.shape[0], target.numel(), coef, g_loss)
            grads = _gradients(inputs, target, active, spec, weights, needs)
        return (*grads, None, None, g_coef, None)


class LinearRowTerms(torch.autograd.Function):
    """The per-row [ce, div, zsq] of LinearLoss as a differentiable function of hidden, weight and
    bias: its backward (the chunks recomputed with the rows' weights) runs only when something
    uses the rows (see logits_loss.RowTerms)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, active, rows, spec: LossSpec):
        ctx.save_for_backward(hidden, weight, bias, target, active)
        ctx.spec = spec
        return rows.clone()

    @staticmethod
    def backward(ctx, g_rows):
        hidden, weight, bias, target, active = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if not any(needs):
            return None, None, None, None, None, None, None
        weights = rows_weights(ctx.spec, hidden.shape[0], g_rows)
        grads = _gradients((hidden, weight, bias), target, active, ctx.spec, weights, needs)
        return (*grads, None, None, None, None)
