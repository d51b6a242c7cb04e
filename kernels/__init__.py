"""semipd kernels."""
