"""pytest-benchmark view of the contenders: `pytest benchmarks/ --benchmark-only`.

Small CPU shapes by default; the GPU grid when CUDA is available. The runner (python -m
benchmarks.run) is what writes the committed tables; this suite is for interactive comparison.
"""

import pytest
import torch

from benchmarks import contenders as C
from benchmarks import measure as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 8192, 32000), (3, 8192, 128256), (2, 8192, 32000)] if DEVICE == "cuda" else [(3, 128, 8000), (2, 128, 8000)]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _cases():
    for k, n, v in SHAPES:
        for name in C.contenders(DEVICE, k, with_compile=False):
            yield pytest.param(k, n, v, name, id=f"K{k}-N{n}-V{v}-{name}")


@pytest.mark.parametrize("k,n,v,name", list(_cases()))
def test_forward_backward(benchmark, k, n, v, name):
    fn, kind = C.contenders(DEVICE, k, with_compile=False)[name]
    logits, target = R.make_inputs(k, n, v, DTYPE, DEVICE)
    target = None if kind == "js" else target
    assert R.check(fn, kind, logits, target) < 2e-2
    step = R.mode_callables(fn, logits, target, "forward+backward")

    def timed():
        step()
        R.sync(DEVICE)

    benchmark(timed)
