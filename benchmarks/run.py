"""`python -m benchmarks.run` from a source checkout. The runner is intradistill_kernels.bench
(installed as the `intradistill-bench` command); see benchmarks/README.md."""

from intradistill_kernels.bench.run import main

if __name__ == "__main__":
    main(prog="python -m benchmarks.run")
