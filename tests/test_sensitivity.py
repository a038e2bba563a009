"""Sensitivity toolkit: exact values on a model with closed-form gradients, tracker, pruning, plots, CLI."""

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


def test_sensitivity_matches_closed_form():
    model, batches = _linear_problem()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    want_w, want_b = torch.zeros_like(w), torch.zeros_like(b)
    for x, t in batches:
        r = x @ w.T + b - t                    # d/dθ mean(r²) = 2 mean(r · ∂r/∂θ)
        want_w += (w * (2 * (r * x).mean(0, keepdim=True))).abs()
        want_b += (b * (2 * r.mean(0))).abs()
    sens = S.parameter_sensitivity(model, _mse, batches)
    torch.testing.assert_close(sens["weight"], want_w / 3)
    torch.testing.assert_close(sens["bias"], want_b / 3)
    assert set(sens) == {"weight", "bias"}
    assert set(S.parameter_sensitivity(model, _mse, batches, max_batches=1, params=["bias"])) == {"bias"}


def test_callers_grads_and_mode_untouched():
    model, batches = _linear_problem(1)
    model.train()
    _mse(model, batches[0]).backward()
    before = model.weight.grad.clone()
    model.bias.grad = None
    S.parameter_sensitivity(model, _mse, batches)
    assert model.training
    assert torch.equal(model.weight.grad, before) and model.bias.grad is None


def test_contribution_balance_statistics():
    sens = {"a": torch.arange(1, 101, dtype=torch.float32), "b": torch.zeros(0)}
    bal = S.contribution_balance(sens, exclude_top=0.01)
    kept = torch.arange(1, 100, dtype=torch.float64)  # the top 1% (the value 100) removed
    assert bal.count == 99
    assert bal.std == pytest.approx(float(kept.std(unbiased=False)))
    assert bal.mean == pytest.approx(50.0)
    assert bal.top20_mean == pytest.approx(float(torch.arange(81, 101, dtype=torch.float64).mean()))
    assert bal.rest_mean == pytest.approx(float(torch.arange(1, 81, dtype=torch.float64).mean()))
    with pytest.raises(ValueError, match="exclude_top"):
        S.contribution_balance(sens, exclude_top=1.5)


def test_tracker_records_top_and_rest_from_current_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = S.SensitivityTracker(model, every=2)
    x, t = torch.randn(16, 6), torch.randn(16, 1)
    for step in range(5):
        opt.zero_grad()
        ((model(x) - t) ** 2).mean().backward()
        record = tracker.step(step)
        if step % 2 == 0:
            values = torch.cat([(p * p.grad).abs().reshape(-1) for p in model.parameters()]).sort(descending=True).values
            top = int(-(-0.2 * values.numel() // 1))
            assert record["top20_mean"] == pytest.approx(float(values[:top].mean()), rel=1e-6)
            assert record["rest_mean"] == pytest.approx(float(values[top:].mean()), rel=1e-6)
        else:
            assert record is None
        opt.step()
    assert [h["step"] for h in tracker.history] == [0, 2, 4]
    assert tracker.to_dict()["every"] == 2


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
        assert flat_sens[flat_mask].max() <= flat_sens[~flat_mask].min()
    for n, p in model.named_parameters():
        assert torch.all(p[handle.masks[n]] == 0)
    handle.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n])


def test_pruning_curve_and_plots(tmp_path):
    model, batches = _linear_problem(2)
    sens = S.parameter_sensitivity(model, _mse, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    curve = S.pruning_curve(model, sens, lambda m: float(_mse(m, batches[0])), [0.0, 0.4, 1.0])
    assert [f for f, _ in curve] == [0.0, 0.4, 1.0]
    assert curve[0][1] == pytest.approx(float(_mse(model, batches[0])))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    paths = [S.plot_sensitivity_violins({"a": sens, "b": sens}, tmp_path / "v.png"),
             S.plot_pruning_curves({"a": curve}, tmp_path / "p.png"),
             S.plot_top_vs_rest({"a": [{"step": 0, "top20_mean": 1.0, "rest_mean": 0.1},
                                       {"step": 1, "top20_mean": 0.5, "rest_mean": 0.2}]}, tmp_path / "t.png")]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    def loader(path):
        model, batches = _linear_problem(int(open(path).read()))
        return model, _mse, batches
    module = types.ModuleType("fake_sensitivity_loader")
    module.load = loader
    monkeypatch.setitem(sys.modules, "fake_sensitivity_loader", module)
    ckpts = []
    for i in (3, 4):
        (tmp_path / f"run{i}").mkdir()
        ckpt = tmp_path / f"run{i}" / "checkpoint.pt"
        ckpt.write_text(str(i))
        ckpts.append(str(ckpt))
    summary = S.main(ckpts + ["--loader", "fake_sensitivity_loader:load", "--out", str(tmp_path / "out"),
                              "--fractions", "0", "0.5"])
    assert set(summary) == {"run3", "run4"}
    assert (tmp_path / "out" / "sensitivity_violins.png").exists() and (tmp_path / "out" / "sensitivity.json").exists()
    assert "| run3 |" in capsys.readouterr().out


def test_bad_input():
    model, batches = _linear_problem()
    with pytest.raises(ValueError, match="max_batches"):
        S.parameter_sensitivity(model, _mse, batches, max_batches=0)
    with pytest.raises(ValueError, match="empty"):
        S.parameter_sensitivity(model, _mse, [])
    with pytest.raises(ValueError, match="fraction"):
        S.prune_by_sensitivity(model, {"weight": torch.ones(1, 4)}, 1.5)
    with pytest.raises(ValueError, match="does not have"):
        S.prune_by_sensitivity(model, {"nope": torch.ones(3)}, 0.5)
