"""IntraDistillationTrainer under DDP (gloo, world 2): the same update as one process with the whole
batch; and the guard against a sharded (DTensor) output weight."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.full]  # two processes

WORLD, K = 2, 3


def _setup():
    from test_trainer_lm import _args, _llama, _perturb_passes, _Rows, _update
    return _args, _llama, _perturb_passes, _Rows, _update


def _trainer(model, args):
    from intradistill_kernels.integrations.transformers import IntraDistillationArguments, IntraDistillationTrainer
    return IntraDistillationTrainer(model=model, args=args, train_dataset=_setup()[3](seed=3),
                                    intra_args=IntraDistillationArguments(passes=K, alpha=2.0, adaptive=False))


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    _args, _llama, _perturb_passes, _, _update = _setup()
    from intradistill_kernels.integrations.output_layer import check_not_sharded

    model = _llama(seed=1)
    _perturb_passes(model, K)
    # 2 processes x micro-batch 2 x accumulation 2: the 8 rows of the single-process step
    trainer = _trainer(model, _args(out_dir, 2, 2, ddp_backend="gloo"))
    assert trainer.args.world_size == WORLD
    delta = _update(model, trainer)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    sharded = distribute_tensor(model.lm_head.weight.detach().clone(), mesh, [Shard(0)])
    errors = []
    try:
        check_not_sharded(sharded, "LlamaForCausalLM")
    except ValueError as exc:
        errors.append(str(exc))
    model.lm_head.weight = torch.nn.Parameter(sharded)
    model.train()
    try:  # through the Trainer: refused before the forward would mix DTensor and Tensor
        from test_trainer_lm import _batch
        trainer.compute_loss(model, _batch(trainer.train_dataset.rows[:2]))
    except ValueError as exc:
        errors.append(str(exc))
    except Exception as exc:  # anything else is a failure the parent reports
        errors.append(f"wrong error {type(exc).__name__}: {exc}")
    torch.save({"delta": delta, "errors": errors}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    # Skip interpreter teardown: torch 2.13's gloo/DDP destructors can deadlock at exit (see
    # tests/test_distributed.py); the results are on disk and mp.spawn checks the exit code.
    os._exit(0)


def test_ddp_step_equals_single_process_and_sharded_weight_is_refused(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    _args, _llama, _perturb_passes, _, _update = _setup()
    model = _llama(seed=1)
    _perturb_passes(model, K)
    want = _update(model, _trainer(model, _args(tmp_path / "single", 8, 1)))
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        num = sum(float((a - b).pow(2).sum()) for a, b in zip(saved["delta"], want)) ** 0.5
        den = sum(float(b.pow(2).sum()) for b in want) ** 0.5
        assert den > 0 and num / den < 1e-5, f"rank {rank}: relative update difference {num / den:.3g}"
        assert len(saved["errors"]) == 2
        for message in saved["errors"]:
            assert "sharded DTensor" in message and "fused_linear=False" in message, message
