"""GGUF files (llama.cpp's format) as a model source: convert one into a Hugging Face checkpoint directory.

    hf_dir = load_gguf_dir("SmolLM2-135M-Instruct.Q4_1.gguf")    # cached under $MINILORA_CACHE/from_gguf/
    model = load_model(hf_dir)                                     # then it is a checkpoint like any other

A GGUF carries everything a checkpoint needs under llama.cpp's names: the hyper-parameters and the tokenizer as
metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...), the weights as tensors (`blk.0.attn_q.weight`),
most of them quantized in blocks (Q4_K, Q8_0, ...). Every tensor is dequantized to float32 by the `gguf` package
(llama.cpp's own reader), then we undo what llama.cpp's converter (convert_hf_to_gguf.py) did on the way in:

  1. names   blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight     (LAYER_NAMES below)
  2. shapes  GGUF lists dims fastest-first (ne[0] = in_features); reversed, that is torch's [out, in]
  3. Q/K     Llama-architecture files permute each head's q/k rows from HF's rotate-half layout (x0..x31 | y0..y31)
             to llama.cpp's interleaved pairs (x0 y0 x1 y1 ...); we permute them back. Qwen/Gemma are not permuted.
  4. norms   Gemma RMSNorms multiply by (1 + w) and HF stores w; llama.cpp stores 1 + w. We subtract the 1.
  5. RoPE    Llama 3.1's frequency scaling is baked into a `rope_freqs` tensor; we recover the rope_scaling dict.

The tokenizer is rebuilt from the metadata as a `tokenizers` JSON the way transformers' GGUF loader does
(transformers/integrations/gguf/gguf_tokenizer_mapping.py), so token ids equal
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`; the tests check that, and the weights, against transformers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from minilora.atomic import atomic_path
from minilora.config import rope_inv_freq
from minilora.pypi_models import cache_dir

MAX_SHARD_BYTES = 2 * 10**9  # HF's "2GB": above it the weights are split into model-0000k-of-0000n.safetensors

# GGUF `general.architecture` -> (config.json model_type, architectures[0])
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),  # Mistral 7B files say "llama" too: same block, same converter
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),  # the text half; a multimodal file's vision tower is elsewhere
}
PERMUTED_QK = ("llama",)  # convert_hf_to_gguf.py's LlamaModel.permute; Qwen and Gemma converters don't
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3")  # GemmaModel.modify_tensors: `data_torch + 1` on every *norm.weight
SANDWICH = ("gemma2", "gemma3")  # norms after attention and around the MLP

TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",  # Llama/Qwen/Gemma 1: the norm in front of the MLP
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SANDWICH_NAMES = {  # Gemma 2/3: llama.cpp's ffn_norm is HF's pre_feedforward_layernorm
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
CONSUMED = ("rope_freqs.weight",)  # turned into config.json's rope_scaling, not a weight

# llama.cpp token types (llama.h `llama_token_type`)
CONTROL, USER_DEFINED = 3, 4


class GGUFError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------- reading


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf "
                          "(or pip install 'minilora[gguf]')") from None
    return gguf


def open_gguf(path: str | Path):
    """(gguf.GGUFReader, metadata dict). Metadata values are python scalars/strings, lists of strings, or numpy
    arrays for numeric arrays (token types, scores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise GGUFError(f"{path}: cannot read GGUF header ({type(e).__name__}: {e})") from None
    return reader, {k: _field_value(f, gguf.GGUFValueType) for k, f in reader.fields.items()}


def _field_value(field, T):
    # The reader keeps one numpy view per array element in `parts`; `data` indexes the value-carrying ones.
    if field.types[0] == T.ARRAY:
        if field.types[-1] == T.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not len(field.data):
            return np.zeros(0)
        return np.concatenate([field.parts[i] for i in field.data])
    if field.types[0] == T.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1][0].item()


# ------------------------------------------------------------------------------------------------------ config


def hf_config(meta: dict, tensors: dict, path: Path, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for this file, with transformers' field names. `tensors` maps GGUF name -> ReaderTensor."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: unsupported architecture {arch!r} (general.architecture); "
                        f"supported: {', '.join(ARCHS)}")

    def key(name, default=...):
        full = f"{arch}.{name}"
        if full not in meta:
            if default is ...:
                raise GGUFError(f"{path}: metadata has no {full!r}")
            return default
        value = meta[full]
        if isinstance(value, np.ndarray):  # a per-layer list; none of the supported families vary by layer
            raise GGUFError(f"{path}: {full} is per-layer ({value.tolist()[:4]}...), which minilora cannot express")
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    model_type, cls = ARCHS[arch]
    n_layers, hidden, n_heads = key("block_count"), key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // n_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: RoPE on {key('rope.dimension_count')} of {head_dim} head dims (partial rotary) "
                        "is not supported")
    theta = float(key("rope.freq_base", 10000.0))
    ctx = key("context_length")
    cfg = {
        "architectures": [cls],
        "model_type": model_type,
        # the embedding's row count, which is what the weights need (`<arch>.vocab_size` is often absent)
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "max_position_embeddings": ctx,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        # llama.cpp writes `output.weight` only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    scaling = _rope_scaling(meta, arch, tensors, theta, head_dim, ctx, path)
    if scaling:
        cfg["rope_scaling"] = scaling
    if arch == "llama":
        cfg["hidden_act"] = "silu"
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    elif arch in ("qwen2", "qwen3"):
        cfg["hidden_act"] = "silu"
        cfg["use_sliding_window"] = False  # llama.cpp runs Qwen with full attention everywhere
    else:
        cfg.update(_gemma_fields(arch, key, n_layers, hidden, n_heads, head_dim))
    return cfg


def _gemma_fields(arch: str, key, n_layers: int, hidden: int, n_heads: int, head_dim: int) -> dict:
    """What llama.cpp's llama-model.cpp fixes in code for Gemma rather than storing in the file."""
    out = {"hidden_activation": "gelu_pytorch_tanh"}
    if arch == "gemma":
        return out
    # Scores scale by head_dim**-0.5, except the 27B models (46 layers for Gemma 2, 62 for Gemma 3), which use
    # (hidden / heads)**-0.5 -- llama.cpp picks by size the same way (f_attention_scale).
    big = n_layers == (46 if arch == "gemma2" else 62)
    out["query_pre_attn_scalar"] = hidden // n_heads if big else head_dim
    window = key("attention.sliding_window")
    # llama.cpp: Gemma 2 alternates sliding/global from layer 0 (swa pattern 2), Gemma 3 has 5 sliding then 1 global
    pattern = 2 if arch == "gemma2" else 6
    out["sliding_window"] = window
    out["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if arch == "gemma2":
        out["attn_logit_softcapping"] = key("attn_logit_softcapping", None)
        out["final_logit_softcapping"] = key("final_logit_softcapping", None)
    else:
        out["rope_local_base_freq"] = 10000.0  # llama.cpp: rope_freq_base_train_swa = 10000 for Gemma 3
        out["sliding_window_pattern"] = pattern
    return out


def _rope_scaling(meta, arch, tensors, theta, head_dim, ctx, path) -> dict | None:
    if "rope_freqs.weight" in tensors:
        return _llama3_rope(tensors["rope_freqs.weight"], theta, head_dim, ctx, path)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise GGUFError(f"{path}: {arch}.rope.scaling.type = {kind!r} is not supported (linear, yarn)")
    out = {"rope_type": kind, "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if f"{arch}.rope.scaling.original_context_length" in meta:
        out["original_max_position_embeddings"] = meta[f"{arch}.rope.scaling.original_context_length"]
    return out


def _llama3_rope(t, theta: float, head_dim: int, ctx: int, path) -> dict:
    """Llama 3.1's RoPE scaling from the per-frequency divisors llama.cpp stores in `rope_freqs.weight`
    (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors). The largest divisor is `factor`; the band edges are
    Meta's low/high_freq_factor 1 and 4 over 8192 original positions, the values llama.cpp itself assumes.
    We recompute the divisors from the result, so a file made with other values fails loudly here."""
    divisors = torch.from_numpy(_dequantize(t, path).copy()).reshape(-1)  # [head_dim/2]
    p = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    plain, _ = rope_inv_freq({"rope_type": "default", "rope_theta": theta}, head_dim, ctx)
    scaled, _ = rope_inv_freq({**p, "rope_theta": theta}, head_dim, ctx)
    if not torch.allclose(plain / scaled, divisors, rtol=1e-4):
        raise GGUFError(f"{path}: rope_freqs.weight does not match Llama 3 RoPE scaling with factor {p['factor']}, "
                        "low/high_freq_factor 1/4 over 8192 positions; cannot express it in config.json")
    return p


# ----------------------------------------------------------------------------------------------------- weights


def hf_tensor_name(name: str, arch: str) -> str | None:
    """The HF state-dict key for a GGUF tensor name, or None if it has none."""
    stem, _, suffix = name.rpartition(".")  # "blk.3.attn_q", "weight"
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem):
        leaf = (SANDWICH_NAMES.get(m[2]) if arch in SANDWICH else None) or LAYER_NAMES.get(m[2])
        return f"model.layers.{m[1]}.{leaf}.{suffix}" if leaf else None
    return f"{TOP_NAMES[stem]}.{suffix}" if stem in TOP_NAMES else None


def _dequantize(t, path) -> np.ndarray:
    try:
        values = _gguf().quants.dequantize(t.data, t.tensor_type)  # float32
    except NotImplementedError as e:
        raise GGUFError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize "
                        f"({e})") from None
    return values.reshape([int(d) for d in reversed(t.shape)])  # GGUF dims are fastest-first


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's LlamaModel.permute: w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2). Per head, HF's rows
    are [first halves | second halves] (rotate-half RoPE); llama.cpp's are the pairs interleaved."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute (HF rotate-half rows -> interleaved pairs), the inverse of unpermute_qk;
    used when writing GGUF (minilora/gguf_export.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def convert_tensor(t, arch: str, cfg: dict, path) -> torch.Tensor:
    """One GGUF tensor as the float32 tensor HF stores."""
    w = torch.from_numpy(_dequantize(t, path).copy())  # copy: the reader's arrays are read-only memory maps
    leaf = t.name.rsplit(".", 2)[-2]
    if arch in PERMUTED_QK and leaf in ("attn_q", "attn_k"):  # weight [H*D, hidden] and bias [H*D] alike
        w = unpermute_qk(w, cfg["num_attention_heads"] if leaf == "attn_q" else cfg["num_key_value_heads"])
    if arch in NORM_PLUS_ONE and t.name.endswith("norm.weight"):
        w = w - 1.0  # in float32, before any cast, as transformers does
    return w


def _write_weights(reader, arch: str, cfg: dict, out: Path, dtype: torch.dtype, max_shard_bytes: int, path):
    from safetensors.torch import save_file

    named = []  # (hf name, GGUF tensor), embedding first, then layer by layer
    for t in reader.tensors:
        if t.name in CONSUMED:
            continue
        hf = hf_tensor_name(t.name, arch)
        if hf is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no Hugging Face equivalent for architecture {arch!r}")
        named.append((hf, t))
    named.sort(key=lambda x: (int(x[0].split(".")[2]) if x[0].startswith("model.layers.") else
                              -1 if x[0].startswith("model.embed") else 1 << 30, x[0]))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards, size = [[]], 0  # greedy: start a new shard when the next tensor would overflow this one
    for hf, t in named:
        nbytes = int(t.n_elements) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf, t))
        size += nbytes
    total = sum(int(t.n_elements) * itemsize for _, t in named)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):  # one shard in memory at a time
        state = {hf: convert_tensor(t, arch, cfg, path).to(dtype).contiguous() for hf, t in shard}
        save_file(state, out / fname, metadata={"format": "pt"})
        weight_map.update({hf: fname for hf in state})
        del state
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------------- tokenizer

# Pre-tokenizer splits by `tokenizer.ggml.pre`, from transformers' GGUF_PRE_TOKENIZER_SPLITS (which copies
# llama.cpp's llama-vocab.cpp). Files not listed (gpt-2, smollm, default, ...) get GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level BPE vocabularies are spelled in these characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def merges_from_vocab(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary with no merge list: every split of a token into two tokens, best-ranked
    merged token first (transformers' `generate_merges`, whose order we must reproduce to get its token ids)."""
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _byte_level_bpe(meta: dict):
    """GPT-2 style byte-level BPE (tokenizer.ggml.model = "gpt2"): SmolLM, Qwen, Llama 3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict, gemma: bool):
    """SentencePiece-style BPE with byte fallback (tokenizer.ggml.model = "llama"): Llama 2, Mistral, Gemma.
    Gemma: no prefix space, spaces become "▁" in a normalizer; its files list no merges and store runs of spaces
    as real spaces, so we respell those as "▁"s and rank merges by position in the file (its scores don't follow
    merge order). Others: Metaspace adds "▁" before the first word; merges from the file or from the scores."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    if gemma:
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    elif gemma:
        merges = merges_from_vocab(vocab, {t: -i for i, t in enumerate(tokens)})
    else:
        merges = merges_from_vocab(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"].tolist())))
    if gemma:
        tok = Tokenizer(models.BPE(vocab, merges, dropout=None, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok = Tokenizer(models.BPE(vocab, merges, dropout=None, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return tok


def special_tokens(meta: dict, arch: str) -> dict[str, str | None]:
    """bos/eos/unk/pad (and Gemma's mask) token strings, from the ids the file gives."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}
    out = {name: tokens[meta[f"tokenizer.ggml.{k}"]] if f"tokenizer.ggml.{k}" in meta else None
           for name, k in ids.items()}
    if arch.startswith("gemma") and "<mask>" in tokens:  # transformers' GemmaTokenizer default
        out["mask_token"] = "<mask>"
    return out


def build_tokenizer(meta: dict, arch: str, path):
    """The `tokenizers.Tokenizer` this file describes (what tokenizer.json will hold)."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_bpe(meta)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, gemma=arch.startswith("gemma"))
    else:
        raise GGUFError(f"{path}: tokenizer.ggml.model = {kind!r} is not supported; supported: 'gpt2' (byte-level "
                        "BPE), 'llama' (SentencePiece BPE)")
    # Tokens the file marks CONTROL (<|im_end|>) become special added tokens, USER_DEFINED ones (<tool_call>, Gemma's
    # "\n\n") plain added tokens, so both are matched whole. In a byte-level vocabulary a control token spelled
    # outside the byte alphabet is a llama.cpp mislabel that transformers skips; so do we.
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", np.zeros(0)).tolist()
    alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                            if ty == CONTROL and (alphabet is None or set(t) <= alphabet)])
    vocab = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                    if ty == USER_DEFINED and t in vocab])
    added = {str(t) for t in tok.get_added_tokens_decoder().values()}
    tok.add_special_tokens([AddedToken(t, special=True) for t in special_tokens(meta, arch).values()
                            if t is not None and t not in added])
    # BOS/EOS insertion, as transformers' update_post_processor writes it
    cfg = tokenizer_config(meta, arch)
    bos, eos = cfg["bos_token"] if cfg["add_bos_token"] else None, cfg["eos_token"] if cfg["add_eos_token"] else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    specials = [(t, tok.token_to_id(t)) for t in (bos, eos) if t]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def tokenizer_config(meta: dict, arch: str) -> dict:
    specials = special_tokens(meta, arch)
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
           "add_bos_token": bool(add_bos and specials["bos_token"]),
           "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False) and specials["eos_token"]),
           "clean_up_tokenization_spaces": False,
           "model_max_length": meta.get(f"{arch}.context_length")}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def generation_config(meta: dict) -> dict:
    """Stop on every end-of-generation token the file names (llama.cpp's EOG set: eos, end-of-turn, ...)."""
    stops = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if k in meta]
    stops = list(dict.fromkeys(stops))
    return {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}


# ---------------------------------------------------------------------------------------------------- the dirs


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a Hugging Face checkpoint directory for this GGUF: config.json, generation_config.json, weights in
    `dtype`, tokenizer.json, tokenizer_config.json. Written into a temporary sibling directory and renamed into
    place, so `out_dir` either holds a complete conversion or does not exist."""
    path, out = Path(gguf_path), Path(out_dir)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not an empty directory")
    reader, meta = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = hf_config(meta, tensors, path, dtype)
    arch = meta["general.architecture"]
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
    tok = build_tokenizer(meta, arch, path)

    # renamed into place at the end; replaces an empty directory, fails on a full one (another process's result)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(meta), indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta, arch), indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        _write_weights(reader, arch, cfg, tmp, dtype, max_shard_bytes, path)
        mode = (tmp / "config.json").stat().st_mode & 0o666  # safetensors writes 0600; give them the umask's mode
        for f in tmp.glob("*.safetensors"):
            f.chmod(mode)
    return out


def load_gguf_dir(gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The converted directory for this GGUF, converting on first use. Cached under
    $MINILORA_CACHE/from_gguf/<stem>-<size>-<mtime>, so an edited or replaced file is converted again."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    st = path.stat()
    name = f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if dtype != torch.float32:
        name += "-" + str(dtype).removeprefix("torch.")
    out = cache_dir() / "from_gguf" / name
    if (out / "config.json").is_file():
        return out
    try:
        return gguf_to_hf_dir(path, out, dtype)
    except OSError:
        if (out / "config.json").is_file():  # another process finished the same conversion first
            return out
        raise
