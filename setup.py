"""Build steps that pyproject.toml cannot express.

1. The C++/CUDA sources live in the top-level csrc/ and are copied into the package
   (intradistill_kernels/csrc/) of every wheel, so that an installed package can build its
   extension on first use. (Editable installs find csrc/ beside the package instead.)
2. INTRADISTILL_BUILD_EXT=1 also compiles the extension now, ahead of time, against the torch of
   the build environment, so pass --no-build-isolation (otherwise pip would build it for a second,
   throwaway torch). The flags are those of the first-use build (ops/extension_spec.py); the CPU
   part uses -march=native unless INTRADISTILL_CPU_ARCH names another target (e.g. x86-64-v3 for a
   wheel that other machines install). The CUDA part is built where torch has CUDA and nvcc is found.

Without INTRADISTILL_BUILD_EXT this file imports neither torch nor the package: a default install
is pure Python, needs no compiler, and build isolation never pulls in a torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = "intradistill_kernels"
CSRC = "csrc"


def _load_extension_spec():
    # By file path: importing the package would import torch.
    path = ROOT / PACKAGE / "ops" / "extension_spec.py"
    module_spec = importlib.util.spec_from_file_location("_intradistill_extension_spec", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


SPEC = _load_extension_spec()


class BuildPyWithSources(build_py):
    """build_py that also places csrc/ inside the built package."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            for source, target in self._csrc_copies():
                self.mkpath(str(target.parent))
                self.copy_file(str(source), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        extra = [] if getattr(self, "editable_mode", False) else [str(t) for _, t in self._csrc_copies()]
        return super().get_outputs(include_bytecode) + extra

    def _csrc_copies(self):
        target_dir = Path(self.build_lib) / PACKAGE / CSRC
        return [(source, target_dir / source.name) for source in SPEC.csrc_files(ROOT / CSRC)]


def _python_cflag(arg: str) -> bool:
    """A flag of the interpreter's own build that setuptools adds to every extension's compile."""
    return arg in ("-g", "-fwrapv", "-Wall", "-Wsign-compare", "-Wno-unused-result", "-DNDEBUG") or \
        arg in ("-O0", "-O1", "-O2", "-O3", "-Os")


def _ahead_of_time() -> dict:
    """setup() arguments that compile the extension now, or none without INTRADISTILL_BUILD_EXT."""
    if os.environ.get("INTRADISTILL_BUILD_EXT", "0") in ("", "0"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            "INTRADISTILL_BUILD_EXT=1 compiles the extension against the torch you will run: install "
            "torch first and build with pip's --no-build-isolation") from exc

    arch = os.environ.get(SPEC.ARCH_ENV, "native")
    parts = {"cpu": cpp_extension.CppExtension}
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        parts["cuda"] = cpp_extension.CUDAExtension
    extensions, flags = [], {}
    for kind, extension in parts.items():
        cxx, cuda = SPEC.cxx_flags(kind, arch), SPEC.cuda_flags(kind)
        flags[kind] = (cxx, cuda)
        compile_args = {"cxx": cxx, "nvcc": cuda} if kind == "cuda" else {"cxx": cxx}
        extensions.append(extension(
            f"{PACKAGE}.{SPEC.AOT_MODULES[kind]}", sources=[f"{CSRC}/{s}" for s in SPEC.SOURCES[kind]],
            extra_compile_args=compile_args, extra_link_args=SPEC.ld_flags(kind)))

    class BuildExtWithInfo(cpp_extension.BuildExtension):
        """Records, beside the libraries, what they were built for: ops/cpp.py loads one only for
        the same torch, sources and (with -march=native) CPU, and builds on first use otherwise."""

        def build_extensions(self):
            # Python's own CFLAGS (-g -fwrapv -O2 -Wall -DNDEBUG ...) would make this library differ
            # from the first-use build, and -g alone makes it 15 times larger.
            self.compiler.compiler_so = [a for a in self.compiler.compiler_so if not _python_cflag(a)]
            super().build_extensions()

        def run(self):
            super().run()
            info = {"parts": {}}
            for ext in self.extensions:
                kind = next(k for k, m in SPEC.AOT_MODULES.items() if ext.name.endswith("." + m))
                cxx, cuda = flags[kind]
                identity = SPEC.build_identity(kind, ROOT / CSRC, torch.__version__, cxx, cuda)
                info["parts"][kind] = {"library": Path(self.get_ext_fullpath(ext.name)).name, **identity}
            target = Path(self.get_ext_fullpath(self.extensions[0].name)).parent / SPEC.AOT_INFO
            target.write_text(json.dumps(info, indent=1) + "\n")
            self._aot_info = str(target)

        def get_outputs(self):
            return super().get_outputs() + ([self._aot_info] if getattr(self, "_aot_info", None) else [])

    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtWithInfo}}


aot = _ahead_of_time()
setup(
    cmdclass={"build_py": BuildPyWithSources, **aot.pop("cmdclass", {})},
    **aot,
)
