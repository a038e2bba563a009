"""What a user could run instead of this package, each as fn(logits, target) -> scalar loss.

Every contender computes the same quantity (mean CE over the K passes + alpha * X-divergence, or
the divergence alone) so that the timings compare equal work; the runner checks each value
against the reference before timing it (measure.check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import intradistill_kernels as idk

ALPHA = 1.0


def paper_eager(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The formula as the paper's released code computes it: softmax of each pass, p̄ in
    probability space, the log of each, and both KL directions summed (fp32)."""
    z = logits.float()
    k = z.shape[0]
    p = torch.softmax(z, dim=-1)
    p_bar = p.mean(0)
    log_p, log_p_bar = torch.log(p), torch.log(p_bar)
    div = sum(((p[i] * (log_p[i] - log_p_bar)).sum(-1) + (p_bar * (log_p_bar - log_p[i])).sum(-1)).mean()
              for i in range(k)) / k
    if target is None:
        return div
    ce = F.cross_entropy(z.flatten(0, -2), target.repeat(k))
    return ce + ALPHA * div


def rdrop_eager(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """R-Drop's two-direction KL for K = 2 (F.kl_div on log-softmaxes, as its code does), scaled to
    the X-divergence (X = J / 4 for K = 2) so the value is comparable."""
    z = logits.float()
    lp = torch.log_softmax(z, dim=-1)
    j = (F.kl_div(lp[0], lp[1], log_target=True, reduction="none").sum(-1)
         + F.kl_div(lp[1], lp[0], log_target=True, reduction="none").sum(-1)).mean()
    div = j / 4
    if target is None:
        return div
    return F.cross_entropy(z.flatten(0, -2), target.repeat(2)) + ALPHA * div


def ours(backend: str):
    def fn(logits, target):
        if target is None:
            return idk.x_divergence(logits, backend=backend)
        return idk.intra_distillation_loss(logits, target, ALPHA, backend=backend).loss
    fn.__name__ = f"intradistill[{backend}]"
    return fn


def ours_two_pass(backend: str):
    """The same loss through its exact two-pass path: per-row outputs reduced outside the kernel,
    so the forward cannot know the row weights and the backward reads the logits again (the
    default `ours` lets the one-pass forward write the gradient in its own sweep)."""
    def fn(logits, target):
        if target is None:
            return idk.x_divergence(logits, reduction="none", backend=backend).mean()
        return idk.intra_distillation_loss(logits, target, ALPHA, reduction="none", backend=backend).loss.mean()
    fn.__name__ = f"intradistill[{backend}].two-pass"
    return fn


def compiled(fn):
    c = torch.compile(fn, dynamic=False)
    c.__name__ = f"torch.compile({fn.__name__})"
    return c


def liger_jsd():
    """Liger-Kernel's JSD (K = 2, GPU) against our js_divergence; None where it is not installed.
    LigerJSD takes log-probabilities (student, teacher): the log-softmaxes are part of its cost."""
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError:
        return None
    jsd = LigerJSD(beta=0.5)

    def fn(logits, target):
        lp = torch.log_softmax(logits.float(), dim=-1)
        return jsd(lp[0].flatten(0, -2), lp[1].flatten(0, -2))
    fn.__name__ = "liger_kernel.LigerJSD"
    return fn


def ours_js(backend: str):
    def fn(logits, target):
        return idk.js_divergence(logits, backend=backend)
    fn.__name__ = f"intradistill[{backend}].js"
    return fn


def contenders(device: str, k: int, with_compile: bool = True) -> dict:
    """name -> (fn, kind) where kind is "x" (CE + X or X) or "js" (the JS comparison)."""
    out = {}
    for backend in idk.available_backends():
        if backend == "triton" and device != "cuda":
            continue  # on CPU Triton runs in its interpreter: not a contender
        if backend == "cuda" and device != "cuda":
            continue
        if backend == "cpu" and device != "cpu":
            continue
        out[f"intradistill[{backend}]"] = (ours(backend), "x")
        out[f"intradistill[{backend}].two-pass"] = (ours_two_pass(backend), "x")
    out["paper_eager"] = (paper_eager, "x")
    if with_compile:
        out["paper_eager+torch.compile"] = (compiled(paper_eager), "x")
    if k == 2:
        out["rdrop_eager"] = (rdrop_eager, "x")
        liger = liger_jsd() if device == "cuda" else None
        if liger is not None:
            out["liger_jsd"] = (liger, "js")
            fused = "triton" if "triton" in idk.available_backends() else "torch"
            out[f"intradistill[{fused}].js"] = (ours_js(fused), "js")
    return out
