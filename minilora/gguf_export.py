"""Write a merged 16-bit Hugging Face checkpoint as a GGUF file (llama.cpp's format), plus an Ollama Modelfile.

    export_gguf("out/merged_16bit", "out/gguf/model-f16.gguf", outtype="f16")   # also writes out/gguf/Modelfile
    # then:  cd out/gguf && ollama create my-model -f Modelfile

## Smaller files: q4_k_m with llama.cpp's `llama-quantize`

minilora writes `f16`, `bf16` and `q8_0` itself. The k-quants (`q4_k_m`, `q5_k_m`, `q6_k`, ...) choose a type per
tensor and search scales, which is llama.cpp's job; quantize the f16 file with its `llama-quantize` tool:

    # get llama-quantize: a llama.cpp release archive, `brew install llama.cpp`, or build it:
    git clone https://github.com/ggml-org/llama.cpp && cd llama.cpp
    cmake -B build && cmake --build build --config Release -t llama-quantize
    # f16 in, q4_k_m out (the last argument is the type; `llama-quantize --help` lists them all)
    ./build/bin/llama-quantize out/gguf/model-f16.gguf out/gguf/model-q4_k_m.gguf q4_k_m

Quantize from `f16` (or `bf16`), never from `q8_0`: re-quantizing stacks two rounding errors. The metadata (tokenizer,
chat template) is copied as is; to serve the smaller file with Ollama, change `FROM` in the Modelfile to it.

## What the conversion does

It mirrors llama.cpp's convert_hf_to_gguf.py, so llama.cpp, Ollama and LM Studio read the file like one made by
llama.cpp itself, and it is the exact inverse of minilora/gguf.py (which reads GGUF), whose name tables and
permutation it reuses:

  1. names   model.layers.N.self_attn.q_proj.weight -> blk.N.attn_q.weight   (minilora.gguf's tables, inverted)
  2. Q/K     the Llama architecture permutes each head's q/k rows from HF's rotate-half layout (x0..x31 | y0..y31)
             to llama.cpp's interleaved pairs (x0 y0 x1 y1 ...); Qwen and Gemma are not permuted
  3. norms   Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
  4. types   2-D weights in the chosen type; 1-D tensors and norms stay float32 (llama.cpp's kernels want them so);
             q8_0 rows whose length is not a multiple of 32 fall back to f16, as in llama.cpp
  5. config  config.json as `<arch>.*` metadata (block_count, head counts, RoPE, sliding window, softcaps, ...);
             Llama 3.1 RoPE scaling as a `rope_freqs.weight` tensor of per-frequency divisors
  6. tokens  tokenizer.json as `tokenizer.ggml.*`: the vocabulary by id (padded with [PAD{i}] up to the embedding's
             rows), token types, merges, the pre-tokenizer's name, special ids, and the chat template

Tensors are converted one at a time and streamed to a temporary file that is renamed at the end: memory stays around
one tensor, and an interrupted export never leaves a file at `out_path`.

Where llama.cpp fixes in code what a config can change (Gemma's attention scale and layer pattern, sliding windows
it ignores), the export warns: the file cannot say it, so llama.cpp will run the model its own way.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minilora.atomic import atomic_path
from minilora.config import ModelConfig, rope_inv_freq
from minilora.gguf import (LAYER_NAMES, NORM_PLUS_ONE, PERMUTED_QK, PRE_TOKENIZER_SPLITS, SANDWICH, SANDWICH_NAMES,
                           TOP_NAMES, permute_qk)
from minilora.tokenizer import Tokenizer

# config.json model_type -> GGUF general.architecture (convert_hf_to_gguf.py's classes: MistralForCausalLM is a
# LlamaModel, Gemma3ForCausalLM a Gemma3Model)
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
              "gemma2": "gemma2", "gemma3_text": "gemma3"}
OUTTYPES = ("f16", "bf16", "q8_0")
# Split regexes of minilora.gguf.PRE_TOKENIZER_SPLITS -> the name llama.cpp gives them in tokenizer.ggml.pre
PRE_NAMES = {PRE_TOKENIZER_SPLITS["llama-bpe"]: "llama-bpe", PRE_TOKENIZER_SPLITS["qwen2"]: "qwen2",
             PRE_TOKENIZER_SPLITS["gpt-4o"]: "gpt-4o"}
Q8_BLOCK = 32  # values per Q8_0 block


class GGUFExportError(ValueError):
    pass


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("writing GGUF files needs the `gguf` package: pip install gguf "
                          "(or pip install 'minilora[gguf]')") from None
    return gguf


def export_gguf(model_dir: Path, out_path: Path, outtype: str = "f16", tokenizer_dir: Path | None = None,
                overwrite: bool = False, modelfile: bool = True) -> Path:
    """Write `model_dir` (config.json, *.safetensors, tokenizer files) as one GGUF file at `out_path`, and an
    Ollama `Modelfile` beside it (unless `modelfile=False`). Refuses to replace either unless `overwrite`, so
    export each outtype into its own directory. Returns `out_path`."""
    gguf = _gguf()
    model_dir, out = Path(model_dir), Path(out_path)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)} "
                              "(for q4_k_m and other k-quants, run llama-quantize on the f16 file)")
    modelfile_path = out.parent / "Modelfile"
    for p in [out, *([modelfile_path] if modelfile else [])]:
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True (--overwrite) to replace it")
    cfg = _read_config(model_dir)
    arch = GGUF_ARCHS[cfg.model_type]
    for caveat in llamacpp_caveats(cfg, arch):
        warnings.warn(f"{model_dir / 'config.json'}: {caveat}", stacklevel=2)
    plan = plan_tensors(_weight_index(model_dir), cfg, arch, outtype, model_dir)
    tok = Tokenizer.from_dir(tok_dir)

    # the writer is closed (flushed) before atomic_path renames its file into place
    with atomic_path(out, overwrite) as tmp, closing(gguf.GGUFWriter(tmp, arch)) as writer:
        add_model_metadata(writer, cfg, arch, outtype, name=model_dir.resolve().name)
        add_bos = add_tokenizer_metadata(writer, tok_dir, arch, cfg.vocab_size, tok.chat_templates)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plan, cfg, arch)
        text = modelfile_text(out.name, tok, add_bos) if modelfile else None
    if text is not None:
        with atomic_path(modelfile_path, overwrite=True) as mtmp:  # checked above; the GGUF is already in place
            mtmp.write_text(text, encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------------ config


def _read_config(model_dir: Path) -> ModelConfig:
    cfg = ModelConfig.from_file(model_dir)  # clear errors for a missing or malformed config.json
    if cfg.model_type not in GGUF_ARCHS:
        raise GGUFExportError(f"{model_dir / 'config.json'}: model_type {cfg.model_type!r} has no GGUF export; "
                              f"supported: {', '.join(GGUF_ARCHS)}")
    return cfg


def llamacpp_caveats(cfg: ModelConfig, arch: str) -> list[str]:
    """What this config asks for that a GGUF cannot say, so llama.cpp (llama-model.cpp) will do otherwise."""
    out = []
    slides = "sliding_attention" in cfg.layer_types
    if slides and arch in ("llama", "qwen2", "qwen3"):
        out.append(f"sliding_window={cfg.sliding_window}: llama.cpp runs {arch} with full attention in every layer")
    if arch in ("gemma2", "gemma3"):
        big = cfg.num_hidden_layers == (46 if arch == "gemma2" else 62)  # the 27B models
        want = cfg.hidden_size // cfg.num_attention_heads if big else cfg.head_dim
        if cfg.query_pre_attn_scalar != want:
            out.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}: llama.cpp scales scores by {want}**-0.5")
        pattern = 2 if arch == "gemma2" else 6  # llama.cpp's swa pattern: 1 sliding, 1 global / 5 sliding, 1 global
        fixed = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg.num_hidden_layers)]
        if cfg.layer_types != fixed:
            out.append(f"layer_types differ from llama.cpp's fixed {arch} pattern (every {pattern}th layer global)")
    if arch == "gemma3" and slides:
        local = cfg.rope["sliding_attention"]
        if local["rope_type"] != "default" or local["rope_theta"] != 10000.0:
            out.append(f"sliding layers' RoPE {local}: llama.cpp uses plain RoPE with base 10000 there")
    if cfg.rope["full_attention"]["rope_type"] == "dynamic":
        out.append("rope_type 'dynamic' has no GGUF form: llama.cpp runs plain RoPE (same within "
                   "max_position_embeddings)")
    return out


def add_model_metadata(w, cfg: ModelConfig, arch: str, outtype: str, name: str):
    """`general.*` and `<arch>.*` keys: convert_hf_to_gguf.py's TextModel.set_gguf_parameters and the Llama /
    Gemma overrides. Head dims and RoPE dims are written for every family (llama.cpp derives the same values)."""
    gguf = _gguf()
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope["full_attention"]  # Gemma 3: the global layers' RoPE; the sliding ones are fixed in llama.cpp
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", cfg.max_position_embeddings))
        for key, add in (("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma3" and cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------------------------- tensors


@dataclass
class TensorPlan:
    name: str  # GGUF name
    source: str | None  # HF name, or None for a tensor made from the config (rope_freqs)
    file: Path | None
    shape: tuple[int, ...]  # torch order [out, in]
    ggml_type: object  # gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = _gguf().GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape) // block * size


def gguf_tensor_name(hf_name: str, arch: str) -> str | None:
    """The GGUF name of an HF state-dict key (inverse of minilora.gguf.hf_tensor_name), or None if it has none."""
    stem, _, suffix = hf_name.rpartition(".")  # "model.layers.3.self_attn.q_proj", "weight"
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem):
        leaves = {hf: g for g, hf in LAYER_NAMES.items()}
        if arch in SANDWICH:  # Gemma 2/3: post_attention_layernorm and the norms around the MLP
            leaves.update({hf: g for g, hf in SANDWICH_NAMES.items()})
        return f"blk.{m[1]}.{leaves[m[2]]}.{suffix}" if m[2] in leaves else None
    tops = {hf: g for g, hf in TOP_NAMES.items()}
    return f"{tops[stem]}.{suffix}" if stem in tops else None


def ggml_type_for(name: str, shape: tuple[int, ...], outtype: str):
    """convert_hf_to_gguf.py prepare_tensors: 1-D tensors and norms in F32; weights in the chosen type."""
    T = _gguf().GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    if outtype == "q8_0":
        return T.Q8_0 if shape[-1] % Q8_BLOCK == 0 else T.F16  # llama.cpp falls back to F16 on a QuantError
    return T.F16 if outtype == "f16" else T.BF16


def _weight_index(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF name -> (safetensors file, shape), from the headers only."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (export needs a merged 16-bit checkpoint)")
    out = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in {index.name} but missing")
        with safe_open(f, "pt") as s:
            out.update({k: (f, tuple(s.get_slice(k).get_shape())) for k in s.keys()})
    return out


def plan_tensors(weights: dict, cfg: ModelConfig, arch: str, outtype: str, where: Path) -> list[TensorPlan]:
    """Every tensor the file will hold, in order: embedding, layers, final norm, output; rope_freqs first.
    `weights` is _weight_index's; `where` the checkpoint, for error messages."""
    if any(k.endswith((".quant_state.bitsandbytes__nf4", ".absmax")) for k in weights):
        raise GGUFExportError(f"{where}: the checkpoint holds bitsandbytes 4-bit weights; export GGUF from a merged "
                              "16-bit checkpoint (save_method merged_16bit)")
    plan, unknown = [], []
    for hf, (f, shape) in weights.items():
        if hf.endswith(".rotary_emb.inv_freq") or (hf == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # recomputed from the config / llama.cpp writes output.weight only when it is not tied
        name = gguf_tensor_name(hf, arch)
        if name is None:
            unknown.append(hf)
            continue
        plan.append(TensorPlan(name, hf, f, shape, ggml_type_for(name, shape, outtype)))
    if unknown:
        raise GGUFExportError(f"{where}: {len(unknown)} tensors have no GGUF name for architecture {arch!r}: "
                              f"{unknown[:5]}")
    if not cfg.tie_word_embeddings and "lm_head.weight" not in weights:
        raise GGUFExportError(f"{where}: tie_word_embeddings is false but the weights have no lm_head.weight")
    if "model.embed_tokens.weight" not in weights:
        raise GGUFExportError(f"{where}: the weights have no model.embed_tokens.weight")
    rows = weights["model.embed_tokens.weight"][1][0]
    if rows != cfg.vocab_size:  # the token list is padded to the embedding's rows, so they must agree
        raise GGUFExportError(f"{where}: model.embed_tokens.weight has {rows} rows, config.json says "
                              f"vocab_size={cfg.vocab_size}")
    plan.sort(key=_file_order)
    if cfg.rope["full_attention"]["rope_type"] == "llama3":
        plan.insert(0, TensorPlan("rope_freqs.weight", None, None, (cfg.head_dim // 2,),
                                  _gguf().GGMLQuantizationType.F32))
    return plan


def _file_order(t: TensorPlan) -> tuple[int, str]:
    """token_embd, then block by block, then output_norm and output (the order llama.cpp's files have)."""
    if t.name.startswith("blk."):
        return int(t.name.split(".")[1]), t.name
    return (-1 if t.name.startswith("token_embd") else 1 << 30), t.name


def llama3_rope_divisors(cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1 RoPE scaling as llama.cpp applies it: each frequency divided by a stored factor (LlamaModel.
    generate_extra_tensors); here plain over scaled frequencies, from minilora's own RoPE code. [head_dim/2]"""
    p = cfg.rope["full_attention"]
    plain, _ = rope_inv_freq({"rope_type": "default", "rope_theta": p["rope_theta"]}, cfg.head_dim,
                             cfg.max_position_embeddings)
    scaled, _ = rope_inv_freq(p, cfg.head_dim, cfg.max_position_embeddings)
    return (plain / scaled).float()


def convert_weight(w: torch.Tensor, hf_name: str, cfg: ModelConfig, arch: str) -> np.ndarray:
    """One HF tensor as llama.cpp stores it, float32, before the cast to the file's type."""
    w = w.float()
    if arch in PERMUTED_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias")):  # weight [H*D, hidden], bias [H*D]
        w = permute_qk(w, cfg.num_attention_heads)
    elif arch in PERMUTED_QK and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        w = permute_qk(w, cfg.num_key_value_heads)
    if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
        w = w + 1.0  # GemmaModel.modify_tensors: the file stores the (1 + w) the RMSNorm multiplies by
    return w.contiguous().numpy()


def _write_tensors(writer, plan: list[TensorPlan], cfg: ModelConfig, arch: str):
    from safetensors import safe_open

    quantize = _gguf().quants.quantize
    handles = {}  # one open (memory-mapped) handle per shard
    for t in plan:
        if t.source is None:
            x = llama3_rope_divisors(cfg).numpy()
        else:
            if t.file not in handles:
                handles[t.file] = safe_open(t.file, "pt")
            x = convert_weight(handles[t.file].get_tensor(t.source), t.source, cfg, arch)
        writer.write_tensor_data(quantize(x, t.ggml_type))  # F16/BF16/Q8_0 bytes, bit-exact with ggml's


# --------------------------------------------------------------------------------------------------- tokenizer


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py does_token_look_special: added tokens some checkpoints forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))  # deepseek-coder
            or (token.startswith("<unused") and token.endswith(">")))  # Gemma


def _pre_tokenizer_name(tj: dict, path: Path) -> str:
    """tokenizer.ggml.pre for a byte-level BPE: llama.cpp names pre-tokenizers by what they split on (it hashes
    the ids of a probe text; we read the regex from tokenizer.json instead)."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split" and (p.get("pattern") or {}).get("Regex") in PRE_NAMES:
            return PRE_NAMES[p["pattern"]["Regex"]]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM's digit-by-digit split (transformers' GGUF reader falls back to GPT-2's regex)
    raise GGUFExportError(f"{path}: pre_tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows by name "
                          f"(recognised: GPT-2's ByteLevel regex, SmolLM's, and the Split regexes of "
                          f"{', '.join(sorted(PRE_NAMES.values()))})")


def _merge_scores(tj: dict, vocab: list[str]) -> list[float]:
    """Scores for a SentencePiece-style vocabulary without its tokenizer.model: llama.cpp's SPM tokenizer merges
    the adjacent pair whose *result* scores highest, so a token scores minus the rank of its first merge."""
    rank = {}
    for i, m in enumerate(tj["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, i)
    return [-float(rank[t]) if t in rank else 0.0 for t in vocab]


def add_tokenizer_metadata(w, tok_dir: Path, arch: str, n_vocab: int, chat_templates: dict[str, str]) -> bool:
    """`tokenizer.ggml.*` from tokenizer.json (+ tokenizer_config.json): convert_hf_to_gguf.py's get_vocab_base /
    _create_vocab_sentencepiece, read without transformers. `chat_templates` as minilora.tokenizer reads them
    (transformers' precedence: chat_template.jinja first). Returns add_bos_token."""
    gguf = _gguf()
    T = gguf.TokenType
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF export needs the tokenizer as tokenizer.json")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{path}: model.type {model.get('type')!r}; GGUF export supports BPE tokenizers")
    byte_level = "ByteLevel" in json.dumps(tj.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tj.get("decoder"))
    if not byte_level and not model.get("byte_fallback"):
        raise GGUFExportError(f"{path}: neither byte-level BPE (GPT-2 style) nor SentencePiece-style BPE with "
                              "byte fallback; llama.cpp has no tokenizer for it")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= n_vocab:
        raise GGUFExportError(f"{path}: token id {max(by_id)} does not fit the model's {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:  # embedding rows past the tokenizer (padded vocabularies): llama.cpp's placeholders
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added and (added[i].get("special") or _looks_special(tok)):
            tokens.append(tok)
            types.append(T.CONTROL)
        elif i in added:  # llama.cpp "pre-normalizes" user-defined tokens' spaces (Gemma's "▁▁" tokens)
            tokens.append(tok.replace("\u2581", " "))
            types.append(T.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(T.BYTE if not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok) else
                         T.UNKNOWN if tok == model.get("unk_token") else T.NORMAL)
    gemma = arch.startswith("gemma")
    w.add_tokenizer_model("gpt2" if byte_level else "llama")
    w.add_tokenizer_pre(_pre_tokenizer_name(tj, path) if byte_level else "default")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    if not byte_level:
        w.add_token_scores(_merge_scores(tj, tokens))
        if gemma:
            w.add_add_space_prefix(False)
    # merges (written for SentencePiece-style vocabularies too: llama.cpp ignores them there, transformers and
    # minilora rebuild the tokenizer from them exactly), bos/eos/unk/pad ids, add_bos_token: llama.cpp's own reader
    # of tokenizer.json / tokenizer_config.json / config.json
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=n_vocab)
    special.chat_template = (chat_templates.get("default") if set(chat_templates) <= {"default"} else
                             [{"name": k, "template": v} for k, v in chat_templates.items()])
    special.add_to_gguf(w, quiet=True)
    return bool(special.add_special_token.get("bos", False))


# ------------------------------------------------------------------------------------------------------ Ollama


@dataclass
class ChatTurns:
    """A chat template read as fixed text around each turn."""
    preamble: str  # before the first turn when there is no system message (bos, a default system prompt, ...)
    user: tuple[str, str]  # (before, after) the content
    assistant: tuple[str, str]
    generation: str  # the generation prompt
    system: tuple[str, str] | None  # own turn: (before, after), replacing the preamble
    system_sep: str | None  # or folded into the first user message: system + sep + content (Gemma)


PROBES = dict(system="SYSPROBE1", u1="USERPROBE1", a1="ASSISTPROBE1", u2="USERPROBE2", a2="ASSISTPROBE2",
              u3="USERPROBE3")


def chat_turns(template: str, **specials) -> ChatTurns | None:
    """Read the turns off the Jinja template by rendering probe conversations; None when the result is not fixed
    text around each message (then no TEMPLATE is written). Checked by re-rendering a longer conversation."""
    from minilora.chat_templates import render

    P = PROBES
    s = {"role": "system", "content": P["system"]}

    def u(content):
        return {"role": "user", "content": content}

    def a(content):
        return {"role": "assistant", "content": content}

    def r(messages, gen=False):
        return render(template, messages, add_generation_prompt=gen, **specials)

    try:
        one, one_gen = r([u(P["u1"])]), r([u(P["u1"])], gen=True)
        two, three = r([u(P["u1"]), a(P["a1"])]), r([u(P["u1"]), a(P["a1"]), u(P["u2"])])
        if not (one_gen.startswith(one) and two.startswith(one) and three.startswith(two)):
            return None
        a_turn, u_turn = two[len(one):], three[len(two):]
        if a_turn.count(P["a1"]) != 1 or u_turn.count(P["u2"]) != 1:
            return None
        user, assistant = tuple(u_turn.split(P["u2"])), tuple(a_turn.split(P["a1"]))
        first = user[0] + P["u1"] + user[1]
        if not one.endswith(first):
            return None
        turns = ChatTurns(one[:-len(first)], user, assistant, one_gen[len(one):], None, None)
        try:
            with_sys = r([s, u(P["u1"])])
        except Exception:  # a template that refuses system messages
            with_sys = None
        if with_sys and with_sys.endswith(first) and with_sys[:-len(first)].count(P["system"]) == 1:
            turns.system = tuple(with_sys[:-len(first)].split(P["system"]))
        elif with_sys and with_sys.startswith(turns.preamble + user[0] + P["system"]) and \
                with_sys.endswith(P["u1"] + user[1]):
            turns.system_sep = with_sys[len(turns.preamble + user[0] + P["system"]):-len(P["u1"] + user[1])]
        convo = [u(P["u1"]), a(P["a1"]), u(P["u2"]), a(P["a2"]), u(P["u3"])]
        ok = emulate(turns, convo) == r(convo, gen=True)
        if turns.system or turns.system_sep is not None:
            ok = ok and emulate(turns, [s, *convo]) == r([s, *convo], gen=True)
    except Exception:  # a template we cannot render with probes (tools required, odd raise_exception rules, ...)
        return None
    return turns if ok else None


def emulate(t: ChatTurns, messages: list[dict]) -> str:
    """What the Go template from `ollama_template(t)` renders, written in Python (to check it against Jinja)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # Ollama joins them so
    out = t.system[0] + system + t.system[1] if system and t.system else t.preamble
    pending = system if t.system_sep is not None else ""
    for m in messages:
        if m["role"] == "user":
            out += t.user[0] + (pending + t.system_sep if pending else "") + m["content"] + t.user[1]
            pending = ""
        elif m["role"] == "assistant":
            out += t.assistant[0] + m["content"] + t.assistant[1]
    return out + t.generation


def ollama_template(t: ChatTurns) -> str:
    """Ollama's TEMPLATE (Go text/template over .System and .Messages) for these turns."""
    lit = lambda s: s.replace("{{", '{{ "{{" }}')  # literal text; only "{{" means something to Go
    if t.system:
        head = ("{{ if .System }}" + lit(t.system[0]) + "{{ .System }}" + lit(t.system[1])
                + ("{{ else }}" + lit(t.preamble) if t.preamble else "") + "{{ end }}")
    elif t.system_sep is not None:
        head = "{{ $system := .System }}" + lit(t.preamble)
    else:
        head = lit(t.preamble)
    fold = ('{{ if $system }}{{ $system }}' + lit(t.system_sep) + '{{ $system = "" }}{{ end }}'
            if t.system_sep is not None else "")
    return (head + '{{ range .Messages }}{{ if eq .Role "user" }}' + lit(t.user[0]) + fold + "{{ .Content }}"
            + lit(t.user[1]) + '{{ else if eq .Role "assistant" }}' + lit(t.assistant[0]) + "{{ .Content }}"
            + lit(t.assistant[1]) + "{{ end }}{{ end }}" + lit(t.generation))


def modelfile_text(gguf_name: str, tok: Tokenizer, add_bos: bool) -> str:
    """An Ollama Modelfile: FROM the file, TEMPLATE from the chat template, a stop per end-of-turn token."""
    lines = ["# Ollama: ollama create <name> -f Modelfile   (written by minilora)", f"FROM ./{gguf_name}"]
    turns = None
    if tok.chat_template:
        turns = chat_turns(tok.chat_template, **{k: v for k, v in (("bos_token", tok.bos_token),
                                                                    ("eos_token", tok.eos_token)) if v})
    if turns is not None:
        if add_bos and tok.bos_token:  # llama.cpp adds BOS itself; keeping the template's would double it
            turns.preamble = turns.preamble.removeprefix(tok.bos_token)
            if turns.system:
                turns.system = (turns.system[0].removeprefix(tok.bos_token), turns.system[1])
        template = ollama_template(turns)
        if '"""' not in template:
            lines.append(f'TEMPLATE """{template}"""')
        else:
            turns = None
    if turns is None and tok.chat_template:
        lines.append("# no TEMPLATE: the chat template is not fixed text around each turn; Ollama may pick one "
                     "from the file's tokenizer.chat_template")
    stops = [tok.id_to_token(i) for i in tok.eos_token_ids]
    if turns is not None and tok.token_to_id(turns.assistant[1].strip()) is not None:
        stops.append(turns.assistant[1].strip())  # the end-of-turn marker (<|im_end|>, <end_of_turn>, <|eot_id|>)
    for s in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    return "\n".join(lines) + "\n"
