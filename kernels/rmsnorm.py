"""RMSNorm over the last dimension, optionally fused with the residual add that precedes it.

One program per row. With a residual, the row is x + residual rounded to the model dtype (Hugging Face keeps
the residual stream in that dtype), written out as the new residual, then normalised in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from semipd.kernels.reference import rms_norm as rms_norm_reference  # noqa: F401  (the ground truth)
from semipd.kernels.triton_utils import check_runnable


@triton.jit
def rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                    x_stride, residual_stride, hidden, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x / tl.sqrt(variance + eps) * w
    tl.store(out_ptr + row * hidden + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t, hidden):
    # Rows may be strided (a slice of a bigger activation) but each row must be contiguous.
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x, weight, eps: float, residual=None):
    check_runnable(rms_norm_kernel, x, weight)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    rows = _rows(x, hidden)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_rows = _rows(residual, hidden) if residual is not None else rows
    res_out = torch.empty_like(out) if residual is not None else out
    if rows.shape[0]:
        rms_norm_kernel[(rows.shape[0],)](
            rows, res_rows, weight, out, res_out, rows.stride(0), res_rows.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            num_warps=min(max(triton.next_power_of_2(hidden) // 256, 1), 8))
    return out if residual is None else (out, res_out)
