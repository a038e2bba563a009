"""Property-based checks: random shapes, dtypes and options against the float64 reference."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import intradistill_kernels as idk  # noqa: E402
from helpers import assert_close_grads, assert_close_values, fused_backends, loss_and_grad, reference_of  # noqa: E402

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
    if draw(st.booleans()):  # a non-contiguous view of the same values
        logits = logits.transpose(-1, 0).contiguous().transpose(-1, 0)
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
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_random_problems_match_reference(backend, problem):
    logits, target, alpha, options, weights = problem

    def call(b):
        return lambda z: idk.intra_distillation_loss(z, target, alpha, backend=b, **options)

    got, grad = loss_and_grad(logits, call(backend), weights)
    want, want_grad = reference_of(logits, call("torch"), weights)
    assert_close_values(got, want, logits.dtype)
    assert_close_grads(grad, want_grad, logits.dtype)
