"""doctor() / `python -m intradistill_kernels` and unavailable_reason(): every backend is named,
with the reason an unavailable one cannot be used (simulated failures run in fresh processes, so
the C++ library of this process is never reloaded)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import intradistill_kernels
from intradistill_kernels import available_backends, doctor
from intradistill_kernels.ops import available as backend_available, cpp, unavailable_reason

BACKENDS = ("triton", "cuda", "cpu", "torch")


def _backend_line(report: str, name: str) -> str:
    (line,) = [line for line in report.splitlines() if re.match(rf"  {name}\s+(available|unavailable)", line)]
    return line


def _run_doctor(tmp_path: Path, **env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("INTRADISTILL_DISABLE_CPP",)}
    env.update(env_changes)
    # From outside the checkout, like a user; PYTHONPATH keeps the package under test importable.
    env["PYTHONPATH"] = str(Path(intradistill_kernels.__file__).parents[1])
    run = subprocess.run([sys.executable, "-m", "intradistill_kernels"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_doctor_names_every_backend_and_agrees_with_available_backends():
    out = io.StringIO()
    doctor(file=out)
    report = out.getvalue()
    assert "doctor" in intradistill_kernels.__all__
    assert report.startswith(f"intradistill-kernels {intradistill_kernels.__version__}")
    for heading in ("python", "torch", "triton", "transformers", "devices", "backends"):
        assert re.search(rf"^\s*{heading}\b", report, re.M), heading
    for name in BACKENDS:
        line = _backend_line(report, name)
        if name in available_backends():
            assert line.split()[1] == "available", line
            assert unavailable_reason(name) is None
        else:
            assert line.split(None, 1)[1] == f"unavailable: {unavailable_reason(name)}", line
    if "cpu" in available_backends():
        assert f"loaded from the {cpp.library_origin('cpu')}" in report


def test_unavailable_reason_matches_backend_available():
    for name in BACKENDS:
        reason = unavailable_reason(name)
        assert (reason is None) == backend_available(name), (name, reason)
        assert reason is None or (isinstance(reason, str) and reason)
    assert unavailable_reason("torch") is None


def test_unavailable_reason_rejects_unknown_names():
    with pytest.raises(ValueError, match="name must be one of"):
        unavailable_reason("cudnn")


def test_triton_reason_without_gpu_or_interpreter(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU, triton is available without the interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert unavailable_reason("triton") == "no CUDA device and TRITON_INTERPRET unset"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason("triton") is None


def test_main_shows_the_reason_when_the_cpp_extension_is_disabled(tmp_path):
    report = _run_doctor(tmp_path, INTRADISTILL_DISABLE_CPP="1")
    for name in BACKENDS:
        _backend_line(report, name)
    assert _backend_line(report, "cpu").endswith("unavailable: disabled by INTRADISTILL_DISABLE_CPP")
    assert _backend_line(report, "torch").endswith("available")
    assert "INTRADISTILL_DISABLE_CPP=1" in report  # listed under settings


def test_main_shows_the_compiler_error_when_the_build_fails(tmp_path):
    real = shutil.which(os.environ.get("CXX", "c++"))
    assert real is not None, "this test wraps the machine's C++ compiler"
    # A compiler that answers version queries but fails every compilation with its own message.
    fake = tmp_path / "failing-c++"
    fake.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do if [ "$a" = "-c" ]; then\n'
        '  echo "cpu_kernel.cpp:1:1: error: simulated compiler failure" >&2; exit 1; fi; done\n'
        f'exec "{real}" "$@"\n')
    fake.chmod(0o755)
    # A private extension cache: the failed build must not touch the shared one.
    report = _run_doctor(tmp_path, CXX=str(fake), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    line = _backend_line(report, "cpu")
    assert line.endswith("unavailable: the build failed: cpu_kernel.cpp:1:1: error: simulated compiler failure"), line
    assert "build error:" in report and "ninja: build stopped" in report  # the full log follows
    assert f"C++ compiler ({fake}): {fake}" in report


def test_short_reason_keeps_the_compiler_errors_not_the_commands():
    error = ("RuntimeError: Error building extension 'x': [1/2] c++ -Werror -c a.cpp -o a.o\n"
             "FAILED: a.o\nc++ -Werror -c a.cpp -o a.o\n"
             "a.cpp:3:7: error: 'foo' was not declared in this scope\n"
             "a.cpp:9:1: error: expected ';'\nninja: build stopped: subcommand failed.\n")
    assert cpp._short(error) == ("the build failed: a.cpp:3:7: error: 'foo' was not declared in this scope"
                                 " | a.cpp:9:1: error: expected ';'")
    assert cpp._short("OSError: libtorch_cpu.so: cannot open shared object file") == \
        "OSError: libtorch_cpu.so: cannot open shared object file"
