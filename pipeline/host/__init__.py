"""This machine, set up for the model: the BLAS a rank uses and its kernels (blas.py,
blas_kernels.py), memory that stays wired (wired.py, macOS) or on huge pages (hugepages.py,
Linux), and the few-row products switched on where the machine's check finds them bitwise
equal (rows_first.py). Each checks the machine it runs on and falls back where a check fails."""
