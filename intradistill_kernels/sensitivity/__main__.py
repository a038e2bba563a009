from .cli import main

main(prog="python -m intradistill_kernels.sensitivity")
