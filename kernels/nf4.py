"""NF4 dequantization with the nested (double-quantized) absmax, in one pass over the packed bytes.

For 64-value block b and value i (formulas of minilora/nf4.py, the layout bitsandbytes stores):

    absmax[b] = nested_quant_map[absmax_u8[b]] * nested_absmax[b // 256] + offset      fp32: multiply, then add
    w[i]      = quant_map[code[i]] * absmax[i // 64]                                     fp32, then cast (RNE)
    code[2j] = packed[j] >> 4,  code[2j+1] = packed[j] & 15

Both products and the sum are rounded separately, in fp32, as bitsandbytes does (its absmax is a torch `*`
then `+=`), so fp32 outputs are bitwise bnb's and bf16/fp16 ones are those floats rounded to nearest even.
The Triton launch passes enable_fp_fusion=False so the compiler does not fuse the multiply-add into an fma.

Memory-bound: per weight it reads 0.5 byte (+ 1/64 byte of absmax) and writes 2 bytes in bf16. Each program
takes BYTES contiguous packed bytes (2*BYTES outputs), seen as rows of 4 bytes: a thread loads a row (4 B),
looks its 8 codes up in the 16-entry table (L1-resident), multiplies by the row's block scale and stores the
8 outputs as one 16-byte vector (bf16/fp16). Rows of 4 bytes make the load and the store share one layout:
with longer rows (16 B loads) Triton must reshuffle the 4x wider output through shared memory before its
16-byte stores. The block scale is recomputed per row from 3 small loads that hit L1 (cheaper than a shuffle).

`dequantize` is the one entry point: Triton for CUDA tensors, `dequantize_reference` (plain torch) elsewhere.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minilora.kernels import use_triton

# 4096 outputs (64 blocks) a program, 4 rows a thread. Not yet timed on a GPU (none was lent to the session that
# wrote this): tests/bench_dequant.py --sweep times the alternatives.
BYTES_PER_PROGRAM = 2048
NUM_WARPS = 4


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,  # uint8 [n_bytes]
    absmax_ptr,  # uint8 [n_blocks]
    nested_absmax_ptr,  # fp32 [ceil(n_blocks / 256)]
    offset_ptr,  # fp32 [1]
    quant_map_ptr,  # fp32 [16]
    nested_quant_map_ptr,  # fp32 [256]
    out_ptr,  # bf16/fp16/fp32 [numel]
    n_bytes,
    numel,
    n_blocks,
    BYTES: tl.constexpr,
):
    ROWS: tl.constexpr = BYTES // 4  # rows of 4 packed bytes = 8 outputs, 8 rows per 64-value block
    pid = tl.program_id(0).to(tl.int64)  # int64 bases: numel may pass 2**31
    packed_ptr += pid * BYTES
    out_ptr += pid * (2 * BYTES)
    rows = tl.arange(0, ROWS)[:, None]  # [ROWS, 1]

    # scale of each row's block: absmax = nested_map[u8] * nested_absmax + offset (the 8 rows of a block
    # load the same bytes: one L1 line, broadcast across neighbouring lanes)
    blk = pid * (BYTES // 32) + rows // 8  # [ROWS, 1] global block index
    bmask = blk < n_blocks
    a8 = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
    nested = tl.load(nested_absmax_ptr + blk // 256, mask=bmask, other=0.0)
    scale = tl.load(nested_quant_map_ptr + a8) * nested + tl.load(offset_ptr)  # fp32 [ROWS, 1]

    # codes; the high nibble is the even value
    offs = rows * 4 + tl.arange(0, 4)[None, :]  # [ROWS, 4]
    byte = tl.load(packed_ptr + offs, mask=offs < n_bytes - pid * BYTES, other=0).to(tl.int32)
    hi = tl.load(quant_map_ptr + (byte >> 4)) * scale  # fp32 [ROWS, 4]
    lo = tl.load(quant_map_ptr + (byte & 15)) * scale
    w = tl.interleave(hi, lo)  # [ROWS, 8]: hi0, lo0, hi1, lo1, ...

    o = rows * 8 + tl.arange(0, 8)[None, :]  # [ROWS, 8]
    tl.store(out_ptr + o, w.to(out_ptr.dtype.element_ty), mask=o < numel - pid * (2 * BYTES))


def _check(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map, shape, dtype, out):
    """Shapes, dtypes and devices of the inputs; returns numel and a contiguous `out` (allocated if None)."""
    numel = math.prod(shape)
    n_blocks = -(-numel // 64)
    expect = {"packed": (packed, torch.uint8, (numel + 1) // 2), "absmax": (absmax, torch.uint8, n_blocks),
              "nested_absmax": (nested_absmax, torch.float32, -(-n_blocks // 256)),
              "offset": (offset, torch.float32, 1), "quant_map": (quant_map, torch.float32, 16),
              "nested_quant_map": (nested_quant_map, torch.float32, 256)}
    for name, (t, dt, n) in expect.items():
        if t.dtype != dt or t.numel() != n or t.device != packed.device:
            raise ValueError(f"nf4 dequantize: {name} must be {dt} with {n} values on {packed.device} for shape "
                             f"{list(shape)}, got {t.dtype} {list(t.shape)} on {t.device}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"nf4 dequantize: dtype must be bf16, fp16 or fp32, got {dtype}")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif out.shape != torch.Size(shape) or out.dtype != dtype or out.device != packed.device or not out.is_contiguous():
        raise ValueError(f"nf4 dequantize: out must be contiguous {dtype} {list(shape)} on {packed.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    return numel, out


def dequantize_triton(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map, shape, dtype,
                      out=None, bytes_per_program=BYTES_PER_PROGRAM, num_warps=NUM_WARPS):
    """Launch the kernel (CUDA tensors; CPU ones under TRITON_INTERPRET=1). Returns `out`, shape `shape`."""
    numel, out = _check(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map, shape, dtype, out)
    if bytes_per_program < 32 or bytes_per_program & (bytes_per_program - 1):
        raise ValueError(f"nf4 dequantize: bytes_per_program must be a power of 2 >= 32, got {bytes_per_program}")
    n_bytes = packed.numel()
    grid = (triton.cdiv(n_bytes, bytes_per_program),)
    _dequantize_nf4_kernel[grid](
        packed.contiguous(), absmax.contiguous(), nested_absmax.contiguous(), offset.reshape(1),
        quant_map.contiguous(), nested_quant_map.contiguous(), out,
        n_bytes, numel, absmax.numel(),
        BYTES=bytes_per_program, num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


def dequantize_reference(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map, shape, dtype,
                         out=None):
    """The same function in plain torch (any device); the oracle for the kernel and the CPU path."""
    numel, out = _check(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map, shape, dtype, out)
    n_blocks = absmax.numel()
    nested = nested_absmax.repeat_interleave(256)[:n_blocks]  # [n_blocks]
    scale = nested_quant_map[absmax.int()] * nested  # fp32 [n_blocks]; the add is its own op: no fma
    scale = scale + offset
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:numel]  # uint8 [numel], high nibble first
    w = quant_map[codes.int()]  # fp32 [numel]
    w = torch.nn.functional.pad(w, (0, n_blocks * 64 - numel)).view(n_blocks, 64) * scale[:, None]
    out.copy_(w.view(-1)[:numel].view(shape))  # fp32 -> dtype rounds to nearest even
    return out


def dequantize(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map, shape, dtype, out=None):
    """NF4 -> `dtype` tensor of `shape`: the Triton kernel for CUDA tensors, the torch reference elsewhere."""
    fn = dequantize_triton if use_triton(packed, "nf4") else dequantize_reference
    return fn(packed, absmax, nested_absmax, offset, quant_map, nested_quant_map, shape, dtype, out=out)
