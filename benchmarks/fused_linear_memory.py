"""`python -m benchmarks.fused_linear_memory` from a source checkout; the measurement is
intradistill_kernels.bench.fused_linear_memory."""

from intradistill_kernels.bench.fused_linear_memory import main

if __name__ == "__main__":
    main(prog="python -m benchmarks.fused_linear_memory")
