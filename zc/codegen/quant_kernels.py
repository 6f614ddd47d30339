"""zc's int8 GEMM with the merged dequantization epilogue, as a custom op Inductor can see into.

``torch.ops.zc.w8a8_linear(x_q, w_q, scale, bias, out_dtype)`` computes
``(x_q @ w_q.T) * scale + bias`` with int8 operands, an int32 accumulator and the per-output-
channel ``scale`` (activation step x weight scale) applied in the kernel's epilogue. On GPU the
body is the Triton kernel below; being a ``triton_op``, Inductor inlines the kernel launch into
its generated wrapper instead of calling an opaque extern. On CPU the quantize pass does not use
this op (it emits ``aten._int_mm``, oneDNN's VNNI GEMM, with the epilogue left in the graph so
Inductor fuses it into the consumer); the op's CPU body is the same reference computation, and
under ``TRITON_INTERPRET=1`` the Triton kernel itself runs on CPU tensors (how CI tests it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _w8a8_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0)
        b = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=(cols[None, :] < N) & (k[:, None] < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    scale = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
    out = acc.to(tl.float32) * scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _use_triton(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@triton_op("zc::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if not _use_triton(x):
        out = torch._int_mm(x, weight.t()) * scale
        return (out if bias is None else out + bias).to(out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    block_m, block_n, block_k = (64, 64, 64) if m > 16 else (16, 64, 128)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    wrap_triton(_w8a8_gemm_kernel)[grid](
        x, weight, scale, scale if bias is None else bias, out, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
