"""IntraDistillationTrainer under DDP (gloo, world 2): the same update as one process with the whole
batch (a tensor-parallel output layer: tests/test_llm_distributed.py)."""
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
    model = _llama(seed=1)
    _perturb_passes(model, K)
    # 2 processes x micro-batch 2 x accumulation 2: the 8 rows of the single-process step
    trainer = _trainer(model, _args(out_dir, 2, 2, ddp_backend="gloo"))
    assert trainer.args.world_size == WORLD
    delta = _update(model, trainer)

    torch.save({"delta": delta}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    # Skip interpreter teardown: torch 2.13's gloo/DDP destructors can deadlock at exit (see
    # tests/test_distributed.py); the results are on disk and mp.spawn checks the exit code.
    os._exit(0)


@pytest.mark.full
def test_ddp_step_equals_single_process(tmp_path):
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
