"""Rotary position embedding (RoPE) for training: one Triton kernel a pass, forward and backward, beside the
plain-torch reference (models/common.py's `apply_rope`, in the [B, T, heads, D] layout of q_proj/k_proj).

Rotate-half layout, half h = D/2, x = [x1 | x2], cos = [c1 | c2], sin = [s1 | s2] (RoPE's cos/sin repeat their
first half, c1 = c2 and s1 = s2, but nothing here relies on it):

    y  = x * cos + rotate_half(x) * sin,    rotate_half(x) = [-x2 | x1]
    y1 = x1 c1 - x2 s1                      y2 = x2 c2 + x1 s2
    dx = dy * cos + rotate_half^T(dy * sin), rotate_half^T(g) = [g2 | -g1]
    dx1 = dy1 c1 + dy2 s2                   dx2 = dy2 c2 - dy1 s1

Both passes are out_i = a_i c_i + a_j u_i with (u1, u2) = (-s1, s2) forward and (s2, -s1) backward, so one
kernel serves both.

Numerics: bitwise torch's. torch evaluates the composition one op at a time, each rounding to x.dtype: the two
products, then their sum (autograd: the two products dy*cos and dy*sin, then the sum of the two gradient paths
into x). The kernel computes in fp32 and rounds after each of those three ops the same way. A product of two
bf16/fp16 values is exact in fp32, so rounding it to bf16/fp16 equals torch's rounding; the fp32 sum of two
rounded values, rounded again, is what torch's bf16/fp16 `+` does. The bf16 rounding is done on the bits
(round to nearest even, as torch's c10::BFloat16): Triton's interpreter truncates on `.to(tl.bfloat16)`, and this
way the interpreter and the GPU give the same bits. In fp32 the launch sets enable_fp_fusion=False so that
ptxas cannot contract a product and the sum into one fma (torch runs them as separate kernels).

Why fuse: torch's composition is 6 kernels a tensor forward (mul, chunk's neg, cat, mul, add; the rotation
copies x twice) and about as many in the backward, each reading and writing a [B, T, heads, D] tensor. Saved
memory is not the gain: autograd of the composition keeps only (views of) cos and sin, as this Function does.

`rope` is the entry point (`rope_qk` for q and k together): RopeFunction for CUDA tensors (unless MINILORA_TRITON leaves out "rope", see
kernels/__init__.py), `rope_reference` (autograd through torch) elsewhere and for the cases the kernel does not
cover (see `_fusable`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from minilora.kernels import use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Values of x an iteration of the head loop handles (both halves): 16 fp32 a thread with 4 warps. A program
# takes one (b, t) row; with head_dim 128 that is 16 heads an iteration, so 1 to 4 iterations for 8..64 heads.
# The pass is memory-bound; not yet timed on a GPU.
ELEMS_PER_ITER = 2048
NUM_WARPS = 4


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE's precision (to nearest, ties to even), kept in fp32."""
    if DTYPE == tl.bfloat16:  # on the bits: keep the top 16, rounding by the 16 dropped and the lowest kept
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN (the add could carry)
    elif DTYPE == tl.float16:  # fp32 -> fp16 rounds to nearest even on GPUs and in the interpreter (numpy)
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _rope_kernel(
    x_ptr,  # [B, T, H, D] x.dtype, unit stride on D: x forward, dy backward
    x2_ptr,  # [B, T, H2, D] x.dtype, unit stride on D: a second tensor (k beside q), or x again with H2 = 0
    cos_ptr,  # [B, T, D] x.dtype, unit stride on D (stride 0 on B when expanded)
    sin_ptr,  # [B, T, D]
    y_ptr,  # [B, T, H, D] contiguous, x.dtype: y forward, dx backward
    y2_ptr,  # [B, T, H2, D] contiguous: the second tensor's
    T, H, H2, half,
    sx_b, sx_t, sx_h,  # x's strides
    sx2_b, sx2_t, sx2_h,  # x2's strides
    sc_b, sc_t, ss_b, ss_t,  # cos's and sin's strides
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # b * T + t; int64: B T H D may pass 2**31
    b, t = row // T, row % T
    cols = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF] within a half
    col_mask = cols < half
    # one row of cos/sin serves every head: [1, BLOCK_HALF] each
    c_row, s_row = cos_ptr + b * sc_b + t * sc_t, sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(c_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + half + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + half + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # out1 = a1 c1 + a2 s2, out2 = a2 c2 - a1 s1
        u1, u2 = s2, -s1
    else:  # out1 = a1 c1 - a2 s1, out2 = a2 c2 + a1 s2
        u1, u2 = -s1, s2
    x_row, x2_row = x_ptr + b * sx_b + t * sx_t, x2_ptr + b * sx2_b + t * sx2_t
    y_row, y2_row = y_ptr + row * H * 2 * half, y2_ptr + row * H2 * 2 * half
    # heads 0..H-1 are x's, H..H+H2-1 are x2's: one loop over both, each head's pointers picked per lane
    for h0 in range(0, H + H2, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # [BLOCK_H]
        first = heads < H
        h2 = tl.where(first, 0, heads - H)
        mask = (heads < H + H2)[:, None] & col_mask[None, :]  # [BLOCK_H, BLOCK_HALF]
        src = tl.where(first[:, None], x_row + heads[:, None] * sx_h, x2_row + h2[:, None] * sx2_h) + cols[None, :]
        a1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        a2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        # torch's roundings: each product, then the sum (negating is exact and commutes with rounding)
        out1 = _round(_round(a1 * c1, DTYPE) + _round(a2 * u1, DTYPE), DTYPE)
        out2 = _round(_round(a2 * c2, DTYPE) + _round(a1 * u2, DTYPE), DTYPE)
        dst = tl.where(first[:, None], y_row + heads[:, None] * (2 * half), y2_row + h2[:, None] * (2 * half))
        dst += cols[None, :]
        tl.store(dst, out1.to(DTYPE), mask=mask)  # exact: out is already DTYPE-representable
        tl.store(dst + half, out2.to(DTYPE), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Shapes the reference and the kernel both accept: x [B, T, H, D], cos/sin [B or 1, T, d], d even, d <= D."""
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(f"kernels/rope.py: expected x [B, T, heads, head_dim] and cos/sin [B, T, rotary_dim], got "
                         f"x {list(x.shape)}, cos {list(cos.shape)}, sin {list(sin.shape)}")
    B, T, _, D = x.shape
    d = cos.shape[-1]
    if cos.shape[0] not in (1, B) or cos.shape[1] != T or d % 2 or d > D:
        raise ValueError(f"kernels/rope.py: cos/sin {list(cos.shape)} do not fit x {list(x.shape)}: need "
                         f"[{B} or 1, {T}, d] with d even and d <= head_dim {D}")
    if not (x.is_floating_point() and cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"kernels/rope.py: x, cos, sin must be floating point, got {x.dtype}, {cos.dtype}, "
                         f"{sin.dtype}")
    if not x.device == cos.device == sin.device:
        raise ValueError(f"kernels/rope.py: x on {x.device}, cos on {cos.device}, sin on {sin.device}")


def _fusable(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel computes what the reference does. Not for partial rotary (d < head_dim: Phi, GLM,
    none of the supported families), nor for mixed dtypes (torch would promote, e.g. bf16 x with fp32 cos under
    autocast), nor for cos/sin that want a gradient (the Function gives them none)."""
    return (cos.shape[-1] == x.shape[-1] and x.dtype in DTYPES and cos.dtype == sin.dtype == x.dtype
            and not (cos.requires_grad or sin.requires_grad))


def _launch(xs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, backward: bool,
            block_h: int | None) -> list[torch.Tensor]:
    """One kernel launch for one or two tensors [B, T, H_i, D] (q and k) rotated by the same cos/sin."""
    for a in xs:
        _check(a, cos, sin)
        if not _fusable(a, cos, sin):
            raise ValueError(f"kernels/rope.py: the kernel needs full rotary (cos/sin last dim {cos.shape[-1]} == "
                             f"head_dim {a.shape[-1]}), x, cos, sin of one dtype in {DTYPES} (got {a.dtype}, "
                             f"{cos.dtype}, {sin.dtype}) and cos/sin without grad; `rope` takes the reference then")
    if len(xs) == 2 and (xs[0].shape[:2] != xs[1].shape[:2] or xs[0].shape[3] != xs[1].shape[3]
                         or xs[0].dtype != xs[1].dtype):
        raise ValueError(f"kernels/rope.py: q and k must share batch, length, head_dim and dtype, got "
                         f"{list(xs[0].shape)} {xs[0].dtype} and {list(xs[1].shape)} {xs[1].dtype}")
    # unit stride on D: e.g. the expanded dy of y.sum() is not; other strides the kernel takes as they are
    xs = [a if a.stride(-1) == 1 else a.contiguous() for a in xs]
    B, T, H, D = xs[0].shape
    H2 = xs[1].shape[2] if len(xs) == 2 else 0
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)  # a batch of 1: stride 0 on B, no copy
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    block_half = triton.next_power_of_2(D // 2)
    if block_h is None:
        block_h = min(triton.next_power_of_2(H + H2), max(1, ELEMS_PER_ITER // (2 * block_half)))
    outs = [torch.empty(a.shape, dtype=a.dtype, device=a.device) for a in xs]
    x2, y2 = (xs[1], outs[1]) if H2 else (xs[0], outs[0])  # no second tensor: H2 = 0 heads of x again
    if outs[0].numel() or H2 and outs[1].numel():
        _rope_kernel[(B * T,)](
            xs[0], x2, cos, sin, outs[0], y2, T, H, H2, D // 2, *xs[0].stride()[:3], *x2.stride()[:3],
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
            num_warps=NUM_WARPS, enable_fp_fusion=False)
    return outs


def rope_forward_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        block_h: int | None = None) -> torch.Tensor:
    """y = x * cos + rotate_half(x) * sin by the kernel (CUDA tensors; CPU ones under TRITON_INTERPRET=1), no
    autograd. x [B, T, H, D]; cos/sin [B or 1, T, D]; y a new contiguous [B, T, H, D]. block_h: heads an
    iteration (a power of 2), for tests."""
    return _launch([x], cos, sin, False, block_h)[0]


def rope_backward_triton(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         block_h: int | None = None) -> torch.Tensor:
    """dx = dy * cos + rotate_half^T(dy * sin), a new contiguous [B, T, H, D]; dy may have any strides."""
    return _launch([dy], cos, sin, True, block_h)[0]


class RopeFunction(torch.autograd.Function):
    """RoPE keeping only cos and sin for the backward (shared by every layer: no memory of its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        y = rope_forward_triton(x, cos, sin)
        ctx.save_for_backward(cos, sin)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return (rope_backward_triton(dy, cos, sin) if ctx.needs_input_grad[0] else None), None, None


class RopeQKFunction(torch.autograd.Function):
    """RoPE of q and k in one launch each way (the same cos/sin): one kernel and one autograd node a layer
    instead of two. The GPU work is the same; what it saves is the CPU's: the 8B step at 2 x 2048 waits ~25 ms
    of its ~245 on kernel launches, longest of all between the q/k/v GEMMs and RoPE (issue 6 profile)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return tuple(_launch([q, k], cos, sin, False, None))

    @staticmethod
    @once_differentiable
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors  # (an output unused downstream comes as zeros: materialize_grads)
        dq, dk = _launch([dq, dk], cos, sin, True, None)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """models/common.py's apply_rope in the [B, T, H, D] layout (any device; autograd differentiates it):
    the oracle and the fallback. Rotates the first cos.shape[-1] dims of each head (partial rotary)."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, d]: one row for every head
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :d], x[..., d:]
    return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(rope(q, cos, sin), rope(k, cos, sin)) for q [B, T, H, D] and k [B, T, K, D]: one RopeQKFunction on CUDA
    (one kernel each way; its launch checks the shapes), else each through `rope`."""
    if use_triton(q, "rope") and q.dtype == k.dtype and _fusable(q, cos, sin) and _fusable(k, cos, sin):
        return RopeQKFunction.apply(q, k, cos, sin)
    return rope(q, cos, sin), rope(k, cos, sin)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, T, H, D] (q_proj/k_proj output viewed per head) with cos/sin [B or 1, T, d] from
    models.common.rope_cos_sin; returns a new [B, T, H, D]. The fused Function for CUDA tensors, the torch
    reference elsewhere, when MINILORA_TRITON leaves "rope" out, and where `_fusable` says no (partial rotary
    among them)."""
    _check(x, cos, sin)
    if use_triton(x, "rope") and _fusable(x, cos, sin):
        return RopeFunction.apply(x, cos, sin)
    return rope_reference(x, cos, sin)
