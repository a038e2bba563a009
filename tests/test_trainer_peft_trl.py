"""The Trainer with PEFT adapters and inside TRL's SFTTrainer, on a tiny Llama and real text
(German-English instruction pairs from the Debian trans-de-en dictionary, tokenizer trained on them)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from examples.llm.data import instruction_rows, train_tokenizer, translation_pairs  # noqa: E402
from intradistill_kernels.integrations.transformers import (  # noqa: E402
    IntraDistillationArguments, IntraDistillationTrainer)
from intradistill_kernels.integrations.trl import IntraDistillationSFTTrainer  # noqa: E402


@pytest.fixture(scope="module")
def text():
    pairs = translation_pairs(limit=24, seed=1)
    tokenizer = train_tokenizer([s for pair in translation_pairs(limit=2000) for s in pair], vocab_size=400)
    return pairs, tokenizer


def _llama(tokenizer, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=128, attention_dropout=dropout,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config)


def _sft_args(tmp_path, micro=8, accum=1, **kw):
    return trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=micro,
                         gradient_accumulation_steps=accum, report_to=[], use_cpu=True, save_strategy="no",
                         disable_tqdm=True, bf16=False, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                         max_grad_norm=0.0, weight_decay=0.0, max_length=48, seed=0, **kw)


def _delta(model, trainer):
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def _rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    assert den > 0
    return num / den


@pytest.mark.parametrize("chat", [False, True], ids=["prompt-completion", "chat"])
def test_sft_trainer_step_equals_trl_with_dropout_off(tmp_path, text, chat):
    """Completion-only SFT data from TRL's own preparation: with dropout off, intra-distillation's
    step (micro-batch 2 x accumulation 4) is SFTTrainer's step (micro-batch 8)."""
    pairs, tok = text
    data = datasets.Dataset.from_list(instruction_rows(pairs[:8], chat=chat))
    model = _llama(tok)
    want = _delta(model, trl.SFTTrainer(model=model, args=_sft_args(tmp_path / "plain"), train_dataset=data,
                                        processing_class=tok))
    model = _llama(tok)
    intra = IntraDistillationSFTTrainer(model=model, args=_sft_args(tmp_path / "intra", 2, 4), train_dataset=data,
                                        processing_class=tok,
                                        intra_args=IntraDistillationArguments(passes=3, adaptive=False))
    assert _rel(_delta(model, intra), want) < 1e-5


def test_sft_trainer_trains_with_divergence(tmp_path, text):
    pairs, tok = text
    data = datasets.Dataset.from_list(instruction_rows(pairs))
    model = _llama(tok, dropout=0.2)
    args = _sft_args(tmp_path, 4, 1, logging_steps=1)
    args.max_steps = 3
    trainer = IntraDistillationSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                          intra_args=IntraDistillationArguments(passes=2, alpha=1.0, adaptive=False))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "divergence" in h]
    assert len(logs) == 3 and all(h["divergence"] > 0 and h["ce"] > 0 for h in logs)


def _lora(model, targets, **kw):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=targets, task_type="CAUSAL_LM", **kw))


def _batch(tok, pairs):
    rows = [f"Translate into English: {de}\n{en}" for de, en in pairs]
    enc = tok(rows, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def test_lora_causal_lm_matches_the_models_own_loss(tmp_path, text):
    """LoRA on the attention projections and lm_head in modules_to_save: loss and adapter gradients
    (grad_output 0.7) equal the wrapped model's own loss with dropout off; base weights stay frozen."""
    pairs, tok = text
    base = _llama(tok)
    model = _lora(base, ["q_proj", "v_proj"], modules_to_save=["lm_head"])
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    trainer = IntraDistillationTrainer(model=model, args=_sft_args(tmp_path),
                                       intra_args=IntraDistillationArguments(passes=2, adaptive=False))
    batch = _batch(tok, pairs[:4])
    model.train()
    (0.7 * trainer.compute_loss(model, dict(batch))).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (0.7 * model(**batch).loss).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("lora_A" in n for n in got) and any("modules_to_save" in n for n in got)
    assert not any("base_layer" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_on_lm_head_is_refused_with_the_remedy(tmp_path, text):
    pairs, tok = text
    model = _lora(_llama(tok), ["q_proj", "lm_head"])
    trainer = IntraDistillationTrainer(model=model, args=_sft_args(tmp_path),
                                       intra_args=IntraDistillationArguments(passes=2))
    model.train()
    with pytest.raises(ValueError, match="LoRA adapter.*target_modules"):
        trainer.compute_loss(model, _batch(tok, pairs[:2]))
    trainer.intra_args.fused_linear = False  # the materialised path scores the adapted logits
    assert torch.isfinite(trainer.compute_loss(model, _batch(tok, pairs[:2])))


def _disabled_dropout(args):
    args.disable_dropout = True  # TRL's preference trainers have it; SFTConfig 1.16 does not
    return args


@pytest.mark.parametrize("change,match", [
    (lambda a: setattr(a, "loss_type", "dft") or a, "loss_type='dft'.*set loss_type='nll'"),
    (lambda a: setattr(a, "padding_free", True) or a, "padding-free.*padding_free=False"),
    (lambda a: setattr(a, "packing", True) or a, "packing_strategy='wrapped'"),
    (_disabled_dropout, "disable_dropout=False"),
], ids=["dft", "padding-free", "bfd-packing", "disable-dropout"])
def test_sft_config_conflicts_are_refused_before_data_preparation(tmp_path, text, change, match):
    pairs, tok = text
    args = change(_sft_args(tmp_path))
    with pytest.raises(ValueError, match=match):
        IntraDistillationSFTTrainer(model=_llama(tok), args=args, train_dataset=None, processing_class=tok)
    with pytest.raises(ValueError, match="compute_loss_func"):
        IntraDistillationSFTTrainer(model=_llama(tok), args=_sft_args(tmp_path), processing_class=tok,
                                    compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)
