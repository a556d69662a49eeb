"""The gated activation of the MLP, h = act(g) * u, fused into one Triton kernel forward and one backward.

g = gate_proj(x) and u = up_proj(x), both [*, I]. act is silu (SwiGLU: Llama, Qwen, Mistral) or gelu with the
tanh approximation (GeGLU: Gemma; exactly F.gelu(g, approximate="tanh")). Both have the form g * sigmoid(s(g)):

    silu(g)      = g * sigmoid(g)                                  s = g
    gelu_tanh(g) = 0.5 g (1 + tanh(k (g + c g^3)))                 k = sqrt(2/pi), c = 0.044715
                 = g * sigmoid(2k (g + c g^3))                     s = 2k (g + c g^3), as 0.5 (1 + tanh z) = sigmoid(2z)

so one formula serves both, and tanh is never needed (Triton 3.6 and 3.9 differ on where tanh lives; writing
1 + tanh(z) as 2 sigmoid(2z) also avoids the cancellation of 1 + tanh(z) when z is very negative). Backward:

    act'(g) = sigmoid(s) + g sigmoid(s) (1 - sigmoid(s)) s'(g)     s' = 1 (silu), 2k (1 + 3c g^2) (gelu_tanh)
    dg = dh * u * act'(g),   du = dh * act(g)

For silu that is torch's own sigmoid * (1 + g (1 - sigmoid)); for gelu_tanh it equals torch's
0.5 (1 + tanh) + 0.5 g (1 - tanh^2) k (1 + 3c g^2), since 1 - tanh^2 = 4 sigmoid (1 - sigmoid).

Why fuse: autograd of `act(g) * u` keeps three [N, I] tensors per layer for the backward (g for act', act(g)
and u for the product); GatedActFunction keeps only g and u and recomputes act(g) and act'(g) in the backward,
an elementwise pass that costs no extra memory traffic. The backward reads dh, g, u once and writes fresh
dg and du (torch's composition does three passes: two products and the activation's backward).

Numerics: the kernels load bf16/fp16/fp32 values, compute in fp32 (fp64 for fp64 inputs, for gradcheck) and
round once at the store. torch's bf16 `act(g) * u` rounds twice (act(g) to bf16, then the product), so bf16
results may differ from it by about one bf16 rounding; fp32 ones by a few fp32 ulps (the GPU's exp and divide
are not correctly rounded, nor identical to torch's).

`gated_act` is the one entry point: the Triton Function for CUDA tensors, `gated_act_reference` (plain torch,
differentiated by autograd) elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minilora.kernels import use_triton
from torch.autograd.function import once_differentiable

ACTIVATIONS = ("silu", "gelu_tanh")

# Elements per program: 8 a thread with 4 warps (16-byte bf16 vectors). An elementwise pass is memory-bound,
# so anything from 1024 to 4096 should be near peak; not yet timed on a GPU.
BLOCK = 1024
NUM_WARPS = 4

_GELU_K = math.sqrt(2.0 / math.pi)  # 0.7978845608..., the k of gelu_tanh
_GELU_C = 0.044715


@triton.jit
def _load(ptr, offs, mask, FP64: tl.constexpr):
    """Values at ptr + offs in the compute dtype: fp32, or fp64 for fp64 tensors."""
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if not FP64:
        x = x.to(tl.float32)
    return x


@triton.jit
def _sigmoid_arg(g, GELU_TANH: tl.constexpr, K: tl.constexpr, C: tl.constexpr):
    """s(g) and s'(g), act(g) = g * sigmoid(s(g)): s = g for silu, 2k (g + c g^3) for gelu_tanh."""
    if GELU_TANH:
        s = (2.0 * K) * (g + C * (g * g * g))
        ds = (2.0 * K) * (1.0 + (3.0 * C) * (g * g))
    else:
        s = g
        ds = tl.full(g.shape, 1.0, g.dtype)
    return s, ds


@triton.jit
def _gated_act_fwd_kernel(
    g_ptr,  # [numel] bf16/fp16/fp32/fp64
    u_ptr,  # [numel], g's dtype
    h_ptr,  # [numel], g's dtype: act(g) * u
    numel,
    GELU_TANH: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
    K: tl.constexpr,
    C: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * BLOCK  # int64: numel may pass 2**31
    offs = base + tl.arange(0, BLOCK)
    mask = offs < numel
    g = _load(g_ptr, offs, mask, FP64)
    u = _load(u_ptr, offs, mask, FP64)
    s, _ = _sigmoid_arg(g, GELU_TANH, K, C)
    act = g / (1.0 + tl.exp(-s))  # torch's silu is x / (1 + exp(-x)); exp(+big) = inf gives -0, not nan
    tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    dh_ptr,  # [numel], g's dtype: dL/dh
    g_ptr,  # [numel]
    u_ptr,  # [numel]
    dg_ptr,  # [numel] out: dh * u * act'(g)
    du_ptr,  # [numel] out: dh * act(g)
    h_ptr,  # [numel] out, with STORE_H: act(g) * u, bitwise the forward's (its down_proj's weight gradient reads it)
    numel,
    STORE_H: tl.constexpr,
    GELU_TANH: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
    K: tl.constexpr,
    C: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = base + tl.arange(0, BLOCK)
    mask = offs < numel
    dh = _load(dh_ptr, offs, mask, FP64)
    g = _load(g_ptr, offs, mask, FP64)
    u = _load(u_ptr, offs, mask, FP64)
    s, ds = _sigmoid_arg(g, GELU_TANH, K, C)
    e = 1.0 + tl.exp(-s)
    sig = 1.0 / e
    act = g / e  # as in the forward, so du sees the same act(g)
    # 1 - sigmoid(s) as sigmoid(-s): no cancellation when sigmoid(s) is near 1 (one more exp; the pass is
    # memory-bound). Grouped so that act = 0 meets a finite (1 - sig) s' as g -> -inf, never 0 * inf.
    dact = sig + act * ((1.0 / (1.0 + tl.exp(s))) * ds)
    tl.store(dg_ptr + offs, (dh * u * dact).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


def _check(g: torch.Tensor, u: torch.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated_act: unknown activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"gated_act: g (gate_proj output) and u (up_proj output) must match in shape, dtype and "
                         f"device, got g {g.dtype} {list(g.shape)} on {g.device}, "
                         f"u {u.dtype} {list(u.shape)} on {u.device}")
    if not g.is_floating_point():
        raise ValueError(f"gated_act: g and u must be floating point, got {g.dtype}")


def _launch_args(g: torch.Tensor, activation: str, block: int, num_warps: int) -> tuple[tuple, dict]:
    """Grid and the constexpr keywords shared by both kernels."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"gated_act: block must be a power of 2 >= 16, got {block}")
    meta = dict(GELU_TANH=activation == "gelu_tanh", FP64=g.dtype == torch.float64, BLOCK=block,
                K=_GELU_K, C=_GELU_C, num_warps=num_warps)
    return (triton.cdiv(g.numel(), block),), meta


def gated_act_forward_triton(g: torch.Tensor, u: torch.Tensor, activation: str,
                             block: int = BLOCK, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """h = act(g) * u by the forward kernel (CUDA tensors; CPU ones under TRITON_INTERPRET=1); no autograd."""
    _check(g, u, activation)
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    grid, meta = _launch_args(g, activation, block, num_warps)
    _gated_act_fwd_kernel[grid](g, u, h, g.numel(), **meta)
    return h


def gated_act_backward_triton(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str,
                              block: int = BLOCK, num_warps: int = NUM_WARPS, store_h: bool = False,
                              inplace: bool = False):
    """(dg, du) = (dh * u * act'(g), dh * act(g)) by the backward kernel, as fresh tensors of g's shape; with
    store_h also h = act(g) * u, the forward's output again (dg, du, h): a caller that recomputes h for backward
    gets it from the pass that reads g and u anyway, instead of a second pass over them.

    inplace: dg is written over g, du over u and h over dh (each element is read before it is written, by the
    same thread), so the pass allocates nothing: for a caller that owns all three and needs them no more. The
    8B shape at 32k tokens has [32768, 14336] tensors of 0.94 GB: six of them alive at the MLP's backward peak
    become three. The inputs must then be contiguous already (a copy would be written instead of them)."""
    _check(g, u, activation)
    _check(dh, g, activation)
    if inplace:
        if not (dh.is_contiguous() and g.is_contiguous() and u.is_contiguous()):
            raise ValueError("gated_act_backward_triton(inplace=True): dh, g and u must be contiguous")
        dg, du, h = g, u, (dh if store_h else g)
    else:
        dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()  # dh of a .sum() is an expanded stride-0 view
        dg, du = torch.empty_like(g), torch.empty_like(u)
        h = torch.empty_like(g) if store_h else dg  # (a placeholder pointer the kernel never writes)
    grid, meta = _launch_args(g, activation, block, num_warps)
    _gated_act_bwd_kernel[grid](dh, g, u, dg, du, h, g.numel(), STORE_H=store_h, **meta)
    return (dg, du, h) if store_h else (dg, du)


class GatedActFunction(torch.autograd.Function):
    """act(g) * u saving only g and u for the backward, which recomputes act(g) and act'(g).

    Writes fresh dg and du rather than reusing g's and u's storage: those may be alive elsewhere (a LoRA
    layer's saved output, a hook), and then an in-place gradient would corrupt them."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
        _check(g, u, activation)
        g, u = g.contiguous(), u.contiguous()
        ctx.activation = activation
        ctx.save_for_backward(g, u)
        return gated_act_forward_triton(g, u, activation)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dg, du = gated_act_backward_triton(dh, g, u, ctx.activation)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None), None


def gated_act_reference(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """The same function as torch composes it (any device; autograd differentiates it): the oracle and the
    CPU path. Keeps g, act(g) and u for the backward."""
    _check(g, u, activation)
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    return act * u


def gated_act(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) * u for g = gate_proj(x), u = up_proj(x) of any (equal) shape; activation "silu" or "gelu_tanh".
    The fused Triton Function for CUDA tensors, the torch reference elsewhere."""
    _check(g, u, activation)
    if use_triton(g, "gated_act"):
        return GatedActFunction.apply(g, u, activation)
    return gated_act_reference(g, u, activation)
