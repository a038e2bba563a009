"""The translation example runs end to end on a tiny slice of the real offline data."""

import json
import shutil

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

from examples.translation import data, train  # noqa: E402
from helpers import free_port  # noqa: E402

TINY = ["--preset", "demo", "--max-train-pairs", "600", "--valid-size", "30", "--test-size", "30",
        "--max-test-pairs", "8", "--vocab-size", "400", "--layers", "1", "--embed-dim", "32",
        "--ffn-dim", "64", "--heads", "2", "--max-steps", "4", "--eval-every", "2", "--beam", "2",
        "--max-tokens", "256", "--no-progress"]


@pytest.fixture(scope="module")
def debian_available():
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the offline data comes from a Debian package; apt-get is not here")


def test_ding_pairs_are_real_sentences(debian_available):
    pairs = data.load_trans_de_en()
    assert len(pairs) > 15000
    assert all(len(d.split()) >= 4 and len(e.split()) >= 4 for d, e in pairs[:500])
    splits = data.split_pairs(pairs, 300, 300)
    held_out = {s for s, _ in splits["test"]} | {s for s, _ in splits["valid"]}
    assert not held_out & {s for s, _ in splits["train"]}


def test_bible_verses_are_aligned(debian_available):
    pairs = data.load_bible_es_en()
    assert len(pairs) > 30000
    by_text = dict(pairs)
    # John 3:16 and Genesis 1:1 in Reina-Valera 1909 map to the same verses of the King James Version
    es = next(s for s in by_text if s.startswith("Porque de tal manera amó Dios al mundo"))
    assert by_text[es].startswith("For God so loved the world")
    assert pairs[0] == ("EN el principio crió Dios los cielos y la tierra.", "In the beginning God created the heaven and the earth.")
    assert not any("<" in s or "<" in t for s, t in pairs)


def test_osis_markup_is_removed():
    entry = ('<w lemma="strong:H0430">God</w> <transChange type="added">was</transChange> good'
             '<note type="x-study">a note</note> &amp; \u00b6 <title>Psalm</title>right.')
    assert data.osis_to_text(entry) == "God was good & right."


# The fast tier: the K-pass method on both loss paths and the second data set; the other methods
# in the full tier.
@pytest.mark.parametrize("method,extra", [pytest.param("baseline", [], marks=pytest.mark.full),
                                          pytest.param("rdrop", [], marks=pytest.mark.full),
                                          ("intra-distillation", []),
                                          ("intra-distillation", ["--fused-linear"]),
                                          ("baseline", ["--data", "bible-es-en"])])
def test_train_few_steps_writes_reports(debian_available, tmp_path, method, extra):
    report = train.run(train.parse_args(TINY + ["--method", method, "--out", str(tmp_path)] + extra))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["steps"] == 4 and saved["method"] == method
    assert saved["passes"] == {"baseline": 1, "rdrop": 2, "intra-distillation": 3}[method]
    assert 0.0 <= saved["bleu"] <= 100.0 and saved["valid_loss"] > 0
    assert len(saved["history"]) == 2 and (tmp_path / "valid_loss.png").stat().st_size > 0
    assert "| " + method in (tmp_path / "report.md").read_text()
    if method != "baseline":
        assert saved["history"][-1]["divergence"] > 0
    model, loss_fn, batches = train.sensitivity_inputs(report["checkpoint"], max_batches=2)
    assert float(loss_fn(model, batches[0]).detach()) > 0


def test_iwslt14_files_path(debian_available, tmp_path):
    """--data iwslt14 reads prepare-iwslt14.sh's layout (train/valid/test.{de,en}, a sentence a
    line); real Ding pairs stand in for the IWSLT release, which needs a network."""
    splits = data.split_pairs(list(data.load_trans_de_en()), 30, 30)
    data_dir = tmp_path / "iwslt14.tokenized.de-en"
    data_dir.mkdir()
    for split, pairs in splits.items():
        pairs = pairs[:600]
        (data_dir / f"{split}.de").write_text("".join(f"{d}\n" for d, _ in pairs), encoding="utf-8")
        (data_dir / f"{split}.en").write_text("".join(f"{e}\n" for _, e in pairs), encoding="utf-8")
    loaded = data.load_iwslt14("de", data_dir)
    assert loaded["test"][:3] == splits["test"][:3] and len(loaded["train"]) == 600
    out = tmp_path / "run"
    train.run(train.parse_args(TINY + ["--data", "iwslt14", "--src", "de", "--data-dir", str(data_dir),
                                       "--method", "intra-distillation", "--out", str(out)]))
    saved = json.loads((out / "report.json").read_text())
    assert saved["data"] == "iwslt14" and saved["steps"] == 4 and saved["history"][-1]["divergence"] > 0
    with pytest.raises(ValueError, match="source language"):
        data.load_iwslt14("xx", data_dir)
    with pytest.raises(FileNotFoundError, match="prepare-iwslt14"):
        data.load_iwslt14("it", data_dir)


def test_inverse_sqrt_schedule():
    assert train.inverse_sqrt(50, 100) == pytest.approx(0.5)
    assert train.inverse_sqrt(100, 100) == pytest.approx(1.0)
    assert train.inverse_sqrt(400, 100) == pytest.approx(0.5)


@pytest.mark.full
def test_torchrun_two_ranks(debian_available, tmp_path):
    """DistributedDataParallel on two CPU processes (gloo), through the fused-linear path, which
    must run inside DDP's forward for the gradients to be synchronised."""
    import os
    import subprocess
    import sys

    # A free port rather than torchrun's fixed default (29500), which a concurrent run may hold.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "examples.translation.train",
           *TINY, "--method", "intra-distillation", "--fused-linear", "--threads", "1", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["steps"] == 4 and saved["history"][-1]["divergence"] > 0
