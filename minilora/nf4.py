"""NF4, the 4-bit NormalFloat format of QLoRA, byte for byte as bitsandbytes stores it.

A weight w is cut into blocks of 64 consecutive values (row-major order, the last block may be short).
Each block keeps its absmax, and each value becomes the index of the nearest of 16 NF4 levels of w / absmax:

    code[i] = argmin_k |NF4[k] - w[i] / absmax[i // 64]|        two codes a byte, code[2j] in the high nibble

"Double quantization" then stores the fp32 absmax in 8 bits: subtract their mean (`offset`), cut into blocks
of 256, and code each one with bitsandbytes' dynamic 8-bit map, relative to the block's own absmax:

    absmax_u8[b]     = nearest DYNAMIC level of (absmax[b] - offset) / nested_absmax[b // 256]
    absmax[b]       ~= DYNAMIC[absmax_u8[b]] * nested_absmax[b // 256] + offset
    w[i]            ~= NF4[code[i]] * absmax[i // 64]

That is 4 + 8/64 + 32/(64*256) = 4.127 bits a weight. Same result as
`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`:
packed bytes, absmax bytes, offset and nested absmax are identical (tests/test_nf4.py checks that).

Rounding, copied from bitsandbytes 0.50 so the bytes match (ties matter when you want identical bytes):
- 4-bit codes: x = clamp(w * (1 / absmax), -1, 1), then `bucketize` on the fp32 midpoints of NF4 (a value
  exactly on a midpoint takes the lower code). The short last block divides instead: w / absmax, as bnb does.
  An all-zero block codes 7 (the 0.0 level). bnb's CUDA decision tree compares against these same midpoints.
- 8-bit absmax codes: bnb's CPU kernel (csrc/cpu_ops.cpp) does not search the map; it snaps
  x = (absmax - offset) / nested_absmax to one of 65536 evenly spaced bins on [-1, 1] and reads the code from
  a table built for the bins' centres. We rebuild that table and snap the same way (`_quantize_dynamic`).
  bnb's CUDA kernel instead searches the map for the nearest level, so absmax bytes from a GPU bitsandbytes
  can differ from ours where x falls near the midpoint of two levels (tests/bench_dequant.py counts them).

Serialization follows bnb's `Params4bit` + `QuantState.as_dict(packed=True)`, the keys Hugging Face writes for a
`load_in_4bit` model: `weight` (uint8 [ceil(numel/2), 1]), `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map` and `weight.quant_state.bitsandbytes__nf4` (JSON as bytes).
"""
from __future__ import annotations

import json
import math
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

BLOCKSIZE = 64  # values per absmax
NESTED_BLOCKSIZE = 256  # absmax values per nested absmax

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (QLoRA, Dettmers et al. 2023,
# section 3). Values exactly as in bitsandbytes.functional.get_4bit_type("nf4"); fp32 rounds them.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code() -> Tensor:
    """fp32 [16], the NF4 levels in code order (sorted)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def dynamic_code() -> Tensor:
    """fp32 [256]: bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), sorted.

    A sign, a decimal exponent and a linear fraction: for exponent e = 0..6 the map holds 2**e levels
    10**(e-6) * m, m the midpoints of 2**e equal steps of [0.1, 1], positive and negative; plus 0 and 1.
    So 127 levels a sign, dense near 0 (5.5e-7 apart) and 0.014 apart near 1 (Dettmers 2015, arXiv:1511.04561).
    Computed with the same fp32 torch ops as bnb, so the levels are the same floats."""
    data: list[float] = []
    for e in range(7):  # bnb: max_exponent_bits = 7, non-sign bits = 7, no "additional items" when signed
        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + e)) * means).tolist()
        data += (-(10 ** (-6 + e)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def _dynamic_lut(code: Tensor) -> Tensor:
    """uint8 [65536]: bnb's CPU table from bin j (centre -1 + 2j/65535, in fp32) to the nearest level of `code`:
    the number of fp32 midpoints strictly below the centre (`build_quantize_lut` in bnb's csrc/cpu_ops.cpp).
    numpy, because it divides elementwise in fp32 exactly as the C++ does."""
    c = code.numpy()
    mid = (c[:-1] + c[1:]) * np.float32(0.5)
    j = np.arange(65536, dtype=np.float32)
    centre = (j + j) / np.float32(65535) - np.float32(1)
    return torch.from_numpy(np.searchsorted(mid, centre, side="left").astype(np.uint8))


_NF4_CODE = nf4_code()
_DYNAMIC_CODE = dynamic_code()
_DYNAMIC_LUT = _dynamic_lut(_DYNAMIC_CODE)


@dataclass
class NF4Tensor:
    """A weight in bitsandbytes' double-quantized NF4 format (see the module docstring for the formulas)."""

    packed: Tensor  # uint8 [ceil(numel/2)]: code[2j] << 4 | code[2j+1]; an odd numel pads the last low nibble
    absmax: Tensor  # uint8 [n_blocks], n_blocks = ceil(numel/64)
    nested_absmax: Tensor  # fp32 [ceil(n_blocks/256)]
    offset: Tensor  # fp32 [], mean of the fp32 absmax
    shape: torch.Size  # of the original weight
    dtype: torch.dtype  # of the original weight: what dequantize() returns by default
    quant_map: Tensor = field(default=None)  # fp32 [16], the NF4 levels (bnb stores them with the weight)
    nested_quant_map: Tensor = field(default=None)  # fp32 [256], the dynamic map the absmax bytes index

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        # bnb saves both maps beside every weight; a fresh quantization uses the standard ones (own copies,
        # so no NF4Tensor shares the module's tensors)
        if self.quant_map is None:
            self.quant_map = _NF4_CODE.to(self.packed.device, copy=True)
        if self.nested_quant_map is None:
            self.nested_quant_map = _DYNAMIC_CODE.to(self.packed.device, copy=True)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held, maps included (~0.516 bytes a weight for large weights)."""
        parts = (self.packed, self.absmax, self.nested_absmax, self.offset, self.quant_map, self.nested_quant_map)
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: torch.device | str) -> NF4Tensor:
        return NF4Tensor(
            self.packed.to(device), self.absmax.to(device), self.nested_absmax.to(device), self.offset.to(device),
            self.shape, self.dtype, self.quant_map.to(device), self.nested_quant_map.to(device),
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self, dtype)


# ----------------------------------------------------------------------------------------------------------
# quantization


def quantize_nf4(w: Tensor, chunk_numel: int = 1 << 22) -> NF4Tensor:
    """Quantize `w` (bf16/fp16/fp32, any shape, on any device) to NF4 with double-quantized absmax.

    Works through `w` in chunks of `chunk_numel` values (a multiple of 64): the fp32 temporaries (a copy, the
    scaled values, int32 codes; ~16 bytes a value) are the chunk's, so loading an 8B model on the GPU needs
    ~64 MiB beside the weights, not 16 bytes per value of the largest weight."""
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_nf4: weight dtype must be bf16, fp16 or fp32, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4: empty weight")
    chunk_numel = max(BLOCKSIZE, chunk_numel - chunk_numel % BLOCKSIZE)
    flat = w.detach().reshape(-1)  # [n]
    absmax = _block_absmax(flat, chunk_numel)  # fp32 [n_blocks]
    packed = _quantize_codes(flat, absmax, chunk_numel)  # uint8 [ceil(n/2)]
    offset = absmax.mean()  # the same torch reduction bnb calls, on the same tensor: the same float
    absmax_u8, nested_absmax = _quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Tensor(packed, absmax_u8, nested_absmax, offset, w.shape, w.dtype)


def _block_absmax(flat: Tensor, chunk_numel: int) -> Tensor:
    """fp32 [ceil(n/64)], max |w| of each block of 64. As in bnb, a short last block's absmax is clamped to
    1e-38 (it divides by it), the full blocks' are not (they multiply by 1 / absmax.clamp(1e-38))."""
    n = flat.numel()
    full = n - n % BLOCKSIZE
    parts = [flat[s:min(s + chunk_numel, full)].float().view(-1, BLOCKSIZE).abs().amax(dim=1)
             for s in range(0, full, chunk_numel)]
    if full < n:
        parts.append(flat[full:].float().abs().max().clamp(min=1e-38).view(1))
    return torch.cat(parts)


def _quantize_codes(flat: Tensor, absmax: Tensor, chunk_numel: int) -> Tensor:
    """uint8 [ceil(n/2)]: nearest NF4 code of each w / absmax, packed two a byte (high nibble first)."""
    n = flat.numel()
    full = n - n % BLOCKSIZE
    mid = _NF4_CODE.to(flat.device)
    mid = (mid[:-1] + mid[1:]) / 2  # fp32 [15], the decision boundaries
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    for s in range(0, n, chunk_numel):
        e = min(s + chunk_numel, n)
        x = flat[s:min(e, full)].float().view(-1, BLOCKSIZE)  # [blocks, 64]
        scale = 1.0 / absmax[s // BLOCKSIZE: s // BLOCKSIZE + x.shape[0]].clamp(min=1e-38)
        x = torch.clamp(x * scale.view(-1, 1), -1, 1).view(-1)
        if e > full:  # short last block: bnb divides here, which can round differently from * (1 / absmax)
            x = torch.cat([x, torch.clamp(flat[full:].float() / absmax[-1], -1, 1)])
        if x.numel() % 2:  # odd numel: the last byte's low nibble codes a 0.0 (code 7), as bnb pads it
            x = torch.nn.functional.pad(x, (0, 1))
        q = torch.bucketize(x, mid, out_int32=True).to(torch.uint8)  # [e - s (+1)], ties to the lower code
        packed[s // 2: s // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
    return packed


def _quantize_dynamic(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization with the dynamic map, as bnb's CPU kernel does it (`quantize_cpu_impl`).

    Returns (codes uint8 [m], absmax fp32 [ceil(m/blocksize)]) for fp32 x [m]. Per block: s = x * (1 / absmax)
    clamped to [-1, 1], bin j = trunc(fma((s + 1) * 0.5, 65535, 0.5)), code = LUT[j]; an all-zero block codes 0."""
    m = x.numel()
    n_blocks = -(-m // blocksize)
    xb = torch.nn.functional.pad(x.float(), (0, n_blocks * blocksize - m)).view(n_blocks, blocksize)
    absmax = xb.abs().amax(dim=1)  # fp32 [n_blocks]
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # zero blocks: bnb writes code 0 (below)
    u = (torch.clamp(xb * inv.view(-1, 1), -1, 1) + 1.0) * 0.5  # fp32 [n_blocks, blocksize], in [0, 1]
    # The C++ fuses u * 65535 + 0.5 into one fma (one rounding). In fp64 the product and sum are exact
    # (u is a multiple of 2**-25 below 1), so rounding that to fp32 once gives the fma's float; trunc = floor.
    j = (u.double() * 65535.0 + 0.5).float().long()
    codes = _DYNAMIC_LUT.to(x.device)[j]
    codes = torch.where(absmax.view(-1, 1) > 0, codes, 0)
    return codes.view(-1)[:m].contiguous(), absmax


# ----------------------------------------------------------------------------------------------------------
# dequantization


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """The weight back in `dtype` (default q.dtype), shape q.shape: Triton on CUDA, plain torch elsewhere.
    `out` (contiguous, q.shape, dtype) is filled and returned when given, to reuse one buffer."""
    from minilora.kernels.nf4 import dequantize

    return dequantize(q.packed, q.absmax, q.nested_absmax, q.offset, q.quant_map, q.nested_quant_map,
                      q.shape, dtype or q.dtype, out=out)


# ----------------------------------------------------------------------------------------------------------
# bitsandbytes serialization

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
BNB_NF4_STATE = ".quant_state.bitsandbytes__nf4"  # "<weight>" + this: the packed QuantState, marks an NF4 weight


def bnb_nf4_modules(keys: Iterable[str]) -> list[str]:
    """The modules whose weight a checkpoint stores in bnb's NF4 layout (a `<module>.weight` + BNB_NF4_STATE
    key among `keys`), sorted."""
    tail = ".weight" + BNB_NF4_STATE
    return sorted(k[: -len(tail)] for k in keys if k.endswith(tail))


def is_bnb_state_key(key: str, modules: Container[str]) -> bool:
    """`<module>.weight.absmax`, `.quant_map`, ... of one of `modules`: quant state, read with its weight."""
    head, sep, _ = key.partition(".weight.")
    return bool(sep) and head in modules


def bnb_meta(state: Tensor, where: str = "quant state") -> dict:
    """The JSON held by the uint8 tensor `<weight>.quant_state.bitsandbytes__nf4` (quant_type, shape, dtype, ...);
    `where` (file: key) goes into the error when the bytes are not a JSON object."""
    try:
        meta = json.loads(bytes(state.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: not a bitsandbytes quant state (its bytes are not JSON: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: not a bitsandbytes quant state (JSON {type(meta).__name__}, not an object)")
    return meta


def nf4_to_bnb_state(q: NF4Tensor, prefix: str = "weight") -> dict[str, Tensor]:
    """The tensors bnb's Linear4bit puts in a state dict for this weight: `prefix` (the packed bytes as uint8
    [ceil(numel/2), 1]) and `prefix.<key>` for each item of QuantState.as_dict(packed=True)."""
    meta = {  # same keys in the same order as bnb, so the JSON bytes are identical too
        "quant_type": "nf4",
        "blocksize": BLOCKSIZE,
        "dtype": DTYPE_NAMES[q.dtype],
        "shape": list(q.shape),
        "nested_blocksize": NESTED_BLOCKSIZE,
        "nested_dtype": "float32",
        "nested_offset": q.offset.item(),
    }
    return {
        prefix: q.packed.view(-1, 1),
        f"{prefix}.absmax": q.absmax,
        f"{prefix}.quant_map": q.quant_map,
        f"{prefix}.nested_absmax": q.nested_absmax,
        f"{prefix}.nested_quant_map": q.nested_quant_map,
        prefix + BNB_NF4_STATE: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8),
    }


def nf4_from_bnb_state(tensors: dict[str, Tensor], prefix: str, where: str) -> NF4Tensor:
    """Read one bnb 4-bit weight (`prefix` and its `prefix.*` quant-state tensors) back into an NF4Tensor.

    Only NF4 with blocksize 64 and double quantization (compress_statistics=True, nested blocksize 256) is
    accepted; anything else raises ValueError naming `where` (the file) and the key. The maps are kept as
    stored, so the weight dequantizes to exactly what bnb would give."""
    def fail(key: str, msg: str):
        raise ValueError(f"{where}: {key}: {msg}")

    def get(key: str) -> Tensor:
        if key not in tensors:
            fail(key, "missing (expected a bitsandbytes 4-bit weight with its quant state)")
        return tensors[key]

    state_key = prefix + BNB_NF4_STATE
    if f"{prefix}.quant_state.bitsandbytes__fp4" in tensors:
        fail(f"{prefix}.quant_state.bitsandbytes__fp4", "FP4 weights are not supported, only NF4")
    meta = bnb_meta(get(state_key), f"{where}: {state_key}")
    if meta.get("quant_type") != "nf4":
        fail(state_key, f"quant_type {meta.get('quant_type')!r}, only 'nf4' is supported")
    if meta.get("blocksize") != BLOCKSIZE:
        fail(state_key, f"blocksize {meta.get('blocksize')}, only {BLOCKSIZE} is supported")
    if "nested_offset" not in meta or f"{prefix}.nested_absmax" not in tensors:
        fail(state_key, "absmax is not double-quantized (saved with compress_statistics=False); "
                        "only NF4 with nested absmax is supported")
    if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
        fail(state_key, f"nested_blocksize {meta.get('nested_blocksize')}, only {NESTED_BLOCKSIZE} is supported")
    if meta.get("dtype") not in DTYPE_NAMES.values():
        fail(state_key, f"dtype {meta.get('dtype')!r}, expected one of {sorted(DTYPE_NAMES.values())}")

    shape = torch.Size(meta["shape"])
    n_blocks = -(-shape.numel() // BLOCKSIZE)
    packed = get(prefix)
    if packed.dtype != torch.uint8:  # bnb's quant_storage (e.g. bf16 for FSDP) holds the same bytes
        packed = packed.contiguous().view(torch.uint8)
    expect = {
        prefix: (packed, torch.uint8, (shape.numel() + 1) // 2),
        f"{prefix}.absmax": (get(f"{prefix}.absmax"), torch.uint8, n_blocks),
        f"{prefix}.nested_absmax": (get(f"{prefix}.nested_absmax"), torch.float32, -(-n_blocks // NESTED_BLOCKSIZE)),
        f"{prefix}.quant_map": (get(f"{prefix}.quant_map"), torch.float32, 16),
        f"{prefix}.nested_quant_map": (get(f"{prefix}.nested_quant_map"), torch.float32, 256),
    }
    for key, (t, dtype, numel) in expect.items():
        if t.dtype != dtype or t.numel() != numel:
            fail(key, f"expected {dtype} with {numel} values for shape {list(shape)}, got {t.dtype} {list(t.shape)}")
    quant_map = expect[f"{prefix}.quant_map"][0]
    if not torch.equal(quant_map.cpu(), _NF4_CODE):
        fail(f"{prefix}.quant_map", "not the NF4 levels")
    return NF4Tensor(
        packed=packed.reshape(-1),
        absmax=expect[f"{prefix}.absmax"][0].reshape(-1),
        nested_absmax=expect[f"{prefix}.nested_absmax"][0].reshape(-1),
        offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device),
        shape=shape,
        dtype=getattr(torch, meta["dtype"]),
        quant_map=quant_map,
        nested_quant_map=expect[f"{prefix}.nested_quant_map"][0],
    )
