import os

# Must be set before triton or the package is imported: runs the Triton kernels on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
