"""Loader of the C++ extension (csrc/): the "cpu" backend and, where torch has CUDA and nvcc is
found, the "cuda" backend. Both implement the interface of ops/backend.py.

Each part of the extension comes from one of two builds (ops/extension_spec.py describes both):
- ahead of time, at install time (INTRADISTILL_BUILD_EXT=1 pip install --no-build-isolation .):
  a library inside the package, preferred when the torch, sources and CPU it was built for are
  the ones here;
- on first use, with torch.utils.cpp_extension.load (ninja) into torch's extension cache
  (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so a plain install needs no compiler
  and never builds against a second torch. The build directory is named after the build's
  identity and compiles a copy of the sources kept inside it, so a source checkout and an
  installed wheel of the same sources share one build, and different sources never overwrite it.
Set INTRADISTILL_DISABLE_CPP=1 to skip both.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from . import extension_spec
from .backend import EarlyGrad, RowStats, RowWeights
from .rows import row_offsets
from .spec import LossSpec

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CSRC = PACKAGE_DIR.parent / "csrc"
# Reentrant: building the cuda part builds the cpu part first, from inside the same lock.
_lock = threading.RLock()
_state: dict[str, object] = {}
# What the max_passes operator returns when any K is accepted.
_NO_PASS_LIMIT = 2**63 - 1


def _sources_dir() -> Path:
    # Wheels carry csrc/ inside the package; editable installs and checkouts have it beside it.
    inside = PACKAGE_DIR / "csrc"
    return inside if inside.is_dir() else CSRC


def _build(kind: str) -> bool:
    """Loads one part of the extension (building it if needed); remembers failures."""
    with _lock:
        if kind in _state:
            return _state[kind] is True
        ok = False
        try:
            if os.environ.get("INTRADISTILL_DISABLE_CPP", "0") not in ("", "0"):
                raise _Unavailable("disabled by INTRADISTILL_DISABLE_CPP")
            _state[f"{kind}_origin"] = _load(kind)
            limit = int(torch.ops.intradistill_cpp.max_passes(torch.empty(0, device=kind)))
            _state[f"{kind}_max_passes"] = None if limit >= _NO_PASS_LIMIT else limit
            ok = True
        except _Unavailable as exc:  # an expected absence (no CUDA, no compiler): the reason says it all
            _state[f"{kind}_error"] = str(exc)
        except Exception as exc:  # a failed build or load: keep the whole message (compiler output)
            _state[f"{kind}_error"] = f"{type(exc).__name__}: {exc}"
        _state[kind] = ok
        return ok


class _Unavailable(RuntimeError):
    pass


def _load(kind: str) -> str:
    """Loads the library of one part and says where it came from."""
    if kind == "cuda":
        if torch.version.cuda is None:
            raise _Unavailable("this torch is a CPU-only build (no CUDA)")
        if not torch.cuda.is_available():
            raise _Unavailable("no CUDA device visible to torch")
        if not _build("cpu"):  # the CPU library defines the operators the CUDA one implements
            raise _Unavailable(f"the cpu part failed first: {build_error('cpu')}")
    aot = _aot_library(kind)
    if aot is not None:
        try:
            torch.ops.load_library(str(aot))
            return f"ahead-of-time build {aot}"
        except OSError as exc:
            _state[f"{kind}_aot_skipped"] = f"ahead-of-time library {aot} failed to load: {exc}"
    return f"first-use build {_first_use_build(kind)}"


def _aot_library(kind: str) -> Path | None:
    """The ahead-of-time library of this part, if one was installed and fits this machine."""
    info_path = PACKAGE_DIR / extension_spec.AOT_INFO
    if not info_path.is_file():
        return None
    try:
        recorded = json.loads(info_path.read_text())["parts"][kind]
    except KeyError:
        return None  # built ahead of time without this part (e.g. no CUDA at install time)
    except (OSError, ValueError) as exc:
        _state[f"{kind}_aot_skipped"] = f"unreadable {info_path}: {exc}"
        return None
    library = PACKAGE_DIR / recorded["library"]
    current = extension_spec.build_identity(kind, _sources_dir(), torch.__version__, recorded["cxx"], recorded["cuda"])
    differences = extension_spec.identity_mismatch(recorded, current)
    if differences or not library.is_file():
        why = f"built for {', '.join(differences)}" if differences else "its file is missing"
        _state[f"{kind}_aot_skipped"] = f"ahead-of-time library {library} not used: {why}"
        return None
    return library


def _first_use_build(kind: str) -> str:
    from torch.utils.cpp_extension import LIB_EXT, _get_build_directory, load

    if kind == "cpu":
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise _Unavailable(f"no C++ compiler found (CXX={compiler}) for the first-use build")
    else:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            raise _Unavailable("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    _ensure_ninja_on_path()
    cxx, cuda = extension_spec.cxx_flags(kind), extension_spec.cuda_flags(kind)
    identity = extension_spec.build_identity(kind, _sources_dir(), torch.__version__, cxx, cuda)
    name = f"{extension_spec.FIRST_USE_NAMES[kind]}_{extension_spec.identity_key(identity)}"
    build_dir = Path(_get_build_directory(name, verbose=False))
    sources = _copy_sources(kind, build_dir / "src")
    if not (build_dir / f"{name}{LIB_EXT}").exists():
        print(f"intradistill-kernels: building the {kind} extension (first use only, about a minute)...",
              file=sys.stderr, flush=True)
    return load(name=name, sources=[str(s) for s in sources], extra_cflags=cxx, extra_cuda_cflags=cuda,
                extra_ldflags=extension_spec.ld_flags(kind), build_directory=str(build_dir), is_python_module=False,
                verbose=False)


def _copy_sources(kind: str, dest: Path) -> list[Path]:
    """Copies the part's sources into its build directory (once: the directory is named after
    their content) and returns the files to compile. Compiling the copies keeps ninja's command
    lines independent of where the package lives, so every install of these sources reuses the
    build; files already there are left alone so that their times do not trigger a rebuild."""
    dest.mkdir(parents=True, exist_ok=True)
    src = _sources_dir()
    for name in extension_spec.SOURCES[kind] + extension_spec.HEADERS[kind]:
        target = dest / name
        if not target.exists():
            tmp = dest / f".{name}.{os.getpid()}"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, target)  # atomic: a concurrent build never compiles a half-written file
    return [dest / name for name in extension_spec.SOURCES[kind]]


def _ensure_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; pip's ninja lands in the environment's scripts directory,
    which is not on PATH when the interpreter of a virtualenv is run without activating it."""
    if shutil.which("ninja") is not None:
        return
    candidates = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if directory and shutil.which("ninja", path=directory) is not None:
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return
    raise _Unavailable("ninja not found (pip install ninja)")


def build_error(kind: str) -> str | None:
    """Why a part of the extension could not be loaded, in full (compiler output included)."""
    return _state.get(f"{kind}_error")  # type: ignore[return-value]


def library_origin(kind: str) -> str | None:
    """Where the loaded library of a part came from: "ahead-of-time build <path>" or
    "first-use build <path>"; None when it is not loaded."""
    return _state.get(f"{kind}_origin")  # type: ignore[return-value]


def aot_skipped(kind: str) -> str | None:
    """Why an installed ahead-of-time library was not used, if there is one and it was not."""
    return _state.get(f"{kind}_aot_skipped")  # type: ignore[return-value]


def _short(error: str) -> str:
    """A build error in a line or a few: the compiler's own error lines rather than the command
    lines that precede them."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    # "error:" is how gcc, clang, nvcc, ld and ninja start a message; command lines lack it.
    errors = [line for line in lines[1:] if "error:" in line.lower()]
    head = "the build failed: " + " | ".join(errors[:3]) if errors else (lines[0] if lines else error)
    return head if len(head) <= 400 else head[:397] + "..."


def _could_build(name: str) -> bool:
    """Whether a build was attempted, so that the tools it needs are worth listing."""
    if os.environ.get("INTRADISTILL_DISABLE_CPP", "0") not in ("", "0"):
        return False
    return name == "cpu" or torch.cuda.is_available()


def _build_tools(name: str) -> list[str]:
    if name == "cpu":
        compiler = os.environ.get("CXX", "c++")
        tools = {f"C++ compiler ({compiler})": shutil.which(compiler), "ninja": shutil.which("ninja")}
    else:
        tools = {"nvcc": shutil.which("nvcc") or _cuda_home_nvcc()}
    return [f"{tool}: {path or 'not found'}" for tool, path in tools.items()]


def _cuda_home_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.exists(path) else None


class _Backend:
    """The "cpu" or "cuda" backend (interface: ops/backend.py)."""

    def __init__(self, kind: str):
        self.kind = self.name = kind

    def is_available(self) -> bool:
        return _build(self.kind)

    def supports(self, t: torch.Tensor) -> bool:
        return t.device.type == self.kind and t.dtype != torch.float64

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot be used (None when it can), in a line or a few."""
        if self.is_available():
            return None
        return _short(build_error(self.kind) or "the extension did not load")

    def details(self) -> list[str]:
        """doctor()'s lines under this backend: where its library came from, what it needs to
        build, and the full build error when the one-line reason left part of it out."""
        lines = []
        origin = library_origin(self.kind)
        if origin is not None:
            lines.append(f"loaded from the {origin}")
        if aot_skipped(self.kind):
            lines.append(aot_skipped(self.kind))
        reason = self.unavailable_reason()
        if reason is not None:
            error = build_error(self.kind) or ""
            if error and error != reason:
                lines.append("build error:")
                lines += [f"  {line}" for line in error.splitlines()[-40:]]
            if _could_build(self.kind):
                lines += _build_tools(self.kind)
        return lines

    @property
    def max_passes(self) -> int | None:
        """The largest K the kernels accept (None: any), as the extension itself reports it: the
        CUDA kernels keep a token's K rows in registers and are instantiated up to a fixed K."""
        if self.kind not in _state:
            self.is_available()
        return _state.get(f"{self.kind}_max_passes")  # type: ignore[return-value]

    def forward(self, logits, target, cfg: LossSpec, early: EarlyGrad | None = None) -> RowStats:
        w_ce = w_div = w_z = grad = grad_off = None
        if early is not None:
            w_ce, w_div, w_z = (None if w is None else w.float().contiguous() for w in early.weights)
            grad, grad_off = early.grad, row_offsets(early.grad)
        return RowStats(*torch.ops.intradistill_cpp.forward(
            logits, row_offsets(logits), target, cfg.js, cfg.label_smoothing, cfg.has_ce, cfg.logit_scale,
            cfg.softcap, w_ce, w_div, w_z, grad, grad_off))

    def backward(self, logits, target, lse, stat, weights: RowWeights, cfg: LossSpec, grad) -> None:
        w_ce, w_div, w_z = (None if w is None else w.float().contiguous() for w in weights)
        torch.ops.intradistill_cpp.backward(logits, row_offsets(logits), target, lse, stat, w_ce, w_div, w_z, cfg.js,
                                            cfg.label_smoothing, cfg.has_ce, cfg.logit_scale, cfg.softcap, grad,
                                            row_offsets(grad))


cpu_backend = _Backend("cpu")
cuda_backend = _Backend("cuda")
