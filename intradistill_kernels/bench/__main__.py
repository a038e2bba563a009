from .run import main

main(prog="python -m intradistill_kernels.bench")
