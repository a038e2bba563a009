"""`python -m intradistill_kernels`: prints the installation's diagnosis (see _doctor.py)."""

from ._doctor import doctor

if __name__ == "__main__":
    doctor()
