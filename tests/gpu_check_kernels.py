"""Every Triton kernel against its torch reference on a CUDA GPU, forward and backward, at real sizes.

    python tests/gpu_check_kernels.py          # exits 1 if any kernel is off by more than its tolerance

CI runs the kernels in Triton's interpreter on the CPU (tests/test_kernels_*.py); this script is the same check
compiled for the GPU, where the code generator, approximate rsqrt/exp and rounding of casts differ. Tolerances:
fp32 ~1e-5 relative to the largest value; bf16 two bf16 ulps of the largest value (the references round after
every op, the kernels once). Not collected by pytest (no GPU in CI); the device session runs it first.
"""
from __future__ import annotations

import os
import sys

import torch

from minilora.config import ModelConfig
from minilora.kernels.cross_entropy import ce_loss_and_grad_reference_, ce_loss_and_grad_triton_, ce_loss_triton
from minilora.kernels.gated_act import GatedActFunction, gated_act_reference
from minilora.kernels.rmsnorm import RMSNormFunction, rmsnorm_reference
from minilora.kernels.rope import RopeFunction, RopeQKFunction, rope_reference
from minilora.lora import GatedLoRAFunction, LoRAFunction, LoRALinear
from minilora.models.common import rope_cos_sin
from minilora.optim import AdamW8bit

FAILED = []


def compare(name: str, ours, ref, dtype):
    for what, a, b in zip(("out", *(f"grad{i}" for i in range(len(ours) - 1))), ours, ref):
        if a is None and b is None:
            continue
        big = b.double().abs().max().item()
        err = (a.double() - b.double()).abs().max().item()
        tol = (1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps) * max(big, 1.0)
        ok = err <= tol
        print(f"{'ok ' if ok else 'BAD'} {name:<44} {what:<6} max|diff| {err:.3g} (tol {tol:.3g}, max {big:.3g})")
        if not ok:
            FAILED.append(f"{name} {what}")


def outputs_and_grads(fn, inputs, dy_seed=1):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    y = fn(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator(y.device).manual_seed(dy_seed), device=y.device).to(y.dtype)
    grads = torch.autograd.grad(y, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], dy)
    return [y.detach(), *grads]


def main():
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((2, 2048, 4096), (4096, 2048), (2, 512, 8, 128)):  # hidden sizes; a Qwen3 q/k norm
            for offset in (0.0, 1.0):
                x = torch.randn(shape, generator=g, device=dev).to(dtype)
                w = (torch.randn(shape[-1], generator=g, device=dev) * 0.1 + (1 - offset)).to(dtype)
                compare(f"rmsnorm {list(shape)} {dtype} offset {offset}",
                        outputs_and_grads(lambda x, w: RMSNormFunction.apply(x, w, 1e-5, offset), [x, w]),
                        outputs_and_grads(lambda x, w: rmsnorm_reference(x, w, 1e-5, offset), [x, w]), dtype)
        for act in ("silu", "gelu_tanh"):
            gate = torch.randn(4096, 14336, generator=g, device=dev).mul_(3).to(dtype)
            up = torch.randn(4096, 14336, generator=g, device=dev).to(dtype)
            compare(f"gated_act {act} [4096, 14336] {dtype}",
                    outputs_and_grads(lambda a, b: GatedActFunction.apply(a, b, act), [gate, up]),
                    outputs_and_grads(lambda a, b: gated_act_reference(a, b, act), [gate, up]), dtype)
        if dtype == torch.bfloat16:  # the 8B MLP's down_proj in NF4 with LoRA r=16, fused with its activation
            m = LoRALinear(14336, 4096, False, r=16, lora_alpha=16, device=dev)
            m.set_base_weight(torch.randn(4096, 14336, generator=g, device=dev).mul_(0.02).to(dtype), quantize=True)
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
            gate = torch.randn(4096, 14336, generator=g, device=dev).to(dtype)
            up = torch.randn(4096, 14336, generator=g, device=dev).to(dtype)
            lora = [m.lora_A.weight, m.lora_B.weight]
            compare("down_proj(gated_act) fused [4096, 14336] nf4",
                    # a * 1, b * 1: non-leaf inputs, whose storage the backward overwrites (GatedMLP's call)
                    outputs_and_grads(lambda a, b, A, B: GatedLoRAFunction.apply(a * 1, b * 1, "silu", m.nf4, None,
                                                                                 A, B, m.scaling, True, True),
                                      [gate, up, *lora]),
                    outputs_and_grads(lambda a, b, A, B: LoRAFunction.apply(GatedActFunction.apply(a, b, "silu"),
                                                                            None, m.nf4, None, A, B, m.scaling),
                                      [gate, up, *lora]), dtype)
        config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=4096, intermediate_size=8,
                                          num_hidden_layers=1, num_attention_heads=32, rope_theta=500000.0))
        pos = torch.arange(4096, device=dev).view(2, 2048)
        cos, sin = rope_cos_sin(config, "full_attention", pos, dtype)
        for heads in (32, 8):
            q = torch.randn(2, 2048, heads, 128, generator=g, device=dev).to(dtype)
            compare(f"rope [2, 2048, {heads}, 128] {dtype}",
                    outputs_and_grads(lambda x: RopeFunction.apply(x, cos, sin), [q]),
                    outputs_and_grads(lambda x: rope_reference(x, cos, sin), [q]), dtype)
        # q and k in one launch (what the model runs): both outputs joined, as one tensor for the comparison
        q, k = (torch.randn(2, 2048, h, 128, generator=g, device=dev).to(dtype) for h in (32, 8))
        compare(f"rope q+k [2, 2048, 32+8, 128] {dtype}",
                outputs_and_grads(lambda q, k: torch.cat(RopeQKFunction.apply(q, k, cos, sin), 2), [q, k]),
                outputs_and_grads(lambda q, k: torch.cat([rope_reference(q, cos, sin), rope_reference(k, cos, sin)],
                                                         2), [q, k]), dtype)
        for cap in (None, 30.0):  # the loss head: 1024 rows of Llama 3's vocabulary
            z = torch.randn(1024, 128256, generator=g, device=dev).mul_(4).to(dtype)
            y = torch.randint(0, 128256, (1024,), generator=g, device=dev)
            z_ref, z_tri = z.clone(), z.clone()
            loss_only = ce_loss_triton(z, y, cap)
            loss_ref = ce_loss_and_grad_reference_(z_ref, y, cap)
            loss_tri = ce_loss_and_grad_triton_(z_tri, y, cap)
            compare(f"cross_entropy [1024, 128256] cap {cap} {dtype}", [loss_tri.view(1), z_tri],
                    [loss_ref.view(1), z_ref], torch.float32 if dtype == torch.float32 else dtype)
            compare(f"cross_entropy loss only, cap {cap} {dtype}", [loss_only.view(1)], [loss_ref.view(1)],
                    torch.float32)
    check_project(dev)
    check_adamw8bit(dev)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all kernels within tolerance")
    sys.exit(1 if FAILED else 0)


def check_adamw8bit(dev):
    """AdamW8bit's one-launch step (kernels/adamw8bit.py) against its torch step (MINILORA_TRITON=0), three steps
    from equal params and state on one 8B layer's LoRA shapes: params within 1e-5 of their scale, codes one
    level apart at most and on under 0.1% of elements (a moment that sits on a midpoint may round either way)."""
    shapes = [(16, 4096), (4096, 16), (16, 4096), (1024, 16), (16, 14336), (14336, 16), (16, 14336), (4096, 16)]
    g = torch.Generator(dev).manual_seed(5)
    ref_p = [torch.nn.Parameter(torch.randn(s, generator=g, device=dev) * 0.02) for s in shapes]
    ref = AdamW8bit(ref_p, lr=2e-4, weight_decay=0.01)
    for step in range(3):
        ours_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
        ours = AdamW8bit(ours_p, lr=2e-4, weight_decay=0.01)
        if step:
            ours.load_state_dict(ref.state_dict())
        for p, q in zip(ours_p, ref_p):
            p.grad = torch.randn(p.shape, generator=g, device=dev) * 1e-3
            q.grad = p.grad.clone()
        ours.step()
        kernels = os.environ.get("MINILORA_TRITON")
        os.environ["MINILORA_TRITON"] = "0"  # the torch step
        ref.step()
        os.environ.pop("MINILORA_TRITON") if kernels is None else os.environ.update(MINILORA_TRITON=kernels)
        err = max((p - q).abs().max().item() / q.abs().max().item() for p, q in zip(ours_p, ref_p))
        codes = [(ours.state[p][k].int() - ref.state[q][k].int()).abs() for p, q in zip(ours_p, ref_p)
                 for k in ("state1", "state2")]
        far, off = max(c.max().item() for c in codes), sum((c > 0).sum().item() for c in codes)
        n = sum(c.numel() for c in codes)
        ok = err <= 1e-5 and far <= 1 and off <= 1e-3 * n
        print(f"{'ok ' if ok else 'BAD'} adamw8bit step {step} (8B layer's LoRA)   params max|diff| / max {err:.3g}; "
              f"codes differing {off} of {n}, by at most {far}")
        if not ok:
            FAILED.append(f"adamw8bit step {step}")


def check_project(dev):
    """The 8B shape's q/k/v in NF4 with LoRA r=16 run as one SharedInputLoRAFunction (minilora.lora.project)
    against the three layers one by one (MINILORA_LORA_JOIN=0): outputs, dX, and every dA and dB."""
    from minilora.lora import project
    g = torch.Generator(dev).manual_seed(7)
    layers = []
    for out in (4096, 1024, 1024):
        m = LoRALinear(4096, out, False, r=16, lora_alpha=16, device=dev)
        m.set_base_weight(torch.randn(out, 4096, generator=g, device=dev).mul_(0.02).to(torch.bfloat16), True)
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
        layers.append(m)
    x = torch.randn(4096, 4096, generator=g, device=dev).to(torch.bfloat16)
    dy = torch.randn(4096, 6144, generator=g, device=dev).to(torch.bfloat16)
    results = {}
    for join in ("1", "0"):
        os.environ["MINILORA_LORA_JOIN"] = join
        for m in layers:
            m.lora_A.weight.grad = m.lora_B.weight.grad = None
        xx = x.clone().requires_grad_()
        y = torch.cat(project(xx, *layers), -1)
        y.backward(dy)
        results[join] = [y.detach(), xx.grad] + [p.grad for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]
    os.environ.pop("MINILORA_LORA_JOIN")
    compare("q/k/v joined vs one by one [4096, 4096] nf4", results["1"], results["0"], torch.bfloat16)


if __name__ == "__main__":
    main()
