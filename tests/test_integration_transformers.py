"""The Trainer subclass against the functional API on tiny randomly initialised models."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from intradistill_kernels import AdaptiveAlpha, consistency_mse, intra_distillation_loss  # noqa: E402
from intradistill_kernels.integrations.transformers import (  # noqa: E402
    IntraDistillationArguments, IntraDistillationTrainer, repeat_batch)

K = 3


def _config(num_labels=2):
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                                   hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.1)


def _trainer(model, tmp_path, intra=None, **kw):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                                          disable_tqdm=True, **kw)
    return IntraDistillationTrainer(model=model, args=args, intra_args=intra or IntraDistillationArguments(passes=K))


def _batch(b=4, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": torch.randint(1, 50, (b, t), generator=g), "attention_mask": mask}


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _compare(model, trainer, inputs, manual_loss_fn):
    """Trainer loss and manual functional-API loss under the same seed (same dropout masks)."""
    model.train()
    torch.manual_seed(123)
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    g_trainer = _grads(model)
    model.zero_grad()
    torch.manual_seed(123)
    ref = manual_loss_fn(model)
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad()
    torch.testing.assert_close(loss, ref)
    assert len(g_trainer) == len(g_ref) > 0
    for a, b in zip(g_trainer, g_ref):
        torch.testing.assert_close(a, b)
    return loss


def test_sequence_classification_matches_functional(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config(3))
    trainer = _trainer(model, tmp_path)
    inputs = {**_batch(), "labels": torch.tensor([0, 2, 1, 2])}

    def manual(m):
        x = {k: v for k, v in inputs.items() if k != "labels"}
        logits = m(**repeat_batch(x, K)).logits.unflatten(0, (K, -1))
        return intra_distillation_loss(logits, inputs["labels"], 1.0).loss

    loss = _compare(model, trainer, inputs, manual)
    # the K copies saw different dropout masks, so the divergence is really there
    assert trainer._sums["divergence"] > 0


def test_regression_head_uses_mse_and_consistency(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config(1))
    trainer = _trainer(model, tmp_path, IntraDistillationArguments(passes=K, alpha=1.0))
    inputs = {**_batch(), "labels": torch.tensor([0.5, 3.0, 1.2, 4.8])}

    def manual(m):
        x = {k: v for k, v in inputs.items() if k != "labels"}
        out = m(**repeat_batch(x, K)).logits.squeeze(-1).unflatten(0, (K, -1))
        mse = ((out - inputs["labels"]) ** 2).mean()
        return mse + consistency_mse(out)

    _compare(model, trainer, inputs, manual)


def test_token_classification_ignores_minus_100(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForTokenClassification(_config(5))
    trainer = _trainer(model, tmp_path, IntraDistillationArguments(passes=K, alpha=0.5))
    batch = _batch()
    labels = torch.randint(0, 5, (4, 7), generator=torch.Generator().manual_seed(1))
    labels[batch["attention_mask"] == 0] = -100
    labels[:, 0] = -100
    inputs = {**batch, "labels": labels}

    def manual(m):
        logits = m(**repeat_batch(batch, K)).logits.unflatten(0, (K, -1))
        return intra_distillation_loss(logits, labels, 0.5, ignore_index=-100).loss

    _compare(model, trainer, inputs, manual)


def _qa_reference(model, batch, starts, ends, alpha, **options):
    """The mean over the 2 x 4 start and end targets of the loss on padding-masked logits."""
    out = model(**repeat_batch(batch, K))
    pad = (batch["attention_mask"] == 0).unsqueeze(0)
    total = 0
    for logits, target in ((out.start_logits, starts), (out.end_logits, ends)):
        logits = logits.unflatten(0, (K, -1)).masked_fill(pad, torch.finfo(torch.float32).min / 4)
        total = total + intra_distillation_loss(logits, target, alpha, reduction="sum", **options).loss
    return total / 8


def test_question_answering_masks_padding(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(_config(2))
    trainer = _trainer(model, tmp_path)
    batch = _batch()
    starts, ends = torch.tensor([1, 2, 0, 4]), torch.tensor([3, 2, 1, 6])
    inputs = {**batch, "start_positions": starts, "end_positions": ends}

    _compare(model, trainer, inputs, lambda m: _qa_reference(m, batch, starts, ends, 1.0))


def test_repeat_batch_copies_not_aliases():
    enc = transformers.BatchEncoding({"input_ids": torch.arange(6).view(2, 3),
                                      "start_positions": torch.tensor([1, 2])})
    batch = {"enc": enc, "ids": torch.tensor([[1, 2], [3, 4]]), "name": "x", "nested": [torch.ones(2, 1)]}
    out = repeat_batch(batch, 3)
    assert out["name"] == "x"
    assert isinstance(out["enc"], transformers.BatchEncoding)
    assert out["ids"].shape == (6, 2) and out["nested"][0].shape == (6, 1)
    torch.testing.assert_close(out["ids"], torch.tensor([[1, 2], [3, 4]] * 3))
    pos = out["enc"]["start_positions"]
    assert pos.shape == (6,)
    assert pos.data_ptr() != enc["start_positions"].data_ptr()
    pos[0] = 99  # one copy changes alone: the K copies do not share memory
    assert pos[2] == 1 and enc["start_positions"][0] == 1
    with pytest.raises(ValueError, match="passes"):
        repeat_batch(batch, 0)
    with pytest.raises(TypeError, match="passes"):
        repeat_batch(batch, 2.0)


def test_adaptive_alpha_follows_global_step(tmp_path):
    model = transformers.BertForSequenceClassification(_config(2))
    intra = IntraDistillationArguments(passes=K, alpha=2.0, p=5.0, q=10.0)
    trainer = _trainer(model, tmp_path, intra)
    schedule = AdaptiveAlpha(2.0, 5.0, 10.0, 100)
    trainer.state.max_steps = 100
    seen = []
    for step in (0, 3, 10, 15, 20, 60):
        trainer.state.global_step = step
        seen.append(trainer.current_alpha())
        assert trainer.current_alpha() == pytest.approx(schedule(step))
    assert seen[0] == 0.0 and seen[-1] == 2.0 and seen == sorted(seen)
    trainer.intra_args.adaptive = False
    assert trainer.current_alpha() == 2.0


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 50, (n, 6), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


def test_training_logs_ce_divergence_alpha_and_eval_is_single_pass(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config(2))
    trainer = _trainer(model, tmp_path, IntraDistillationArguments(passes=K, alpha=2.0, p=2.0, q=4.0),
                       max_steps=4, logging_steps=2, per_device_train_batch_size=4, learning_rate=1e-3)
    trainer.train_dataset = _Rows()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert {"ce", "divergence", "alpha"} <= h.keys()
        assert h["divergence"] > 0
    # steps 0,1 average alpha(0), alpha(1); steps 2,3 are past N/p = 2 so alpha is 2
    sched = AdaptiveAlpha(2.0, 2.0, 4.0, 4)
    assert logs[0]["alpha"] == pytest.approx((sched(0) + sched(1)) / 2, abs=1e-5)
    assert logs[1]["alpha"] == pytest.approx(2.0)

    model.eval()
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    batch = {k: torch.stack([_Rows()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    loss, logits, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    hook.remove()
    assert calls == [4] and logits.shape == (4, 2)  # one pass, batch not repeated
    model.train()  # even left in train mode (the Trainer does not switch it), prediction is one pass
    calls.clear()
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    trainer.prediction_step(model, batch, prediction_loss_only=False)
    hook.remove()
    assert calls == [4]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**batch).loss)


def test_bad_arguments():
    with pytest.raises(ValueError, match="passes"):
        IntraDistillationArguments(passes=1)
    with pytest.raises(ValueError, match="divergence"):
        IntraDistillationArguments(divergence="kl")
    with pytest.raises(ValueError, match="q > p"):
        IntraDistillationArguments(alpha=2.0, p=10.0, q=5.0)


def test_qa_answer_outside_the_window_is_ignored_like_transformers(tmp_path):
    """A start/end position equal to the sequence length marks an answer outside the window:
    transformers ignores it (it used to be clamped onto a padding token: loss ~1e37)."""
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(_config(2))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer = _trainer(model, tmp_path, IntraDistillationArguments(passes=2, adaptive=False))
    batch = _batch()
    t = batch["input_ids"].shape[1]
    starts, ends = torch.tensor([1, t, 0, 4]), torch.tensor([3, t, 1, 9])  # row 1 outside; end 9 > T clamps to T
    model.train()
    loss = trainer.compute_loss(model, {**batch, "start_positions": starts, "end_positions": ends})
    assert torch.isfinite(loss) and float(loss) < 20
    # the model's own loss (no padding mask there, so compare with the mask all ones)
    ones = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
    loss = trainer.compute_loss(model, {**ones, "start_positions": starts, "end_positions": ends})
    own = model(**ones, start_positions=starts, end_positions=ends).loss
    # 3 valid starts, 2 valid ends: transformers averages each over its own count; the pooled token
    # mean used here (exact under accumulation) weighs them by count
    out = model(**ones)
    ce = torch.nn.functional.cross_entropy
    s = ce(out.start_logits, starts.clamp(0, t), ignore_index=t, reduction="sum")
    e = ce(out.end_logits, ends.clamp(0, t), ignore_index=t, reduction="sum")
    torch.testing.assert_close(loss, (s + e) / 5)
    assert abs(float(own) - float((s / 3 + e / 2) / 2)) < 1e-5
    all_in = torch.tensor([1, 2, 0, 4]), torch.tensor([3, 2, 1, 6])
    torch.testing.assert_close(trainer.compute_loss(model, {**ones, "start_positions": all_in[0], "end_positions": all_in[1]}),
                               model(**ones, start_positions=all_in[0], end_positions=all_in[1]).loss)


def test_repeat_batch_keeps_namedtuple_and_mapping_types():
    from collections import OrderedDict, defaultdict, namedtuple

    Pair = namedtuple("Pair", "ids mask")
    out = repeat_batch(Pair(torch.arange(4).view(2, 2), torch.ones(2, 2)), 2)
    assert type(out) is Pair and out.ids.shape == (4, 2)
    ordered = repeat_batch(OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))]), 3)
    assert type(ordered) is OrderedDict and list(ordered) == ["b", "a"] and ordered["a"].shape == (3,)
    dd = defaultdict(list, x=torch.ones(2))
    out = repeat_batch(dd, 2)
    assert type(out) is defaultdict and out.default_factory is list and out["x"].shape == (4,)


def test_adaptive_alpha_rejects_none_and_nan_steps():
    schedule = AdaptiveAlpha(2.0, 5.0, 10.0, 100)
    with pytest.raises(TypeError, match="step"):
        schedule(None)
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(ValueError, match="step"):
            schedule(bad)
    assert schedule(10.0) == schedule(10)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(alpha=float("nan")), ValueError, "alpha"), (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(alpha=-1.0), ValueError, "alpha"), (dict(alpha="1"), TypeError, "alpha"),
    (dict(backend="gpu"), ValueError, "backend"), (dict(p=float("nan")), ValueError, "p"),
    (dict(adaptive=1), TypeError, "adaptive"), (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(fused_linear="yes"), TypeError, "fused_linear"),
])
def test_arguments_are_checked_when_made(kwargs, error, name):
    with pytest.raises(error, match=name):
        IntraDistillationArguments(**kwargs)


def test_question_answering_z_loss_and_label_smoothing(tmp_path):
    """QA takes z_loss (the squared log-sum-exp over the unmasked positions) and refuses label
    smoothing, which would put target mass on the masked padding."""
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(_config(2))
    trainer = _trainer(model, tmp_path, IntraDistillationArguments(passes=K, alpha=0.5, z_loss=0.1))
    batch = _batch()
    starts, ends = torch.tensor([1, 2, 0, 4]), torch.tensor([3, 2, 1, 6])

    _compare(model, trainer, {**batch, "start_positions": starts, "end_positions": ends},
             lambda m: _qa_reference(m, batch, starts, ends, 0.5, z_loss=0.1))
    assert trainer._sums["z_loss"] > 0
    with pytest.raises(ValueError, match="label smoothing over positions"):
        _trainer(model, tmp_path, label_smoothing_factor=0.1)
