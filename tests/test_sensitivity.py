"""Sensitivity toolkit: exact values on a model with closed-form gradients, tracker, pruning, plots, CLI."""

import json
import sys
import types

import pytest
import torch
from torch import nn

from intradistill_kernels import sensitivity as S

pytest.importorskip("matplotlib")


def _linear_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 1, bias=True)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=g))
        model.bias.copy_(torch.randn(1, generator=g))
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]
    return model, batches


def _mse(model, batch):
    x, t = batch
    return ((model(x) - t) ** 2).mean()


def _closed_form(w, b, batch):
    x, t = batch
    r = x @ w.T + b - t                        # d/dθ mean(r²) = 2 mean(r · ∂r/∂θ)
    return (w * (2 * (r * x).mean(0, keepdim=True))).abs(), (b * (2 * r.mean(0))).abs()


def _top_rest_std(values, exclude_top=0.01):
    """The tracker's numbers by sorting, the obvious way."""
    ordered = values.double().sort(descending=True).values
    top = -(-ordered.numel() * 2 // 10)         # ceil(0.2 n)
    kept = ordered[int(exclude_top * ordered.numel()):]
    return float(ordered[:top].mean()), float(ordered[top:].mean()), float(kept.std(unbiased=False))


def test_sensitivity_matches_closed_form():
    model, batches = _linear_problem()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    want = [_closed_form(w, b, batch) for batch in batches]
    sens = S.parameter_sensitivity(model, _mse, batches)
    assert set(sens) == {"weight", "bias"} and sens["weight"].dtype == torch.float32
    torch.testing.assert_close(sens["weight"], sum(ww for ww, _ in want) / 3)
    torch.testing.assert_close(sens["bias"], sum(bb for _, bb in want) / 3)
    # max_batches takes the first batches of any iterable, drawing no more than it needs
    drawn = []

    def stream():
        for batch in batches:
            drawn.append(batch)
            yield batch
    two = S.parameter_sensitivity(model, _mse, stream(), max_batches=2, params=["bias"])
    assert set(two) == {"bias"} and len(drawn) == 2
    torch.testing.assert_close(two["bias"], (want[0][1] + want[1][1]) / 2)


def test_callers_grads_and_mode_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 1))
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(2)]
    model.train()
    _mse(model, batches[0]).backward()
    before = model[0].weight.grad.clone()
    model[2].bias.grad = None
    seen = []

    def loss_fn(m, batch):
        seen.append(m.training)
        return _mse(m, batch)
    eval_a = S.parameter_sensitivity(model, loss_fn, batches)
    eval_b = S.parameter_sensitivity(model, loss_fn, batches)
    assert seen == [False] * 4 and model.training
    assert all(torch.equal(eval_a[n], eval_b[n]) for n in eval_a)  # eval mode: no dropout noise
    S.parameter_sensitivity(model, loss_fn, batches, train_mode=True)
    assert seen[4:] == [True, True]
    model.eval()
    S.parameter_sensitivity(model, loss_fn, batches, train_mode=True)
    assert not model.training
    assert torch.equal(model[0].weight.grad, before) and model[2].bias.grad is None
    with torch.no_grad():  # the measurement needs autograd even when the caller is in no_grad
        S.parameter_sensitivity(model, _mse, batches)


def test_contribution_balance_statistics():
    sens = {"a": torch.arange(1, 101, dtype=torch.float32), "b": torch.zeros(0)}
    bal = S.contribution_balance(sens, exclude_top=0.01)
    kept = torch.arange(1, 100, dtype=torch.float64)  # the top 1% (the value 100) removed
    assert bal.count == 99
    assert bal.std == pytest.approx(float(kept.std(unbiased=False)))
    assert bal.mean == pytest.approx(50.0) and bal.median == pytest.approx(50.0)
    assert (bal.q25, bal.q75) == (pytest.approx(25.5), pytest.approx(74.5))
    assert bal.top20_mean == pytest.approx(90.5) and bal.rest_mean == pytest.approx(40.5)
    assert S.contribution_balance(sens, exclude_top=0).count == 100


def _train_steps(tracker, model, steps, batch=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = torch.randn(16, 6), torch.randn(16, 1)
    checked = 0
    for step in range(steps):
        opt.zero_grad()
        ((model(x) - t) ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        record = tracker.step(step, (x, t) if batch else None)
        if step % tracker.every == 0:
            values = torch.cat([(p.detach() * g).abs().reshape(-1) for p, g in zip(model.parameters(), grads)])
            top, rest, std = _top_rest_std(values)
            assert record == {"step": step, "top20_mean": pytest.approx(top, rel=1e-6),
                              "rest_mean": pytest.approx(rest, rel=1e-6), "std": pytest.approx(std, rel=1e-6)}
            checked += 1
        else:
            assert record is None
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        opt.step()
    return checked


def test_tracker_matches_direct_computation_over_training_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 1))  # 321 parameters: 3 dropped as top 1%
    tracker = S.SensitivityTracker(model, every=2)
    assert _train_steps(tracker, model, 5) == 3
    assert [h["step"] for h in tracker.history] == [0, 2, 4]
    assert tracker.history[0]["top20_mean"] != tracker.history[2]["top20_mean"]  # it follows training
    assert tracker.to_dict() == {"every": 2, "exclude_top": 0.01, "history": tracker.history}
    # with a loss_fn, a batch is measured with its own backward; same numbers, .grad untouched
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 1))
    with_batch = S.SensitivityTracker(model, every=2, loss_fn=_mse)
    assert _train_steps(with_batch, model, 5, batch=True) == 3
    for a, b in zip(tracker.history, with_batch.history):
        assert a == {k: pytest.approx(v, rel=1e-5) for k, v in b.items()}


def test_tracker_errors_and_trainer_callback(monkeypatch):
    model = nn.Linear(3, 1)
    tracker = S.SensitivityTracker(model, every=3)
    with pytest.raises(ValueError, match="after loss.backward"):
        tracker.step(0)
    with pytest.raises(ValueError, match="no loss_fn"):
        tracker.step(0, (torch.randn(2, 3), torch.randn(2, 1)))
    with pytest.raises(ValueError, match="every"):
        S.SensitivityTracker(model, every=0)
    with pytest.raises(ValueError, match="params"):
        S.SensitivityTracker(model, params=["nope"])
    # the adapter subclasses whatever transformers.TrainerCallback is; a stand-in module here
    fake = types.ModuleType("transformers")
    fake.TrainerCallback = type("TrainerCallback", (), {})
    monkeypatch.setitem(sys.modules, "transformers", fake)
    callback = tracker.as_trainer_callback()
    assert isinstance(callback, fake.TrainerCallback)
    _mse(model, (torch.randn(4, 3), torch.randn(4, 1))).backward()
    control = object()
    for global_step in range(6):  # the Trainer's state.global_step before the update
        assert callback.on_pre_optimizer_step(None, types.SimpleNamespace(global_step=global_step), control) is control
    assert [h["step"] for h in tracker.history] == [3, 6]


@pytest.mark.parametrize("fraction", [0.0, 0.137, 0.5, 1.0])
def test_pruning_exact_fraction_and_restore(fraction):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    sens = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    handle = S.prune_by_sensitivity(model, sens, fraction)
    assert handle.count == round(fraction * total)
    flat_sens = torch.cat([s.reshape(-1) for s in sens.values()])
    flat_mask = torch.cat([m.reshape(-1) for m in handle.masks.values()])
    if 0 < handle.count < total:  # the pruned ones are exactly the least sensitive
        assert flat_sens[flat_mask].max() < flat_sens[~flat_mask].min()
    for n, p in model.named_parameters():
        assert torch.all(p[handle.masks[n]] == 0)
        assert torch.equal(p[~handle.masks[n]], original[n][~handle.masks[n]])
    handle.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n])


def test_pruning_ties_are_deterministic_and_subset_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    sens = {"0.weight": torch.ones(4, 3), "1.bias": torch.ones(2)}  # all tied: first positions go
    with S.prune_by_sensitivity(model, sens, 0.5) as handle:
        assert handle.count == 7
        assert handle.masks["0.weight"].reshape(-1).tolist() == [True] * 7 + [False] * 5
        assert not handle.masks["1.bias"].any()
        assert torch.equal(model[0].bias, original["0.bias"]) and torch.equal(model[1].weight, original["1.weight"])
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_pruning_curve_and_plots(tmp_path):
    model, batches = _linear_problem(2)
    sens = S.parameter_sensitivity(model, _mse, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def evaluate(m):
        return float(_mse(m, batches[0]).detach())
    curve = S.pruning_curve(model, sens, evaluate, [0.0, 0.4, 1.0])
    assert [f for f, _ in curve] == [0.0, 0.4, 1.0]
    assert curve[0][1] == pytest.approx(evaluate(model))
    assert curve[2][1] == pytest.approx(float((batches[0][1] ** 2).mean()))  # all zero: output 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    def failing(m):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        S.pruning_curve(model, sens, failing, [0.5])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    tracker = S.SensitivityTracker(model, every=1)
    for step in range(3):
        model.zero_grad()
        _mse(model, batches[step]).backward()
        tracker.step(step)
    paths = [S.plot_sensitivity_violins({"a": sens, "b": sens}, tmp_path / "v.png"),
             S.plot_pruning_curves({"a": curve}, tmp_path / "p.png"),
             S.plot_top_vs_rest({"a": tracker, "b": tracker.to_dict(), "c": tracker.history}, tmp_path / "sub" / "t.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(ValueError, match="non-empty dict"):
        S.plot_pruning_curves({}, tmp_path / "x.png")


def _fake_loader_module(monkeypatch, with_evaluate):
    def load(path):
        model, batches = _linear_problem(int(open(path).read()))
        if with_evaluate:
            return model, _mse, iter(batches), lambda m: 42.0 + float(m.weight.abs().sum() == 0)
        return model, _mse, iter(batches)
    module = types.ModuleType("fake_sensitivity_loader")
    module.load = load
    monkeypatch.setitem(sys.modules, "fake_sensitivity_loader", module)


def _checkpoints(tmp_path):
    paths = []
    for i in (3, 4):
        (tmp_path / f"run{i}").mkdir()
        ckpt = tmp_path / f"run{i}" / "checkpoint.pt"
        ckpt.write_text(str(i))
        paths.append(str(ckpt))
    return paths


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    _fake_loader_module(monkeypatch, with_evaluate=False)
    ckpts = _checkpoints(tmp_path)
    out = tmp_path / "out"
    summary = S.main(ckpts + ["--loader", "fake_sensitivity_loader:load", "--out", str(out),
                              "--fractions", "0", "0.5", "--max-batches", "2"])
    assert set(summary["models"]) == {"run3", "run4"}
    assert json.loads((out / "sensitivity.json").read_text()) == json.loads(json.dumps(summary))
    assert "torch" in summary["machine"]
    model, batches = _linear_problem(3)
    run3 = summary["models"]["run3"]
    want = S.contribution_balance(S.parameter_sensitivity(model, _mse, batches[:2]))
    assert run3["balance"]["std"] == pytest.approx(want.std) and run3["batches"] == 2
    with torch.no_grad():  # the default metric: mean loss over the batches, unpruned at fraction 0
        assert run3["pruning"][0] == [0.0, pytest.approx(sum(float(_mse(model, b)) for b in batches[:2]) / 2)]
    for name in ("sensitivity_violins.png", "pruning_curves.png"):
        assert (out / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| run3 |" in printed and "pruned 50%" in printed


def test_cli_uses_the_loaders_evaluate_and_labels(tmp_path, monkeypatch):
    _fake_loader_module(monkeypatch, with_evaluate=True)
    ckpts = _checkpoints(tmp_path)
    summary = S.main(ckpts + ["--loader", "fake_sensitivity_loader:load", "--out", str(tmp_path / "o"),
                              "--fractions", "0", "1", "--labels", "base", "intra"])
    assert summary["models"]["base"]["pruning"] == [[0.0, 42.0], [1.0, 43.0]]
    with pytest.raises(SystemExit):
        S.main(ckpts + ["--loader", "no_colon", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        S.main(ckpts + ["--loader", "fake_sensitivity_loader:load", "--labels", "one"])


def test_bad_input():
    model, batches = _linear_problem()
    with pytest.raises(ValueError, match="max_batches"):
        S.parameter_sensitivity(model, _mse, batches, max_batches=0)
    with pytest.raises(ValueError, match="empty"):
        S.parameter_sensitivity(model, _mse, [])
    with pytest.raises(TypeError, match="model"):
        S.parameter_sensitivity(lambda x: x, _mse, batches)
    with pytest.raises(TypeError, match="loss_fn"):
        S.parameter_sensitivity(model, "mse", batches)
    with pytest.raises(ValueError, match="scalar"):
        S.parameter_sensitivity(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ValueError, match="no_grad"):
        S.parameter_sensitivity(model, lambda m, b: b[1].sum(), batches)
    with pytest.raises(ValueError, match="params"):
        S.parameter_sensitivity(model, _mse, batches, params=["nope"])
    with pytest.raises(ValueError, match="exclude_top"):
        S.contribution_balance({"w": torch.ones(3)}, exclude_top=1.5)
    with pytest.raises(ValueError, match="empty"):
        S.contribution_balance({})
    with pytest.raises(ValueError, match="fraction"):
        S.prune_by_sensitivity(model, {"weight": torch.ones(1, 4)}, 1.5)
    with pytest.raises(TypeError, match="fraction"):
        S.prune_by_sensitivity(model, {"weight": torch.ones(1, 4)}, "half")
    with pytest.raises(ValueError, match="does not have"):
        S.prune_by_sensitivity(model, {"nope": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        S.prune_by_sensitivity(model, {"weight": torch.ones(4)}, 0.5)
