"""The vocabulary-parallel losses through the custom ops, in real gloo process groups on CPU:
the fused-linear form against the unsharded fused-linear loss for every option (world sizes 2 and
4, unequal shards), both forms compiled with fullgraph=True, and the one-pass path taken when only
the loss is differentiated."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import intradistill_kernels as idk
from helpers import free_port

pytestmark = [pytest.mark.full, pytest.mark.filterwarnings("ignore")]

K, N, H = 3, 7, 12
SHARDS = {2: [23, 14], 4: [9, 17, 4, 11]}
CASES = {  # name: (options, dtype); alpha is a tensor in one case
    "x": (dict(), torch.float32),
    "js-smooth": (dict(divergence="js", label_smoothing=0.1), torch.float32),
    "jeffrey-llm": (dict(divergence="jeffrey", softcap=5.0, logit_scale=0.8, z_loss=0.01), torch.float32),
    "sum-smooth-cap": (dict(reduction="sum", label_smoothing=0.05, softcap=4.0), torch.float32),
    "none-all": (dict(reduction="none", divergence="js", label_smoothing=0.1, z_loss=0.02, logit_scale=1.2),
                 torch.float32),
    "ignore-7": (dict(ignore_index=7, label_smoothing=0.1), torch.float32),
    "bf16": (dict(label_smoothing=0.1, z_loss=0.01), torch.bfloat16),
    "fp16": (dict(divergence="js"), torch.float16),
}


def _inputs(name: str, v: int):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    hidden = torch.randn(K, N, H, generator=g)
    weight = torch.randn(v, H, generator=g) / H ** 0.5
    bias = torch.randn(v, generator=g) * 0.1
    target = torch.randint(0, v, (N,), generator=g)
    target[2] = CASES.get(name, ({}, None))[0].get("ignore_index", -100)
    row_w = torch.rand(N, generator=g) + 0.5
    return hidden, weight, bias, target, row_w


def _backend() -> str:
    return "cpu" if "cpu" in idk.available_backends() else "torch"


def _run(fn, hidden, weight, bias, target, row_w, opts, dtype, shard=slice(None)):
    """(loss, ce, divergence, grad_hidden, grad_weight[shard], grad_bias[shard]) of a weighted
    sum of the outputs; alpha a tensor that requires grad (its gradient is returned too)."""
    h, w, b = (x.detach().to(dtype).clone().requires_grad_() for x in (hidden, weight[shard], bias[shard]))
    alpha = torch.tensor(0.7, requires_grad=True)
    out = fn(h, w, target, b, alpha, **opts)
    total = (out.loss * row_w).sum() if opts.get("reduction") == "none" else out.loss * 1.3
    (total + 0.4 * out.ce.sum()).backward()
    return [x.detach() for x in out] + [h.grad, w.grad, b.grad, alpha.grad]


def _fused_linear_worker(rank, world, port, out_dir):
    from intradistill_kernels.distributed import vocab_parallel_fused_linear_intra_distillation_loss as vp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])
    results = {}
    for name, (opts, dtype) in CASES.items():
        inputs = _inputs(name, sum(sizes))
        results[name] = _run(lambda *a, **kw: vp(*a, backend=_backend(), chunk_size=3, **kw), *inputs, opts, dtype,
                             shard)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_fused_linear_vocab_parallel_matches_unsharded(world, tmp_path):
    mp.spawn(_fused_linear_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    sizes = SHARDS[world]
    for name, (opts, dtype) in CASES.items():
        inputs = _inputs(name, sum(sizes))
        want = _run(lambda *a, **kw: idk.fused_linear_intra_distillation_loss(*a, backend=_backend(), **kw),
                    *inputs, opts, dtype)
        # values against the float64 reference on the same (rounded) inputs too
        ref = _run(lambda h, w, y, b, a, **kw: idk.intra_distillation_loss(h @ w.T + b, y, a, backend="torch", **kw),
                   *(x.to(dtype).double() if x.is_floating_point() else x for x in inputs[:4]), inputs[4], opts,
                   torch.float64)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        for rank in range(world):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            start = sum(sizes[:rank])
            shard = slice(start, start + sizes[rank])
            for i, label in enumerate(("loss", "ce", "divergence")):
                torch.testing.assert_close(got[i].double(), want[i].double(), **tol, msg=lambda m, s=f"{name} {label}": f"{s}: {m}")
                torch.testing.assert_close(got[i].double(), ref[i], **tol, msg=lambda m, s=f"{name} {label} vs float64": f"{s}: {m}")
            g_h, g_w, g_b, g_a = got[3:]
            torch.testing.assert_close(g_h, want[3], **tol, msg=lambda m, s=f"{name} grad_hidden (full, every rank)": f"{s}: {m}")
            torch.testing.assert_close(g_w, want[4][shard], **tol, msg=lambda m, s=f"{name} grad_weight (this rank's rows)": f"{s}: {m}")
            torch.testing.assert_close(g_b, want[5][shard], **tol, msg=lambda m, s=f"{name} grad_bias": f"{s}: {m}")
            torch.testing.assert_close(g_a, want[6], **tol, msg=lambda m, s=f"{name} grad_alpha": f"{s}: {m}")


def _compiled_worker(rank, world, port, out_dir):
    """Both vocabulary-parallel losses compiled with fullgraph=True against eager; records which
    op wrote the logits loss's gradient (the one-pass forward or the backward)."""
    from intradistill_kernels.distributed import (
        vocab_parallel_fused_linear_intra_distillation_loss, vocab_parallel_intra_distillation_loss)
    from intradistill_kernels.ops import sharded

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    writers = []
    real = sharded.shard_gradient
    sharded.shard_gradient = lambda *a, **kw: writers.append(sys._getframe(1).f_code.co_name) or real(*a, **kw)
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])
    hidden, weight, bias, target, _ = _inputs("compiled", sum(sizes))
    logits = hidden @ weight.T + bias
    opts = dict(label_smoothing=0.1, softcap=5.0, z_loss=0.01, backend=_backend())
    results = {}
    for dynamic in (False, True):
        torch._dynamo.reset()

        def logits_loss(z):
            return vocab_parallel_intra_distillation_loss(z, target, 0.7, **opts).loss

        def linear_loss(h, w):
            return vocab_parallel_fused_linear_intra_distillation_loss(h, w, target, None, 0.7, chunk_size=3, **opts).loss

        for label, fn, args in (("logits", logits_loss, (logits[..., shard],)),
                                ("linear", linear_loss, (hidden, weight[shard]))):
            runs = []
            for f in (torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager"), fn):
                leaves = [a.detach().clone().requires_grad_() for a in args]
                writers.clear()
                loss = f(*leaves)
                loss.backward()
                runs.append([loss.detach()] + [x.grad for x in leaves] + [list(writers)])
            results[(label, dynamic)] = runs
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_vocab_parallel_losses_compile_fullgraph_and_take_the_one_pass_path(tmp_path):
    world = 2
    mp.spawn(_compiled_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        for (label, dynamic), (compiled, eager) in torch.load(tmp_path / f"rank{rank}.pt").items():
            for a, b in zip(compiled[:-1], eager[:-1]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, s=f"{label} dynamic={dynamic}": f"{s}: {m}")
            if label == "logits":
                # only the loss is differentiated: the forward's op writes the gradient, none in backward
                assert compiled[-1] == eager[-1] == ["shard_rows"], (compiled[-1], eager[-1])
