"""Fused RMSNorm for training: a Triton forward and backward in one autograd.Function, beside the plain-torch
reference (the numerics of models/common.py's RMSNorm, which follow transformers' LlamaRMSNorm and Gemma3RMSNorm).

Per row of D values, with offset 0 (Llama, Qwen, Mistral) or 1 (Gemma, which stores w - 1):

    rstd = 1 / sqrt(mean(x^2) + eps)                        fp32
    x̂    = x * rstd                                         fp32
    Llama:  y = w * x̂.to(x.dtype)                           cast first, then scale in promote(w.dtype, x.dtype)
    Gemma:  y = (x̂ * (offset + w.float())).to(x.dtype)       scale in fp32, then cast

Backward, with w_eff = w (Llama) or offset + w (Gemma) and g = dy * w_eff, from d rstd / d x_j = -rstd^3 x_j / D:

    dx = rstd * (g - x̂ * mean(g * x̂))                      fp32 per row, cast to x.dtype
    dw = sum over rows of dy * x̂                            fp32 accumulation, cast to w.dtype

Llama's forward rounds x̂ to x.dtype before the weight, so the backward follows autograd through that cast: g
reaches the fp32 x̂ rounded to x.dtype, and dw multiplies dy by the rounded x̂ the forward used. The kernels
match the reference to rounding, not bit for bit: Triton sums the squares in another order than torch's mean, so
rstd may differ in its last fp32 bit, which can flip the last bit of a bf16 output.

Memory is the point: autograd through the reference keeps an fp32 copy of x (4 bytes a value), and with a
trainable weight also x̂ (cast to x.dtype for Llama, fp32 for Gemma): 4 to 8 bytes a value in all. This Function
keeps x itself (2 bytes a value in bf16) and rstd (4 bytes a row), and recomputes x̂ in the backward.

`rmsnorm` is the one entry point: the Function for CUDA tensors, `rmsnorm_reference` (autograd through torch)
elsewhere. Any leading shape [*, D] works (Qwen3/Gemma3 q/k norm normalises [B, T, heads, head_dim]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minilora.kernels import use_triton

# Elements a program handles (rows of BLOCK_D): for small D (q/k norm: head_dim 64..256) one row a program would
# give a few hundred bytes of work per program and mostly idle lanes in the reduction, so a program takes
# ELEMS // BLOCK_D rows instead; from D > ELEMS / 2 on it takes one row. Not yet timed on a GPU.
ELEMS_PER_PROGRAM = 2048
MAX_D = 65536  # one row sits in registers; beyond this a row would have to be split
PROGRAMS_PER_SM = 4  # backward grid when dw is needed: each program keeps a partial dw row, [n_programs, D] fp32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,  # [N, D] x.dtype
    w_ptr,  # [D] w.dtype
    y_ptr,  # [N, D] y.dtype
    rstd_ptr,  # fp32 [N]
    n_rows, D, eps, offset,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, GEMMA: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # [ROWS]; int64: N * D may pass 2**31
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]  # [ROWS, BLOCK_D]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # [ROWS]
    xhat = x * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_D]
    if GEMMA:
        y = xhat * (offset + w)
    else:  # the product of two bf16/fp16 values is exact in fp32: one rounding on the store, as torch's `*`
        y = xhat.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr,  # [N, D] y.dtype
    x_ptr,  # [N, D] x.dtype
    w_ptr,  # [D] w.dtype
    rstd_ptr,  # fp32 [N]
    dx_ptr,  # [N, D] x.dtype
    dw_ptr,  # fp32 [n_programs, D]: this program's sum of dy * x̂ over its rows
    n_rows, D, offset,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, GEMMA: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_D]
    if GEMMA:
        w = offset + w
    dw = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)  # summed over its rows once, at the end
    # grid-stride over tiles of ROWS rows, so the partial dw rows number the programs, not the tiles
    for tile in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = (tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # row numbers fit int32, offsets may not
        mask = (rows < n_rows)[:, None] & (cols < D)[None, :]  # [ROWS, BLOCK_D]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]  # [ROWS, 1]
        xhat = x * rstd  # bitwise the forward's x̂
        g = dy * w
        if GEMMA:
            dw += dy * xhat
        else:  # autograd through the forward's cast: g comes back rounded to x.dtype, dw sees the rounded x̂
            g = g.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_DX:
            c = tl.sum(g * xhat, axis=1)[:, None] / D  # [ROWS, 1] mean(g * x̂)
            tl.store(dx_ptr + offs, (rstd * (g - xhat * c)).to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(dw_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=cols < D)


def _check(x: torch.Tensor, weight: torch.Tensor):
    D = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.shape != (D,):
        raise ValueError(f"kernels/rmsnorm.py: weight must have shape [D] for x of shape [*, D], got weight "
                         f"{list(weight.shape)} and x {list(x.shape)}")
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise ValueError(f"kernels/rmsnorm.py: x and weight must be fp32, bf16 or fp16, got x {x.dtype}, "
                         f"weight {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"kernels/rmsnorm.py: weight is on {weight.device}, x on {x.device}")


def _launch_config(D: int):
    """BLOCK_D, rows a program, warps. Warps grow with the tile so a thread holds ~16 values (registers)."""
    if D > MAX_D:
        raise ValueError(f"kernels/rmsnorm.py: last dim D={D} exceeds {MAX_D} (a row must fit one program)")
    block = triton.next_power_of_2(D)
    rows = max(1, ELEMS_PER_PROGRAM // block)
    return block, rows, min(16, max(4, rows * block // 512))


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0):
    """The forward kernel (CUDA tensors; CPU ones under TRITON_INTERPRET=1). Returns y (x's shape) and rstd
    (fp32, one per row of x.reshape(-1, D))."""
    _check(x, weight)
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()  # [N, D]
    N = x2.shape[0]
    y_dtype = x.dtype if offset else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(N, D, dtype=y_dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    block, rows, warps = _launch_config(D)
    if N:
        _rmsnorm_fwd_kernel[(triton.cdiv(N, rows),)](
            x2, weight.contiguous(), y, rstd, N, D, eps, offset,
            ROWS=rows, BLOCK_D=block, GEMMA=bool(offset), num_warps=warps)
    return y.view(x.shape), rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     offset: float = 0.0, need_dx: bool = True, need_dw: bool = True):
    """The backward kernel: dx (x's shape and dtype, or None) and dw (weight's dtype, or None) from the upstream
    gradient dy (y's shape), the forward's input x and its rstd."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()  # a copy only when the forward's input was not contiguous
    dy2 = dy.reshape(-1, D).contiguous()
    N = x2.shape[0]
    block, rows, warps = _launch_config(D)
    n_tiles = triton.cdiv(N, rows)
    if x.is_cuda and need_dw:
        n_programs = min(n_tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count)
    elif x.is_cuda:
        n_programs = n_tiles  # no dw to gather: one tile a program
    else:
        n_programs = min(n_tiles, 4)  # the interpreter: a few programs, so the grid-stride loop is exercised
    dx = torch.empty_like(x2) if need_dx else None
    dw = torch.zeros(max(n_programs, 1), D, dtype=torch.float32, device=x.device) if need_dw else None
    if N and (need_dx or need_dw):
        _rmsnorm_bwd_kernel[(n_programs,)](
            dy2, x2, weight.contiguous(), rstd, dx if need_dx else x2, dw if need_dw else rstd, N, D, offset,
            ROWS=rows, BLOCK_D=block, GEMMA=bool(offset), HAS_DX=need_dx, HAS_DW=need_dw, num_warps=warps)
    return (dx.view(x.shape) if need_dx else None), (dw.sum(0).to(weight.dtype) if need_dw else None)


class RMSNormFunction(torch.autograd.Function):
    """Saves x, the weight and rstd [N] fp32; the backward recomputes x̂ = x * rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0):
        y, rstd = rmsnorm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = rmsnorm_backward(dy, x, weight, rstd, ctx.offset, need_dx, need_dw)
        return dx, dw, None, None


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """The same function in plain torch (models/common.py's RMSNorm.forward); autograd goes through torch."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma: scale in fp32, then cast
        return (xf * (offset + weight.float())).type_as(x)
    return weight * xf.to(x.dtype)  # Llama: cast, then scale in the weight's dtype


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim of x [*, D] with weight [D]: the fused Triton Function for CUDA tensors, the
    torch reference elsewhere."""
    if use_triton(x, "rmsnorm"):
        return RMSNormFunction.apply(x, weight, eps, offset)
    _check(x, weight)  # the Function checks its inputs in rmsnorm_forward
    return rmsnorm_reference(x, weight, eps, offset)
