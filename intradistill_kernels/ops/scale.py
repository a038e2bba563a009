"""grad *= factor on the GPU without reading factor on the host.

The one-pass loss leaves its gradient ready at the end of the forward; backward only has to apply
grad_output, which is 1 in every plain `loss.backward()`. Testing that on the host would wait for
the stream, and scaling unconditionally would read and write the whole gradient once more (half
the traffic the one-pass kernel saved). Each program here loads the factor and returns at once
when it is 1, so that case costs a launch and no pass over memory.
"""

from __future__ import annotations

import torch

from . import checks

BLOCK = 4096


def _usable(t: torch.Tensor) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return t.is_cuda and t.is_non_overlapping_and_dense()


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scale_unless_one(ptr, factor_ptr, numel, BLOCK: tl.constexpr):
        factor = tl.load(factor_ptr).to(tl.float32)
        if factor != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            msk = offs < numel
            x = tl.load(ptr + offs, mask=msk).to(tl.float32)
            tl.store(ptr + offs, (x * factor).to(ptr.dtype.element_ty), mask=msk)

    return scale_unless_one


_compiled = None


def _scale_unless_one(grad: torch.Tensor, factor: torch.Tensor) -> None:
    global _compiled
    if _compiled is None:
        _compiled = _kernel()
    numel = grad.numel()
    if numel == 0:
        return
    with torch.cuda.device(grad.device):
        _compiled[(-(-numel // BLOCK),)](grad, factor.to(device=grad.device, dtype=torch.float32).reshape(1), numel,
                                         BLOCK=BLOCK)


@torch.library.custom_op("intradistill::scale_", mutates_args=("grad",))
def scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad *= factor, leaving grad untouched where factor == 1 (what loss.backward() passes).
    On the CPU the factor is read directly; on a GPU the Triton kernel above tests it on the device."""
    if checks.host_reads_are_free(grad.device):
        if float(factor) != 1.0:
            grad.mul_(factor.to(grad.dtype))
    elif _usable(grad):
        _scale_unless_one(grad, factor)
    else:
        grad.mul_(factor.to(grad.dtype))
