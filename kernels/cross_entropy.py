"""Cross-entropy of one chunk of logits, loss and gradient in one Triton kernel, the gradient written over the logits.

This is the per-chunk step of minilora/loss.py's chunked, fused linear + cross-entropy. For logits z [c, V] (the
chunk's `h @ weight.T`, bf16/fp16/fp32) and labels y [c], with Gemma 2's final-logit soft-capping or without:

    s      = cap * tanh(z / cap)                   (s = z when cap is None)
    loss   = sum_i logsumexp(s_i) - s_i[y_i]       fp32 scalar
    dL/dz  = (softmax(s) - onehot(y)) * (1 - tanh(z / cap)^2)     written into z, in z's dtype

The torch version (`ce_loss_and_grad_reference_`, loss.py's code) makes about eight passes over an fp32 [c, V]
buffer: the upcast, tanh, max, exp, sum, divide, the one-hot subtraction, the derivative of the cap. The kernel
reads each row twice and writes it once, in z's own dtype, and needs no [c, V] buffer at all:

    pass 1  online softmax (Milakov & Gimelshein 2018, as in Liger-Kernel's ops/cross_entropy.py): walk the row
            in BLOCK-sized tiles keeping the running max m and sum d of exp(s - m), rescaling d by
            exp(m_old - m_new) when the max grows; then loss_i = m + log(d) - s[y]
    pass 2  walk the row again and store exp(s - m) / d - (col == y), times the cap's derivative

One program owns one row (grid = c): a row is at most V = 262144 values, and a chunk has hundreds to thousands of
rows, enough programs to fill the GPU. Row losses go to an fp32 [c] buffer that torch sums.

Numerics: all arithmetic is fp32 (bf16/fp16 logits are upcast exactly on load), the gradient is rounded once to
z's dtype at the store, exactly as loss.py's fp32 gradient followed by `.to(h.dtype)`. exp is written as
exp2(x * log2(e)) on the difference s - m (what tl.exp lowers to on NVIDIA anyway, ex2.approx.ftz, so
probabilities below 1e-38 flush to 0; scaling after the subtraction keeps the argument's rounding error relative
to s - m, not to s). tanh is written through one exponential,
tanh|x| = 2 sigmoid(2|x|) - 1 = (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1], because Triton 3.6 and 3.9 keep
tanh in different places (libdevice paths); taking |x| means e never overflows, and the derivative
1 - tanh^2 = 4e / (1 + e)^2 has no cancellation when tanh is near 1. Near x = 0, 1 - e loses a few bits, so the
capped logit can be off by ~cap * 1e-7 in absolute terms (3e-6 for cap 30); that moves a probability by a relative
3e-6, well below bf16 rounding. Results match the reference to fp32 rounding, not bit for bit (sum order, exp).

`ce_loss_and_grad_` is the one entry point for training, `ce_loss` (pass 1 only, z untouched) for evaluation:
Triton for CUDA tensors unless MINILORA_TRITON=0, the torch reference elsewhere. Labels must lie in [0, V); the
caller (chunked_cross_entropy) has checked that and dropped ignore_index rows, and the kernel does not check again
(an out-of-range label would read outside the row).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minilora.kernels import use_triton

# Values of a row a program loads per loop step. 8192 with 8 warps is 32 values a thread: enough independent loads
# in flight to hide memory latency (four 16-byte vectors for bf16), few enough fp32 registers (z, s, e, the
# gradient) not to spill, and a Llama 3 row (V = 128256) takes 16 steps a pass. The kernel is memory-bound, so
# 4096..16384 should all be near peak; not yet timed on a GPU.
BLOCK = 8192
NUM_WARPS = 8
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = math.log2(math.e)


@triton.jit
def _capped(z, cap, inv_cap, SOFTCAP: tl.constexpr, LOG2E: tl.constexpr):
    """(s, ds/dz) for fp32 logits z: s = cap * tanh(z / cap), ds/dz = 1 - tanh^2; (z, 1) without a cap.
    tanh through e = exp(-2|x|) (see the module docstring): no overflow, no cancellation in 1 - tanh^2."""
    if SOFTCAP:
        x = z * inv_cap
        e = tl.exp2((-2.0 * LOG2E) * tl.abs(x))  # exp(-2|x|) in (0, 1]
        r = 1.0 / (1.0 + e)
        t = (1.0 - e) * r  # tanh|x|
        s = cap * tl.where(x < 0, -t, t)
        ds = 4.0 * e * r * r
    else:
        s = z
        ds = 1.0
    return s, ds


@triton.jit
def _ce_kernel(
    z_ptr,  # [c, V] bf16/fp16/fp32 logits in; with WRITE_GRAD, dL/dz out (same dtype)
    y_ptr,  # [c] int64 labels in [0, V)
    loss_ptr,  # [c] fp32 out: logsumexp(s_i) - s_i[y_i]
    V, cap, inv_cap,
    SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    LOG2E: tl.constexpr,  # log2(e): exp(x) = exp2(x * LOG2E)
):
    row = tl.program_id(0).to(tl.int64)  # int64: c * V may pass 2**31
    z_row = z_ptr + row * V
    y = tl.load(y_ptr + row)

    # pass 1: running max m and sum d of exp(s - m) over the row's tiles
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)  # [BLOCK]
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        s, _ = _capped(z, cap, inv_cap, SOFTCAP, LOG2E)
        s = tl.where(mask, s, float("-inf"))  # after the cap: cap * tanh(-inf) would be -cap, not -inf
        m_new = tl.maximum(m, tl.max(s, axis=0))
        # exp(-inf) = 0 on the first tile, where m is still -inf
        d = d * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((s - m_new) * LOG2E), axis=0)
        m = m_new
    s_y, _ = _capped(tl.load(z_row + y).to(tl.float32), cap, inv_cap, SOFTCAP, LOG2E)
    tl.store(loss_ptr + row, m + tl.log(d) - s_y)

    # pass 2: dL/dz = (exp(s - m) / d - onehot(y)) * ds/dz, over the logits it was computed from
    if WRITE_GRAD:
        inv_d = 1.0 / d
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            s, ds = _capped(z, cap, inv_cap, SOFTCAP, LOG2E)
            g = tl.exp2((s - m) * LOG2E) * inv_d - tl.where(cols == y, 1.0, 0.0)
            tl.store(z_row + cols, (g * ds).to(z_ptr.dtype.element_ty), mask=mask)


def _check(z: torch.Tensor, y: torch.Tensor, softcap: float | None) -> None:
    if z.dim() != 2 or z.dtype not in DTYPES:
        raise ValueError(f"kernels/cross_entropy: logits z must be a 2-D [rows, vocab] tensor of "
                         f"{', '.join(map(str, DTYPES))}, got {z.dtype} {list(z.shape)}")
    if not z.is_contiguous():
        raise ValueError(f"kernels/cross_entropy: logits z must be contiguous (the gradient is written into it in "
                         f"place), got strides {z.stride()} for shape {list(z.shape)}")
    if z.shape[1] == 0:
        raise ValueError("kernels/cross_entropy: logits z have an empty vocabulary dimension")
    if y.shape != z.shape[:1] or y.dtype != torch.int64 or y.device != z.device:
        raise ValueError(f"kernels/cross_entropy: labels y must be int64 [{z.shape[0]}] on {z.device} to match "
                         f"logits {list(z.shape)}, got {y.dtype} {list(y.shape)} on {y.device}")
    if softcap is not None and not (0 < softcap < float("inf")):
        raise ValueError(f"kernels/cross_entropy: softcap must be None or a positive number, got {softcap}")


def _launch(z: torch.Tensor, y: torch.Tensor, softcap: float | None, write_grad: bool,
            block: int, num_warps: int) -> torch.Tensor:
    """Run the kernel over z's rows; the fp32 loss sum."""
    _check(z, y, softcap)
    if block < 16 or block & (block - 1):
        raise ValueError(f"kernels/cross_entropy: block must be a power of 2 >= 16, got {block}")
    c, V = z.shape
    row_loss = torch.empty(c, dtype=torch.float32, device=z.device)  # [c]
    if c:
        cap = 1.0 if softcap is None else float(softcap)
        _ce_kernel[(c,)](z, y, row_loss, V, cap, 1.0 / cap, SOFTCAP=softcap is not None, WRITE_GRAD=write_grad,
                         BLOCK=block, LOG2E=_LOG2E, num_warps=num_warps)
    return row_loss.sum()


def ce_loss_and_grad_triton_(z: torch.Tensor, y: torch.Tensor, softcap: float | None = None,
                             block: int = BLOCK, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Sum of CE losses (fp32 scalar); d loss / d z written into z. The kernel (CUDA tensors; CPU ones under
    TRITON_INTERPRET=1)."""
    return _launch(z, y, softcap, True, block, num_warps)


def ce_loss_triton(z: torch.Tensor, y: torch.Tensor, softcap: float | None = None,
                   block: int = BLOCK, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Sum of CE losses (fp32 scalar) by the kernel's first pass alone; z is left as it was."""
    return _launch(z, y, softcap, False, block, num_warps)


def _reference_fp32_(z: torch.Tensor, y: torch.Tensor, softcap: float | None,
                     need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """loss.py's torch code on an fp32 [c, V] buffer z that it may overwrite: (loss sum, dL/dz fp32 or None)."""
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()  # tanh(z / cap), kept for the derivative
        z = t * softcap  # [c, V] capped logits
    target = z.gather(1, y[:, None])  # [c, 1]
    m = z.amax(1, keepdim=True)  # [c, 1] row max, so exp cannot overflow
    z.sub_(m).exp_()  # exp(s - m)
    s = z.sum(1, keepdim=True)  # [c, 1]
    loss = (m + s.log() - target).sum()  # logsumexp(s) - s[y], summed over the rows
    if not need_grad:
        return loss, None
    z.div_(s)  # softmax(s)
    z[torch.arange(z.shape[0], device=z.device), y] -= 1  # softmax - onehot = dL/ds
    if t is not None:
        z.mul_(t.mul_(t).neg_().add_(1))  # d(cap tanh(z/cap))/dz = 1 - tanh^2
    return loss, z


def ce_loss_and_grad_reference_(z: torch.Tensor, y: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """The same contract in plain torch (any device): the fp32 gradient is computed in a working buffer (z itself
    when z is fp32) and copied into z, rounding once to z's dtype."""
    _check(z, y, softcap)
    loss, g = _reference_fp32_(z.float(), y, softcap, need_grad=True)
    z.copy_(g)  # a no-op when g is z (fp32, no cap)
    return loss


def ce_loss_reference(z: torch.Tensor, y: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Sum of CE losses in plain torch; z is left as it was (an fp32 z is copied first)."""
    _check(z, y, softcap)
    return _reference_fp32_(z.clone() if z.dtype == torch.float32 else z.float(), y, softcap, need_grad=False)[0]


def ce_loss_and_grad_(z: torch.Tensor, y: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """For logits z [c, V] (contiguous bf16/fp16/fp32) and labels y [c] (int64, all in [0, V)): the sum over rows
    of logsumexp(s) - s[y], s = softcap(z), as an fp32 scalar; z is overwritten with d loss / d z in its dtype.
    The Triton kernel on CUDA (unless MINILORA_TRITON leaves it out), the torch reference elsewhere."""
    if use_triton(z, "cross_entropy"):
        return ce_loss_and_grad_triton_(z, y, softcap)
    return ce_loss_and_grad_reference_(z, y, softcap)


def ce_loss(z: torch.Tensor, y: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """The loss of `ce_loss_and_grad_` without the gradient, z untouched (evaluation)."""
    if use_triton(z, "cross_entropy"):
        return ce_loss_triton(z, y, softcap)
    return ce_loss_reference(z, y, softcap)
