"""Load a checkpoint into a minilora model: build on the meta device, then materialise each tensor straight from
the memory-mapped safetensors file into the target device and dtype, one at a time.

    model = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")             # Hub id, local dir, or .gguf
    model = load_model(path, device="cuda", load_in_4bit=True)            # NF4 while streaming: q/k/v/o/gate/up/down

Memory: host memory holds at most one tensor beyond what the target keeps (the file is mmapped, never read whole);
the GPU holds the model plus one tensor in flight. With `load_in_4bit` each projection arrives in the compute dtype,
is quantized on the device and freed, so peak GPU memory is the 4-bit footprint plus one 16-bit weight.

Pre-quantized bitsandbytes checkpoints (the `*-bnb-4bit` repos) load too: their NF4 bytes are used as they are.
Every failure names the file; nothing half-loaded is returned (the model object is dropped with the exception).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from minilora.config import ModelConfig
from minilora.hub import resolve_checkpoint
from minilora.lora import DEFAULT_TARGETS as PROJECTIONS  # the seven projections a 4-bit load quantizes
from minilora.lora import LoRALinear, replace_linears_for_4bit
from minilora.models import build_model
from minilora.nf4 import NF4Tensor, bnb_nf4_modules, is_bnb_state_key, nf4_from_bnb_state

# Keys some checkpoints carry that are not weights (old Llama exports saved RoPE's inverse frequencies).
IGNORED_KEYS = re.compile(r"\.rotary_emb\.inv_freq$")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


class CheckpointError(ValueError):
    pass


def default_dtype(device) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class WeightFiles:
    """Which file holds which tensor, and lazy access to each through safetensors' mmap."""

    def __init__(self, ckpt: Path, allow_pickle: bool = False):
        self.ckpt = ckpt
        self.key_file: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        index = ckpt / "model.safetensors.index.json"
        shards = sorted(ckpt.glob("*.safetensors"))
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name in sorted(set(weight_map.values())):
                if not (ckpt / name).is_file():
                    raise FileNotFoundError(f"{ckpt / name}: shard listed in {index.name} is missing")
            self.key_file = {k: ckpt / f for k, f in weight_map.items()}
        elif shards:
            for shard in shards:
                for key in self._open(shard).keys():
                    self.key_file[key] = shard
        else:
            self._load_pickle(ckpt, allow_pickle)

    def _load_pickle(self, ckpt: Path, allow_pickle: bool):
        found = [ckpt / n for n in PICKLE_NAMES if (ckpt / n).is_file()] + sorted(ckpt.glob("pytorch_model-*.bin"))
        if not found:
            raise FileNotFoundError(f"{ckpt}: no weights (*.safetensors or model.safetensors.index.json)")
        if not allow_pickle:
            raise CheckpointError(
                f"{found[0]}: pickle weights can execute code when loaded; minilora reads safetensors. Convert the "
                f"checkpoint, or pass allow_pickle=True (--allow_pickle) if you trust its source.")
        self._pickled = {}
        for f in (p for p in found if not p.name.endswith(".json")):
            for k, t in torch.load(f, map_location="cpu", mmap=True, weights_only=True).items():
                self._pickled[k], self.key_file[k] = t, f

    def _open(self, path: Path):
        from safetensors import safe_open
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[path]

    def release(self, path: Path):
        """Unmap a file whose tensors are all read: its pages stop counting against this process."""
        self._handles.pop(path, None)

    def get(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        try:
            return self._open(self.key_file[key]).get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.key_file[key]}: cannot read tensor {key!r} ({e})") from None

    def bnb_state(self, key: str) -> dict[str, torch.Tensor]:
        """A bitsandbytes 4-bit weight's tensors as stored: `key` (the packed bytes) and its `key.*` quant state."""
        return {k: self.get(k) for k in self.key_file if k == key or k.startswith(key + ".")}

    def nf4(self, key: str) -> NF4Tensor:
        """A bitsandbytes 4-bit weight as an NF4Tensor; an unsupported variant (FP4, no nested absmax, another
        blocksize) or a missing or misshapen tensor raises ValueError naming the file and the tensor."""
        return nf4_from_bnb_state(self.bnb_state(key), prefix=key, where=str(self.key_file[key]))


def load_model(source, device="cpu", dtype: torch.dtype | None = None, load_in_4bit: bool = False,
               allow_pickle: bool = False) -> nn.Module:
    ckpt = resolve_checkpoint(source)
    config = ModelConfig.from_file(ckpt)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    files = WeightFiles(ckpt, allow_pickle)
    prequantized = _bnb_modules(config, files)
    with torch.device("meta"):
        model = build_model(config)
    four_bit = {}  # module name -> LoRALinear placeholder that takes an NF4 weight
    if prequantized or load_in_4bit:
        targets = prequantized or [n for n, m in model.named_modules()
                                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS]
        replace_linears_for_4bit(model, targets)
        four_bit = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    _materialize(model, files, four_bit, device, dtype, quantize=load_in_4bit and not prequantized)
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint has no tensor for {len(missing)} model keys, e.g. {missing[:5]}")
    return model.eval()


def _bnb_modules(config: ModelConfig, files: WeightFiles) -> list[str]:
    """Module names stored in bitsandbytes' serialized 4-bit format (empty for a 16-bit checkpoint)."""
    q = config.raw.get("quantization_config")
    if not q:
        return []
    where = files.ckpt / "config.json"
    if q.get("quant_method") != "bitsandbytes" or q.get("load_in_8bit"):
        raise CheckpointError(f"{where}: quantization_config {q.get('quant_method')!r} is not supported; minilora "
                              f"loads 16-bit checkpoints and bitsandbytes 4-bit (NF4) ones")
    if q.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise CheckpointError(f"{where}: bnb_4bit_quant_type {q['bnb_4bit_quant_type']!r} is not supported (NF4 only)")
    mods = bnb_nf4_modules(files.key_file)
    if not mods:
        raise CheckpointError(f"{where}: says load_in_4bit, but no tensor carries a bitsandbytes NF4 quant state")
    return mods


def _materialize(model: nn.Module, files: WeightFiles, four_bit: dict, device, dtype, quantize: bool):
    targets = {n: t for n, t in [*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False)]}
    tied = "lm_head.weight" if model.config.tie_word_embeddings else None
    previous = None
    for key in sorted(files.key_file, key=lambda k: (str(files.key_file[k]), k)):  # file order: sequential reads
        where = files.key_file[key]
        if previous is not None and where != previous:
            files.release(previous)  # host memory stays around one shard
        previous = where
        module_name, _, leaf = key.rpartition(".")
        if IGNORED_KEYS.search(key) or key == tied:
            continue
        if module_name in four_bit and leaf == "weight":
            _load_4bit(four_bit[module_name], key, files, device, dtype, quantize)
            continue
        if is_bnb_state_key(key, four_bit):  # read with its module's weight (_load_4bit)
            continue
        if key not in targets:
            raise CheckpointError(f"{where}: unexpected tensor {key!r} (not a parameter of {model.config.model_type})")
        t = files.get(key)
        if t.shape != targets[key].shape:
            raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(targets[key].shape)}")
        _assign(model, module_name, leaf, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))


def _load_4bit(module, key: str, files: WeightFiles, device, dtype, quantize: bool):
    t = files.get(key)
    if t.dtype != torch.uint8:  # a 16-bit weight: quantize on the target device, then let the 16-bit copy go
        expected = (module.out_features, module.in_features)
        if tuple(t.shape) != expected:
            raise CheckpointError(f"{files.key_file[key]}: tensor {key!r} has shape {tuple(t.shape)}, the config "
                                  f"implies {expected}")
        module.set_base_weight(t.to(device=device, dtype=dtype), quantize=quantize)
        return
    q = files.nf4(key)
    expected = torch.Size((module.out_features, module.in_features))
    if q.shape != expected:
        raise CheckpointError(f"{files.key_file[key]}: 4-bit tensor {key!r} has shape {tuple(q.shape)}, the config "
                              f"implies {tuple(expected)}")
    q.dtype = dtype  # compute dtype: dequantize straight into what the activations use
    module.set_base_nf4(q.to(device))


def _assign(model: nn.Module, module_name: str, leaf: str, t: torch.Tensor):
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        # trainable like a freshly built module (full fine-tuning); inject_lora freezes all but the adapters
        module._parameters[leaf] = nn.Parameter(t, requires_grad=t.is_floating_point())
    else:
        module._buffers[leaf] = t
