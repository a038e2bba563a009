"""apply_intra_distillation: the loss inside a language model's forward, in a plain loop, an
accelerate loop, transformers.Trainer unmodified and IntraDistillationTrainer, on tiny models."""
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_trainer_lm import (  # noqa: E402
    LargestAllocation, T, V, _args, _assert_same_update, _batch, _llama, _perturb_passes, _Rows, _update)

from intradistill_kernels import AdaptiveAlpha, intra_distillation_loss  # noqa: E402
from intradistill_kernels.integrations.transformers import (  # noqa: E402
    IntraDistillationArguments, IntraDistillationTrainer, apply_intra_distillation, remove_intra_distillation,
    repeat_batch)

K = 3
INTRA = dict(passes=K, alpha=2.0, adaptive=False)


def _sgd_step(model, batch, **kwargs):
    """One SGD step (lr 0.5, as _args) of a plain loop; the parameter updates."""
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    loss = model(**batch, **kwargs).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def _perturbed(seed=1):
    model = _llama(seed=seed)
    _perturb_passes(model, K)  # K different passes without randomness: divergence > 0
    return model


def test_plain_loop_accelerate_and_unmodified_trainer_equal_the_intra_distillation_trainer(tmp_path):
    """One step on 8 rows: IntraDistillationTrainer (micro-batch 8), a plain loop and an accelerate
    loop on the applied model, and transformers.Trainer unmodified on the applied model with
    micro-batch 2 x accumulation 4 all take the same step."""
    data = _Rows(seed=3)
    model = _perturbed()
    want = _update(model, IntraDistillationTrainer(model=model, args=_args(tmp_path / "intra", 8, 1), train_dataset=data,
                                                   intra_args=IntraDistillationArguments(**INTRA)))
    batch = _batch(data.rows)

    model = apply_intra_distillation(_perturbed(), IntraDistillationArguments(**INTRA))
    _assert_same_update(_sgd_step(model, batch), want)

    from accelerate import Accelerator

    model = apply_intra_distillation(_perturbed(), IntraDistillationArguments(**INTRA))
    before = [p.detach().clone() for p in model.parameters()]
    accelerator = Accelerator(cpu=True)
    wrapped, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    wrapped.train()
    accelerator.backward(wrapped(**batch).loss)
    optimizer.step()
    _assert_same_update([p.detach() - b for p, b in zip(model.parameters(), before)], want)

    model = apply_intra_distillation(_perturbed(), IntraDistillationArguments(**INTRA))
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "plain", 2, 4), train_dataset=data)
    _assert_same_update(_update(model, trainer), want)


def test_dropout_step_equals_the_reference_from_the_models_own_logits():
    """With real dropout (attention_dropout 0.3): under the same seed, the applied model's loss and
    gradients (grad_output 0.7) are those of intra_distillation_loss on the model's own logits of
    the batch repeated K times."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      attention_dropout=0.3, pad_token_id=0, initializer_range=0.5)
    model = transformers.LlamaForCausalLM(config)
    batch = _batch(_Rows(n=4, seed=5).rows)
    apply_intra_distillation(model, IntraDistillationArguments(passes=K, alpha=0.8, adaptive=False, divergence="js",
                                                               chunk_size=5))
    model.train()
    torch.manual_seed(11)
    out = model(**batch)
    (0.7 * out.loss).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    remove_intra_distillation(model)
    torch.manual_seed(11)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**repeat_batch(inputs, K)).logits.unflatten(0, (K, -1))
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    ref = intra_distillation_loss(logits.double(), shifted, 0.8, divergence="js", backend="torch")
    (0.7 * ref.loss).backward()
    assert float(ref.divergence) > 1e-3 and float(out.divergence) == pytest.approx(float(ref.divergence), rel=1e-4)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.double(), ref.ce, rtol=1e-5, atol=1e-6)
    assert out.logits is None
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_no_tensor_of_the_full_logits_during_a_fused_step(tied):
    model = apply_intra_distillation(_llama(tied=tied, seed=2), IntraDistillationArguments(**INTRA, chunk_size=4))
    batch = _batch(_Rows(n=4, seed=6).rows)
    model.train()
    with LargestAllocation() as mode:
        model(**batch).loss.backward()
    assert 0 < mode.largest < K * 4 * T * V, mode.largest  # the weights, activations, 4-token chunks


def test_identical_passes_warn_once_with_the_remedy():
    model = apply_intra_distillation(_llama(seed=3), IntraDistillationArguments(passes=2, adaptive=False))
    batch = _batch(_Rows(n=2).rows)
    model.train()
    with pytest.warns(UserWarning, match=r"2 passes of LlamaForCausalLM were identical.*attention_dropout=0\.0"
                                         r".*lora_dropout"):
        model(**batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch)  # once only
    model = apply_intra_distillation(_perturbed(), IntraDistillationArguments(passes=K, adaptive=False))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(model(**batch).divergence) > 1e-4  # different passes: no warning


def test_eval_unlabelled_and_removed_forwards_are_the_models_own():
    model = _llama(seed=4)
    own = inspect.signature(model.forward)
    apply_intra_distillation(model, IntraDistillationArguments(passes=2, adaptive=False))
    assert inspect.signature(model.forward) == own  # Trainer keeps the columns the model takes
    batch = _batch(_Rows(n=2, seed=1).rows)
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)
    assert evaluated.logits.shape == (2, T, V)
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.warns(UserWarning, match="without labels"):
        assert model(**inputs).logits.shape == (2, T, V)  # one pass
    remove_intra_distillation(model)
    assert "forward" not in model.__dict__
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, evaluated.loss)


def test_alpha_schedule_and_bad_calls():
    batch = _batch(_Rows(n=2).rows)
    model = apply_intra_distillation(_perturbed(), IntraDistillationArguments(passes=K, alpha=4.0, p=2.0, q=4.0))
    model.train()
    with pytest.raises(ValueError, match="intra_distillation_alpha=AdaptiveAlpha"):
        model(**batch)
    schedule = AdaptiveAlpha(4.0, 2.0, 4.0, 8)
    at = {step: model(**batch, intra_distillation_alpha=schedule(step)) for step in (0, 6)}
    for out in at.values():
        torch.testing.assert_close(out.loss, out.ce + schedule(6 if out is at[6] else 0) * out.divergence)
    with pytest.raises(ValueError, match="IntraDistillationSFTTrainer"):
        model(**batch, fused_lm_head=True, intra_distillation_alpha=1.0)  # TRL's SFTTrainer's own loss call
    with pytest.raises(ValueError, match="IntraDistillationTrainer"):
        apply_intra_distillation(transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    with pytest.raises(TypeError, match="intra_args"):
        apply_intra_distillation(model, {"passes": 2})


def test_compiled_applied_model_takes_the_eager_step():
    """torch.compile(model, fullgraph=True) of an applied tiny Llama trains one step with the fused
    loss inside its forward: the eager step's result, and no tensor of the [K, B, T, V] logits in
    the compiled graphs."""
    from test_compile import _recording_backend

    batch = _batch(_Rows(n=4, seed=3).rows)
    updates, sizes = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _perturbed()
        apply_intra_distillation(model, IntraDistillationArguments(**INTRA, chunk_size=4))
        call = torch.compile(model, fullgraph=True, backend=_recording_backend(sizes)) if compiled else model
        updates.append(_sgd_step(call, batch))
    for got, want in zip(*updates):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    rows, length = batch["input_ids"].shape
    assert sizes and max(sizes) < K * rows * length * V, (max(sizes), K * rows * length * V)
