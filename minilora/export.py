"""Take a fine-tune elsewhere: the adapter merged into its base model as 16-bit or bitsandbytes-4-bit safetensors
that transformers loads as they are, a GGUF for llama.cpp / Ollama, and an upload to the Hugging Face Hub.

    weights = LoRAWeights.from_model(model)          # after training, or LoRAWeights.from_dir("outputs/minilora")
    save_merged(weights, base_dir, "out/merged")                   # W = W₀ + s·B·A, in the base's own dtype
    save_merged(weights, base_dir, "out/merged-4bit", four_bit=True)
    save_gguf(weights, base_dir, "out/gguf", outtype="q8_0")
    push_to_hub("out/merged", "me/my-model", dry_run=True)         # [(path, bytes), ...]
    (the `lora` method, the adapter alone in PEFT's format, is minilora.adapter.save_adapter)

Merging, per targeted weight, in fp32 and rounded once to the base's dtype (s = α/r, or α/√r with rsLoRA):

    W [out, in] = W₀ [out, in] + s · B [out, r] · A [r, in]

W₀ is read again from the base checkpoint's safetensors, never taken from the model in memory: a QLoRA model
holds its base in NF4, and merging into that would bake the 4-bit rounding into every targeted weight, so the
merged model would be worse than the adapter on its base. When the base checkpoint is itself a pre-quantized
bitsandbytes 4-bit one there is no 16-bit original; we warn and merge into its dequantized weights.

Streaming: the output is planned from the safetensors headers (names, shapes, dtypes; no data read), cut into
shards of at most `max_shard_size` bytes, then written one shard at a time while the source files are read in
order and unmapped once done, so host memory stays around one source shard (mapped) plus one output shard.
Tensors the adapter does not touch are copied as they are: byte-identical to the source. One shard is
`model.safetensors`; more are `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, as
transformers writes them. Beside them: config.json (without quantization_config, or with bitsandbytes' for
4-bit), generation_config.json and the tokenizer files with the chat template.

`merged_4bit` quantizes what a bitsandbytes `load_in_4bit` load would (the q/k/v/o/gate/up/down projections) to
NF4 with double-quantized absmax, byte for byte as bitsandbytes would quantize the 16-bit merge (minilora.nf4),
and stores it in bitsandbytes' serialized layout. Re-quantizing loses accuracy against the 16-bit merge.

Every save goes into a temporary directory renamed at the end (minilora.atomic.save_atomic): an interrupted
export leaves no directory that looks complete, and an existing output is replaced only with overwrite=True.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from minilora.adapter import adapter_state_dict, lora_modules, read_adapter_config, read_adapter_weights
from minilora.atomic import save_atomic
from minilora.hub import resolve_checkpoint
from minilora.loading import PROJECTIONS, WeightFiles
from minilora.nf4 import (BNB_NF4_STATE, DTYPE_NAMES, bnb_meta, bnb_nf4_modules, dequantize_nf4, is_bnb_state_key,
                          nf4_to_bnb_state, quantize_nf4)

DEFAULT_SHARD_SIZE = "5GB"
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


# --- the adapter, from memory or from disk ----------------------------------------------------------------------

@dataclass
class LoRAWeights:
    """What a merge needs from an adapter, under the checkpoint's own tensor names (minilora keeps HF names)."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A [r, in], B [out, r], fp32; scale s)
    full: dict[str, torch.Tensor]  # tensor name -> trained value (modules_to_save; both names of a tied embedding)
    where: str  # the adapter, for error messages

    @classmethod
    def from_model(cls, model) -> LoRAWeights:
        lora = {n: (m.lora_A.weight.detach().float().cpu(), m.lora_B.weight.detach().float().cpu(), m.scaling)
                for n, m in lora_modules(model).items()}
        if not lora:
            raise ValueError("the model has no LoRA modules (call inject_lora first)")
        lora_keys = {f"{n}.lora_{ab}.weight" for n in lora for ab in "AB"}
        full = {n: t.cpu() for n, t in adapter_state_dict(model).items() if n not in lora_keys}
        return cls(lora, full, "the model in memory")

    @classmethod
    def from_dir(cls, adapter_dir: str | Path) -> LoRAWeights:
        """An adapter directory in PEFT's format, written by minilora or by PEFT."""
        cfg = read_adapter_config(adapter_dir)
        where = str(Path(adapter_dir) / "adapter_model.safetensors")
        if cfg.get("fan_in_fan_out"):
            raise ValueError(f"{Path(adapter_dir) / 'adapter_config.json'}: fan_in_fan_out adapters (GPT-2 Conv1D) "
                             f"are not supported")
        r, alpha = cfg["r"], cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        tensors = read_adapter_weights(adapter_dir)
        lora, full = {}, {}
        for name, t in tensors.items():
            module, sep, leaf = name.rpartition(".lora_")
            if not sep:
                full[name] = t
            elif leaf == "A.weight":
                b = tensors.get(f"{module}.lora_B.weight")
                if b is None:
                    raise ValueError(f"{where}: {name!r} has no matching {module}.lora_B.weight")
                lora[module] = (t.float(), b.float(), scale)
            elif leaf != "B.weight" or f"{module}.lora_A.weight" not in tensors:
                raise ValueError(f"{where}: tensor {name!r} is not a LoRA A/B pair that minilora can merge")
        if not lora:
            raise ValueError(f"{where}: no lora_A/lora_B tensors")
        return cls(lora, full, where)


# --- the base checkpoint ----------------------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict:
    """{name: {"dtype", "shape", "data_offsets"}} from a .safetensors file's JSON header; no tensor data read."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class BaseCheckpoint:
    """The base model on disk: tensor names, shapes and dtypes from the headers; data read one tensor at a time."""

    def __init__(self, source: str | Path):
        self.dir = resolve_checkpoint(source)
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: the base checkpoint has no config.json")
        self.config = json.loads(config_path.read_text())
        self.files = WeightFiles(self.dir)  # refuses pickle weights; names a missing shard
        self.header = {}
        for path in sorted(set(self.files.key_file.values())):
            self.header.update(safetensors_header(path))
        # modules stored in bitsandbytes' NF4 layout: "<module>.weight" plus "<module>.weight.<quant state>"
        self.bnb = set(bnb_nf4_modules(self.header))
        q = self.config.get("quantization_config")
        if q and not (q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit") and self.bnb):
            raise ValueError(f"{config_path}: quantization_config {q.get('quant_method')!r}: only 16-bit and "
                             f"bitsandbytes 4-bit base checkpoints can be merged")
        # the tensors to write, in file order (sequential reads); a 4-bit weight's quant state travels with it
        self.keys = sorted((k for k in self.header if not is_bnb_state_key(k, self.bnb)),
                           key=lambda k: (str(self.files.key_file[k]), k))

    def shape_dtype(self, key: str) -> tuple[list[int], torch.dtype | None]:
        """What the tensor is when 16-bit: a 4-bit weight's original shape and dtype come from its quant state."""
        if key.removesuffix(".weight") in self.bnb:
            state = key + BNB_NF4_STATE
            meta = bnb_meta(self.files.get(state), f"{self.files.key_file[state]}: {state}")
            return meta["shape"], getattr(torch, meta["dtype"])
        h = self.header[key]
        return h["shape"], SAFETENSORS_DTYPES.get(h["dtype"])

    def get(self, key: str) -> torch.Tensor:
        return self.files.get(key)


def check_adapter_fits(weights: LoRAWeights, base: BaseCheckpoint):
    """Every LoRA module and trained tensor must be a tensor of the base with the right shape; fail before writing."""
    where = f"{weights.where} on base {base.dir}"
    tied = "lm_head.weight" not in base.header  # the checkpoint stores the embedding once, for both
    for module, (a, b, _) in weights.lora.items():
        key = f"{module}.weight"
        if key not in base.header:
            hint = " (lm_head is tied to embed_tokens: LoRA on it cannot be merged)" if module == "lm_head" else ""
            raise ValueError(f"{where}: LoRA module {module!r} has no weight {key!r} in the base{hint}")
        shape, _ = base.shape_dtype(key)
        if list(shape) != [b.shape[0], a.shape[1]] or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: {module}: B {list(b.shape)} · A {list(a.shape)} does not fit the base "
                             f"weight {list(shape)}")
    for key, t in weights.full.items():
        if tied and key == "lm_head.weight":
            emb = weights.full.get("model.embed_tokens.weight")
            if emb is None or not torch.equal(emb, t):
                raise ValueError(f"{where}: lm_head.weight is trained apart from model.embed_tokens.weight, but the "
                                 f"base ties them (tie_word_embeddings); one merged tensor cannot hold both")
            continue
        if key not in base.header:
            raise ValueError(f"{where}: trained tensor {key!r} is not in the base checkpoint")
        if list(base.shape_dtype(key)[0]) != list(t.shape):
            raise ValueError(f"{where}: trained tensor {key!r} has shape {list(t.shape)}, the base has "
                             f"{list(base.shape_dtype(key)[0])}")
    if tied and "model.embed_tokens.weight" in weights.full and "lm_head.weight" not in weights.full:
        raise ValueError(f"{where}: embed_tokens is trained without lm_head, but the base ties them; saved by PEFT "
                         f"without ensure_weight_tying? One merged tensor cannot hold both")


# --- one output tensor at a time --------------------------------------------------------------------------------

def is_4bit_target(key: str) -> bool:
    """The weights a bitsandbytes load_in_4bit load quantizes: the linear projections (never lm_head)."""
    module, _, leaf = key.rpartition(".")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in PROJECTIONS


def output_tensors(key: str, base: BaseCheckpoint, weights: LoRAWeights, four_bit: bool) -> dict[str, torch.Tensor]:
    """The output tensor(s) for one base tensor: merged, replaced, dequantized, quantized or copied as is."""
    module = key.removesuffix(".weight")
    if module in base.bnb:
        if four_bit and module not in weights.lora:
            return base.files.bnb_state(key)  # untouched 4-bit weight: its NF4 bytes as they are, no second rounding
        q = base.files.nf4(key)
        w0, dtype = dequantize_nf4(q, torch.float32), q.dtype
    else:
        w0 = base.get(key)
        dtype = w0.dtype
    if module in weights.lora and key.endswith(".weight"):
        a, b, scale = weights.lora[module]
        w = torch.addmm(w0.float(), b, a, alpha=scale).to(dtype)  # W₀ + s·B·A in fp32, rounded once
    elif key in weights.full:
        w = weights.full[key].to(dtype, copy=True)  # a copy: a tied pair must not share storage in the file
    else:
        w = w0.to(dtype)  # the source bytes when 16-bit (no copy); a 4-bit weight dequantized
    if four_bit and is_4bit_target(key):
        return nf4_to_bnb_state(quantize_nf4(w), prefix=key)
    return {key: w}


def estimated_bytes(key: str, base: BaseCheckpoint, four_bit: bool) -> int:
    shape, dtype = base.shape_dtype(key)
    if dtype is None:  # integer or other exotic tensors are copied as stored
        return base.header[key]["data_offsets"][1] - base.header[key]["data_offsets"][0]
    n = math.prod(shape)
    if four_bit and is_4bit_target(key):
        return (n + 1) // 2 + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) + 1400  # codes, absmax, maps, JSON
    return n * dtype.itemsize


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard when the next tensor would overflow this one (a huge tensor sits alone)."""
    shards, current, used = [], [], 0
    for key, n in sizes:
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    return shards + [current] if current else shards


def parse_size(size: int | str) -> int:
    """5000000, "5GB" (10⁹) or "4GiB" (2³⁰) -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB', '500MB', '4GiB'")
    unit = (m.group(2) or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))


# --- writing a merged checkpoint --------------------------------------------------------------------------------

def write_weights(base: BaseCheckpoint, weights: LoRAWeights, out: Path, four_bit: bool,
                  max_shard_size: int | str) -> list[str]:
    """The weights as (sharded) safetensors in out; returns the file names."""
    plan = plan_shards([(k, estimated_bytes(k, base, four_bit)) for k in base.keys], parse_size(max_shard_size))
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    weight_map, total, previous = {}, 0, None
    for name, keys in zip(names, plan):
        tensors = {}  # one output shard: what host memory holds
        for key in keys:
            where = base.files.key_file[key]
            if previous is not None and where != previous:
                base.files.release(previous)  # a source file read to the end is unmapped
            previous = where
            tensors.update(output_tensors(key, base, weights, four_bit))
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def bnb_quantization_config(compute_dtype: torch.dtype) -> dict:
    """The quantization_config transformers writes for a load_in_4bit NF4 model (BitsAndBytesConfig.to_dict)."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def write_configs(base: BaseCheckpoint, out: Path, four_bit: bool, tokenizer=None, chat_template: str | None = None):
    """config.json, generation_config.json, the tokenizer's files and the chat template."""
    config = {k: v for k, v in base.config.items() if k != "quantization_config"}
    if four_bit:
        dtypes = [base.shape_dtype(k)[1] for k in base.keys if is_4bit_target(k)]
        config["quantization_config"] = bnb_quantization_config(dtypes[0] if dtypes else torch.bfloat16)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is None and ((base.dir / "tokenizer.json").is_file() or (base.dir / "tokenizer.model").is_file()):
        from minilora.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(base.dir)
    if tokenizer is not None:
        tokenizer.save(out)  # tokenizer.json / .model, tokenizer_config.json, chat_template.jinja, ...
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    # the base's generation_config.json holds its stop ids and sampling defaults; else what transformers derives
    if (base.dir / "generation_config.json").is_file():
        shutil.copyfile(base.dir / "generation_config.json", out / "generation_config.json")
    elif not (out / "generation_config.json").is_file():
        gen = {k: base.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base.config}
        (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **gen}, indent=2) + "\n")


def write_merged(weights: LoRAWeights, base: BaseCheckpoint, out: Path, four_bit: bool = False,
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE, tokenizer=None, chat_template: str | None = None):
    """The merged checkpoint into `out` (created), not atomically: see save_merged."""
    check_adapter_fits(weights, base)
    if base.bnb:
        warnings.warn(f"{base.dir}: the base is a pre-quantized bitsandbytes 4-bit checkpoint, with no 16-bit "
                      f"original to merge into; merging into its dequantized NF4 weights, which keeps their "
                      f"quantization error. Pass the 16-bit base checkpoint for an exact merge.", stacklevel=2)
    if four_bit:
        warnings.warn("merged_4bit re-quantizes the merged weights to NF4: it is less accurate than merged_16bit "
                      "(and than the adapter on its base); use merged_16bit where accuracy matters.", stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(base, weights, out, four_bit, max_shard_size)
    write_configs(base, out, four_bit, tokenizer, chat_template)


def save_merged(weights: LoRAWeights, base: str | Path, out_dir: str | Path, four_bit: bool = False,
                max_shard_size: int | str = DEFAULT_SHARD_SIZE, tokenizer=None, chat_template: str | None = None,
                overwrite: bool = False) -> Path:
    """merged_16bit (or merged_4bit with four_bit) into out_dir, atomically. `base` is the checkpoint the adapter
    was trained on (dir, Hub id or .gguf); `tokenizer` (a minilora Tokenizer) defaults to the base's, and
    `chat_template` (Jinja source) replaces its template when given."""
    src = BaseCheckpoint(base)
    return save_atomic(lambda tmp: write_merged(weights, src, tmp, four_bit, max_shard_size, tokenizer,
                                                chat_template), out_dir, overwrite)


def save_gguf(weights: LoRAWeights, base: str | Path, out_dir: str | Path, outtype: str = "f16", tokenizer=None,
              chat_template: str | None = None, overwrite: bool = False) -> Path:
    """model-<outtype>.gguf and an Ollama Modelfile in out_dir, converted from a temporary 16-bit merge."""
    from minilora.gguf_export import export_gguf  # the GGUF writer (needs the optional `gguf` package)
    src = BaseCheckpoint(base)

    def write(tmp: Path):
        merged = tmp / Path(out_dir).name  # its name becomes the GGUF's general.name
        write_merged(weights, src, merged, tokenizer=tokenizer, chat_template=chat_template)
        export_gguf(merged, tmp / f"model-{outtype}.gguf", outtype=outtype, tokenizer_dir=merged)
        shutil.rmtree(merged)

    return save_atomic(write, out_dir, overwrite)


# --- the Hub ----------------------------------------------------------------------------------------------------

def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                ignore_patterns: list[str] | None = None, dry_run: bool = False) -> list[tuple[str, int]]:
    """Upload a saved folder to the Hub repo `repo_id` (created if missing). The token is `token`, else HF_TOKEN
    or the saved `hf auth login`. Returns the (path, bytes) uploaded; with dry_run, what would be, without any
    network access. `ignore_patterns` (e.g. ["checkpoint-*/*"]) are fnmatch patterns on the relative paths."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: nothing to upload (not a directory)")
    ignore = [*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [(p, (folder / p).stat().st_size) for p in filter_repo_objects(paths, ignore_patterns=ignore)]
    if dry_run:
        return files
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=ignore_patterns,
                          commit_message=f"Upload {folder.name} with minilora")
    except Exception as e:  # network, auth, permissions: all end here
        raise RuntimeError(f"could not upload {folder} to the Hub repo {repo_id!r} ({type(e).__name__}: {e}). Set "
                           f"HF_TOKEN to a token with write access, or check the repo name.") from e
    return files
