"""Static performance model of the GPU kernels on an H100 SXM, read from their sm_90 machine code:
no GPU needed. Its figures are predictions until a GPU measures them (`make gpu-check` prints both).

    python -m benchmarks.gpu_model                  # the grid -> benchmarks/results/gpu-model-h100-sm90/
    python -m benchmarks.gpu_model --headline       # K = 2, 3, 4, CE + X only, printed
    python -m benchmarks.gpu_model --compare FILE   # exit 1 where a prediction is > 5% slower than FILE's
    python -m benchmarks.gpu_model --summary        # the table of docs/design.md §2.5, from the committed one

Each variant is compiled as it runs: the Triton kernels with the project's ahead-of-time helper
(tests/aot_compile.py: compile_variant, the launcher's constexprs, num_warps and maxnreg), the
CUDA C++ kernels (csrc/cuda_kernel.cu) with nvcc -cubin for sm_90 and the extension's own flags.
The cubins are disassembled with nvdisasm (installed on first use from the package registry into
.gpu/sass-venv, an ignored folder, where no nvdisasm is on PATH). A *sweep* is an innermost loop
whose body loads from global memory: one pass over a token's K rows. Its instructions are
counted per warp and iteration, together with the logit elements that iteration reads (bytes of
its LDGs / element size), and the time of the sweep over a [K, N, V] tensor is bounded by:

    issue    every warp-instruction takes an issue slot: 4 per SM and clock (one per sub-partition)
    fma      FFMA/FADD/FMUL/IMAD/...: 128 lanes per SM and clock
    alu      compare, min/max, select, logic, shift, permute, conversion: 64 lanes per SM and clock
    mufu     MUFU (ex2, lg2, rcp): 16 per SM and clock
    shfl     warp shuffles: 32 lanes per SM and clock
    hbm      the sweep's bytes (reads, and writes in a gradient sweep) at 3.35 TB/s
    latency  Little's law: each resident warp has one iteration's loads in flight (the loads of an
             iteration are issued together at its top and used in it), each taking 600 ns, so an
             SM reads at most (resident warps x bytes per warp-iteration) / 600 ns

The sweep takes the largest (table: "bound"). A kernel's time is the sum of its sweeps'; the one-pass forward's
gradient sweep re-reads a token's rows from L2 only while the rows of every resident program fit
in the 50 MB L2 (resident programs from ptxas's register count), from HBM otherwise, so it is
given as a range: every bound summed over its sweeps (perfect overlap of programs in different
sweeps) to the sum of the sweeps' own times. Clocks: 1.98 GHz (boost) and 1.755 GHz (sustained).
What the model leaves out only adds time: queueing beyond the latency bound, the first and last
waves, the row statistics and launches, DRAM refresh and clocks below these.

The CUDA kernels take their options (divergence, smoothing, transform, z-loss, K within the
compiled bound) at run time; the model compiles them with those options fixed by the
preprocessor (INTRADISTILL_FIXED_OPTIONS, see csrc/cuda_kernel.cu), one instantiation per variant,
so that each sweep is the single path the real kernel takes for that variant. The real kernel's
tests of the options are uniform branches that this count leaves out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SASS_VENV = ROOT / ".gpu" / "sass-venv"
OUT = ROOT / "benchmarks" / "results" / "gpu-model-h100-sm90"

# The machine model (H100 SXM5, sm_90). Stated, not measured: the first GPU session checks it.
MACHINE = {
    "name": "H100 SXM5 (sm_90)",
    "sms": 132,
    "clocks_hz": [1.98e9, 1.755e9],
    "issue_per_sm_clock": 4,
    "lanes_per_sm_clock": {"fma": 128, "alu": 64, "mufu": 16, "shfl": 32},
    "hbm_bytes_per_s": 3.35e12,
    "l2_bytes": 50e6,
    "hbm_latency_s": 600e-9,
    "registers_per_sm": 65536,
    "max_warps_per_sm": 64,
}
N, V = 8192, 128256  # the headline shape's tokens and classes; K varies
TOLERANCE = 0.05  # a prediction more than this much slower than the committed table fails the test
NO_NVDISASM = 3  # exit status where nvdisasm is neither on PATH nor installable

PIPES = {
    "fma": {"FFMA", "FADD", "FMUL", "IMAD", "HFMA2", "HADD2", "HMUL2", "FFMA2", "FADD2", "FMUL2"},
    "alu": {"FMNMX", "FSEL", "FSETP", "ISETP", "SHF", "PRMT", "LOP3", "IADD3", "SEL", "MOV", "F2FP", "PLOP3", "LEA",
            "IMNMX", "VIADD", "F2F", "FSET", "IABS", "BMSK", "SGXT", "I2F", "F2I", "FCHK", "P2R", "R2P", "VIMNMX",
            "IADD", "FRND", "ISCADD", "LEA.HI", "CS2R", "S2R", "FMNMX3"},
    "mufu": {"MUFU"},
    "shfl": {"SHFL"},
}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration a user meets: backend, K, dtype, divergence and options."""
    backend: str  # "triton" | "cuda"
    k: int
    dtype: str  # "bfloat16" | "float32"
    divergence: str  # "x" | "js"
    options: str  # "-": CE only; "ls": label smoothing; "llm": logit_scale, softcap and z-loss

    @property
    def key(self) -> str:
        return f"{self.backend} K={self.k} {self.dtype} ce+{self.divergence} {self.options}"

    @property
    def flags(self) -> tuple[bool, bool, bool]:
        """(HAS_CE, SMOOTH, JS) as the dispatcher combines them."""
        return True, self.options == "ls", self.divergence == "js"

    @property
    def llm(self) -> bool:
        return self.options == "llm"


def grid(backends=("triton", "cuda")) -> list[Variant]:
    return [Variant(b, k, d, div, o) for b in backends for d in ("bfloat16", "float32") for div in ("x", "js")
            for o in ("-", "ls", "llm") for k in range(2, 9)]


def headline(backends=("triton",)) -> list[Variant]:
    return [Variant(b, k, d, "x", "-") for b in backends for d in ("bfloat16", "float32") for k in (2, 3, 4)]


# --------------------------------------------------------------------------- tools

def nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    for dirpath, _, files in os.walk(SASS_VENV):
        if "nvdisasm" in files:
            return os.path.join(dirpath, "nvdisasm")
    print("installing nvdisasm (nvidia-cuda-nvdisasm) into .gpu/sass-venv ...", file=sys.stderr)
    venv.create(SASS_VENV, with_pip=True)
    pip = subprocess.run([str(SASS_VENV / "bin" / "pip"), "install", "-q", "nvidia-cuda-nvdisasm"])
    for dirpath, _, files in os.walk(SASS_VENV):
        if "nvdisasm" in files:
            return os.path.join(dirpath, "nvdisasm")
    print(f"nvdisasm not found (pip install nvidia-cuda-nvdisasm exited {pip.returncode})", file=sys.stderr)
    raise SystemExit(NO_NVDISASM)



def nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def disassemble(cubin: bytes, tool: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout


# --------------------------------------------------------------------------- SASS

def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction) of the first function in an nvdisasm listing, with labels kept as
    (address, '.L_x_N:') entries just before the instruction they name."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            out.append((-1, m.group(1) + ":"))
            continue
        m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def sweeps(text: str) -> list[list[str]]:
    """The innermost loops (back-edge branches) whose body loads from global memory, in address
    order, each as its list of instructions."""
    items = parse_sass(text)
    labels, instrs, pending = {}, [], []
    for addr, ins in items:
        if addr < 0:
            pending.append(ins[:-1])
            continue
        for label in pending:
            labels[label] = addr
        pending = []
        instrs.append((addr, ins))
    loops = []
    for addr, ins in instrs:
        m = re.search(r"BRA\s+(?:\S+\s+)?`\((\.L_x_\d+)\)", ins)
        if m and labels.get(m.group(1), 1 << 62) <= addr:
            start = labels[m.group(1)]
            body = [i for a, i in instrs if start <= a <= addr]
            if any(opcode(i).startswith("LDG") for i in body):
                loops.append((start, addr, body))
    inner = [lp for lp in loops if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return [body for _, _, body in sorted(inner, key=lambda lp: lp[0])]


def _access_bytes(op: str) -> int:
    width = re.search(r"\.(128|64|U16|S16|16|U8|S8|8)\b", op)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "16": 2, "U8": 1, "S8": 1, "8": 1}[width.group(1)] if width else 4


def count(body: list[str], element_bytes: int) -> dict:
    """Per warp-iteration counts of one sweep."""
    ops = collections.Counter(opcode(i) for i in body)
    base = collections.Counter()
    for op, c in ops.items():
        base[op.split(".")[0]] += c
    loaded = sum(_access_bytes(op) * c for op, c in ops.items() if op.startswith("LDG"))
    stored = sum(_access_bytes(op) * c for op, c in ops.items() if op.startswith("STG"))
    elements = 32 * loaded // element_bytes
    pipes = {p: sum(base[o] for o in names) for p, names in PIPES.items()}
    # Conditional branches besides the back-edge: the loop has more than one path and every path's
    # instructions are counted (an upper bound). The kernels' sweeps are written to have none.
    branches = sum(1 for i in body[:-1] if opcode(i).startswith("BRA"))
    return {"instructions": len(body), "elements": elements, "writes": stored > 0, "branches": branches,
            "warp_instr_per_element": len(body) / elements, "mufu_per_element": 32 * base["MUFU"] / elements,
            "shfl": base["SHFL"], "bar": base["BAR"], "lds_sts": base["LDS"] + base["STS"],
            "ldg": base["LDG"], "stg": base["STG"], "local": base["LDL"] + base["STL"], **pipes}


# --------------------------------------------------------------------------- compiling

TRITON_KERNELS = {"forward": ("_forward_kernel", False), "one-pass": ("_forward_kernel", True),
                  "backward": ("_backward_kernel", None)}


def compile_triton(variant: Variant) -> dict[str, tuple[bytes, int, int]]:
    """kernel -> (cubin, registers per thread, warps), as the launcher specialises it for a
    contiguous [K, N, V] tensor (16-byte aligned rows, unit class stride)."""
    os.environ["TRITON_INTERPRET"] = "0"
    for p in (str(ROOT), str(ROOT / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import aot_compile  # tests/aot_compile.py: the project's ahead-of-time helper
    from intradistill_kernels.ops.triton import kernels

    options = {"SCALE": True, "SOFTCAP": True, "HAS_Z": True} if variant.llm else {}
    out = {}
    for name, (kernel_name, early) in TRITON_KERNELS.items():
        opts = dict(options) if early is None else dict(options, EARLY=early)
        compiled = aot_compile.compile_variant(getattr(kernels, kernel_name), variant.dtype, 90, (variant.k, V),
                                               variant.flags, None, True, opts)
        usage = aot_compile.ptxas_usage(compiled.asm["ptx"], 90)
        out[name] = (compiled.asm["cubin"], usage["registers"], compiled.metadata.num_warps)
    return out


CUDA_DTYPES = {"bfloat16": "__nv_bfloat16", "float32": "float"}
CUDA_UNIT = """#define INTRADISTILL_FIXED_OPTIONS 1
#define INTRADISTILL_FIXED_K {k}
#define INTRADISTILL_FIXED_JS {js}
#define INTRADISTILL_FIXED_SMOOTH {smooth}
#define INTRADISTILL_FIXED_TRANSFORM {transform}
#define INTRADISTILL_FIXED_HAS_Z {has_z}
#include "{source}"
namespace intradistill {{
namespace {{
template __global__ void forward_kernel<{t}, {kt}, true, false>(RowsArgs, float*, float*, float*, float*, RowWeights,
                                                              GradArgs);
template __global__ void forward_kernel<{t}, {kt}, true, true>(RowsArgs, float*, float*, float*, float*, RowWeights,
                                                             GradArgs);
template __global__ void backward_kernel<{t}, {kt}, true>(RowsArgs, const float*, const float*, RowWeights, GradArgs);
}}  // namespace
}}  // namespace intradistill
"""
CUDA_ENTRIES = {"forward": r"forward_kernel\w*Lb0EEEv", "one-pass": r"forward_kernel\w*Lb1EEEv",
                "backward": r"backward_kernel"}


def compile_cuda(variant: Variant, tool: str) -> dict[str, tuple[bytes, int, int, str]]:
    """kernel -> (cubin, registers, warps, entry) of the CUDA kernels (vectorised rows) with the
    variant's options fixed, compiled with the extension's own nvcc flags."""
    kt = 2 if variant.k <= 2 else 4 if variant.k <= 4 else 8  # the launcher's bound (launch_forward)
    unit = CUDA_UNIT.format(k=variant.k, js=int(variant.divergence == "js"), smooth=int(variant.options == "ls"),
                            transform=int(variant.llm), has_z=int(variant.llm), source=ROOT / "csrc" / "cuda_kernel.cu",
                            t=CUDA_DTYPES[variant.dtype], kt=kt)
    from intradistill_kernels.ops.extension_spec import cuda_flags

    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "model.cu", Path(tmp) / "model.cubin"
        src.write_text(unit)
        run = subprocess.run([tool, "-std=c++17", *cuda_flags("cuda"), "-cubin", "-arch=sm_90", "-Xptxas", "-v",
                              str(src), "-o", str(cubin)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(run.stderr[-3000:])
        data = cubin.read_bytes()
    regs = dict(re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", run.stdout + run.stderr, re.S))
    out = {}
    for name, pattern in CUDA_ENTRIES.items():
        entry = next(e for e in regs if re.search(pattern, e))
        out[name] = (data, int(regs[entry]), 8, entry)  # kThreads = 256
    return out


def function_text(listing: str, entry: str | None) -> str:
    if entry is None:
        return listing
    parts = re.split(r"\n(?=\s*\.text\.)", listing)
    return next(p for p in parts if p.strip().startswith(f".text.{entry}:"))


# --------------------------------------------------------------------------- the model

def programs_per_sm(registers: int, warps: int) -> int:
    per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    return max(1, min(MACHINE["registers_per_sm"] // (per_warp * warps), MACHINE["max_warps_per_sm"] // warps))


def sweep_time(s: dict, elements: float, element_bytes: int, hbm_reads: bool, clock: float,
               resident_warps: int) -> dict:
    """The bounds (seconds) of one sweep over `elements` logits of `element_bytes` each, read
    from HBM (hbm_reads) or from L2, and written back where the sweep stores."""
    m = MACHINE
    iters = elements / s["elements"]
    bounds = {"issue": iters * s["instructions"] / (m["sms"] * m["issue_per_sm_clock"] * clock)}
    for pipe, lanes in m["lanes_per_sm_clock"].items():
        bounds[pipe] = iters * s[pipe] * 32 / (m["sms"] * lanes * clock)
    bounds["hbm"] = elements * element_bytes * (int(hbm_reads) + int(s["writes"])) / m["hbm_bytes_per_s"]
    if hbm_reads:
        in_flight = resident_warps * s["elements"] * element_bytes  # bytes per SM
        bounds["latency"] = elements * element_bytes * m["hbm_latency_s"] / (m["sms"] * in_flight)
    return bounds


def predict(variant: Variant, kernels: dict[str, dict], n: int = N, v: int = V) -> dict:
    """Times (ms) of the variant's kernels on a K x n x v tensor at each clock (the counts hold
    for any v of at least one block: the loops are the same)."""
    eb = ELEMENT_BYTES[variant.dtype]
    elements = variant.k * n * v
    floor = 2 * eb * elements / MACHINE["hbm_bytes_per_s"]
    out = {"floor_ms": floor * 1e3, "clocks": {}}
    one = kernels["one-pass"]
    resident = MACHINE["sms"] * one["programs_per_sm"]
    fits_l2 = resident * variant.k * v * eb <= MACHINE["l2_bytes"]

    for clock in MACHINE["clocks_hz"]:
        times, bounds_of = {}, {}
        for name in ("forward", "backward"):
            total = 0.0
            warps = kernels[name]["programs_per_sm"] * kernels[name]["warps"]
            for i, s in enumerate(kernels[name]["sweeps"]):
                b = sweep_time(s, elements, eb, True, clock, warps)
                bounds_of[f"{name} {i}"] = max(b, key=b.get)
                total += max(b.values())
            times[name] = total
        # One-pass: the sweeps after the first re-read the rows from L2 where they fit.
        per_sweep, summed = [], collections.Counter()
        for i, s in enumerate(one["sweeps"]):
            b = sweep_time(s, elements, eb, i == 0 or not fits_l2, clock, one["programs_per_sm"] * one["warps"])
            per_sweep.append(max(b.values()))
            summed.update(b)
        lo, hi = max(summed.values()), sum(per_sweep)
        two = times["forward"] + times["backward"]
        out["clocks"][f"{clock / 1e9:.3f} GHz"] = {
            "forward_ms": times["forward"] * 1e3, "backward_ms": times["backward"] * 1e3,
            "two_pass_ms": two * 1e3, "two_pass_x_floor": two / floor,
            "one_pass_ms": [lo * 1e3, hi * 1e3], "one_pass_x_floor": [lo / floor, hi / floor],
            "bound": bounds_of}
    out["one_pass_rows_fit_l2"] = fits_l2
    return out


def model_variant(variant: Variant, tool: str, nvcc_tool: str | None) -> dict:
    eb = ELEMENT_BYTES[variant.dtype]
    if variant.backend == "triton":
        compiled = {name: (*v, None) for name, v in compile_triton(variant).items()}
    else:
        compiled = compile_cuda(variant, nvcc_tool)
    listings = {}
    kernels = {}
    for name, (cubin, registers, warps, entry) in compiled.items():
        if id(cubin) not in listings:
            listings[id(cubin)] = disassemble(cubin, tool)
        text = function_text(listings[id(cubin)], entry)
        kernels[name] = {"registers": registers, "warps": warps, "programs_per_sm": programs_per_sm(registers, warps),
                         "sweeps": [count(body, eb) for body in sweeps(text)]}
    return {"variant": dataclasses.asdict(variant), "key": variant.key, "kernels": kernels,
            "prediction": predict(variant, kernels)}


# --------------------------------------------------------------------------- writing

SWEEP_NAMES = {("forward", "x"): ["statistics"], ("forward", "js"): ["statistics", "KL"],
               ("one-pass", "x"): ["statistics", "gradient"], ("one-pass", "js"): ["statistics", "KL", "gradient"],
               ("backward", "x"): ["gradient"], ("backward", "js"): ["gradient"]}


def sweep_label(kernel: str, divergence: str, i: int, n: int) -> str:
    names = SWEEP_NAMES[(kernel, divergence)]
    return names[i] if n == len(names) else f"loop {i}"


def header_lines(meta: dict) -> list[str]:
    m = MACHINE
    lanes = m["lanes_per_sm_clock"]
    return [
        "# Static GPU model: predicted, not measured",
        "",
        f"Written by `python -m benchmarks.gpu_model` ({meta['date']}; Triton {meta['triton']}, "
        f"{meta['nvcc'] or 'no nvcc'}, nvdisasm from {meta['nvdisasm']}). Every figure is read from the sm_90 "
        "machine code of the kernels as the launchers specialise them; no GPU ran them.",
        "",
        "Machine model (assumptions): "
        f"{m['name']}, {m['sms']} SMs at {' and '.join(f'{c / 1e9:.3f}' for c in m['clocks_hz'])} GHz; "
        f"{m['issue_per_sm_clock']} warp-instructions issued per SM and clock; per SM and clock {lanes['fma']} FP32 "
        f"FMA/ADD/MUL lanes, {lanes['alu']} compare/min/max/select/integer/conversion lanes, {lanes['mufu']} MUFU "
        f"results, {lanes['shfl']} shuffle lanes; HBM3 {m['hbm_bytes_per_s'] / 1e12:.2f} TB/s; "
        f"{m['l2_bytes'] / 1e6:.0f} MB L2; {m['registers_per_sm']} registers per SM; loaded HBM latency "
        f"{m['hbm_latency_s'] * 1e9:.0f} ns, one loop iteration's loads in flight per resident warp (Little's law). "
        f"Shape K x {N} x {V}. A sweep takes its largest bound; a kernel the sum of its sweeps. The floor is one "
        "read and one write of every logit (4 B/element in bf16, 8 in fp32). Latency, tails, launches and "
        "clocks below these only add time. Counts per warp and loop iteration; elements are the logits one "
        "iteration of a warp reads.",
        "",
    ]


def markdown(results: list[dict], meta: dict) -> str:
    lines = header_lines(meta)
    lines += ["## Predicted time, forward + backward (1.980 GHz)", "",
              "| backend | K | dtype | loss | options | floor ms | fwd ms | bwd ms | two-pass ms | x floor | "
              "one-pass ms | one-pass x floor | bounds | regs fwd/bwd | programs/SM fwd/bwd |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v, p = r["variant"], r["prediction"]
        c = p["clocks"]["1.980 GHz"]
        ks = r["kernels"]
        bounds = ", ".join(f"{k}: {b}" for k, b in c["bound"].items())
        lines.append(
            f"| {v['backend']} | {v['k']} | {v['dtype']} | ce+{v['divergence']} | {v['options']} | {p['floor_ms']:.2f} | "
            f"{c['forward_ms']:.2f} | {c['backward_ms']:.2f} | {c['two_pass_ms']:.2f} | {c['two_pass_x_floor']:.2f} | "
            f"{c['one_pass_ms'][0]:.2f}-{c['one_pass_ms'][1]:.2f} | "
            f"{c['one_pass_x_floor'][0]:.2f}-{c['one_pass_x_floor'][1]:.2f} | {bounds} | "
            f"{ks['forward']['registers']}/{ks['backward']['registers']} | "
            f"{ks['forward']['programs_per_sm']}/{ks['backward']['programs_per_sm']} |")
    lines += ["", "## Sweeps", "",
              "| backend | K | dtype | loss | options | kernel | sweep | warp-instr | elements | warp-instr/element | "
              "MUFU/element | fma | alu | SHFL | BAR | LDS+STS | local | branches |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v = r["variant"]
        for kernel, info in r["kernels"].items():
            for i, s in enumerate(info["sweeps"]):
                lines.append(
                    f"| {v['backend']} | {v['k']} | {v['dtype']} | ce+{v['divergence']} | {v['options']} | {kernel} | "
                    f"{sweep_label(kernel, v['divergence'], i, len(info['sweeps']))} | {s['instructions']} | "
                    f"{s['elements']} | {s['warp_instr_per_element']:.3f} | {s['mufu_per_element']:.2f} | {s['fma']} | "
                    f"{s['alu']} | {s['shfl']} | {s['bar']} | {s['lds_sts']} | {s['local']} | {s['branches']} |")
    return "\n".join(lines) + "\n"


def _model_one(variant: Variant) -> dict:
    return model_variant(variant, nvdisasm(), nvcc())


def summary(table: dict[str, dict]) -> str:
    """The compact table of docs/design.md §2.5, from a committed table: per backend, K and dtype,
    CE + X plain and the slowest option set, warp-instructions per element of each sweep and the
    forward + backward prediction as a multiple of the floor."""
    lines = ["| backend | dtype | K | CE + X: statistics / gradient warp-instr per element | two-pass x floor | "
             "one-pass x floor | slowest variant (x floor, bound) |", "|---|---|---|---|---|---|---|"]
    for backend in ("triton", "cuda"):
        for dtype in ("bfloat16", "float32"):
            for k in range(2, 9):
                r = table.get(Variant(backend, k, dtype, "x", "-").key)
                if r is None:
                    continue
                c = r["prediction"]["clocks"]["1.980 GHz"]
                stats = r["kernels"]["forward"]["sweeps"][0]["warp_instr_per_element"]
                grad = r["kernels"]["backward"]["sweeps"][0]["warp_instr_per_element"]
                others = [table[v.key] for v in grid((backend,)) if v.k == k and v.dtype == dtype and v.key in table]
                worst = max(others, key=lambda o: o["prediction"]["clocks"]["1.980 GHz"]["two_pass_x_floor"])
                wc = worst["prediction"]["clocks"]["1.980 GHz"]
                bound = ", ".join(sorted(set(wc["bound"].values())))
                wv = worst["variant"]
                lines.append(f"| {backend} | {dtype} | {k} | {stats:.2f} / {grad:.2f} | {c['two_pass_x_floor']:.2f} | "
                             f"{c['one_pass_x_floor'][0]:.2f}-{c['one_pass_x_floor'][1]:.2f} | ce+{wv['divergence']} "
                             f"{wv['options']}: {wc['two_pass_x_floor']:.2f} ({bound}) |")
    return "\n".join(lines)


def run(variants: list[Variant], out: Path | None, quiet: bool = False, jobs: int = 1) -> list[dict]:
    """Models the variants (CUDA ones only where nvcc exists), in `jobs` processes; writes
    model.md and model.json into `out` unless it is None."""
    nvdisasm()  # installs it once, before any worker looks for it
    nvcc_tool = nvcc()
    variants = [v for v in variants if v.backend == "triton" or nvcc_tool is not None]
    start = time.monotonic()
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_model_one, variants))
    else:
        results = []
        for i, variant in enumerate(variants):
            results.append(_model_one(variant))
            if not quiet:
                c = results[-1]["prediction"]["clocks"]["1.980 GHz"]
                print(f"[{i + 1}/{len(variants)}] {variant.key}: two-pass {c['two_pass_ms']:.2f} ms = "
                      f"{c['two_pass_x_floor']:.2f}x floor ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    if out is not None:
        import triton

        nvcc_version = None
        if nvcc_tool:
            nvcc_version = subprocess.run([nvcc_tool, "--version"], capture_output=True, text=True).stdout.strip()
            nvcc_version = "nvcc " + nvcc_version.splitlines()[-1].split()[-1] if nvcc_version else None
        meta = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "nvcc": nvcc_version,
                "nvdisasm": "PATH" if shutil.which("nvdisasm") else "nvidia-cuda-nvdisasm", "machine": MACHINE,
                "shape": {"N": N, "V": V}}
        write(out, meta, results)
    return results


def write(out: Path, meta: dict, results: list[dict]) -> None:
    """model.md, and model.json with one variant per line (readable diffs, a third of indent's size)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in results)
    (out / "model.json").write_text(f'{{"meta": {json.dumps(meta)},\n"results": [\n{lines}\n]}}\n')
    (out / "model.md").write_text(markdown(results, meta))



def load(path: Path = OUT / "model.json") -> dict[str, dict]:
    """The committed table: variant key -> result."""
    data = json.loads(Path(path).read_text())
    return {r["key"]: r for r in data["results"]}


def regressions(results: list[dict], committed: dict[str, dict], tolerance: float = TOLERANCE) -> list[str]:
    """Variants whose predicted two-pass or one-pass (upper) time exceeds the committed one by
    more than `tolerance`, or that the committed table lacks."""
    bad = []
    for r in results:
        old = committed.get(r["key"])
        if old is None:
            bad.append(f"{r['key']}: not in the committed table")
            continue
        for clock, new_c in r["prediction"]["clocks"].items():
            old_c = old["prediction"]["clocks"][clock]
            for what, new, was in (("two-pass", new_c["two_pass_ms"], old_c["two_pass_ms"]),
                                   ("one-pass", new_c["one_pass_ms"][1], old_c["one_pass_ms"][1])):
                if new > was * (1 + tolerance):
                    bad.append(f"{r['key']} {clock}: {what} {new:.3f} ms > {was:.3f} ms committed (+{new / was - 1:.1%})")
    return bad


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_model", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT), help="where model.md and model.json go (default: %(default)s)")
    ap.add_argument("--headline", action="store_true", help="K = 2, 3, 4, CE + X, bf16 and fp32 only; nothing written")
    ap.add_argument("--backend", choices=("triton", "cuda", "both"), default="both")
    ap.add_argument("--compare", metavar="FILE", help="fail where a prediction is > 5%% slower than FILE's")
    ap.add_argument("--jobs", type=int, default=1, help="variants modelled in parallel (processes)")
    ap.add_argument("--summary", action="store_true", help="print docs/design.md's table from the committed one")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(load(Path(args.out) / "model.json")))
        return

    backends = ("triton", "cuda") if args.backend == "both" else (args.backend,)
    variants = headline(backends) if args.headline else grid(backends)
    out = None if (args.headline or args.compare) else Path(args.out)
    results = run(variants, out, jobs=args.jobs)

    for r in results:
        c = r["prediction"]["clocks"]["1.980 GHz"]
        sweeps_ = "; ".join(f"{k} " + ", ".join(f"{s['warp_instr_per_element']:.3f} (SHFL {s['shfl']}, BAR {s['bar']})"
                                                 for s in info["sweeps"]) for k, info in r["kernels"].items())
        print(f"{r['key']}: {c['two_pass_ms']:.2f} ms = {c['two_pass_x_floor']:.2f}x floor; one-pass "
              f"{c['one_pass_x_floor'][0]:.2f}-{c['one_pass_x_floor'][1]:.2f}x; warp-instr/element {sweeps_}")
    if args.compare:
        bad = regressions(results, load(Path(args.compare)))
        print("\n".join(bad) if bad else f"no prediction more than {TOLERANCE:.0%} slower than {args.compare}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
