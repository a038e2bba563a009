"""Property-based checks: random shapes, dtypes and options against the float64 reference.

How many problems each test draws is the hypothesis profile's (tests/conftest.py): "quick" in
`make test`, "thorough" in `make test-full`."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import intradistill_kernels as idk  # noqa: E402
from helpers import (  # noqa: E402
    assert_close_grads, assert_close_values, fused_backends, loss_and_grad, reference_of, value_floor)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@st.composite
def problems(draw):
    k = draw(st.integers(2, 5))
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    v = draw(st.integers(1, 600))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    logits = (torch.randn((k, *batch, v), generator=gen, dtype=torch.float64) * scale).to(dtype)
    if v > 1 and draw(st.booleans()):  # masked vocabulary padding: classes at -inf in every pass
        logits[..., torch.rand(v, generator=gen) < 0.3] = float("-inf")
        logits[..., 0] = 0.0  # every row keeps a finite class
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "batch-transposed"]))
    if layout == "transposed":  # a non-contiguous view of the same values
        logits = logits.transpose(-1, 0).contiguous().transpose(-1, 0)
    elif layout == "strided":  # every other class of a wider buffer
        wide = torch.zeros((k, *batch, 2 * v), dtype=dtype)
        wide[..., ::2] = logits
        logits = wide[..., ::2]
    elif layout == "batch-transposed" and len(batch) == 2:
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
    target = torch.randint(0, v, batch, generator=gen)
    target = torch.where(torch.rand(batch, generator=gen) < 0.2, torch.full_like(target, -100), target)
    options = dict(
        divergence=draw(st.sampled_from(["x", "js", "jeffrey"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    alpha = draw(st.floats(0.0, 5.0))
    weights = [torch.rand(batch if options["reduction"] == "none" else (), generator=gen, dtype=torch.float64) + 0.5
               for _ in range(3)]
    return logits, target, alpha, options, weights


@pytest.mark.parametrize("backend", fused_backends())
@given(problem=problems())
def test_random_problems_match_reference(backend, problem):
    logits, target, alpha, options, weights = problem

    def call(b):
        return lambda z: idk.intra_distillation_loss(z, target, alpha, backend=b, **options)

    got, grad = loss_and_grad(logits, call(backend), weights)
    want, want_grad = reference_of(logits, call("torch"), weights)
    assert_close_values(got, want, logits.dtype, value_floor(logits, target, alpha, options["reduction"]))
    assert_close_grads(grad, want_grad, logits.dtype)


@st.composite
def masked_divergences(draw):
    k = draw(st.integers(2, 4))
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    v = draw(st.integers(2, 300))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn((k, *batch, v), generator=gen, dtype=torch.float64) * 3).to(dtype)
    mask = torch.rand(batch, generator=gen) < 0.7
    partial = draw(st.booleans())
    if partial:  # a class at -inf in one pass only: KL(p̄ ‖ p_k) is +inf there
        logits[0, ..., v - 1] = float("-inf")
    return logits, mask, draw(st.sampled_from(["x", "js"])), draw(st.sampled_from(["mean", "sum", "none"])), partial


@pytest.mark.parametrize("backend", fused_backends())
@given(problem=masked_divergences())
def test_random_masked_divergences_match_reference(backend, problem):
    logits, mask, divergence, reduction, partial = problem
    fn = idk.x_divergence if divergence == "x" else idk.js_divergence
    got = fn(logits, mask, reduction, backend=backend).double()
    want = fn(logits.double(), mask, reduction, backend="torch")
    if partial and divergence == "x" and mask.any():
        assert torch.all(torch.isinf(want[mask]) if reduction == "none" else torch.isinf(want))
    assert_close_values([got], [want], logits.dtype)
    if not partial:
        weights = [torch.rand(want.shape, dtype=torch.float64) + 0.5]
        _, grad = loss_and_grad(logits, lambda z: fn(z, mask, reduction, backend=backend), weights)
        _, want_grad = reference_of(logits, lambda z: fn(z, mask, reduction, backend="torch"), weights)
        assert_close_grads(grad, want_grad, logits.dtype)
