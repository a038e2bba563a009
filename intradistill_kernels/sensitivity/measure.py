"""parameter_sensitivity: |θ ⊙ ∇θ L| per parameter, averaged over batches (the paper's Eq. 2)."""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn

from .._progress import progress_bar

Sensitivity = dict[str, torch.Tensor]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _named_params(model: nn.Module, params: Iterable[str] | None) -> list[tuple[str, nn.Parameter]]:
    if isinstance(params, str):
        raise TypeError("params must be an iterable of parameter names, not a single string")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = set(params)
    unknown = wanted - {n for n, _ in named}
    if unknown:
        raise ValueError(f"params names no trainable parameter of the model: {sorted(unknown)[:3]}")
    return [(n, p) for n, p in named if n in wanted]


def parameter_sensitivity(model: nn.Module, loss_fn: Callable, batches: Iterable, max_batches: int = 100, *,
                          train_mode: bool = False, params: Iterable[str] | None = None,
                          progress: bool | None = None) -> Sensitivity:
    """name -> |θ ⊙ ∇θ L| (float32), averaged over the first `max_batches` batches.

    loss_fn(model, batch) must return a scalar loss tensor; batches may be any iterable (a list,
    a DataLoader, a generator: at most max_batches items are drawn). The model runs in eval mode
    unless train_mode (dropout then differs per batch); its mode and every parameter's .grad are
    restored afterwards, so this can run in the middle of training. `params` restricts the
    measurement to the named trainable parameters. A parameter the loss does not reach gets
    sensitivity zero. progress: tqdm bar (None: only on a terminal).
    """
    _check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    named = _named_params(model, params)
    if not named:
        raise ValueError("the model has no trainable parameters to measure")
    tensors = [p for _, p in named]
    # torch.autograd.grad leaves .grad alone; the copies guard against a loss_fn that calls backward
    saved = [None if p.grad is None else p.grad.detach().clone() for p in tensors]
    was_training = model.training
    total = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    count = 0
    total_hint = min(max_batches, len(batches)) if hasattr(batches, "__len__") else max_batches
    try:
        model.train(train_mode)
        with torch.enable_grad():
            for batch in progress_bar(itertools.islice(batches, max_batches), enabled=progress, leave=False,
                                      total=total_hint, desc="sensitivity"):
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn must return a scalar tensor, got "
                                     f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                if not loss.requires_grad:
                    raise ValueError("the loss returned by loss_fn does not depend on the parameters "
                                     "(it has no grad_fn: was it computed under torch.no_grad()?)")
                grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
                for acc, p, g in zip(total, tensors, grads):
                    if g is not None:
                        acc.add_((p.detach().float() * g.float()).abs_())
                count += 1
    finally:
        model.train(was_training)
        for p, g in zip(tensors, saved):
            p.grad = g
    if count == 0:
        raise ValueError("batches is empty: no batch to measure the sensitivity on")
    return {n: t.div_(count) for (n, _), t in zip(named, total)}
