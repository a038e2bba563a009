"""The C++ CPU kernels store a gradient with ordinary or streaming stores depending on the buffer
(csrc/cpu_kernel.cpp, streams_well): ordinary ones over the logits and into pages not yet touched,
streaming ones into a buffer already in memory. The gradient must not depend on which: the same
bits into a fresh anonymous mapping, into a written buffer and over the logits."""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
import torch

from intradistill_kernels.ops import registry
from intradistill_kernels.ops.backend import EarlyGrad, RowWeights
from intradistill_kernels.ops.spec import LossSpec

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="untouched pages are told apart on Linux only"),
    pytest.mark.skipif(not registry.available("cpu"), reason="C++ cpu backend unavailable"),
]

# A row of V floats is 32-byte aligned every other row and its last chunk is not a whole number of
# 8-float blocks: streaming stores take the aligned whole chunks, ordinary ones the rest.
K, N, V = 3, 16, 3004
PAGE = mmap.PAGESIZE


def _resident(t: torch.Tensor) -> list[bool]:
    """Whether each page under t is in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = t.data_ptr() // PAGE * PAGE
    pages = (t.data_ptr() + t.numel() * t.element_size() - start + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * PAGE), vec) != 0:
        pytest.skip(f"mincore failed (errno {ctypes.get_errno()})")
    return [bool(b & 1) for b in vec]


def _untouched_like(z: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like z on an anonymous mapping none of whose pages has been written (the
    tensor keeps the mapping alive)."""
    nbytes = z.numel() * z.element_size()
    m = mmap.mmap(-1, (nbytes + PAGE - 1) // PAGE * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(m, dtype=z.dtype, count=z.numel()).view(z.shape)
    assert not any(_resident(t)), "a fresh anonymous mapping should have no page in memory"
    return t


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(K, N, V, generator=g) * 3
    target = torch.randint(0, V, (N,), generator=g)
    target[3] = -1  # an inactive row: its gradient is zeroed
    weights = RowWeights(torch.rand(N, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5, None)
    return z, target, weights


@pytest.mark.parametrize("js", [False, True], ids=["x", "js"])
def test_one_pass_gradient_is_the_same_into_any_buffer(js):
    impl = registry.get("cpu")
    z, target, weights = _problem(1 + js)
    cfg = LossSpec("cpu", divergence="js" if js else "x", label_smoothing=0.1)
    used = torch.full_like(z, 7.0)
    fresh = _untouched_like(z)
    over = z.clone()
    for grad, logits in ((used, z), (fresh, z), (over, over)):
        impl.forward(logits, target, cfg, EarlyGrad(weights, grad))
    assert all(_resident(fresh))
    assert torch.equal(fresh, used)
    assert torch.equal(over, used)
    assert torch.count_nonzero(used[:, 3]) == 0 and torch.count_nonzero(used) > 0


def test_exact_backward_is_the_same_into_any_buffer():
    impl = registry.get("cpu")
    z, target, weights = _problem(3)
    cfg = LossSpec("cpu")
    stats = impl.forward(z, target, cfg)
    used = torch.full_like(z, 7.0)
    fresh = _untouched_like(z)
    over = z.clone()
    for grad, logits in ((used, z), (fresh, z), (over, over)):
        impl.backward(logits, target, stats.lse, stats.stat, weights, cfg, grad)
    assert torch.equal(fresh, used)
    assert torch.equal(over, used)
