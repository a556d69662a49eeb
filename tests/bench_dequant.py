"""Benchmark NF4 dequantization on a CUDA GPU: minilora's Triton kernel against a plain device copy (the
ceiling), the plain-torch reference, and bitsandbytes' dequantize_4bit when bitsandbytes imports.

    python tests/bench_dequant.py             # 14336x4096 (Llama-3-8B MLP) and 4096x4096, bf16 output
    python tests/bench_dequant.py --quick     # 4096x4096 only, shorter timing
    python tests/bench_dequant.py --sweep     # also time other program sizes / warp counts (tuning)

Bytes counted for a dequantization, the least it must move: packed codes (numel/2), absmax bytes (numel/64),
nested absmax (fp32, numel/16384), the two maps, and the output (numel * 2 in bf16). bitsandbytes is charged
the same bytes, although it makes two passes (absmax, then weights). Times are triton.testing.do_bench
medians; each timed call uses another of several input/output sets, so the data is not sitting in L2.
Correctness comes first: ours vs the reference vs bitsandbytes (which is imported here only as a yardstick).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math

import torch
import triton
from triton.testing import do_bench

from minilora.kernels.nf4 import BYTES_PER_PROGRAM, NUM_WARPS, dequantize_reference, dequantize_triton
from minilora.nf4 import NF4Tensor, quantize_nf4

# -- flags -----------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--quick", action="store_true", help="4096x4096 only, shorter timing")
parser.add_argument("--sweep", action="store_true", help="time other bytes-per-program / num_warps settings")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="output dtype")
args = parser.parse_args()

assert torch.cuda.is_available(), "bench_dequant.py needs a CUDA GPU"
dev = torch.device("cuda")
dtype = getattr(torch, args.dtype)
shapes = [(4096, 4096)] if args.quick else [(14336, 4096), (4096, 4096)]
rep_ms = 50 if args.quick else 200
props = torch.cuda.get_device_properties(dev)
l2 = getattr(props, "L2_cache_size", 50 << 20)
print(f"{props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}, "
      f"triton {triton.__version__}; output {dtype}; kernel defaults: {BYTES_PER_PROGRAM} bytes/program, "
      f"{NUM_WARPS} warps")

try:  # a yardstick only: minilora itself never imports bitsandbytes
    import bitsandbytes.functional as bnbF
except Exception as e:  # noqa: BLE001 - any import failure just means no comparison
    bnbF = None
    print(f"bitsandbytes not available ({type(e).__name__}: {e}); timing minilora only")


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def rotating(fns):
    """One callable that runs the next of `fns` each call (different buffers, so timing sees HBM, not L2)."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def nf4_args(q: NF4Tensor):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, q.quant_map, q.nested_quant_map, q.shape)


def nf4_bytes(q: NF4Tensor, out_dtype: torch.dtype) -> int:
    return q.nbytes + q.numel * out_dtype.itemsize


# -- ceiling: a large device-to-device copy, bytes read + written ------------------------------------------
src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
copy_ms = median_ms(lambda: dst.copy_(src))
copy_gbs = 2 * src.numel() / copy_ms / 1e6
print(f"device copy: {2 * src.numel() / 1e9:.2f} GB moved in {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s")
del src, dst

rows = []  # (shape, what, ms, GB/s)
for shape in shapes:
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(shape, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    n_sets = max(2, math.ceil(4 * l2 / (w.numel() * (dtype.itemsize + 0.52))))  # >= 4x L2 across the sets
    quant_ms = median_ms(lambda: quantize_nf4(w))
    q = quantize_nf4(w)
    nbytes = nf4_bytes(q, dtype)
    print(f"\n{shape[0]}x{shape[1]}: quantize_nf4 {quant_ms:.2f} ms; dequant moves {nbytes / 1e6:.1f} MB; "
          f"{n_sets} rotating sets")

    # -- correctness first: Triton vs reference (bitwise), then vs bitsandbytes --------------------------
    ref = dequantize_reference(*nf4_args(q), dtype)
    ours = dequantize_triton(*nf4_args(q), dtype, out=torch.full_like(ref, float("nan")))
    print(f"  triton vs reference: bitwise equal {torch.equal(ours, ref)}, "
          f"max abs diff {(ours.float() - ref.float()).abs().max().item():.3g}")
    assert torch.equal(ours, ref), "Triton kernel disagrees with the reference"
    rel = ((ours.float() - w.float()).norm() / w.float().norm()).item()
    print(f"  NF4 round trip: |w - dequant| / |w| = {rel:.4f}")
    if bnbF is not None:
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        same = {"packed": (q.packed != packed.view(-1)).sum().item(), "absmax": (q.absmax != qs.absmax).sum().item(),
                "nested_absmax": (q.nested_absmax != qs.state2.absmax).sum().item()}
        print(f"  quantize vs bnb CUDA: differing values {same} (absmax bytes may differ: bnb's CUDA kernel searches "
              f"the 8-bit map, its CPU kernel and ours use a 65536-bin table), offset equal "
              f"{torch.equal(q.offset, qs.offset)}")
        qs_out = copy.copy(qs)
        qs_out.dtype = dtype  # bnb dequantizes to the state's dtype
        theirs = bnbF.dequantize_4bit(packed, qs_out)
        mine = dequantize_triton(packed.view(-1), qs.absmax, qs.state2.absmax, qs.offset, qs.code, qs.state2.code,
                                 shape, dtype)
        print(f"  dequantizing bnb's bytes: ours vs bnb bitwise equal {torch.equal(mine, theirs)}, "
              f"max abs diff {(mine.float() - theirs.float()).abs().max().item():.3g}")

    # -- timing ------------------------------------------------------------------------------------------
    # the fair ceiling at this size: a copy moving the same bytes (launch and tail effects included)
    csrc = [torch.empty(nbytes // 2, dtype=torch.uint8, device=dev) for _ in range(n_sets)]
    cdst = [torch.empty_like(c) for c in csrc]
    ms = median_ms(rotating([lambda a=a, b=b: b.copy_(a) for a, b in zip(csrc, cdst)]))
    rows.append((shape, "device copy, same bytes", ms, nbytes / ms / 1e6))
    del csrc, cdst
    sets = [NF4Tensor(*(t.clone() for t in nf4_args(q)[:4]), q.shape, q.dtype) for _ in range(n_sets)]
    outs = [torch.empty(shape, dtype=dtype, device=dev) for _ in range(n_sets)]
    ms = median_ms(rotating([lambda s=s, o=o: dequantize_triton(*nf4_args(s), dtype, out=o)
                             for s, o in zip(sets, outs)]))
    rows.append((shape, "minilora triton", ms, nbytes / ms / 1e6))
    ms = median_ms(rotating([lambda s=s, o=o: dequantize_reference(*nf4_args(s), dtype, out=o)
                             for s, o in zip(sets[:2], outs[:2])]))
    rows.append((shape, "torch reference", ms, nbytes / ms / 1e6))
    if bnbF is not None and dtype == w.dtype:  # bnb dequantizes to the dtype it quantized from
        states = [bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                  for _ in range(n_sets)]
        ms = median_ms(rotating([lambda p=p, s=s, o=o: bnbF.dequantize_4bit(p, s, out=o)
                                 for (p, s), o in zip(states, outs)]))
        rows.append((shape, "bitsandbytes", ms, nbytes / ms / 1e6))
        del states
    if args.sweep:
        for bpp, nw in itertools.product([512, 1024, 2048, 4096, 8192], [2, 4, 8]):
            ms = median_ms(rotating([lambda s=s, o=o: dequantize_triton(*nf4_args(s), dtype, out=o,
                                                                        bytes_per_program=bpp, num_warps=nw)
                                     for s, o in zip(sets, outs)]))
            rows.append((shape, f"triton {bpp} B/prog, {nw} warps", ms, nbytes / ms / 1e6))
    del sets, outs, ref, ours, w
    torch.cuda.empty_cache()

# -- summary -----------------------------------------------------------------------------------------------
print(f"\n{'shape':>11}  {'version':<30} {'ms':>8} {'GB/s':>7} {'% of copy':>9}")
print(f"{'':>11}  {'device copy':<30} {'':>8} {copy_gbs:7.0f} {100:9.0f}")
for shape, what, ms, gbs in rows:
    print(f"{shape[0]:>5}x{shape[1]:<5}  {what:<30} {ms:8.4f} {gbs:7.0f} {100 * gbs / copy_gbs:9.0f}")
