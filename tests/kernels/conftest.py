import os; os.environ["TRITON_INTERPRET"] = "1"  # must precede any triton import: @triton.jit reads it once

# Why this matters: Triton decides between compiling and interpreting when a kernel is decorated, so the
# variable has to be set before semipd.kernels' Triton modules are imported (load_ops("triton") does that).
