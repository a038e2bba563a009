"""apply_intra_distillation under FSDP2 (fully_shard), DDP, DeepSpeed ZeRO-3 and tensor parallelism
(ColwiseParallel on lm_head), gloo on CPU, world 2: the loss is computed inside the model's forward,
where the output weight is gathered (or, tensor-parallel, each rank's vocabulary shard goes to the
vocabulary-parallel fused-linear loss), and one optimizer step on two halves of a batch (the whole
batch on every rank, for tensor parallelism) equals the single-process step on the whole batch.

Dropout is off for the equality (each process would draw its own masks); the same runs then turn
attention dropout on and must see a positive divergence. Every step is watched for the largest
tensor: never the [K, B, T, V] logits.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.full, pytest.mark.filterwarnings("ignore")]

WORLD, K, ROWS = 2, 3, 8
FSDP_DDP = ("ddp", "fsdp-root-untied", "fsdp-root-tied", "fsdp-lm-head-unit")
ZERO3 = ("zero3-untied", "zero3-tied", "zero3-peft")


def _data():
    from test_trainer_lm import _batch, _Rows

    batch = _batch(_Rows(n=ROWS, seed=3).rows)
    return batch, (batch["labels"][:, 1:] != -100).sum()


def _model(tied: bool, peft: bool = False):
    from test_trainer_lm import _llama

    from intradistill_kernels.integrations.transformers import IntraDistillationArguments, apply_intra_distillation

    model = _llama(tied=tied, seed=1)
    if peft:  # LoRA on the attention, the output layer trained as a copy owned by a child module
        import peft as _peft

        model = _peft.get_peft_model(model, _peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                             target_modules=["q_proj", "v_proj"],
                                                             modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    return model, lambda m: apply_intra_distillation(m, IntraDistillationArguments(passes=K, alpha=2.0, adaptive=False,
                                                                                   chunk_size=4))


def _set_dropout(model, p):
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p


def _step(call, optimizer, batch, total, scale):
    """One SGD step; the largest tensor any operation of forward and backward produced."""
    from test_trainer_lm import LargestAllocation

    with LargestAllocation() as mode:
        out = call(**batch, num_items_in_batch=total)
        (out.loss * scale).backward()
    optimizer.step()
    optimizer.zero_grad()
    return mode.largest


def _full(named):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def _env(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)


def _wrapped(config, model, apply):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if config == "ddp":
        apply(model)
        return DistributedDataParallel(model)
    if config == "fsdp-lm-head-unit":  # applied after sharding, the other orders before
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(model)
        return apply(model)
    apply(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_ddp_worker(rank, port, out_dir):
    _env(rank, port)
    torch.distributed.init_process_group("gloo")
    batch, total = _data()
    half = {k: v[rank * ROWS // WORLD:(rank + 1) * ROWS // WORLD] for k, v in batch.items()}
    results = {}
    for config in FSDP_DDP:
        model, apply = _model(tied=config == "fsdp-root-tied")
        call = _wrapped(config, model, apply)
        if config != "ddp":  # sharded outside the forward
            from torch.distributed.tensor import DTensor

            assert isinstance(model.lm_head.weight, DTensor) and model.lm_head.weight.to_local().shape[0] < 97
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        # the count covers both processes and the framework averages the gradients over them
        largest = _step(call, optimizer, half, total, WORLD)
        params = _full(model.named_parameters())
        _set_dropout(model, 0.3)
        out = call(**half, num_items_in_batch=total)
        out.loss.backward()
        results[config] = {"params": params, "largest": largest, "divergence": float(out.divergence)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    # Skip interpreter teardown: torch 2.13's gloo destructors can deadlock at exit (see
    # tests/test_distributed.py); the results are on disk and mp.spawn checks the exit code.
    os._exit(0)


def _zero3_worker(rank, port, out_dir):
    _env(rank, port)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    batch, total = _data()
    half = {k: v[rank * ROWS // WORLD:(rank + 1) * ROWS // WORLD] for k, v in batch.items()}
    config = {"train_micro_batch_size_per_gpu": ROWS // WORLD, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # tiny weights partitioned
              "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}
    results = {}
    for name in ZERO3:
        model, apply = _model(tied=name == "zero3-tied", peft=name == "zero3-peft")
        apply(model)
        trained = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=config)
        head = model.get_output_embeddings()
        head = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
        assert head.weight.numel() == 0  # partitioned outside the forward
        engine.train()
        from test_trainer_lm import LargestAllocation

        with LargestAllocation() as mode:
            out = engine(**half, num_items_in_batch=total)
            engine.backward(out.loss * WORLD)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            params = _full(model.named_parameters())
        _set_dropout(model, 0.3)
        out = engine(**half, num_items_in_batch=total)
        engine.backward(out.loss)
        results[name] = {"params": params, "largest": mode.largest, "divergence": float(out.divergence)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    os._exit(0)


def _tensor_parallel_worker(rank, port, out_dir):
    """lm_head split over the vocabulary (97 classes: 49 and 48), the rest replicated; every rank
    runs the whole batch, so the loss needs no data-parallel averaging."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    _env(rank, port)
    torch.distributed.init_process_group("gloo")
    batch, total = _data()
    model, apply = _model(tied=False)
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)), {"lm_head": ColwiseParallel()})
    apply(model)
    from torch.distributed.tensor import DTensor

    assert isinstance(model.lm_head.weight, DTensor) and model.lm_head.weight.to_local().shape[0] in (48, 49)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    largest = _step(model, optimizer, batch, total, 1)
    params = _full(model.named_parameters())
    _set_dropout(model, 0.3)
    out = model(**batch, num_items_in_batch=total)
    out.loss.backward()
    torch.save({"tensor-parallel": {"params": params, "largest": largest, "divergence": float(out.divergence)}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    os._exit(0)


def _spawn(worker, out_dir):
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def fsdp_ddp(tmp_path_factory):
    return _spawn(_fsdp_ddp_worker, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return _spawn(_zero3_worker, tmp_path_factory.mktemp("zero3"))


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
    return _spawn(_tensor_parallel_worker, tmp_path_factory.mktemp("tp"))


def _single_process(tied, peft=False):
    model, apply = _model(tied, peft)
    apply(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch, total = _data()
    model.train()
    _step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5), batch, total, 1)
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}


def _check(results, config, tied, peft=False, rows=ROWS // WORLD):
    before, want = _single_process(tied, peft)
    num = sum(float((want[n] - before[n]).pow(2).sum()) for n in want) ** 0.5
    for rank, saved in enumerate(results):
        got = saved[config]
        assert got["params"].keys() == want.keys()
        diff = sum(float((got["params"][n] - want[n]).pow(2).sum()) for n in want) ** 0.5
        assert num > 0 and diff / num < 1e-5, f"{config} rank {rank}: relative update difference {diff / num:.3g}"
        for n in want:
            torch.testing.assert_close(got["params"][n], want[n], rtol=1e-5, atol=1e-7, msg=n)
        assert 0 < got["largest"] < K * rows * 12 * 97, got["largest"]  # never [K, B, T, V]
        assert got["divergence"] > 0


@pytest.mark.parametrize("config", FSDP_DDP)
def test_fsdp2_and_ddp_step_equals_single_process(fsdp_ddp, config):
    _check(fsdp_ddp, config, tied=config == "fsdp-root-tied")


@pytest.mark.parametrize("config", ZERO3)
def test_deepspeed_zero3_step_equals_single_process(zero3, config):
    _check(zero3, config, tied=config == "zero3-tied", peft=config == "zero3-peft")


def test_tensor_parallel_output_layer_step_equals_single_process(tensor_parallel):
    _check(tensor_parallel, "tensor-parallel", tied=False, rows=ROWS)
