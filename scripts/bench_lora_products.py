"""The skinny LoRA products of one Llama-3.1-8B layer at 2 x 2048 tokens, as minilora/lora.py writes them and
transposed, against the time of reading their large operand once at the GPU's bandwidth.

    python scripts/bench_lora_products.py          # GPU

Each product multiplies an [N, in] or [N, out] activation (N = 4,096 tokens) by a rank-16 factor, so it is
memory-bound: its floor is the large operand's bytes over the bandwidth (`--tb_s`, default 4.8, H200 HBM3e).
The profile of the 8B step puts them at ~26 ms of ~245; this says which form of each cuBLAS runs fastest.
Per layer (q/k/v and gate/up joined, as `SharedInputLoRAFunction`):

    xa  = x Aᵀ              forward, [N, in] x [in, R]            dyb = dY B      backward, [N, out] x [out, r]
    dA  = dybᵀ x (fp32)     [R, N] x [N, in]                      dB  = dYᵀ xa    (fp32) [out, N] x [N, r]
"""
from __future__ import annotations

import argparse

import torch
import triton

N, H, I, KV, R = 4096, 4096, 14336, 1024, 16
# (name, in, out, joined rank of A): the matrix shapes of one layer's LoRA products
PROJECTIONS = [("q", H, H, 3 * R), ("k", H, KV, None), ("v", H, KV, None), ("o", H, H, R),
               ("gate", H, I, 2 * R), ("up", H, I, None), ("down", I, H, R)]


def forms(x, dy, a, b, xa, dyb):
    """{product: {form: thunk}}; 'as written' is minilora/lora.py's call."""
    f32 = torch.float32
    out = {"dyb = dY B": {"as written": lambda: torch.mm(dy, b),
                          "(Bᵀ dYᵀ)ᵀ": lambda: torch.mm(b.t(), dy.t()).t()},
           "dB = dYᵀ xa": {"as written": lambda: torch.mm(dy.t(), xa, out_dtype=f32),
                           "(xaᵀ dY)ᵀ": lambda: torch.mm(xa.t(), dy, out_dtype=f32).t()}}
    if a is not None:
        out["xa = x Aᵀ"] = {"as written": lambda: torch.mm(x, a.t()),
                            "(A xᵀ)ᵀ": lambda: torch.mm(a, x.t()).t()}
        out["dA = dybᵀ x"] = {"as written": lambda: torch.mm(dyb.t(), x, out_dtype=f32),
                              "(xᵀ dyb)ᵀ": lambda: torch.mm(x.t(), dyb, out_dtype=f32).t()}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tb_s", type=float, default=4.8, help="memory bandwidth, TB/s, for the floor")
    args = p.parse_args()
    bf = torch.bfloat16
    g = torch.Generator("cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda").to(bf)  # noqa: E731
    totals: dict[str, float] = {}
    print(f"{'projection':10} {'product':14} {'form':12} {'us':>8} {'floor us':>9}")
    for name, n_in, n_out, joined in PROJECTIONS:
        x, dy = rand(N, n_in), rand(N, n_out)
        a = rand(joined, n_in) if joined else None
        b, xa, dyb = rand(n_out, R), rand(N, R), rand(N, joined or R)
        for product, variants in forms(x, dy, a, b, xa, dyb).items():
            big = dy if product.startswith(("dyb", "dB")) else x
            floor = big.numel() * big.element_size() / (args.tb_s * 1e12) * 1e6
            for form, fn in variants.items():
                us = triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3
                print(f"{name:10} {product:14} {form:12} {us:8.1f} {floor:9.1f}")
                key = (product, form == "as written")
                totals[key] = totals.get(key, 0.0) + us
                totals[("floor", product)] = totals.get(("floor", product), 0.0) + floor / len(variants)
    print("\nper layer, all projections (us):")
    for product in ("xa = x Aᵀ", "dyb = dY B", "dA = dybᵀ x", "dB = dYᵀ xa"):
        print(f"  {product:14} as written {totals[(product, True)]:8.1f}   transposed {totals[(product, False)]:8.1f}"
              f"   floor {totals[('floor', product)]:8.1f}")
    written = sum(totals[(p_, True)] for p_ in ("xa = x Aᵀ", "dyb = dY B", "dA = dybᵀ x", "dB = dYᵀ xa"))
    print(f"  32 layers as written: {written * 32 / 1e3:.1f} ms a step")


if __name__ == "__main__":
    main()
