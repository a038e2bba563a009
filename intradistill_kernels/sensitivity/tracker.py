"""SensitivityTracker: the paper's Fig. 2 numbers recorded during training."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from .balance import _check_fraction, _flat, _split_stats
from .measure import Sensitivity, _check_model, _named_params, parameter_sensitivity


class SensitivityTracker:
    """The paper's Fig. 2 during training: every `every` steps, the mean sensitivity of the
    current top 20% of parameters, of the other 80%, and the std (top `exclude_top` removed).

        loss.backward()
        tracker.step(step)        # reads the .grad already there: no extra backward
        optimizer.step()

    Call it before optimizer.step() (after it, θ has moved and θ·∇ mixes two steps) and after
    unscaling when using a GradScaler (scaled gradients scale every number). With gradient
    accumulation, .grad holds the whole step's gradient, which is what is measured. With loss_fn
    given, tracker.step(step, batch) measures on that batch instead, with its own backward
    (parameter_sensitivity, in the model's current mode), leaving .grad untouched.
    With transformers: trainer.add_callback(tracker.as_trainer_callback()).
    """

    def __init__(self, model: nn.Module, every: int = 100, loss_fn: Callable | None = None, *,
                 params: Iterable[str] | None = None, exclude_top: float = 0.01):
        _check_model(model)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) or None, got {type(loss_fn).__name__}")
        self.model, self.every, self.loss_fn = model, every, loss_fn
        self.params = None if params is None else list(params)
        self.exclude_top = _check_fraction(exclude_top, "exclude_top", upper_open=True)
        _named_params(model, self.params)  # fail now on unknown names, not mid-training
        self.history: list[dict] = []

    def _current(self, batch) -> Sensitivity:
        if batch is not None:
            if self.loss_fn is None:
                raise ValueError("a batch was given but the tracker has no loss_fn to compute its loss")
            return parameter_sensitivity(self.model, self.loss_fn, [batch], 1, train_mode=self.model.training,
                                         params=self.params, progress=False)
        sens = {n: (p.detach() * p.grad.detach()).abs() for n, p in _named_params(self.model, self.params)
                if p.grad is not None}
        if not sens:
            raise ValueError("no parameter has a .grad: call tracker.step() after loss.backward() and before "
                             "optimizer.zero_grad(), or give the tracker a loss_fn and pass a batch")
        return sens

    def step(self, step: int, batch=None) -> dict | None:
        """Record step `step` if it is a multiple of `every`; returns the record or None."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step % self.every:
            return None
        top20, rest, std = _split_stats(_flat(self._current(batch)), self.exclude_top)
        record = {"step": step, "top20_mean": top20, "rest_mean": rest, "std": std}
        self.history.append(record)
        return record

    def to_dict(self) -> dict:
        return {"every": self.every, "exclude_top": self.exclude_top, "history": [dict(h) for h in self.history]}

    def as_trainer_callback(self):
        """A transformers.TrainerCallback feeding this tracker (transformers is imported only here).

        It records in on_pre_optimizer_step (transformers >= 4.42), the one event at which the
        step's gradients exist and θ has not moved yet; by on_step_end the Trainer has zeroed them.
        The step recorded is the global step the update completes (state.global_step + 1).
        """
        try:
            from transformers import TrainerCallback
        except ImportError as e:
            raise ImportError("as_trainer_callback needs `pip install transformers`") from e
        tracker = self

        class _SensitivityCallback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                tracker.step(int(state.global_step) + 1)
                return control

        return _SensitivityCallback()
