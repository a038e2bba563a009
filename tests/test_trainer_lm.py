"""IntraDistillationTrainer on language models: shifted labels, the fused-linear path, exact gradient
accumulation, compared with transformers' own results on tiny models built from configs."""
import pytest
import torch
from test_fused_linear import _LargestAllocation

transformers = pytest.importorskip("transformers")

from intradistill_kernels import intra_distillation_loss  # noqa: E402
from intradistill_kernels.integrations.transformers import (  # noqa: E402
    IntraDistillationArguments, IntraDistillationTrainer, repeat_batch)

V, T = 97, 12


def _llama(tied=False, bias=False, seed=0, cls=None):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=tied, pad_token_id=0)
    model = (cls or transformers.LlamaForCausalLM)(config)
    if bias:
        model.lm_head = torch.nn.Linear(16, V, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model


def _qwen2(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


class _Rows(torch.utils.data.Dataset):
    """Rows of different lengths: padding and a prompt prefix carry label -100, so micro-batches hold
    different numbers of label tokens."""

    def __init__(self, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            length = int(torch.randint(4, T + 1, (1,), generator=g))
            prompt = int(torch.randint(0, length - 2, (1,), generator=g))
            ids = torch.zeros(T, dtype=torch.long)
            ids[:length] = torch.randint(1, V, (length,), generator=g)
            mask = (torch.arange(T) < length).long()
            labels = ids.masked_fill(mask == 0, -100)
            labels[:prompt] = -100
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _batch(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _args(tmp_path, micro, accum, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, max_steps=1,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, seed=0, **kw)


def _update(model, trainer):
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def _assert_same_update(a, b, rtol=1e-5):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    assert den > 0
    assert num / den < rtol, f"relative update difference {num / den:.3g}"


def _perturb_passes(model, k):
    """Deterministic per-pass, per-example perturbations of the embeddings stand in for dropout, so
    runs that split the batch differently see the same K passes."""
    emb = model.get_input_embeddings()

    def hook(module, args, out):
        ids = args[0]
        pass_index = torch.arange(ids.shape[0]) // (ids.shape[0] // k)
        phase = ids.double() * 0.37 * (pass_index[:, None] + 1)
        wave = torch.sin(phase[..., None] + torch.arange(out.shape[-1]) * 0.11)
        return out + 0.3 * wave.to(out.dtype)

    return emb.register_forward_hook(hook)


LargestAllocation = _LargestAllocation  # the largest tensor any operation produced while active


@pytest.mark.parametrize("build,smoothing", [(lambda: _llama(), 0.0), (lambda: _llama(tied=True), 0.0),
                                             (lambda: _llama(bias=True), 0.0), (lambda: _qwen2(), 0.0),
                                             (lambda: _llama(), 0.1)],
                         ids=["llama", "llama-tied", "llama-bias", "qwen2-tied", "llama-label-smoothing"])
def test_causal_lm_step_equals_plain_trainer(tmp_path, build, smoothing):
    """Dropout off: the divergence is 0 and one step (micro-batch 2 x accumulation 4) is the plain
    Trainer's step (micro-batch 8): labels shifted, the token mean over the whole accumulated batch,
    the Trainer's label_smoothing_factor applied the same way."""
    data = _Rows()
    model = build()
    plain = transformers.Trainer(model=model, args=_args(tmp_path / "plain", 8, 1, label_smoothing_factor=smoothing),
                                 train_dataset=data)
    want = _update(model, plain)
    model = build()
    intra = IntraDistillationTrainer(model=model, args=_args(tmp_path / "intra", 2, 4, label_smoothing_factor=smoothing),
                                     train_dataset=data, intra_args=IntraDistillationArguments(
                                         passes=3, alpha=1.0, adaptive=False, chunk_size=4))
    got = _update(model, intra)
    _assert_same_update(got, want)


def test_accumulation_is_exact_with_divergence(tmp_path):
    """With K different passes (divergence > 0): micro-batch 2 x accumulation 4 == micro-batch 8 x 1."""
    data = _Rows(seed=3)
    updates = []
    for micro, accum in ((8, 1), (2, 4)):
        model = _llama(seed=1)
        handle = _perturb_passes(model, 3)
        trainer = IntraDistillationTrainer(
            model=model, args=_args(tmp_path / f"{micro}", micro, accum, logging_steps=1), train_dataset=data,
            intra_args=IntraDistillationArguments(passes=3, alpha=2.0, adaptive=False))
        updates.append(_update(model, trainer))
        handle.remove()
        log = [h for h in trainer.state.log_history if "divergence" in h][0]
        assert log["divergence"] > 1e-4
    _assert_same_update(updates[1], updates[0])


@pytest.mark.parametrize("fused,z_loss", [(True, 0.0), (False, 0.0), (True, 0.05), (False, 0.05)])
def test_causal_lm_loss_and_grads_match_float64_reference(tmp_path, fused, z_loss):
    """compute_loss against the functional loss in float64 on the shifted labels, grad_output 0.7."""
    k, alpha = 3, 0.8
    extra = {"z_loss": z_loss} if z_loss else {}
    model = _llama(bias=True, seed=2)
    handle = _perturb_passes(model, k)
    trainer = IntraDistillationTrainer(model=model, args=_args(tmp_path, 4, 1),
                                       intra_args=IntraDistillationArguments(passes=k, alpha=alpha, adaptive=False,
                                                                             divergence="js", fused_linear=fused,
                                                                             **extra))
    batch = _batch(_Rows(n=4, seed=5).rows)
    model.train()
    (0.7 * trainer.compute_loss(model, dict(batch))).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    model.double()
    inputs = {k_: v for k_, v in batch.items() if k_ != "labels"}
    logits = model(**repeat_batch(inputs, k)).logits.unflatten(0, (k, -1))
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    ref = intra_distillation_loss(logits, shifted, alpha, divergence="js", backend="torch", **extra)
    (0.7 * ref.loss).backward()
    if z_loss:
        assert ref.z_loss > 0 and trainer._sums["z_loss"] == pytest.approx(float(ref.z_loss), rel=1e-4)
    assert ref.divergence > 1e-4
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-4, atol=1e-6, msg=n)
    handle.remove()


def test_shift_labels_in_batch_are_used_as_given(tmp_path):
    model = _llama(seed=4)
    trainer = IntraDistillationTrainer(model=model, args=_args(tmp_path, 4, 1),
                                       intra_args=IntraDistillationArguments(passes=2, adaptive=False))
    batch = _batch(_Rows(n=4, seed=6).rows)
    model.train()
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    from_labels = trainer.compute_loss(model, dict(batch))
    given = {k: v for k, v in batch.items() if k != "labels"}
    from_shift = trainer.compute_loss(model, {**given, "shift_labels": shifted})
    torch.testing.assert_close(from_shift, from_labels)
    # an unshifted target passed as shift_labels is taken literally: a different loss
    other = trainer.compute_loss(model, {**given, "shift_labels": batch["labels"]})
    assert abs(float(other) - float(from_labels)) > 1e-3


def _seq2seq(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=V, pad_token_id=0, decoder_start_token_id=1, eos_token_id=2)
    if kind == "t5":
        config = transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
                                       tie_word_embeddings=True, **common)
        return transformers.T5ForConditionalGeneration(config)
    small = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=64, **common)
    if kind == "marian":
        model = transformers.MarianMTModel(transformers.MarianConfig(**small))
    else:
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(**small))
    # a non-zero final_logits_bias, so leaving it out of the fused path would show
    model.final_logits_bias.normal_(std=0.5)
    return model


@pytest.mark.parametrize("kind", ["t5", "marian", "bart"])
def test_seq2seq_lm_matches_model_loss(tmp_path, kind):
    """Dropout off: the K passes agree and the loss and gradients are the model's own cross-entropy
    (T5's tied-embedding rescale and BART/Marian's final_logits_bias included)."""
    model = _seq2seq(kind)
    trainer = IntraDistillationTrainer(model=model, args=_args(tmp_path, 4, 1),
                                       intra_args=IntraDistillationArguments(passes=2, adaptive=False))
    g = torch.Generator().manual_seed(7)
    batch = {"input_ids": torch.randint(3, V, (3, 9), generator=g), "attention_mask": torch.ones(3, 9, dtype=torch.long),
             "labels": torch.randint(3, V, (3, 6), generator=g)}
    batch["attention_mask"][1, 6:] = 0
    batch["labels"][2, 4:] = -100
    model.train()
    with LargestAllocation() as mode:
        (0.7 * trainer.compute_loss(model, dict(batch))).backward()
    assert mode.largest < 2 * 3 * 6 * V  # never the [K, B, T, V] logits
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (0.7 * model(**batch).loss).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def _gemma2():
    config = transformers.Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=64, final_logit_softcapping=3.0)
    return transformers.Gemma2ForCausalLM(config)


def _cohere():
    config = transformers.CohereConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                       logit_scale=0.25)
    return transformers.CohereForCausalLM(config)


@pytest.mark.parametrize("build,option,key", [(_gemma2, "final_logit_softcapping", "softcap"),
                                              (_cohere, "logit_scale", "logit_scale")], ids=["gemma2", "cohere"])
def test_logit_softcap_and_scale_architectures(tmp_path, monkeypatch, build, option, key):
    """Gemma 2 soft-caps its logits, Cohere scales them: the fused-linear loss gets the model's
    value as its softcap / logit_scale option and reproduces the model's own loss."""
    import intradistill_kernels.integrations.output_layer as integ

    passed = []
    real = integ.fused_linear_intra_distillation_loss
    monkeypatch.setattr(integ, "fused_linear_intra_distillation_loss",
                        lambda *a, **kw: passed.append(kw.get(key)) or real(*a, **kw))
    torch.manual_seed(0)
    model = build()
    trainer = IntraDistillationTrainer(model=model, args=_args(tmp_path, 4, 1),
                                       intra_args=IntraDistillationArguments(passes=2, adaptive=False))
    batch = _batch(_Rows(n=3, seed=8).rows)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    assert passed == [getattr(model.config, option)]
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


class DoubledLlamaForCausalLM(transformers.LlamaForCausalLM):
    """An architecture that changes its logits after the output layer in a way nothing declares."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_unknown_logit_transform_is_refused(tmp_path):
    model = _llama(cls=DoubledLlamaForCausalLM)
    trainer = IntraDistillationTrainer(model=model, args=_args(tmp_path, 4, 1),
                                       intra_args=IntraDistillationArguments(passes=2))
    model.train()
    with pytest.raises(ValueError, match="DoubledLlamaForCausalLM.*fused_linear=False"):
        trainer.compute_loss(model, _batch(_Rows(n=2).rows))
    # the materialised path scores the model's own logits, whatever they are
    trainer.intra_args.fused_linear = False
    assert torch.isfinite(trainer.compute_loss(model, _batch(_Rows(n=2).rows)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_against_reference(tmp_path, dtype):
    """A 16-bit model: the fused path gets its dtype (no fp32 copy of the weight) and the loss is the
    float64 loss of the same 16-bit values to 1e-3."""
    k = 2
    model = _llama(bias=True, seed=5).to(dtype)
    handle = _perturb_passes(model, k)
    seen = []
    trainer = IntraDistillationTrainer(model=model, args=_args(tmp_path, 4, 1),
                                       intra_args=IntraDistillationArguments(passes=k, adaptive=False))
    batch = _batch(_Rows(n=4, seed=9).rows)
    model.train()
    pre = model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    loss = trainer.compute_loss(model, dict(batch))
    pre.remove()
    assert seen and set(seen) == {dtype} and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    hidden = []
    tap = model.lm_head.register_forward_pre_hook(lambda m, a: hidden.append(a[0]))
    with torch.no_grad():
        model(**repeat_batch({k_: v for k_, v in batch.items() if k_ != "labels"}, k))
    tap.remove()
    handle.remove()
    logits = hidden[0].double() @ model.lm_head.weight.double().T + model.lm_head.bias.double()
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    ref = intra_distillation_loss(logits.unflatten(0, (k, -1)), shifted, 1.0, backend="torch").loss
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-3)


def test_autocast_bf16_runs_the_fused_gemm_in_bf16(tmp_path, monkeypatch):
    import intradistill_kernels.integrations.output_layer as integ

    seen = []
    real = integ.fused_linear_intra_distillation_loss

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(integ, "fused_linear_intra_distillation_loss", spy)
    model = _llama(seed=6)
    trainer = IntraDistillationTrainer(model=model, args=_args(tmp_path, 4, 1),
                                       intra_args=IntraDistillationArguments(passes=2, adaptive=False))
    model.train()
    batch = _batch(_Rows(n=4, seed=10).rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16, False)]
    assert model.lm_head.weight.dtype == torch.float32 and torch.isfinite(model.lm_head.weight.grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(**batch).loss
    torch.testing.assert_close(loss.float(), own.float(), rtol=3e-2, atol=3e-2)
