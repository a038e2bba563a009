"""The repository's benchmark runner (not shipped in the wheel): every contender on the same
inputs in one run, written as tables and plots. Run from the repository root.

    grid.py        what is measured: (K, N, V) shapes, dtypes, modes and losses per device
    contenders.py  what a user could run instead of this package, as fn(logits, target)
    measure.py     inputs, correctness against the float64 reference, timing, bandwidth
    memory.py      peak extra memory (CUDA allocator; CPU resident high-water mark)
    report.py      writing: Markdown, JSON, plots, the results section of benchmarks/README.md
    run.py         the command line: `python -m benchmarks.run` (`make bench`)
    gpu_check.py   `make gpu-check`: the GPU test subset, targets and grid on a lent GPU
    fused_linear_memory.py  fused-linear against unfused peak memory (its own command line)
    trainer_step.py         one Trainer step with and without the fused path
"""
