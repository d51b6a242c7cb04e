"""What every Triton launcher needs to know: can this kernel run here, and in which dtype to multiply.

Triton fixes interpret-vs-compile when a kernel is decorated, so a launcher checks the decorated kernel itself
(not the environment) and says clearly what to do when it cannot run.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def is_interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_runnable(kernel, *tensors: torch.Tensor) -> None:
    interpreted = is_interpreted(kernel)
    if not interpreted and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 was set after semipd.kernels' Triton modules were imported; "
                           "set it before the first load_ops('triton')")
    for t in tensors:
        if t.device.type == "cpu" and not interpreted:
            raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                               "load_ops('triton') to run them on CPU; use load_ops('torch') on CPU")
        if t.dtype.is_floating_point and t.dtype not in TL_DTYPE:
            raise TypeError(f"unsupported dtype {t.dtype}; kernels take float16, bfloat16 or float32")


MIN_HEAD_DIM = 16


def check_head_dim(op: str, head_dim: int) -> None:
    """The attention kernels multiply q by k^T over the head dim, and tl.dot refuses to compile with K < 16.
    Other head dims are padded to the next power of two and masked, so any head_dim >= 16 works."""
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {head_dim} is not supported by the Triton kernels, which need "
                         f"head_dim >= {MIN_HEAD_DIM} (tl.dot needs K >= 16); use the torch backend")


def compute_dtype(kernel, dtype: torch.dtype):
    """Element type for tl.dot inputs: the tensor's own on a GPU (tensor cores, fp32 accumulation), float32
    under the interpreter, which mishandles bfloat16 arithmetic."""
    return tl.float32 if is_interpreted(kernel) else TL_DTYPE[dtype]


def dot_precision(dtype) -> str:
    # float32 caches exist for tests; exact products keep them comparable with the reference (TF32 would not).
    return "ieee" if dtype == tl.float32 else "tf32"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small pretend GPU so split-K still engages on tiny test batches
