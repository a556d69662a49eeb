"""NF4 against bitsandbytes (the oracle, on the CPU): identical bytes out of quantization, identical floats out of
dequantization, state dicts that each side reads from the other; and the Triton kernel (run by Triton's
interpreter in a subprocess) against the plain-torch reference."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import report
from minilora.kernels.nf4 import dequantize_reference
from minilora.nf4 import (
    _DYNAMIC_LUT, NF4Tensor, _quantize_dynamic, dequantize_nf4, dynamic_code, nf4_code, nf4_from_bnb_state,
    nf4_to_bnb_state, quantize_nf4,
)

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd numel, a short last block, a 1-row 11008-wide weight, more than 256 blocks (several nested blocks, the
# last one short), rows that are not a multiple of 64, one value
SHAPES = [(64, 64), (3, 37), (1, 63), (1, 1), (5, 130), (1, 11008), (2, 11001), (300, 130), (16500,)]


def weight(shape, dtype, seed=0):
    """Normal values with a per-row scale (so absmax - offset spreads), one all-zero block and a zero tail."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
    flat = w.view(-1)
    if flat.numel() >= 256:
        flat[64:128] = 0
    if flat.numel() % 64 and flat.numel() > 64:
        flat[flat.numel() - flat.numel() % 64:] = 0  # short last block of zeros: bnb clamps its absmax to 1e-38
    return w.to(dtype)


def bnb_quantize(w):
    return F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def bnb_dequantize(packed, qs, dtype):
    """bnb's dequantization in `dtype`, through its C++ path on a [1, numel] view: bnb 0.50's CPU kernel indexes
    absmax per row and goes wrong when a row is not a multiple of 64 (it is right for one long row)."""
    qs = copy.copy(qs)
    shape, qs.dtype = qs.shape, dtype
    qs.shape = torch.Size([1, shape.numel()])
    with torch._dynamo.config.patch(disable=True):  # an odd numel takes bnb's torch.compile'd path: skip compiling
        return F.dequantize_4bit(packed, qs).reshape(shape)


def test_code_tables_match_bnb():
    assert torch.equal(nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_bytes_match_bnb(shape, dtype):
    w = weight(shape, dtype)
    packed, qs = bnb_quantize(w)
    for chunk in (1 << 22, 192):  # one chunk, and many (the path big weights take)
        q = quantize_nf4(w, chunk_numel=chunk)
        assert (q.shape, q.dtype) == (w.shape, w.dtype)
        assert torch.equal(q.packed, packed.view(-1)), f"packed bytes differ at {(q.packed != packed.view(-1)).sum()}"
        assert torch.equal(q.absmax, qs.absmax), f"absmax bytes differ at {(q.absmax != qs.absmax).sum()}"
        assert q.offset.view(1).view(torch.int32) == qs.offset.view(1).view(torch.int32)
        assert torch.equal(q.nested_absmax, qs.state2.absmax)
        assert torch.equal(q.nested_quant_map, qs.state2.code) and torch.equal(q.quant_map, qs.code)


def test_nested_absmax_rounding_matches_bnb():
    """bnb's CPU kernel snaps x / absmax to 65536 bins; values at the bin edges where the code changes, in
    blocks with absmax 1 and with absmaxes whose reciprocal rounds, tell that rule apart from a division or
    from a nearest-level search. Then 4M random values of several magnitudes."""
    lut = _DYNAMIC_LUT.long()
    k = (lut[1:] != lut[:-1]).nonzero().flatten() + 1
    edge = (2 * (k.double() - 0.5) / 65535 - 1).float()
    s = [edge]
    for direction in (2.0, -2.0):
        v = edge
        for _ in range(3):
            v = torch.nextafter(v, torch.tensor(direction))
            s.append(v)
    s = torch.cat(s).clamp(-1, 1)
    nb = -(-s.numel() // 255)
    blocks = torch.cat([torch.ones(nb, 1), torch.nn.functional.pad(s, (0, nb * 255 - s.numel())).view(nb, 255)], 1)
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(1 << 22, generator=g) * torch.rand(1 << 22, generator=g) ** 3
    for name, x in [("edges", blocks.view(-1)), ("edges*3.7", blocks.view(-1) * 3.7),
                    ("edges*1e-3", blocks.view(-1) * 1e-3), ("random", rand), ("random*1e-4", rand[:300_001] * 1e-4)]:
        ours, absmax = _quantize_dynamic(x, 256)
        theirs, state = F.quantize_blockwise(x, blocksize=256)
        report(f"8-bit codes {name}", ours.float(), theirs.float())
        assert torch.equal(absmax, state.absmax)
        assert torch.equal(ours, theirs), f"{name}: {(ours != theirs).sum()} of {x.numel()} codes differ"


@pytest.mark.parametrize("shape", [(64, 64), (3, 37), (300, 130), (2, 11001), (16500,)], ids=str)
def test_dequantize_matches_bnb(shape):
    w = weight(shape, torch.float32, seed=1)
    packed, qs = bnb_quantize(w)
    q = quantize_nf4(w)
    for dtype in DTYPES:
        ours, theirs = dequantize_nf4(q, dtype), bnb_dequantize(packed, qs, dtype)
        assert ours.dtype == dtype and ours.shape == w.shape
        mx, _ = report(f"dequant {shape} {dtype}", ours, theirs)
        assert torch.equal(ours, theirs), f"max diff {mx}"
    err = (dequantize_nf4(q) - w).abs().max() / w.abs().max()
    assert err < 0.2  # NF4 levels are at most 0.32 apart on [-1, 1]: half of that, relative to the block absmax


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from minilora.kernels import nf4 as K
    from minilora.nf4 import quantize_nf4
    g = torch.Generator().manual_seed(0)
    # odd numel, a short last block, several programs (256 bytes each), several nested blocks
    for shape in [(3, 37), (1, 1), (5, 4099), (130, 160), (17000,)]:
        w = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
        q = quantize_nf4(w)
        args = (q.packed, q.absmax, q.nested_absmax, q.offset, q.quant_map, q.nested_quant_map, q.shape)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = K.dequantize_reference(*args, dtype)
            out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: every value must be written
            tri = K.dequantize_triton(*args, dtype, out=out, bytes_per_program=256 if len(shape) == 2 else 2048)
            assert tri is out
            diff = (tri.double() - ref.double()).abs()
            print(f"{shape} {dtype}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
            assert not tri.isnan().any()
            if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (GPUs round to nearest even)
                ulps = (tri.view(torch.int16).int() - ref.view(torch.int16).int()).abs().max().item()
                assert ulps <= 1, ulps
            else:
                assert torch.equal(tri, ref)
""")


def test_triton_kernel_matches_reference_in_interpreter():
    """TRITON_INTERPRET must be set before the kernel module is imported (triton.jit reads it at decoration),
    so the kernel runs in a fresh interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def bnb_state_dict(w, **kwargs):
    packed, qs = F.quantize_4bit(w, **{"blocksize": 64, "quant_type": "nf4", "compress_statistics": True, **kwargs})
    return packed, qs, {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}


def test_bnb_state_dict_loads_here(tmp_path):
    from safetensors.torch import load_file, save_file

    w = weight((300, 130), torch.bfloat16, seed=2)
    packed, qs, sd = bnb_state_dict(w)
    save_file({f"model.layers.0.mlp.down_proj.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    q = nf4_from_bnb_state(tensors, "model.layers.0.mlp.down_proj.weight", "m.safetensors")
    assert (q.shape, q.dtype) == (w.shape, torch.bfloat16)
    for dtype in DTYPES:
        mx, _ = report(f"bnb file -> ours {dtype}", dequantize_nf4(q, dtype), bnb_dequantize(packed, qs, dtype))
        assert mx == 0


def test_our_state_dict_loads_in_bnb():
    w = weight((300, 130), torch.float16, seed=3)
    sd = nf4_to_bnb_state(quantize_nf4(w), prefix="weight")
    _, _, theirs = bnb_state_dict(w)
    assert sd.keys() == theirs.keys()
    for key in sd:  # the JSON quant state too, byte for byte
        assert sd[key].dtype == theirs[key].dtype and torch.equal(sd[key], theirs[key]), key
    # the way transformers loads a prequantized weight
    param = bnb.nn.Params4bit.from_prequantized(
        data=sd["weight"], quantized_stats={k: v for k, v in sd.items() if k != "weight"}, requires_grad=False,
        device="cpu")
    ours = dequantize_nf4(quantize_nf4(w))
    mx, _ = report("ours -> bnb Params4bit", ours, bnb_dequantize(param.data, param.quant_state, torch.float16))
    assert mx == 0


def test_rejects_other_formats_with_file_and_key():
    w = weight((64, 128), torch.float32)
    cases = [({"quant_type": "fp4"}, "weight.quant_state.bitsandbytes__fp4", "FP4"),
             ({"compress_statistics": False}, "weight.quant_state.bitsandbytes__nf4", "double-quantized"),
             ({"blocksize": 128}, "weight.quant_state.bitsandbytes__nf4", "blocksize 128")]
    for kwargs, key, words in cases:
        _, _, sd = bnb_state_dict(w, **kwargs)
        with pytest.raises(ValueError) as e:
            nf4_from_bnb_state(sd, "weight", "ckpt/model-00001.safetensors")
        msg = str(e.value)
        print(msg)
        assert "ckpt/model-00001.safetensors" in msg and key in msg and words in msg
    _, _, sd = bnb_state_dict(w)
    del sd["weight.absmax"]
    with pytest.raises(ValueError, match=r"x\.safetensors: weight\.absmax: missing"):
        nf4_from_bnb_state(sd, "weight", "x.safetensors")
    _, _, sd = bnb_state_dict(w)
    sd["weight.nested_absmax"] = sd["weight.nested_absmax"][:0]
    with pytest.raises(ValueError, match=r"x\.safetensors: weight\.nested_absmax: expected torch\.float32 with 1"):
        nf4_from_bnb_state(sd, "weight", "x.safetensors")


def test_nf4_tensor():
    w = weight((256, 96), torch.bfloat16)
    q = quantize_nf4(w)
    assert q.device == torch.device("cpu") and q.numel == w.numel()
    assert q.packed.shape == (w.numel() // 2,) and q.absmax.shape == (384,) and q.nested_absmax.shape == (2,)
    assert q.nbytes == w.numel() // 2 + 384 + 2 * 4 + 4 + 16 * 4 + 256 * 4
    assert q.dequantize().dtype == torch.bfloat16 and q.dequantize(torch.float32).shape == w.shape
    moved = q.to("meta")
    assert moved.device == torch.device("meta") and moved.shape == q.shape and moved.nested_quant_map.is_meta
    out = torch.empty(w.shape, dtype=torch.float32)
    assert dequantize_nf4(q, torch.float32, out=out) is out and torch.equal(out, q.dequantize(torch.float32))
    with pytest.raises(ValueError, match="out must be contiguous"):
        dequantize_nf4(q, torch.float32, out=torch.empty(w.shape, dtype=torch.bfloat16))
    # constructed from the listed fields alone, the maps default to the standard ones
    bare = NF4Tensor(q.packed, q.absmax, q.nested_absmax, q.offset, q.shape, q.dtype)
    assert torch.equal(bare.dequantize(), q.dequantize())
    assert torch.equal(dequantize_reference(q.packed, q.absmax, q.nested_absmax, q.offset, q.quant_map,
                                            q.nested_quant_map, q.shape, torch.float32), q.dequantize(torch.float32))
    meta = nf4_to_bnb_state(q)["weight.quant_state.bitsandbytes__nf4"]
    assert json.loads(bytes(meta.tolist()))["dtype"] == "bfloat16"
