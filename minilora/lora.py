"""LoRA: a frozen (optionally 4-bit) linear layer plus a trainable low-rank update, and the function that puts
it into a model.

                 x  [*, in]
                 │
       ┌─────────┴──────────┐
       │                    dropout
       │                    │
   W₀ [out, in]         A [r, in]      Kaiming-uniform (a=√5, as PEFT), trainable
   frozen: bf16/fp16/   │
   fp32, or NF4         xa [*, r]
       │                    │
       │                B [out, r]     zeros, trainable
       │                    │ × s
       └──── (+ b) ──── + ──┘
                 │
                 y  [*, out]

    y = x W₀ᵀ + b + s · dropout(x) Aᵀ Bᵀ          s = α / r        (rsLoRA: s = α / √r)
    merge:  W = W₀ + s · B A                        B starts at zero, so training starts from the base model

(Hu et al. 2021, "LoRA"; Dettmers et al. 2023, "QLoRA" for the NF4 base; Kalajdzievski 2023, "rsLoRA".)

Gradients, with xd = dropout(x), dY [N, out] (W₀ and b are frozen, so they get none):

    dX = dY W₀ + s (dY B) A        dA = s (dY B)ᵀ xd        dB = s dYᵀ (xd Aᵀ)

Every product with B or A goes through an [N, r] tensor first, so LoRA costs O(N·r·(in+out)) on top of the
base matmul. `LoRAFunction` does forward and backward by hand so that the dequantized W₀ is a temporary in
both passes: autograd would otherwise keep an [out, in] 16-bit copy per layer alive until backward, which is
the whole memory that 4-bit storage saves. What it saves for backward is xd, xa = xd Aᵀ [N, r], and A and B
cast to the activations' dtype (made once in forward, not again in backward).

LoRA weights live in fp32 (the optimizer's master copy, as PEFT keeps them); forward and backward cast them to
the activations' dtype, and the gradients come back in fp32. Parameter names are PEFT's without the
`base_model.model.` prefix and the adapter name: `<module>.lora_A.weight`, `<module>.lora_B.weight`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora.kernels import use_triton
from minilora.kernels.gated_act import gated_act, gated_act_backward_triton, gated_act_forward_triton
from minilora.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dense(base: torch.Tensor | NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [out, in] in `dtype`: dequantized into a fresh temporary, or the plain tensor (cast)."""
    if isinstance(base, NF4Tensor):
        return dequantize_nf4(base, dtype)
    return base.to(dtype)


def _fold_lora() -> bool:
    """Add the LoRA term inside the base GEMM (its output starts as the LoRA term, beta = 1) rather than after it;
    the two differ only in rounding order. MINILORA_LORA_FOLD=0 adds it after, for before/after runs: on an H100
    (issue 6, one device call, interleaved) the 8B shape at 2 x 2048 ran 14,739 and 14,672 tok/s folded against
    14,359 unfolded."""
    return os.environ.get("MINILORA_LORA_FOLD", "1") == "1"


def _mm(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale · a @ b in out_dtype (default a's) for the [N, r] and [r, in] / [out, r] LoRA products, with as few
    launches as the backend allows. On CUDA an fp32 result of 16-bit inputs comes straight from the GEMM's fp32
    accumulator (torch.mm's out_dtype), not from a 16-bit product and a cast, and a scale of 1 (alpha = r, the
    default) costs nothing. Each pass saved is a launch of tiny work that the CPU must still issue: four in each
    projection's backward, 896 of the 8B shape's ~5,100 a step. H100, one call (issue 6): 15,889 and 15,927 tok/s
    against 15,733 and 15,737 at 2 x 2048; 10,781 against 9,951 with --max_memory_gb 7, which recomputes."""
    out_dtype = out_dtype or a.dtype
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        y = torch.mm(a, b, out_dtype=torch.float32)
    else:
        y = (a @ b).to(out_dtype)
    return y if scale == 1 else y.mul_(scale)


def _lora_out(x, xa, base, bias, b, scale: float):
    """x W₀ᵀ + b + s · xa Bᵀ [N, out] for x [N, in], xa = xd Aᵀ [N, r] and B [out, r] already in x's dtype."""
    w = _dense(base, x.dtype)  # [out, in], freed when this returns
    if _fold_lora():
        # s · xa Bᵀ (+ b) first, then the base product accumulates onto it in place: cuBLAS reads the [N, out]
        # output once in the big GEMM's epilogue (beta = 1), where adding s · xa Bᵀ afterwards is one more
        # read-modify-write pass over [N, out], exposed (~20 ms of an 8B step's 280 in the profile)
        # (beta = 0: the 0-d placeholder is never read, so it is left unfilled, one launch fewer)
        y = torch.addmm(xa.new_empty(()) if bias is None else bias, xa, b.t(), beta=0 if bias is None else 1,
                        alpha=scale)  # [N, out]
        return y.addmm_(x, w.t())
    y = F.linear(x, w, bias)  # [N, out]
    return y.addmm_(xa, b.t(), alpha=scale)  # + s · xa Bᵀ


def _lora_forward(x, xd, base, bias, A, B, scale: float, need_output: bool = True):
    """y = x W₀ᵀ + b + s (xd Aᵀ) Bᵀ for x [N, in], and what the backward needs: None for r = 0 (A, B None),
    else (xd, xa = xd Aᵀ [N, r], A and B cast to x's dtype). xd None means no dropout: xd is x.
    need_output=False (with LoRA): y is left unset, for a caller that only backpropagates through it (a
    checkpoint's recompute, `GatedMLP.forward`): backward needs xd and xa, never y, so the GEMM is skipped."""
    if A is None:
        return F.linear(x, _dense(base, x.dtype), bias), None
    xd = x if xd is None else xd
    a, b = A.to(x.dtype), B.to(x.dtype)  # the fp32 masters cast once; backward reuses these casts
    xa = xd @ a.t()  # [N, r]
    y = _lora_out(x, xa, base, bias, b, scale) if need_output else x.new_empty(x.shape[0], b.shape[0])
    return y, (xd, xa, a, b)


def _lora_input_grad(dy, base, saved, scale: float, same: bool, need_x: bool, need_xd: bool):
    """(dx, dxd, dyb) for dy [N, out]: dx = dY W₀ (+ s (dY B) A when xd is x), dxd = s (dY B) A when dropout made
    xd a tensor of its own, and dyb = s dY B [N, r] for the weight gradients. saved: _lora_forward's (None: r = 0)."""
    dx = dxd = dyb = None
    if saved is not None:
        _, _, a, b = saved  # A [r, in], B [out, r] in the activations' dtype
        a, b = a.to(dy.dtype), b.to(dy.dtype)  # no-ops unless dy's dtype differs from x's
        dyb = _mm(dy, b, scale)  # s · dY B  [N, r]
    if need_x:
        if saved is not None and same and _fold_lora():
            dx = (dyb @ a).addmm_(dy, _dense(base, dy.dtype))  # s (dY B) A, then + dY W₀ in place  [N, in]
        else:
            dx = dy @ _dense(base, dy.dtype)  # dY W₀  [N, in]
            if saved is not None and same:
                dx.addmm_(dyb, a)
    if need_xd:  # dropout on: the LoRA branch's input gradient flows back through dropout separately
        dxd = dyb @ a
    return dx, dxd, dyb


def _lora_weight_grads(dy, dyb, xd, xa, scale: float, lora_dtypes, need_b: bool, need_A: bool, need_B: bool):
    """(db, dA, dB): dA = s (dY B)ᵀ xd [r, in] and dB = s dYᵀ xa [out, r] in the LoRA weights' dtypes, db = Σ dY."""
    dA = _mm(dyb.t(), xd, out_dtype=lora_dtypes[0]) if need_A else None
    dB = _mm(dy.t(), xa, scale, lora_dtypes[1]) if need_B else None
    return (dy.sum(0) if need_b else None), dA, dB


class LoRAFunction(torch.autograd.Function):
    """y = x W₀ᵀ + b + s (xd Aᵀ) Bᵀ on 2-D inputs x [N, in]. xd is the dropped-out x, or None when it is x
    itself (no dropout), in which case x's gradient carries both terms. A and B are None for r = 0: the
    frozen linear alone, which saves nothing at all. Gradient formulas: see the module docstring."""

    @staticmethod
    def forward(ctx, x, xd, base, bias, A, B, scale: float, need_output: bool = True):
        y, saved = _lora_forward(x, xd, base, bias, A, B, scale, need_output)
        ctx.base, ctx.scale, ctx.same = base, scale, xd is None
        if saved is not None:
            ctx.save_for_backward(*saved)
            ctx.lora_dtypes = A.dtype, B.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # dy [N, out]
        need_x, need_xd, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        saved = ctx.saved_tensors or None
        dx, dxd, dyb = _lora_input_grad(dy, ctx.base, saved, ctx.scale, ctx.same, need_x, need_xd)
        db, dA, dB = _lora_weight_grads(dy, dyb, *(saved or (None, None))[:2], ctx.scale,
                                        getattr(ctx, "lora_dtypes", None), need_b, need_A, need_B)
        return dx, dxd, None, db, dA, dB, None, None


class GatedLoRAFunction(torch.autograd.Function):
    """y = LoRA(h) with h = act(g) * u: the MLP's down projection fused with the gated activation before it.
    Separately, down_proj would keep h [N, I] for its weight gradients and the activation would keep g and u:
    three [N, I] tensors a layer. This Function keeps only g and u, which frees a third of the MLP's activations
    (for Llama 3.1 8B at 2 x 2048 tokens, 117 MB a layer, 3.7 GB in all). Backward needs h again for down_proj's
    dA: the activation's backward kernel, which reads g and u anyway, writes it beside dg and du (a separate
    recompute pass over g and u took ~4 ms of a 283 ms 8B step at 2 x 2048, issue 6). CUDA only: the forward and backward of the activation
    are kernels/gated_act.py's Triton launches. No dropout (its mask would have to be kept).

    With `overwrite` the backward writes dg over g, du over u and h over dh, so the MLP's backward holds three
    [N, I] tensors where fresh outputs make it six: 2.8 GB less at the 8B shape's 32k tokens. GatedMLP asks for
    it, since there g and u are the projections' fresh outputs that nothing else keeps (the projections keep
    their inputs), as Unsloth's fused MLP does the same. The price: a graph through it backpropagates once
    (retain_graph is refused with an error), and a forward hook that keeps gate_proj's or up_proj's output sees
    it overwritten by the gradients."""

    @staticmethod
    def forward(ctx, g, u, activation: str, base, bias, A, B, scale: float, overwrite: bool, need_output: bool):
        h = gated_act_forward_triton(g, u, activation)  # [N, I], dropped once y is made (LoRA keeps xa only)
        y, saved = _lora_forward(h, None, base, bias, A, B, scale, need_output)  # need_output: as _lora_forward
        ctx.base, ctx.scale, ctx.activation = base, scale, activation
        ctx.overwrite = overwrite  # backward writes in place only where dh, g and u are contiguous
        ctx.lora_dtypes = (A.dtype, B.dtype) if A is not None else None
        ctx.save_for_backward(g, u, *(saved[1:] if saved is not None else ()))
        return y

    @staticmethod
    def backward(ctx, dy):  # dy [N, out]
        need_g, need_u, _, _, need_b, need_A, need_B = ctx.needs_input_grad[:7]
        if getattr(ctx, "spent", False):
            raise RuntimeError("GatedLoRAFunction (the MLP's down_proj): backward ran a second time through the "
                               "same graph (retain_graph=True), but the first one wrote its gradients over the "
                               "saved gate/up outputs; run the forward again instead")
        g, u, *lora = ctx.saved_tensors
        saved = (None, *lora) if lora else None  # h is not kept: the activation's backward below remakes it
        dh, _, dyb = _lora_input_grad(dy, ctx.base, saved, ctx.scale, True, need_g or need_u, False)
        dg = du = h = None
        inplace = ctx.overwrite and dh is not None and all(t.is_contiguous() for t in (dh, g, u))
        ctx.spent = inplace
        if dh is not None and need_A:  # dA reads h: the backward kernel writes it beside dg and du
            dg, du, h = gated_act_backward_triton(dh, g, u, ctx.activation, store_h=True, inplace=inplace)
        elif dh is not None:
            dg, du = gated_act_backward_triton(dh, g, u, ctx.activation, inplace=inplace)
        elif need_A:
            h = gated_act_forward_triton(g, u, ctx.activation)
        db, dA, dB = _lora_weight_grads(dy, dyb, h, lora[0] if lora else None, ctx.scale, ctx.lora_dtypes,
                                        need_b, need_A, need_B)
        return dg, du, None, None, db, dA, dB, None, None, None


class SharedInputLoRAFunction(torch.autograd.Function):
    """y_i = x W_iᵀ + b_i + s (x A_iᵀ) B_iᵀ for n LoRA layers that read the same x [N, in] (q/k/v, gate/up), as
    one Function. With A = [A_1; ...; A_n] [R, in], R = Σ r_i, and dY B = [dY_1 B_1 | ... | dY_n B_n] [N, R]:

        xa = x Aᵀ                      one GEMM reads x once, where n LoRALinears read it n times
        dX = s (dY B) A + Σ dY_i W_i   one [N, in] accumulated by the GEMMs' epilogues, where autograd would add
                                       n separate [N, in] gradients with n - 1 elementwise passes
        dA = s (dY B)ᵀ x               one GEMM, x read once; dA_i are its row blocks
        dB_i = s dY_iᵀ xa_i

    Same numbers as the layers one by one (up to summation order), with ~21 launches and ~0.5 GB of memory traffic
    fewer per Llama layer: the 8B shape's step went from 4,212 kernels to 3,546. H100, one call (issue 6; 2 x 2048):
    16,498 and 16,268 tok/s joined against 15,542 and 16,014 one by one; 10,369 against 10,080 at 7 GB; Llama 3.2
    1B at 8 x 2048, 82,895 against 81,145. The frozen W_i (dequantized per use, or kept dense) and b_i stay
    per layer. What backward keeps: x, xa [N, R], A and every B_i in x's dtype. No dropout (its mask would differ
    per layer): `project` runs the layers one by one then."""

    @staticmethod
    def forward(ctx, x, scale: float, bases, biases, *lora):  # lora: A_1..A_n [r_i, in], B_1..B_n [out_i, r_i]
        n = len(bases)
        a = torch.cat(lora[:n]).to(x.dtype)  # [R, in]: the fp32 masters joined, then cast once
        bs = [B.to(x.dtype) for B in lora[n:]]
        xa = x @ a.t()  # [N, R]
        ranks = [b.shape[1] for b in bs]
        ys = [_lora_out(x, xa_i, base, bias, b, scale)  # xa_i [N, r_i]: column blocks of xa
              for xa_i, base, bias, b in zip(xa.split(ranks, 1), bases, biases, bs)]
        ctx.bases, ctx.scale, ctx.lora_dtype = bases, scale, lora[0].dtype
        ctx.save_for_backward(x, xa, a, *bs)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):  # dY_i [N, out_i]
        x, xa, a, *bs = ctx.saved_tensors
        n, scale = len(bs), ctx.scale
        need_x, need_lora = ctx.needs_input_grad[0], ctx.needs_input_grad[4:]
        a = a.to(dys[0].dtype)  # a no-op unless the gradients' dtype differs from x's
        ranks = [b.shape[1] for b in bs]
        dyb = dys[0].new_empty(x.shape[0], xa.shape[1])  # [N, R]
        for dy, b, dyb_i in zip(dys, bs, dyb.split(ranks, 1)):
            torch.mm(dy, b.to(dy.dtype), out=dyb_i)  # dY_i B_i into its column block [N, r_i]
        if scale != 1:
            dyb.mul_(scale)
        dx = None
        if need_x:  # folded: the LoRA term first, then each dY_i W_i accumulates onto it (see _lora_out)
            dx = dyb @ a if _fold_lora() else None
            for dy, base in zip(dys, ctx.bases):  # one dequantized W_i [out_i, in] alive at a time
                w = _dense(base, dy.dtype)
                dx = dy @ w if dx is None else dx.addmm_(dy, w)
            if not _fold_lora():
                dx.addmm_(dyb, a)
        dA = dB = [None] * n
        if any(need_lora[:n]):
            dA = _mm(dyb.t(), x, out_dtype=ctx.lora_dtype).split(ranks)  # row blocks [r_i, in]
        if any(need_lora[n:]):
            dB = [_mm(dy.t(), xa_i, scale, ctx.lora_dtype)  # [out_i, r_i]
                  for dy, xa_i in zip(dys, xa.split(ranks, 1))]
        return dx, None, None, None, *dA, *dB


class LoRALinear(nn.Module):
    """A frozen linear layer W₀ [out, in] (+ bias), with a rank-r LoRA update when r > 0.

    The base weight is either `self.weight` (an nn.Parameter with requires_grad=False, any float dtype) or
    `self.nf4` (an NF4Tensor; `self.weight` is then None). The NF4 tensors are not parameters or buffers, so
    `state_dict()` holds no half-meaningful uint8 entries (a merged export goes through `merge()`); `_apply`
    moves them on `.to()` / `.cuda()` and follows dtype casts of the module in its compute dtype, leaving the
    fp32 quantization constants alone. r = 0 is the plain frozen layer the loader uses for 4-bit inference.
    A freshly built module's base weight is uninitialised: the loader (`set_base_weight`) or `from_linear`
    provides it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, r: int = 0, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, use_rslora: bool = False, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.nf4: NF4Tensor | None = None
        self.dense: torch.Tensor | None = None  # W₀ dequantized once, when the memory plan has room (keep_dense)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling = 0, lora_alpha, 0.0, False, 0.0
        if r > 0:
            self.init_lora(r, lora_alpha, lora_dropout, use_rslora, generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> LoRALinear:
        """An r = 0 LoRALinear that takes over the linear's own weight and bias Parameters, frozen."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        m.weight = linear.weight.requires_grad_(False)
        if linear.bias is not None:
            m.bias = linear.bias.requires_grad_(False)
        return m

    def init_lora(self, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                  generator: torch.Generator | None = None):
        """Add lora_A [r, in] (Kaiming-uniform from `generator`, on CPU so the draw does not depend on the
        device) and lora_B [out, r] = 0, both fp32 on the base weight's device."""
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if self.r > 0:
            raise ValueError("this LoRALinear already has a LoRA update (inject_lora called twice?)")
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        a = nn.Linear(self.in_features, r, bias=False, device="meta").to_empty(device="cpu")
        b = nn.Linear(r, self.out_features, bias=False, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5), generator=generator)
            b.weight.zero_()
        self.lora_A, self.lora_B = a.to(self.device), b.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.nf4.packed.device if self.nf4 is not None else self.weight.device

    # --- base weight: what the loader calls, tensor by tensor ---

    def set_base_weight(self, w: torch.Tensor, quantize: bool):
        """Take a dense [out, in] weight; with quantize, store it as NF4 (quantized on w's device, in w's dtype
        as the compute dtype) and keep no reference to the dense tensor."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"LoRALinear: base weight has shape {tuple(w.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        if quantize:
            self.nf4, self.weight = quantize_nf4(w), None
        else:
            self.nf4, self.weight = None, nn.Parameter(w, requires_grad=False)
        self.dense = None

    def set_base_nf4(self, q: NF4Tensor):
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"LoRALinear: NF4 weight has shape {tuple(q.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        self.nf4, self.weight, self.dense = q, None, None

    def keep_dense(self, keep: bool = True):
        """Keep W₀ dequantized (compute dtype) beside its NF4 bytes, or drop that copy. Forward and backward then
        use it instead of dequantizing into a temporary, twice a step: the same values, 4x the weight's memory.
        Llama 3.1 8B at 2 x 2048 on an H100 (issue 6): 15,366-15,661 tok/s with every layer's copy (32.7 GiB
        peak), 14,603-14,874 without (19.7 GiB; one run 13,507), in other calls of one session. minilora/memory_policy.py turns
        it on for as many layers as the memory budget has room for once activations are planned."""
        self.dense = dequantize_nf4(self.nf4) if keep and self.nf4 is not None else None

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W₀ [out, in]: dequantized (default: the NF4 compute dtype) or the plain weight (default: its dtype)."""
        if self.nf4 is not None:
            return dequantize_nf4(self.nf4, dtype or self.nf4.dtype)
        return self.weight.detach() if dtype is None else self.weight.detach().to(dtype)

    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """W₀ + s · B A in fp32 [out, in], for export; the module itself is left unchanged."""
        w = self.dense_weight(torch.float32)
        if self.r == 0:
            return w.clone()
        return torch.addmm(w, self.lora_B.weight.float(), self.lora_A.weight.float(), alpha=self.scaling)

    def _apply(self, fn, recurse=True):
        # nn.Module moves/casts only parameters and buffers. Run fn on an empty probe in the NF4 compute dtype
        # to learn where the module goes: the NF4 tensors follow the device, the compute dtype follows float
        # casts (model.to(torch.bfloat16)), and the packed bytes and fp32 constants stay as they are.
        if self.nf4 is not None:
            probe = fn(torch.empty(0, dtype=self.nf4.dtype, device=self.nf4.packed.device))
            self.nf4 = dataclasses.replace(self.nf4.to(probe.device), dtype=probe.dtype)
            if self.dense is not None:  # remade where the NF4 weight now is, in its compute dtype
                self.keep_dense()
        super()._apply(fn, recurse)
        if self.r > 0:  # LoRA weights stay the fp32 master copy whatever the model is cast to
            self.lora_A.float(), self.lora_B.float()
        return self

    # --- forward ---

    def _base(self) -> torch.Tensor | NF4Tensor:
        """What the autograd Functions multiply by: the kept dense copy, else the NF4 weight, else the plain one."""
        if self.dense is not None:
            return self.dense
        return self.nf4 if self.nf4 is not None else self.weight

    def forward(self, x: torch.Tensor, need_output: bool = True) -> torch.Tensor:  # x [*, in] -> [*, out]
        """need_output=False: the caller only backpropagates through the result, so with LoRA on its values are
        left unset and the base GEMM is skipped (`_lora_forward`)."""
        if self.nf4 is None and self.r == 0:
            return F.linear(x, self.weight, self.bias)  # frozen or full fine-tuning: autograd as usual
        if self.weight is not None and self.weight.requires_grad:
            raise RuntimeError("LoRALinear: the base weight must stay frozen when LoRA is on (requires_grad=False)")
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        xd = None
        if self.r > 0 and self.training and self.lora_dropout > 0:
            xd = F.dropout(x2, self.lora_dropout, training=True)
        a, b = (self.lora_A.weight, self.lora_B.weight) if self.r > 0 else (None, None)
        y = LoRAFunction.apply(x2, xd, self._base(), self.bias, a, b, self.scaling, need_output)  # [N, out]
        return y.view(*x.shape[:-1], self.out_features)

    def forward_gated(self, g: torch.Tensor, u: torch.Tensor, activation: str, overwrite: bool = False,
                      need_output: bool = True) -> torch.Tensor:
        """self(act(g) * u) for g, u [*, in]; activation as kernels/gated_act.py names it. On CUDA without
        dropout, one GatedLoRAFunction that does not keep act(g) * u for backward; otherwise the composition.
        overwrite: g and u are the caller's to give away, and backward may write their gradients over them
        (GatedLoRAFunction). need_output: as in forward."""
        fused = (use_triton(g, "gated_act") and not (self.r > 0 and self.training and self.lora_dropout > 0)
                 and (self.weight is None or not self.weight.requires_grad))
        if not fused:
            return self(gated_act(g, u, activation), need_output)
        a, b = (self.lora_A.weight, self.lora_B.weight) if self.r > 0 else (None, None)
        y = GatedLoRAFunction.apply(g.reshape(-1, self.in_features), u.reshape(-1, self.in_features), activation,
                                    self._base(), self.bias, a, b, self.scaling, overwrite,
                                    need_output)  # [N, out]
        return y.view(*g.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        base = f"nf4 (compute {self.nf4.dtype})" if self.nf4 is not None else str(self.weight.dtype)
        s = f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, base={base}"
        if self.r > 0:
            s += f", r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, rslora={self.use_rslora}"
        return s


def _join_lora() -> bool:
    """Run LoRA layers that read one input as one SharedInputLoRAFunction (`project`); MINILORA_LORA_JOIN=0 runs
    them one by one, for before/after runs."""
    return os.environ.get("MINILORA_LORA_JOIN", "1") == "1"


def _joinable(m: nn.Module, first: nn.Module) -> bool:
    return (isinstance(m, LoRALinear) and m.r > 0 and m.scaling == first.scaling
            and m.in_features == first.in_features and m.lora_A.weight.dtype == first.lora_A.weight.dtype
            and not (m.training and m.lora_dropout > 0)
            and (m.weight is None or not m.weight.requires_grad) and (m.bias is None or not m.bias.requires_grad))


def project(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    """(m(x) for m in modules) for the projections that read one input x [*, in]: q/k/v, gate/up. LoRALinear
    layers with LoRA on, one scale and no dropout run as one SharedInputLoRAFunction (x read once for their
    A products and dA, one input gradient); anything else (plain nn.Linear, dropout) runs one by one."""
    first = modules[0]
    if not (_join_lora() and len(modules) > 1 and all(_joinable(m, first) for m in modules)):
        return tuple(m(x) for m in modules)
    lora = [m.lora_A.weight for m in modules] + [m.lora_B.weight for m in modules]
    ys = SharedInputLoRAFunction.apply(x.reshape(-1, first.in_features), first.scaling,
                                       tuple(m._base() for m in modules), tuple(m.bias for m in modules), *lora)
    return tuple(y.view(*x.shape[:-1], m.out_features) for y, m in zip(ys, modules))


# --- putting LoRA into a model ---

def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule: the full module name, or a suffix of it on a `.` boundary ("q_proj", "self_attn.q_proj")."""
    return name == target or name.endswith("." + target)


def _select(candidates: Sequence[str], targets: Sequence[str], what: str) -> list[str]:
    """The candidate names that some target matches; every target must match at least one."""
    unknown = [t for t in targets if not any(_matches(n, t) for n in candidates)]
    if unknown:
        leaves = sorted({leaf for n in candidates if not (leaf := n.rsplit(".", 1)[-1]).isdigit()})
        raise ValueError(f"{what}: {unknown} match no module; available names: {leaves} (or full module names)")
    return [n for n in candidates if any(_matches(n, t) for t in targets)]


def _target_list(target_modules) -> list[str]:
    return [target_modules] if isinstance(target_modules, str) else list(target_modules)


def _swap(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def replace_linears_for_4bit(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Swap the targeted nn.Linear modules for r = 0 LoRALinear placeholders that keep the linear's (meta)
    weight and bias Parameters; the loader then fills them through `set_base_weight` / `set_base_nf4`.
    Returns the swapped module names."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = _select(list(linears), _target_list(target_modules), "replace_linears_for_4bit target_modules")
    for name in names:
        _swap(model, name, LoRALinear.from_linear(linears[name]))
    return names


def inject_lora(model: nn.Module, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0,
                target_modules: str | Sequence[str] = DEFAULT_TARGETS, use_rslora: bool = False,
                modules_to_save: Sequence[str] = (), seed: int = 0) -> list[str]:
    """Give the targeted linear layers a LoRA update, in place, and freeze everything else.

    target_modules: names matched as by PEFT (last component like "q_proj", or a full/suffix name), or
    "all-linear" (every linear layer except lm_head). Targets may be nn.Linear or the r = 0 LoRALinear of a
    4-bit load; the base weight, bias and NF4 state are kept. A is drawn from torch.Generator seeded with
    `seed`, module by module in model order, so the same seed gives the same adapter on any device.

    modules_to_save (e.g. ["embed_tokens", "lm_head"]): modules trained in full, in their own dtype (for new
    tokens). A tied embedding is one Parameter under two names, so training either trains both and they stay
    tied. Returns the names of the LoRA modules.
    """
    linears = _linears(model)
    if target_modules == "all-linear":
        names = [n for n in linears if n.rsplit(".", 1)[-1] != "lm_head"]
    else:
        names = _select(list(linears), _target_list(target_modules), "inject_lora target_modules")
    if "lm_head" in names:  # the chunked loss multiplies by lm_head.weight itself, so an adapter there never trains
        raise ValueError("inject_lora: LoRA on lm_head is not supported; train it in full with "
                         "modules_to_save=['lm_head'] instead")
    saved = _select([n for n, _ in model.named_modules() if n], list(modules_to_save),
                    "inject_lora modules_to_save") if modules_to_save else []
    both = sorted(n for n in names if any(n == s or n.startswith(s + ".") for s in saved))
    if both:
        raise ValueError(f"inject_lora: {both} are both LoRA targets and (inside) modules_to_save; pick one")

    gen = torch.Generator().manual_seed(seed)
    for name in names:
        m = linears[name]
        lora = LoRALinear.from_linear(m) if isinstance(m, nn.Linear) else m
        lora.init_lora(r, lora_alpha, lora_dropout, use_rslora, gen)
        _swap(model, name, lora)

    for n, p in model.named_parameters():
        p.requires_grad_(_is_lora(n))
    for name in saved:
        m = model.get_submodule(name)
        if isinstance(m, LoRALinear) and m.nf4 is not None:
            raise ValueError(f"inject_lora modules_to_save: {name!r} is stored in 4-bit and cannot be trained in full")
        for p in m.parameters():
            p.requires_grad_(True)
    return names


def _is_lora(param_name: str) -> bool:
    return any(part.startswith("lora_") for part in param_name.split("."))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_lora(n)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A.weight": [r, in], "<module>.lora_B.weight": [out, r], ...}"""
    return {n: p.detach() for n, p in model.named_parameters() if _is_lora(n)}
