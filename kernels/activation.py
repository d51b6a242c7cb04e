"""SiLU-and-multiply, the gate of a SwiGLU MLP: out = silu(x[:, :I]) * x[:, I:]."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from semipd.kernels.reference import silu_and_mul as silu_and_mul_reference  # noqa: F401  (the ground truth)
from semipd.kernels.triton_utils import check_runnable


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + width + cols, mask=mask).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x):
    check_runnable(silu_and_mul_kernel, x)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    width = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(width), 1024)
    if rows.shape[0]:
        silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
            rows, out, rows.stride(0), width, width, BLOCK=block)
    return out
