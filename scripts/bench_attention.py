"""SDPA's CUDA backends on the causal GQA attention of the Llama-3.1-8B shape: which one torch picks, how far
each is from an fp32 reference, and the time of forward + backward.

    python scripts/bench_attention.py                  # GPU; exits 1 if a backend is off by more than 1e-2

minilora.models.common.attention runs SDPA's backends in `sdpa_order`'s order (flash first at a new batch and
length, torch's own after; MINILORA_SDPA overrides); this is the measurement behind that rule. Per shape (batch x length, 32 query heads, 8 key/value heads, head_dim 128,
bf16, is_causal, enable_gqa) and backend:
  - error: ‖out - ref‖ / ‖ref‖ for the output and for dq, dk, dv. The reference is the math backend on fp32
    copies of the same inputs where its [B, H, T, T] scores fit (2,048 tokens), else the flash backend in bf16.
  - ms: median of forward + backward (triton.testing.do_bench), random inputs, the same upstream gradient.
  - first call: forward + backward at a length not seen before (one token shorter), synchronised: the cost of
    building a kernel plan for a new shape (cuDNN builds one per shape; variable-length batches pay it per length).
    At the first shape it also holds the backend's one-time setup in the process (H200: ~1.7-2 s for cuDNN).
Then the first and second call at lengths a padded batch of real data may have (FIRST_CALL_LENGTHS): the plan
cost alone (H200, cuDNN 9.19: ~110-145 ms a new length for cuDNN, ~1 ms for flash).
"""
from __future__ import annotations

import contextlib
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
H, K, D = 32, 8, 128
SHAPES = [(2, 2048), (1, 32768)]
# lengths a padded batch of real data may have: multiples of 64 and not
FIRST_CALL_LENGTHS = [1000, 1024, 1536, 1537, 1984, 1985]


def inputs(B: int, T: int, seed: int):
    g = torch.Generator("cuda").manual_seed(seed)
    # q/k as the model makes them: [B, T, heads, D] transposed to [B, heads, T, D] (not contiguous)
    q = torch.randn(B, T, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, T, K, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, T, K, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
    dy = torch.randn(B, H, T, D, generator=g, device="cuda").to(torch.bfloat16)
    return q, k, v, dy


def fwd_bwd(q, k, v, dy, backend=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5, enable_gqa=True)
    y.backward(dy)
    return [y.detach(), q.grad, k.grad, v.grad]


def wall_ms(fn) -> float:
    """One synchronised call of fn, in ms of wall time: what a first call at a new shape costs, plans included."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def picked_by_torch(q, k, v, dy) -> str:
    """The kernels torch's own order runs, by name (the profiler's view of one forward + backward)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(q, k, v, dy)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(s in e.key.lower() for s in ("flash", "fmha", "cudnn",
                                                                                    "attention", "sdpa"))}
    return "; ".join(sorted(n[:70] for n in names)) or "?"


def main():
    from triton.testing import do_bench
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    rows, failed = [], []
    for B, T in SHAPES:
        q, k, v, dy = inputs(B, T, seed=T)
        if T <= 4096:
            with sdpa_kernel([SDPBackend.MATH]):
                ref = fwd_bwd(q.float(), k.float(), v.float(), dy.float())
            ref_name = "math fp32"
        else:
            ref, ref_name = fwd_bwd(q, k, v, dy, SDPBackend.FLASH_ATTENTION), "flash bf16"
        print(f"{B} x {T}: torch runs {picked_by_torch(q, k, v, dy)}", flush=True)
        for name, backend in BACKENDS.items():
            try:
                out = fwd_bwd(q, k, v, dy, backend)
            except RuntimeError as e:
                rows.append((f"{B} x {T}", name, "cannot run: " + str(e).splitlines()[0][:80], "", "", ""))
                continue
            errs = [rel(a, b) for a, b in zip(out, ref)]
            if max(errs) > 1e-2 or any(e != e for e in errs):
                failed.append(f"{name} {B}x{T}")
            ms = do_bench(lambda: fwd_bwd(q, k, v, dy, backend), warmup=50, rep=300, return_mode="median")
            first = wall_ms(lambda: fwd_bwd(*inputs(B, T - 1, seed=T + 1), backend))
            flops = 4 * B * H * D * T * (T + 1) // 2 * 3.5  # QKᵀ and PV forward, x2.5 backward (one recompute)
            rows.append((f"{B} x {T}", name, " ".join(f"{e:.1e}" for e in errs) + f" vs {ref_name}",
                         f"{ms:.2f}", f"{flops / ms / 1e9:.0f}", f"{first:.1f}"))
            del out
        torch.cuda.empty_cache()
    print("\nfirst call at a new length, batch 2 (ms), then the same length again:", flush=True)
    for name in ("flash", "cudnn"):
        cells = []
        for T in FIRST_CALL_LENGTHS:
            q, k, v, dy = inputs(2, T, seed=T)
            times = [wall_ms(lambda: fwd_bwd(q, k, v, dy, BACKENDS[name])) for _ in range(2)]
            cells.append(f"{T}: {times[0]:.0f} > {times[1]:.1f}")
        print(f"  {name:<6} " + ", ".join(cells), flush=True)
    print(f"\n{'shape':<10} {'backend':<10} {'rel. error out dq dk dv':<44} {'ms':>7} {'TFLOP/s':>8} "
          f"{'first call ms':>13}")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:<10} {r[2]:<44} {r[3]:>7} {r[4]:>8} {r[5]:>13}")
    print("FAILED: " + ", ".join(failed) if failed else "every backend that runs is within 1e-2")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
