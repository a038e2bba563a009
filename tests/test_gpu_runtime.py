"""What only a GPU can show: no host-device synchronisation in the loss's forward or backward, a
whole training step captured in a CUDA graph and replayed, and tensors on a second GPU.

Skipped (with the reason) where no GPU exists; `make gpu-check` runs this file on a lent one.
"""

from __future__ import annotations

import pytest
import torch

import intradistill_kernels as idk
from helpers import all_backends, fused_backends
from intradistill_kernels.ops import unavailable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

K, B, H, V = 3, 16, 64, 4099


def _cuda_backends():
    return fused_backends("cuda") if torch.cuda.is_available() else []


def _problem(device="cuda", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(K, B, V, generator=g) * 3).to(device=device, dtype=dtype)
    target = torch.randint(0, V, (B,), generator=g).to(device)
    target[2] = -100
    return logits, target


@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("divergence", ["x", "js"])
def test_loss_never_synchronises(backend, divergence):
    logits, target = _problem(dtype=torch.bfloat16)
    z = logits.clone().requires_grad_()
    alpha = torch.tensor(0.7, device="cuda")  # a tensor alpha: its check must not read it back
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = idk.intra_distillation_loss(z, target, alpha, divergence=divergence, label_smoothing=0.1, backend=backend)
        out.loss.mul(1.3).backward()
        x = idk.x_divergence(logits.float().requires_grad_(), reduction="sum", backend=backend)
        x.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = idk.intra_distillation_loss(logits.double(), target, 0.7, divergence=divergence, label_smoothing=0.1,
                                       backend="torch")
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-3, atol=1e-4)


def test_fused_linear_never_synchronises():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(K, B, H, generator=g).cuda().requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).cuda().requires_grad_()
    bias = torch.randn(V, generator=g).cuda().requires_grad_()
    target = torch.randint(0, V, (B,), generator=g).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = idk.fused_linear_intra_distillation_loss(hidden, weight, target, bias, 0.5, label_smoothing=0.1)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = idk.intra_distillation_loss(hidden.detach().double() @ weight.detach().double().T + bias.detach().double(),
                                       target, 0.5, label_smoothing=0.1, backend="torch")
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-4, atol=1e-5)


def _graph_step(step, params, inputs, fresh_inputs):
    """Captures step(*inputs) (a loss and its backward) in a CUDA graph, replays it on
    fresh_inputs copied into the captured tensors; returns (loss, grads) of the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: kernels compiled, workspaces made
        for _ in range(3):
            for p in params:
                p.grad = None
            step(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(*inputs)
    for dst, src in zip(inputs, fresh_inputs):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    return loss.detach().clone(), [p.grad.detach().clone() for p in params]


def _eager_step(step, params, inputs):
    for p in params:
        p.grad = None
    loss = step(*inputs)
    return loss.detach(), [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_training_step_in_a_cuda_graph(fused_linear):
    torch.manual_seed(0)
    body = torch.nn.Linear(H, H).cuda()
    head = torch.nn.Linear(H, V).cuda()
    params = [*body.parameters(), *head.parameters()]

    # Each pass scaled differently (a stand-in for dropout, which a graph would replay with one
    # mask), so that the divergence is not 0.
    pass_scale = torch.linspace(0.8, 1.2, K, device="cuda").view(K, 1, 1)

    def step(x, target):
        hidden = torch.tanh(body(x)).repeat(K, 1).unflatten(0, (K, -1)) * pass_scale
        if fused_linear:
            out = idk.fused_linear_intra_distillation_loss(hidden, head.weight, target, head.bias, 0.8, label_smoothing=0.1)
        else:
            out = idk.intra_distillation_loss(head(hidden), target, 0.8, label_smoothing=0.1)
        out.loss.backward()
        return out.loss

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        target = torch.randint(0, V, (B,), generator=g)
        target[1] = -100
        return [torch.randn(B, H, generator=g).cuda(), target.cuda()]

    captured = batch(1)
    loss, grads = _graph_step(step, params, captured, batch(2))
    want_loss, want_grads = _eager_step(step, params, batch(2))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the launch runs under the tensor's device)")
@pytest.mark.parametrize("backend", _cuda_backends())
def test_tensors_on_the_second_gpu(backend):
    logits, target = _problem(device="cuda:0")
    z0 = logits.clone().requires_grad_()
    out0 = idk.intra_distillation_loss(z0, target, 0.6, backend=backend)
    out0.loss.backward()
    with torch.cuda.device(0):  # the current device is not the tensors'
        z1 = logits.to("cuda:1").requires_grad_()
        out1 = idk.intra_distillation_loss(z1, target.to("cuda:1"), 0.6, backend=backend)
        out1.loss.backward()
    assert out1.loss.device == torch.device("cuda:1") and z1.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(out1.loss.cpu(), out0.loss.cpu())
    torch.testing.assert_close(z1.grad.cpu(), z0.grad.cpu())


def test_every_cuda_backend_is_there():
    # On a GPU machine the device axis must reach compiled Triton and the CUDA kernel; a build
    # failure of either would otherwise only shrink the parametrisation.
    missing = {"triton", "cuda"} - set(all_backends("cuda"))
    assert not missing, f"backends unavailable on this GPU: {missing}: {[unavailable_reason(b) for b in missing]}"
