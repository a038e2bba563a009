"""The layout rules of docs/design.md §4, checked on the source: calls go down only, short
argument lists, and modules that take every option of their function."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import intradistill_kernels as idk

PACKAGE = Path(idk.__file__).resolve().parent


def _imports(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """The package modules a file imports, as dotted names ("intradistill_kernels.ops.spec")."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("intradistill_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("intradistill_kernels"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("ops/**/*.py")) + [PACKAGE / "reference.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_ops_and_the_reference_import_nothing_above_them(path):
    below = "intradistill_kernels.ops"
    allowed = (below,) if path.name != "reference.py" else ()
    upward = sorted(name for name in _imports(path) if _is_module(name)
                    and name != "intradistill_kernels" and not name.startswith(allowed))
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}, above it"


def test_the_import_walk_sees_an_upward_import(tmp_path):
    """The walk above must be able to fail: a module under ops/ importing _core is caught."""
    bad = tmp_path / "intradistill_kernels" / "ops" / "probe.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from .._core import check_int\nfrom . import spec\n")
    assert _imports(bad, tmp_path) >= {"intradistill_kernels._core", "intradistill_kernels.ops.spec"}


# Functions whose extra parameters are the keyword-only options fixed by the public API
# (docs/design.md §3): all of them after the tensors, alpha and group are keyword-only.
PUBLIC_OPTIONS = {"intra_distillation_loss", "fused_linear_intra_distillation_loss",
                  "vocab_parallel_intra_distillation_loss", "vocab_parallel_fused_linear_intra_distillation_loss",
                  "__init__"}


def _long_functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                if count > 8:
                    yield path, node, count


def test_no_function_takes_more_than_eight_parameters():
    """Except Triton kernels (their arguments are the launch's pointers, strides and constexprs)
    and the public functions and modules, whose options beyond the first eight are keyword-only."""
    offenders = []
    for path, node, count in _long_functions():
        kernel = any("triton.jit" in ast.unparse(d) for d in node.decorator_list)
        positional = len(node.args.posonlyargs) + len(node.args.args)
        if kernel or (node.name in PUBLIC_OPTIONS and positional <= 6):
            continue
        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({count})")
    assert not offenders, offenders


TENSOR_ARGUMENTS = {"logits", "mask", "target", "hidden", "weight", "bias"}
MODULES = [(idk.XDivergenceLoss, idk.x_divergence), (idk.JSDivergenceLoss, idk.js_divergence),
           (idk.IntraDistillationLoss, idk.intra_distillation_loss),
           (idk.FusedLinearIntraDistillationLoss, idk.fused_linear_intra_distillation_loss)]


def _missing_options(module, function) -> list[str]:
    options = set(inspect.signature(function).parameters) - TENSOR_ARGUMENTS
    return sorted(options - set(inspect.signature(module.__init__).parameters))


@pytest.mark.parametrize("module,function", MODULES, ids=lambda x: x.__name__)
def test_modules_take_every_option_of_their_function(module, function):
    assert _missing_options(module, function) == []


def test_the_signature_walk_sees_a_missing_option():
    class Lagging(idk.IntraDistillationLoss):
        def __init__(self, alpha=1.0, *, divergence="x"):
            super().__init__(alpha, divergence=divergence)

    assert "softcap" in _missing_options(Lagging, idk.intra_distillation_loss)


def test_module_options_reach_the_function():
    import torch

    z, y = torch.randn(3, 4, 9), torch.randint(0, 9, (4,))
    opts = dict(divergence="js", label_smoothing=0.1, softcap=3.0, logit_scale=0.5, z_loss=0.01, reduction="sum")
    got = idk.IntraDistillationLoss(0.4, **opts)(z, y)
    want = idk.intra_distillation_loss(z, y, 0.4, **opts)
    for a, b in zip((*got, got.z_loss), (*want, want.z_loss)):
        torch.testing.assert_close(a, b)
