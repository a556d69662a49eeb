"""LoRALinear and inject_lora against their oracles.

- The hand-written backward (`LoRAFunction`) against finite differences (gradcheck, float64) and against plain
  autograd on the same composition, with and without dropout, 2-D and 3-D inputs.
- The NF4 path against the same composition on the dequantized weight, and a check that autograd keeps no
  dequantized [out, in] copy for backward.
- Whole models against `peft` on `transformers`: same tiny random weights, same (non-zero) A and B, logits and
  every LoRA gradient in fp32; then the 4-bit model against PEFT on a bitsandbytes-quantized transformers model.
- inject_lora's bookkeeping: errors, what is frozen, modules_to_save, seeded init, the 4-bit placeholders.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import report
from tiny_models import FAMILIES, save_tiny

from minilora.lora import (DEFAULT_TARGETS, LoRALinear, inject_lora, lora_parameters, lora_state_dict, project,
                           replace_linears_for_4bit)
from minilora.nf4 import dequantize_nf4

VOCAB = 1000  # tiny_models.SMALL


def check(name, ours, ref, tol):
    mx, _ = report(name, ours, ref)
    assert mx <= tol, f"{name}: max abs diff {mx:.3g} > {tol}"


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def lora_layer(inp=64, out=48, r=4, bias=True, dtype=torch.float32, quantize=False, **kw):
    """A LoRALinear with random base weight/bias and random, non-zero A and B."""
    m = LoRALinear(inp, out, bias, r=r, lora_alpha=8, dtype=dtype, **kw)
    m.set_base_weight(randn(out, inp, seed=1, dtype=dtype, scale=0.1), quantize=quantize)
    with torch.no_grad():
        if bias:
            m.bias.copy_(randn(out, seed=2, dtype=dtype))
        m.lora_A.weight.copy_(randn(r, inp, seed=3, scale=0.2))
        m.lora_B.weight.copy_(randn(out, r, seed=4, scale=0.2))
    return m


def reference(m: LoRALinear, x, w, a, b, bias, p=0.0):
    """Plain-autograd composition of the same formula (dropout drawn from the global RNG, like the module)."""
    y = F.linear(x, w, bias)
    xd = F.dropout(x, p, training=True) if p else x
    return y + m.scaling * F.linear(F.linear(xd, a), b)


# --- the autograd.Function ---

@pytest.mark.parametrize("fold", ["0", "1"])  # MINILORA_LORA_FOLD: the LoRA term added after or inside the GEMM
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)])
@pytest.mark.parametrize("rslora", [False, True])
def test_gradcheck_dense(shape, rslora, fold, monkeypatch):
    monkeypatch.setenv("MINILORA_LORA_FOLD", fold)
    m = lora_layer(inp=5, out=6, r=3, dtype=torch.float64, use_rslora=rslora)
    params = {k: v.detach().double().requires_grad_() for k, v in
              [("lora_A.weight", m.lora_A.weight), ("lora_B.weight", m.lora_B.weight), ("bias", m.bias)]}
    x = randn(*shape, seed=5, dtype=torch.float64).requires_grad_()

    def f(x, a, b, bias):
        return torch.func.functional_call(m, {"lora_A.weight": a, "lora_B.weight": b, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()))


@pytest.mark.parametrize("fold", ["0", "1"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("quantize", [False, True])
def test_forward_backward_match_plain_autograd(dropout, quantize, fold, monkeypatch):
    monkeypatch.setenv("MINILORA_LORA_FOLD", fold)
    m = lora_layer(quantize=quantize, lora_dropout=dropout).train()
    w = m.dense_weight(torch.float32)
    a, b = [t.detach().clone().requires_grad_() for t in (m.lora_A.weight, m.lora_B.weight)]
    x = randn(2, 5, 64, seed=6).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = randn(2, 5, 48, seed=7)

    torch.manual_seed(0)
    y = m(x)
    torch.manual_seed(0)  # same dropout mask
    y_ref = reference(m, x_ref, w, a, b, m.bias, dropout)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    tag = f"{'nf4' if quantize else 'dense'} dropout={dropout}"
    check(f"{tag} y", y, y_ref, 1e-5)
    check(f"{tag} dX", x.grad, x_ref.grad, 1e-5)
    check(f"{tag} dA", m.lora_A.weight.grad, a.grad, 1e-5)
    check(f"{tag} dB", m.lora_B.weight.grad, b.grad, 1e-5)
    assert m.weight is None if quantize else m.weight.grad is None
    assert m.bias.grad is None  # frozen


def qkv_layers(quantize=False, dense=False, bias=True, dtype=torch.float32):
    """Three LoRALinear reading one input, as q/k/v: outputs 48, 16, 16; ranks 4, 4, 2 at one scale (alpha / r = 2)."""
    layers = []
    for i, (out, r) in enumerate([(48, 4), (16, 4), (16, 2)]):
        m = LoRALinear(64, out, bias, r=r, lora_alpha=2 * r, dtype=dtype)
        m.set_base_weight(randn(out, 64, seed=10 + i, dtype=dtype, scale=0.1), quantize=quantize)
        with torch.no_grad():
            if bias:
                m.bias.copy_(randn(out, seed=20 + i, dtype=dtype))
            m.lora_A.weight.copy_(randn(r, 64, seed=30 + i, scale=0.2))
            m.lora_B.weight.copy_(randn(out, r, seed=40 + i, scale=0.2))
        if dense:
            m.keep_dense()
        layers.append(m)
    return layers


def joined(y: torch.Tensor) -> bool:
    """Whether y came out of a SharedInputLoRAFunction (through the views that reshape its output)."""
    fn = y.grad_fn
    while fn is not None and fn.name().startswith(("View", "Reshape", "Unsafe")):
        fn = fn.next_functions[0][0]
    return fn is not None and fn.name().startswith("SharedInputLoRAFunction")


@pytest.mark.parametrize("fold", ["0", "1"])
@pytest.mark.parametrize("base", ["dense", "nf4", "nf4 kept dense"])
def test_project_matches_plain_autograd(base, fold, monkeypatch):
    """project(x, q, k, v): one SharedInputLoRAFunction, against each layer's formula composed in plain autograd."""
    monkeypatch.setenv("MINILORA_LORA_FOLD", fold)
    layers = qkv_layers(quantize=base != "dense", dense=base == "nf4 kept dense")
    x = randn(2, 5, 64, seed=6).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ys = project(x, *layers)
    assert all(joined(y) for y in ys)  # not the one-by-one path
    refs, leaves = [], []
    for m in layers:
        a, b = [t.detach().clone().requires_grad_() for t in (m.lora_A.weight, m.lora_B.weight)]
        refs.append(reference(m, x_ref, m.dense_weight(torch.float32), a, b, m.bias))
        leaves.append((a, b))
    dys = [randn(*y.shape, seed=50 + i) for i, y in enumerate(ys)]
    sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()
    sum((y * dy).sum() for y, dy in zip(refs, dys)).backward()
    for i, (m, y, y_ref, (a, b)) in enumerate(zip(layers, ys, refs, leaves)):
        check(f"{base} y{i}", y, y_ref, 1e-5)
        check(f"{base} dA{i}", m.lora_A.weight.grad, a.grad, 1e-5)
        check(f"{base} dB{i}", m.lora_B.weight.grad, b.grad, 1e-5)
        assert m.lora_A.weight.grad.is_contiguous() and m.lora_A.weight.grad.dtype == torch.float32
    check(f"{base} dX", x.grad, x_ref.grad, 1e-5)


class Joined(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        return project(x, *self.layers)


def test_project_gradcheck():
    group = Joined(qkv_layers(dtype=torch.float64))
    names = [f"layers.{i}.lora_{ab}.weight" for i in range(3) for ab in "AB"]
    leaves = [group.get_parameter(n).detach().double().requires_grad_() for n in names]
    x = randn(3, 64, seed=5, dtype=torch.float64).requires_grad_()

    def f(x, *lora):
        return torch.func.functional_call(group, dict(zip(names, lora)), (x,))

    assert torch.autograd.gradcheck(f, (x, *leaves))


def test_project_runs_one_by_one_when_it_must():
    """Dropout in training (a mask per layer), two scales, plain nn.Linear: each layer on its own, same results."""
    q, k, _ = qkv_layers()
    dropped = LoRALinear(64, 16, False, r=4, lora_alpha=8, lora_dropout=0.1).train()
    other_scale = LoRALinear(64, 16, False, r=4, lora_alpha=16)
    for m in (dropped, other_scale):
        m.set_base_weight(randn(16, 64, seed=9), quantize=False)
    x = randn(2, 64, seed=6).requires_grad_()
    for mods in ([q, dropped], [q, other_scale], [torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)]):
        torch.manual_seed(0)
        ys = project(x, *mods)
        torch.manual_seed(0)
        assert not any(joined(y) for y in ys)
        for y, m in zip(ys, mods):
            assert torch.equal(y, m(x))


@pytest.mark.parametrize("r", [0, 4])
def test_nf4_backward_keeps_no_dequantized_weight(r):
    if r:
        m = lora_layer(r=r, quantize=True)
    else:  # the frozen 4-bit linear of an inference load
        m = LoRALinear(64, 48, True)
        m.set_base_weight(randn(48, 64, scale=0.1), quantize=True)
        m.bias.data.copy_(randn(48, seed=2))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = randn(3, 5, 64, seed=8).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    print("saved for backward:", saved)
    assert all(math.prod(s) != 48 * 64 for s in saved), saved
    if not r:
        assert saved == []  # dX = dY W0 needs nothing but dY
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w = m.dense_weight(torch.float32)
    y_ref = reference(m, x_ref, w, m.lora_A.weight, m.lora_B.weight, m.bias) if r else F.linear(x_ref, w, m.bias)
    y_ref.sum().backward()
    check(f"r={r} nf4 y", y, y_ref, 1e-5)
    check(f"r={r} nf4 dX", x.grad, x_ref.grad, 1e-5)


def test_nf4_module_moves_casts_and_state_dict():
    m = lora_layer(quantize=True)
    assert set(m.state_dict()) == {"bias", "lora_A.weight", "lora_B.weight"}
    assert m.nf4.dtype == torch.float32
    x = randn(4, 64, seed=9)
    y32 = m(x)
    m.to(torch.bfloat16)  # casts the compute dtype only: packed bytes and fp32 constants are untouched
    assert m.nf4.dtype == torch.bfloat16 and m.nf4.packed.dtype == torch.uint8
    assert m.nf4.nested_absmax.dtype == torch.float32 and m.nf4.offset.dtype == torch.float32
    assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32  # the optimizer's master copy
    check("nf4 bf16 vs fp32 forward", m(x.bfloat16()), y32, 2**-6 * y32.abs().max().item())
    m.keep_dense()  # a dequantized copy: not in the state dict, follows casts and moves, the same outputs
    assert set(m.state_dict()) == {"bias", "lora_A.weight", "lora_B.weight"}
    assert torch.equal(m(x.bfloat16()), m.to(torch.float32).to(torch.bfloat16)(x.bfloat16()))
    assert m.dense.dtype == torch.bfloat16 and torch.equal(m.dense, m.dense_weight())
    m.to("meta")
    assert m.nf4.packed.is_meta and m.bias.is_meta and m.dense.is_meta


def test_bf16_nf4_trains_in_compute_dtype():
    m = lora_layer(dtype=torch.bfloat16, quantize=True)
    x = randn(2, 6, 64, seed=10)
    dy = randn(2, 6, 48, seed=11)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16 and m.nf4.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    (y * dy.bfloat16()).sum().backward()
    assert m.lora_A.weight.grad.dtype == torch.float32 and m.lora_B.weight.grad.dtype == torch.float32
    # the same weights (dequantized, upcast) in fp32: what differs is bf16 rounding of activations (2^-8)
    a, b = [t.detach().clone().requires_grad_() for t in (m.lora_A.weight, m.lora_B.weight)]
    y_ref = reference(m, x, m.dense_weight(torch.float32), a, b, m.bias.float())
    (y_ref * dy).sum().backward()
    pairs = [("y", y, y_ref), ("dA", m.lora_A.weight.grad, a.grad), ("dB", m.lora_B.weight.grad, b.grad)]
    for name, ours, ref in pairs:
        check(f"bf16 vs fp32 {name}", ours, ref, 2**-6 * ref.abs().max().item())


def test_merge_equals_lora_forward():
    for quantize in (False, True):
        m = lora_layer(quantize=quantize).eval()
        x = randn(3, 64, seed=11)
        check(f"merged ({'nf4' if quantize else 'dense'}) forward", F.linear(x, m.merge(), m.bias), m(x), 1e-5)
        check("merge formula", m.merge(), m.dense_weight(torch.float32) +
              m.scaling * m.lora_B.weight @ m.lora_A.weight, 1e-6)


# --- whole models against peft ---

def pair(family, path, **overrides):
    """(transformers model, minilora model) with the same tiny random weights, fp32."""
    from minilora.loading import load_model
    hf = save_tiny(family, path, **overrides)
    return hf, load_model(path, dtype=torch.float32)


def peft_name(name: str) -> str:
    return "base_model.model." + name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")


def inject_both(hf, ours, rslora, r=4, alpha=8, seed=0):
    """LoRA by peft and by minilora, then the same random non-zero A and B copied into both."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                     use_rslora=rslora)
    peft_model = get_peft_model(hf, cfg)
    inject_lora(ours, r=r, lora_alpha=alpha, use_rslora=rslora)
    peft_params = dict(peft_model.named_parameters())
    trainable = {n for n, p in peft_params.items() if p.requires_grad}
    assert trainable == {peft_name(n) for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for i, (n, p) in enumerate(lora_state_dict(ours).items()):
            p.copy_(randn(*p.shape, seed=seed + i, scale=0.1))
            peft_params[peft_name(n)].copy_(p)
    return peft_model


def compare_logits_and_grads(tag, peft_model, ours, tol=1e-5):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    dlogits = randn(2, 12, VOCAB, seed=1, scale=0.1)  # LoRA gradients of order 1, so 1e-5 is a relative bound
    ref = peft_model(input_ids=ids).logits
    out = ours(ids)
    check(f"{tag} logits", out, ref, tol)
    (ref * dlogits).sum().backward()
    (out * dlogits).sum().backward()
    peft_params = dict(peft_model.named_parameters())
    grads_ours = torch.cat([p.grad.flatten() for p in lora_parameters(ours)])
    grads_ref = torch.cat([peft_params[peft_name(n)].grad.flatten() for n in lora_state_dict(ours)])
    assert grads_ours.abs().max() > 0.1  # B != 0, so A gets gradient too
    # gradients reach ~15 in the Gemma models (embeddings scaled by sqrt(hidden)): bound relative to the largest
    check(f"{tag} LoRA grads ({len(lora_parameters(ours))} tensors)", grads_ours, grads_ref,
          tol * max(1.0, grads_ref.abs().max().item()))


GEMMA = importlib.util.find_spec("minilora.models.gemma") is not None
PARITY = [f for f in FAMILIES if GEMMA or not f.startswith("gemma")] + ["llama-bias", "llama-tied"]


@pytest.mark.parametrize("family, rslora", [(f, False) for f in PARITY] + [("llama", True), ("qwen3", True)])
def test_matches_peft(family, rslora, tmp_path):
    hf, ours = pair(family, tmp_path)
    peft_model = inject_both(hf, ours, rslora)
    compare_logits_and_grads(f"{family} rslora={rslora}", peft_model, ours)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases on the 4-bit layers
def test_4bit_matches_peft_on_bitsandbytes(family, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from minilora.loading import load_model
    save_tiny(family, tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    # train mode (dropout is 0 everywhere): in eval mode without grad, bitsandbytes on CPU repacks the weights
    # for a bf16 kernel, which would make the oracle the less accurate side
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, device_map="cpu",
                                              dtype=torch.float32, attn_implementation="eager").train()
    ours = load_model(tmp_path, dtype=torch.float32, load_in_4bit=True)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.nf4 is not None and q.weight is None
    ref_w = hf.model.layers[0].self_attn.q_proj
    import bitsandbytes.functional as bnbf
    check(f"{family} dequantized q_proj vs bitsandbytes", q.dense_weight(torch.float32),
          bnbf.dequantize_4bit(ref_w.weight.data, ref_w.weight.quant_state), 0)
    # the same model saved by transformers in bnb's format (a `*-bnb-4bit` checkpoint) loads to the same bytes
    hf.save_pretrained(tmp_path / "bnb")
    pre = load_model(tmp_path / "bnb", dtype=torch.float32)
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    theirs = {n: m for n, m in pre.named_modules() if isinstance(m, LoRALinear)}
    assert mine.keys() == theirs.keys() and len(mine) == 7 * ours.config.num_hidden_layers
    for n, m in mine.items():
        for f in ("packed", "absmax", "nested_absmax", "offset"):
            assert torch.equal(getattr(m.nf4, f), getattr(theirs[n].nf4, f)), (n, f)
    peft_model = inject_both(hf, ours, rslora=False)
    compare_logits_and_grads(f"{family} 4-bit", peft_model, ours)


# --- inject_lora bookkeeping ---

@pytest.fixture
def tiny(tmp_path):
    return pair("llama-tied", tmp_path)[1]


def test_unknown_target_lists_available_names(tiny):
    with pytest.raises(ValueError) as e:
        inject_lora(tiny, target_modules=["q_proj", "qproj"])
    msg = str(e.value)
    assert "qproj" in msg and all(t in msg for t in DEFAULT_TARGETS) and "lm_head" in msg, msg
    with pytest.raises(ValueError, match="embed_token"):
        inject_lora(tiny, modules_to_save=["embed_token"])


def test_lora_on_lm_head_is_refused(tiny):
    # the chunked loss reads lm_head.weight directly, so an adapter there would silently never train
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_lora(tiny, target_modules=["q_proj", "lm_head"])


def test_everything_else_is_frozen(tiny):
    names = inject_lora(tiny, r=2)
    layers = tiny.config.num_hidden_layers
    assert len(names) == 7 * layers and all(n.rsplit(".", 1)[-1] in DEFAULT_TARGETS for n in names)
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable == list(lora_state_dict(tiny)) and len(trainable) == 2 * 7 * layers
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in lora_parameters(tiny))


def test_model_joins_qkv_and_gate_up(tiny):
    """With LoRA on all seven projections, every layer runs q/k/v and gate/up each as one SharedInputLoRAFunction
    (the speed path of issue 6 is the one a model takes, not only the one its unit test calls)."""
    inject_lora(tiny, r=2)
    loss = tiny(torch.randint(0, VOCAB, (2, 7))).float().square().mean()
    seen, stack, names = set(), [loss.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    assert sum(n.startswith("SharedInputLoRAFunction") for n in names) == 2 * tiny.config.num_hidden_layers


def test_all_linear_and_full_names(tmp_path):
    ours = pair("llama", tmp_path)[1]
    names = inject_lora(ours, target_modules="all-linear", r=2)
    assert len(names) == 7 * ours.config.num_hidden_layers and "lm_head" not in names
    ours = pair("llama", tmp_path)[1]
    assert inject_lora(ours, target_modules=["model.layers.1.mlp.down_proj", "self_attn.v_proj"], r=2) == \
        ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="already has a LoRA"):
        inject_lora(ours, target_modules=["v_proj"])


def test_modules_to_save_tied_embeddings_train_together(tiny):
    for saved in (["q_proj"], ["model.layers.0.mlp"]):
        with pytest.raises(ValueError, match="both LoRA targets and"):
            inject_lora(tiny, target_modules=["q_proj", "up_proj"], modules_to_save=saved)
    inject_lora(tiny, r=2, modules_to_save=["embed_tokens", "lm_head"])
    emb = tiny.model.embed_tokens.weight
    assert tiny.lm_head.weight is emb and emb.requires_grad
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    tiny(ids).square().mean().backward()
    # the tied matrix gets the gradient of both uses: every vocab row through the head, not just the 6 ids
    assert (emb.grad.abs().sum(-1) > 0).sum() > 6
    assert all(p.grad is None for n, p in tiny.named_parameters() if "norm" in n)


def test_seeded_init_and_zero_start(tmp_path):
    a, b = pair("llama", tmp_path / "a")[1], pair("llama", tmp_path / "b")[1]
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = a(ids)
    inject_lora(a, r=4, seed=1)
    inject_lora(b, r=4, seed=1)
    sa, sb = lora_state_dict(a), lora_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        check("logits at init (B = 0) vs base", a(ids), before, 0)
    A = sa["model.layers.0.self_attn.q_proj.lora_A.weight"]  # [r, hidden]
    bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform(a=√5) = U(-1/√fan_in, 1/√fan_in), as nn.Linear / PEFT
    assert A.abs().max() <= bound and A.std() > 0.4 * bound
    assert all(v.abs().max() == 0 for k, v in sa.items() if "lora_B" in k)
    c = pair("llama", tmp_path / "c")[1]
    inject_lora(c, r=4, seed=2)
    assert not torch.equal(lora_state_dict(c)[next(iter(sa))], A)


def test_replace_linears_for_4bit_on_meta():
    from minilora.config import ModelConfig
    from minilora.models import build_model
    cfg = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with torch.device("meta"):
        model = build_model(cfg)
    keys = set(model.state_dict())
    names = replace_linears_for_4bit(model, ["q_proj", "model.layers.0.mlp.down_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.r == 0 and q.weight.is_meta and q.bias.is_meta
    assert set(model.state_dict()) == keys  # the loader still sees every checkpoint key
    q.set_base_weight(randn(32, 32, scale=0.1), quantize=True)
    check("placeholder dequantized weight", q.dense_weight(), dequantize_nf4(q.nf4, torch.float32), 0)
    with pytest.raises(ValueError, match="shape"):
        q.set_base_weight(torch.zeros(3, 32), quantize=False)
    with pytest.raises(ValueError, match="available names"):
        replace_linears_for_4bit(model, ["qkv_proj"])


# --- the down projection fused with the gated activation (CUDA path, run in Triton's interpreter) ---

GATED_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
import torch
from test_lora import lora_layer, randn
from minilora.kernels.gated_act import gated_act_reference
from minilora.lora import GatedLoRAFunction, LoRALinear

out = {}
for r in (0, 4):
    for quantize in (False, True):
        for act in ("silu", "gelu_tanh"):
            if r:
                m = lora_layer(inp=96, out=48, r=r, quantize=quantize)
            else:  # a frozen 4-bit (or 16-bit) linear without LoRA
                m = LoRALinear(96, 48, True)
                m.set_base_weight(randn(48, 96, seed=1, scale=0.1), quantize=quantize)
                m.bias.data.copy_(randn(48, seed=2))
            g0, u0, dy = randn(2, 5, 96, seed=5, scale=2), randn(2, 5, 96, seed=6), randn(2, 5, 48, seed=7)
            res = {}
            for path in ("fused", "composed"):
                g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
                saved = []
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                              lambda t: t):
                    if path == "fused":  # what LoRALinear.forward_gated does on CUDA
                        base = m.nf4 if m.nf4 is not None else m.weight
                        a, b = (m.lora_A.weight, m.lora_B.weight) if r else (None, None)
                        y = GatedLoRAFunction.apply(g.view(-1, 96), u.view(-1, 96), act, base, m.bias, a, b,
                                                    m.scaling, False, True).view(2, 5, 48)
                    else:
                        y = m(gated_act_reference(g, u, act))
                params = [p for p in m.parameters() if p.requires_grad]
                grads = torch.autograd.grad(y, [g, u, *params], dy)
                res[path] = dict(y=y.detach(), grads=grads, n_activation_sized=sum(s[-1] == 96 and s[0] != 4
                                                                                  for s in saved))
            out[(r, quantize, act)] = res
torch.save(out, sys.argv[1])
"""


def test_gated_down_projection_matches_composition_and_keeps_less(tmp_path):
    """GatedLoRAFunction (down_proj(act(g) * u) in one Function, Triton activation kernels in the interpreter)
    against the module applied to the torch activation: the output and the gradients of g, u, A and B, with and
    without LoRA, 16-bit and NF4 bases, both activations; and it keeps two [N, I] tensors (g, u) where the composition keeps h too."""
    from conftest import run_interpreted

    out = run_interpreted(GATED_SCRIPT, tmp_path / "out.pt")
    for (r, quantize, act), res in out.items():
        tag = f"r={r} {'nf4' if quantize else 'fp32'} {act}"
        fused, composed = res["fused"], res["composed"]
        # fp32 rounding relative to the largest value: the kernel's gelu is a different (exact) formula than torch's
        for name, a, b in zip(["y", "dg", "du", "dA", "dB"], [fused["y"], *fused["grads"]],
                              [composed["y"], *composed["grads"]]):
            check(f"{tag} {name}", a, b, 1e-5 * max(1.0, b.abs().max().item()))
        print(f"{tag}: [N, I] tensors kept {fused['n_activation_sized']} fused, "
              f"{composed['n_activation_sized']} composed")
        # composed: the torch activation keeps g, act(g) and u, and a LoRA down_proj its input h as well
        assert fused["n_activation_sized"] == 2 and composed["n_activation_sized"] == (4 if r else 3)
