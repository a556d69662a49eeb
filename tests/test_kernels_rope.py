"""Fused RoPE (kernels/rope.py): RopeFunction (the Triton kernel, run by Triton's interpreter in a subprocess)
against the plain-torch reference, forward and backward, in fp32, bf16 and fp16, with cos/sin from
models.common.rope_cos_sin (batch-expanded with stride 0, per-row, and packed positions that restart at 0); what
the Function saves; the reference against transformers' apply_rotary_pos_emb; the dispatch and its fallbacks.

How close: bitwise. The kernel rounds each product and the sum to x.dtype as torch's op-by-op composition does
(and as autograd's backward of it does), so every case asserts torch.equal for y and dx in all three dtypes.
On a GPU the same bits are expected (the bf16 rounding is done on the bits, fp32 runs without fma contraction);
only the interpreter is tested here."""
from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import report, run_interpreted
from minilora.config import ModelConfig
from minilora.kernels.rope import RopeFunction, _fusable, rope, rope_forward_triton, rope_qk, rope_reference
from minilora.models.common import rope_cos_sin

DTYPES = ("float32", "bfloat16", "float16")
# name -> B, T, H, D, positions, x layout. positions "shared": arange [1, T] expanded over B (stride-0 cos/sin);
# "batch1": cos/sin of shape [1, T, D] left for the kernel to expand; "packed": rows restart at 0 (several
# documents a row), cos/sin [B, T, D]. D = 24: half 12 is no power of 2 (masked columns). "transposed": x laid
# out [B, H, T, D] in memory and viewed as [B, T, H, D] (other strides than q_proj's).
SHAPES = {
    "2x5x4x16-shared": (2, 5, 4, 16, "shared", "contiguous"),
    "1x7x3x64-packed": (1, 7, 3, 64, "packed", "contiguous"),
    "2x7x3x64-packed-transposed": (2, 7, 3, 64, "packed", "transposed"),
    "3x4x5x24-batch1": (3, 4, 5, 24, "batch1", "contiguous"),
}
CASES = {f"{dt}-{name}": (dt, *shape) for dt in DTYPES for name, shape in SHAPES.items()}


def llama_config(n_heads: int, head_dim: int, **rope) -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=50, hidden_size=n_heads * head_dim,
                                    intermediate_size=64, num_hidden_layers=1, num_attention_heads=n_heads,
                                    head_dim=head_dim, **rope))


def cos_sin(B: int, T: int, H: int, D: int, positions: str, dtype: torch.dtype):
    """cos/sin as the model builds them (llama3 scaling for D = 64, so not every case has plain frequencies)."""
    rope = dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=4)) if D == 64 else {}
    config = llama_config(H, D, **rope)
    if positions == "packed":  # documents of 3, 4 / 2, 2, 3 tokens
        pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 0, 1, 2]])[:B, :T]
    else:
        pos = torch.arange(T)[None]  # [1, T]
    cos, sin = rope_cos_sin(config, "full_attention", pos, dtype)
    if positions == "shared":
        cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)
        assert cos.stride(0) == 0
    return cos, sin


def inputs(name: str):
    """x [B, T, H, D], cos, sin, dy for case `name`, the same in the subprocess and here."""
    dt, B, T, H, D, positions, layout = CASES[name]
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(B, T, H, D, generator=gen) * 3
    if layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    dy = torch.randn(B, T, H, D, generator=gen)
    cos, sin = cos_sin(B, T, H, D, positions, dtype)
    return x.to(dtype), cos, sin, dy.to(dtype)


# nan, infinities, values whose sum overflows bf16/fp32 (3e38) and fp16 (6e4), signed zeros. No subnormals: the
# interpreter converts bf16 subnormals to fp32 wrongly (a GPU converts them exactly).
SPECIAL = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 6e4, -6e4, 0.0, -0.0, 1.0, -2.5]


def special_inputs(dt: str):
    """x and dy [2, 3, 4, 16] drawn from SPECIAL, with the model's cos/sin."""
    gen = torch.Generator().manual_seed(5)
    x, dy = (torch.tensor(SPECIAL)[torch.randint(len(SPECIAL), (2, 3, 4, 16), generator=gen)] for _ in range(2))
    cos, sin = cos_sin(2, 3, 4, 16, "shared", getattr(torch, dt))
    return x.to(cos.dtype), cos, sin, dy.to(cos.dtype)


def grads(fn, x, cos, sin, dy):
    """y and dx of fn(x, cos, sin) for dL/dy = dy."""
    x = x.detach().clone().requires_grad_()
    y = fn(x, cos, sin)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


INTERPRETER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])  # tests/, for this module's CASES and inputs
    from test_kernels_rope import CASES, grads, inputs, special_inputs
    from minilora.kernels import rope as K

    out = {}
    for name in CASES:
        x, cos, sin, dy = inputs(name)
        y, dx = grads(K.RopeFunction.apply, x, cos, sin, dy)
        dy_t = dy.transpose(1, 2).contiguous().transpose(1, 2)  # as SDPA's backward may hand it back
        out[name] = {"y": y, "dx": dx,
                     # one and two heads an iteration: the head loop and its masked tail
                     "y1": K.rope_forward_triton(x, cos, sin, block_h=1),
                     "y2": K.rope_forward_triton(x, cos, sin, block_h=2),
                     "dx2_strided_dy": K.rope_backward_triton(dy_t, cos, sin, block_h=2)}

    for dt in ("float32", "bfloat16", "float16"):
        x, cos, sin, dy = special_inputs(dt)
        out[f"special-{dt}"] = grads(K.RopeFunction.apply, x, cos, sin, dy)

    # q and k in one launch each way (RopeQKFunction): k with other heads (GQA, one head: MQA) and strides
    for name in CASES:
        x, cos, sin, dy = inputs(name)
        for n_k in (1, 2):
            k = x[:, :, :n_k].contiguous() * 0.5 + 1  # [B, T, n_k, D]
            dk = dy[:, :, -n_k:]  # strided: a view of dy's last heads
            q_, k_ = x.clone().requires_grad_(), k.clone().requires_grad_()
            yq, yk = K.RopeQKFunction.apply(q_, k_, cos, sin)
            gq, gk = torch.autograd.grad((yq, yk), (q_, k_), (dy, dk))
            out[f"qk-{name}-{n_k}"] = (yq.detach(), yk.detach(), gq, gk)
            for block_h in (1, 2):  # head blocks that straddle q's last heads and k's first
                out[f"qk-{name}-{n_k}-b{block_h}"] = K._launch([x, k], cos, sin, False, block_h)

    # y.sum().backward() hands the backward an expanded dy, stride 0 everywhere
    x, cos, sin, _ = inputs("float32-2x5x4x16-shared")
    x = x.clone().requires_grad_()
    K.RopeFunction.apply(x, cos, sin).sum().backward()
    out["sum_dx"] = x.grad

    # what the Function keeps for the backward: cos and sin themselves
    x, cos, sin, _ = inputs("bfloat16-1x7x3x64-packed")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.RopeFunction.apply(x.clone().requires_grad_(), cos, sin)
    same = lambda t, u: t.data_ptr() == u.data_ptr() and t.shape == u.shape and t.stride() == u.stride()
    out["saved"] = ["cos" if same(t, cos) else "sin" if same(t, sin) else list(t.shape) for t in saved]
    torch.save(out, sys.argv[1])
""")


@pytest.fixture(scope="module")
def triton_out(tmp_path_factory):
    """The Triton path of every case, run once in the interpreter (see conftest.run_interpreted)."""
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("rope") / "out.pt")


def equal(name: str, ours: torch.Tensor, ref: torch.Tensor):
    report(name, ours, ref)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (name, ours.dtype, ref.dtype, ours.shape, ref.shape)
    assert torch.equal(ours, ref), f"{name}: {(ours != ref).sum().item()} of {ref.numel()} values differ"


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(triton_out, name):
    x, cos, sin, dy = inputs(name)
    res = triton_out[name]
    y, dx = grads(rope_reference, x, cos, sin, dy)
    assert res["y"].is_contiguous() and res["dx"].is_contiguous()
    equal(f"{name} y", res["y"], y)
    equal(f"{name} dx", res["dx"], dx)
    # the head loop's block and dy's strides change nothing
    for key in ("y1", "y2"):
        assert torch.equal(res[key], res["y"]), key
    assert torch.equal(res["dx2_strided_dy"], res["dx"])
    # the bitwise match is not the reference agreeing with itself: far from the exact values in bf16/fp16
    exact = rope_reference(x.double(), cos.double(), sin.double())
    mx, _ = report(f"{name} y vs fp64 of the same inputs", res["y"], exact)
    assert mx <= 4 * torch.finfo(x.dtype).eps * exact.abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_q_and_k_in_one_launch_match_reference(triton_out, name):
    """RopeQKFunction: q and k (1 or 2 heads, strided gradients) rotated in one launch, bitwise the reference's
    outputs and input gradients, whatever block of heads straddles the two tensors."""
    x, cos, sin, dy = inputs(name)
    for n_k in (1, 2):
        k = x[:, :, :n_k].contiguous() * 0.5 + 1
        yq, yk, gq, gk = triton_out[f"qk-{name}-{n_k}"]
        for what, ours, ref in zip(("q", "k"), ((yq, gq), (yk, gk)),
                                   (grads(rope_reference, x, cos, sin, dy),
                                    grads(rope_reference, k, cos, sin, dy[:, :, -n_k:]))):
            equal(f"{name} {n_k} {what} y", ours[0], ref[0])
            equal(f"{name} {n_k} {what} dx", ours[1], ref[1])
        for block_h in (1, 2):
            bq, bk = triton_out[f"qk-{name}-{n_k}-b{block_h}"]
            assert torch.equal(bq, yq) and torch.equal(bk, yk), block_h


def test_rope_qk_on_cpu_is_the_reference_twice():
    x, cos, sin, dy = inputs("float32-2x5x4x16-shared")
    q, k = rope_qk(x, x[:, :, :2] * 2, cos, sin)
    assert torch.equal(q, rope_reference(x, cos, sin)) and torch.equal(k, rope_reference(x[:, :, :2] * 2, cos, sin))
    with pytest.raises(ValueError, match=r"kernels/rope.py.*\[1 or 1, 7, d\]|do not fit"):
        rope_qk(x, x[:, :3], cos, sin)  # k of another length


@pytest.mark.parametrize("dt", DTYPES)
def test_special_values(triton_out, dt):
    """NaN where torch has NaN, the same infinities (overflow included) and signed zeros, the same bits elsewhere."""
    ours, ref = triton_out[f"special-{dt}"], grads(rope_reference, *special_inputs(dt))
    for what, a, b in zip(("y", "dx"), ours, ref):
        assert torch.equal(a.isnan(), b.isnan()), what
        assert b.isnan().any() and b.isinf().any(), what  # the case exercises both
        bits = torch.int32 if dt == "float32" else torch.int16
        assert torch.equal(a[~a.isnan()].view(bits), b[~b.isnan()].view(bits)), what


def test_expanded_grad_output(triton_out):
    x, cos, sin, _ = inputs("float32-2x5x4x16-shared")
    x = x.clone().requires_grad_()
    rope_reference(x, cos, sin).sum().backward()
    equal("dx of y.sum()", triton_out["sum_dx"], x.grad)


def test_saves_only_cos_and_sin(triton_out):
    x, cos, sin, _ = inputs("bfloat16-1x7x3x64-packed")
    assert triton_out["saved"] == ["cos", "sin"], triton_out["saved"]
    # autograd of the torch composition keeps no more: views of cos and sin (mul saves only the factor without
    # grad); the kernel's gain is kernels and memory traffic, not saved memory
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rope_reference(x.clone().requires_grad_(), cos, sin)
    print("reference saves", [tuple(t.shape) for t in saved])
    assert sorted(t.untyped_storage().data_ptr() for t in saved) == sorted(
        t.untyped_storage().data_ptr() for t in (cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_rope(dtype):
    """rope_reference in [B, T, H, D] equals transformers' Llama apply_rotary_pos_emb in [B, H, T, D] (the oracle),
    values and gradient; and on the CPU the dispatch is the reference."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 6, 3, 16, generator=gen) * 3).to(dtype)
    dy = torch.randn(2, 6, 3, 16, generator=gen).to(dtype)
    cos, sin = rope_cos_sin(llama_config(3, 16), "full_attention",
                            torch.tensor([[0, 1, 2, 3, 0, 1], [5, 6, 7, 8, 9, 10]]), dtype)
    ours = grads(rope_reference, x, cos, sin, dy)
    theirs = grads(lambda x, c, s: apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), c, s)[0]
                   .transpose(1, 2), x, cos, sin, dy)
    for what, a, b in zip(("y", "dx"), ours, theirs):
        equal(f"{dtype} {what}", a, b)
    for a, b in zip(grads(rope, x, cos, sin, dy), ours):
        assert torch.equal(a, b)


def test_fusable():
    """Which inputs the dispatch would hand the kernel on CUDA: the rest go to the reference."""
    x, cos, sin, _ = inputs("bfloat16-1x7x3x64-packed")
    assert _fusable(x, cos, sin)
    assert not _fusable(x, cos[..., :32], sin[..., :32])  # partial rotary
    assert not _fusable(x, cos.float(), sin.float())  # torch would promote to fp32
    assert not _fusable(x, cos.clone().requires_grad_(), sin)
    assert not _fusable(x.double(), cos.double(), sin.double())
    with pytest.raises(ValueError, match="kernels/rope.py.*full rotary"):
        RopeFunction.apply(x, cos[..., :32], sin[..., :32])  # refused before any launch


def test_bad_inputs():
    x, cos, sin, _ = inputs("float32-1x7x3x64-packed")
    with pytest.raises(ValueError, match=r"kernels/rope.py.*got x \[1, 7, 192\]"):
        rope(x.flatten(2), cos, sin)  # [B, T, H*D]: not split per head
    with pytest.raises(ValueError, match=r"kernels/rope.py.*\[1 or 1, 7, d\]"):
        rope(x, cos[:, :5], sin[:, :5])  # positions for another length
    with pytest.raises(ValueError, match="d even"):
        rope(x, cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="floating point"):
        rope(x.int(), cos, sin)
    with pytest.raises(ValueError, match=r"cos \[1, 7, 64\], sin \[1, 7, 32\]"):
        rope_forward_triton(x, cos, sin[..., :32])
