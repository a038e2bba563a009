"""The package installs whole: its sdist and wheels carry the C++/CUDA sources, an installed wheel
builds (or reuses) the extension on first use, and INTRADISTILL_BUILD_EXT=1 builds it ahead of
time into the wheel, where it is the library that gets loaded.

Each installation goes into a fresh virtualenv that reuses this environment's torch through a
.pth file (no second torch is downloaded) and is checked in a fresh process started outside the
source tree, so the checkout cannot stand in for the installed package.

Cost: the default wheel's first-use build shares torch's extension cache with the checkout (the
build directory is named after the sources' content and compiles copies of them), so it compiles
nothing when the checkout's extension is built, and once otherwise. The ahead-of-time wheel
compiles the CPU part once (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from expected_backends import require
from intradistill_kernels.ops import cpp, extension_spec

REPO = Path(__file__).resolve().parents[1]
CSRC_FILES = sorted(p.name for p in extension_spec.csrc_files(REPO / "csrc"))

# Run in the installed package, in a fresh process: backends, where the C++ library came from,
# and the cpu backend's loss and gradient against the float64 torch reference.
CHECK = r"""
import io, json, sys
import torch
import intradistill_kernels as ik
from intradistill_kernels.ops import cpp

torch.manual_seed(int(sys.argv[1]))
k, n, v = 3, 41, 307
logits = (torch.randn(k, n, v) * 3).requires_grad_()
target = torch.randint(0, v, (n,))
target[::6] = -100
g = torch.rand(()) + 0.5
kwargs = dict(alpha=0.7, label_smoothing=0.1, divergence="x")
out = ik.intra_distillation_loss(logits, target, backend="cpu", **kwargs)
(grad,) = torch.autograd.grad(out.loss * g, logits)
ref_logits = logits.detach().double().requires_grad_()
ref = ik.intra_distillation_loss(ref_logits, target, backend="torch", **kwargs)
(ref_grad,) = torch.autograd.grad(ref.loss * g.double(), ref_logits)
for got, want in zip(out, ref):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
report = io.StringIO()
ik.doctor(file=report)
print(json.dumps({"file": ik.__file__, "backends": ik.available_backends(),
                  "origin": cpp.library_origin("cpu"), "aot_skipped": cpp.aot_skipped("cpu"),
                  "max_passes": cpp.cpu_backend.max_passes, "doctor": report.getvalue()}))
"""


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    run = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert run.returncode == 0, f"{cmd} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return run


def _copy_tree(dest: Path) -> Path:
    """The files a fresh clone has (tracked and untracked-but-not-ignored), so builds write their
    build/ and egg-info into a copy and never see a build/ left in the checkout."""
    listing = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in filter(None, listing.split("\0")):
        source = REPO / name
        if source.is_file():  # a file deleted in the working tree is still in the index
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _build_env(tmp: Path, *, no_torch: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "INTRADISTILL_BUILD_EXT")}
    if no_torch:
        # A torch that fails on import shadows the real one: the default build must not import it.
        fake = tmp / "no-torch"
        (fake / "torch").mkdir(parents=True, exist_ok=True)
        (fake / "torch" / "__init__.py").write_text("raise ImportError('setup.py imported torch')\n")
        env["PYTHONPATH"] = str(fake)
    return env


def _pip_wheel(source: Path, out: Path, env: dict) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
          "--no-build-isolation", "--no-index", "-w", out, source], env=env)
    (wheel,) = out.glob("*.whl")
    return wheel


def _install_in_fresh_venv(wheel: Path, venv: Path) -> Path:
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Appended after the venv's own site-packages: torch, pip and ninja come from here, while the
    # installed package shadows this environment's editable install of the checkout.
    Path(site, "_reuse_torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-index",
          "--ignore-installed", wheel])
    return python


def _check_installed(python: Path, cwd: Path, seed: int, extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "INTRADISTILL_DISABLE_CPP")}
    # As when a virtualenv's python is run without activating it: this environment's bin/ (where
    # pip put ninja) is not on PATH.
    here = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != here)
    env.update(extra_env or {})
    run = _run([python, "-c", CHECK, seed], cwd=cwd, env=env)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _copy_tree(tmp_path_factory.mktemp("source"))


@pytest.mark.full
def test_sdist_and_wheel_carry_the_sources_and_install_without_torch_at_build_time(tree, tmp_path):
    env = _build_env(tmp_path, no_torch=True)
    sdist_dir = tmp_path / "sdist"
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(sdist_dir)!r})"],
         cwd=tree, env=env)
    (sdist,) = sdist_dir.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {f"csrc/{f}" for f in CSRC_FILES} <= names
    assert {"setup.py", "MANIFEST.in", "intradistill_kernels/ops/extension_spec.py"} <= names

    # pip builds PyPI's sdists the same way: unpack, then build the wheel.
    wheel = _pip_wheel(sdist, tmp_path / "wheel", env)
    names = _wheel_names(wheel)
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert {f"intradistill_kernels/csrc/{f}" for f in CSRC_FILES} <= set(names)
    assert not [n for n in names if n.endswith((".so", ".pyd")) or n.endswith(extension_spec.AOT_INFO)]
    # The wheel is the library: the benchmark runner and the GPU check stay in the repository.
    assert not [n for n in names if "bench" in n or "gpu_check" in n], names

    python = _install_in_fresh_venv(wheel, tmp_path / "venv")
    seed = int(torch.randint(0, 2**31, ()))
    result = _check_installed(python, tmp_path, seed)
    assert Path(result["file"]).is_relative_to(tmp_path / "venv"), result["file"]
    assert "cpu" in result["backends"] and "torch" in result["backends"]
    assert result["origin"].startswith("first-use build "), result["origin"]
    assert result["max_passes"] is None  # the CPU kernel takes any K, as the extension reports
    assert "cpu     available" in result["doctor"] and "first-use build" in result["doctor"]


@pytest.mark.full
def test_ahead_of_time_build_is_the_library_that_gets_loaded(tree, tmp_path):
    env = _build_env(tmp_path, no_torch=False)
    env["INTRADISTILL_BUILD_EXT"] = "1"
    wheel = _pip_wheel(tree, tmp_path / "wheel", env)
    names = _wheel_names(wheel)
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # a platform wheel: it holds a library
    assert {f"intradistill_kernels/csrc/{f}" for f in CSRC_FILES} <= set(names)
    libraries = [n for n in names if n.startswith(f"intradistill_kernels/{extension_spec.AOT_MODULES['cpu']}.")]
    assert len(libraries) == 1 and f"intradistill_kernels/{extension_spec.AOT_INFO}" in names, names

    python = _install_in_fresh_venv(wheel, tmp_path / "venv")
    # An empty extension cache that must stay empty: nothing is compiled on first use.
    cache = tmp_path / "torch_extensions"
    seed = int(torch.randint(0, 2**31, ()))
    result = _check_installed(python, tmp_path, seed, {"TORCH_EXTENSIONS_DIR": str(cache)})
    assert "cpu" in result["backends"]
    assert result["origin"].startswith("ahead-of-time build "), (result["origin"], result["aot_skipped"])
    loaded = Path(result["origin"].removeprefix("ahead-of-time build "))
    assert loaded.is_relative_to(tmp_path / "venv") and loaded.name == Path(libraries[0]).name
    assert not cache.exists() or not any(cache.iterdir())
    assert "loaded from the ahead-of-time build" in result["doctor"]


# ----------------------------------------------------------------------------- choosing the AOT library

@pytest.fixture
def fake_install(tmp_path, monkeypatch):
    """A package directory holding csrc/, an 'ahead-of-time library' and its record, as an
    AOT-built wheel installs them; cpp's state is restored afterwards."""
    shutil.copytree(REPO / "csrc", tmp_path / "csrc")
    library = tmp_path / "_cpu_ops.test.so"
    library.write_bytes(b"not loaded by these tests")
    cxx, cuda = extension_spec.cxx_flags("cpu"), extension_spec.cuda_flags("cpu")
    identity = extension_spec.build_identity("cpu", tmp_path / "csrc", torch.__version__, cxx, cuda)

    def record(**changes):
        info = {"parts": {"cpu": {"library": library.name, **identity, **changes}}}
        (tmp_path / extension_spec.AOT_INFO).write_text(json.dumps(info))

    monkeypatch.setattr(cpp, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(cpp, "_state", dict(cpp._state))
    record()
    return tmp_path, library, record


def test_aot_library_is_chosen_when_built_for_this_torch_sources_and_cpu(fake_install):
    _, library, _ = fake_install
    assert cpp._aot_library("cpu") == library
    assert cpp._aot_library("cuda") is None and cpp.aot_skipped("cuda") is None  # no cuda part recorded


@pytest.mark.parametrize("change, words", [
    (dict(torch="1.0.0+other"), "built for torch 1.0.0+other"),
    (dict(sources="0" * 16), "built for other sources"),
    (dict(cpu="0" * 16), "built for another CPU"),
])
def test_aot_library_built_for_something_else_is_skipped_with_the_reason(fake_install, change, words):
    _, library, record = fake_install
    record(**change)
    assert cpp._aot_library("cpu") is None
    assert words in cpp.aot_skipped("cpu") and str(library) in cpp.aot_skipped("cpu")


def test_aot_library_is_skipped_when_the_installed_sources_changed(fake_install):
    package, _, _ = fake_install
    with open(package / "csrc" / "cpu_kernel.cpp", "a") as f:
        f.write("\n// edited after the build\n")
    assert cpp._aot_library("cpu") is None
    assert "other sources" in cpp.aot_skipped("cpu")


def test_first_use_identity_depends_on_sources_flags_and_torch(tmp_path):
    shutil.copytree(REPO / "csrc", tmp_path / "csrc")
    cxx = extension_spec.cxx_flags("cpu")

    def key(csrc=tmp_path / "csrc", version=torch.__version__, flags=cxx):
        return extension_spec.identity_key(extension_spec.build_identity("cpu", csrc, version, flags, []))

    base = key()
    assert base == key(csrc=REPO / "csrc")  # same content elsewhere: the same build directory
    assert key(version="0.0.1") != base
    assert key(flags=extension_spec.cxx_flags("cpu", "x86-64-v3")) != base
    (tmp_path / "csrc" / "cpu_kernel.cpp").write_text("// another kernel\n")
    assert key() != base


def test_max_passes_is_read_from_the_extension():
    require("cpu")
    assert torch.ops.intradistill_cpp.max_passes(torch.empty(0)) == 2**63 - 1
    assert cpp.cpu_backend.max_passes is None
