"""LoRA adapters on disk in PEFT's format, so `peft.PeftModel.from_pretrained(base, dir)` loads what minilora wrote
and minilora loads what PEFT wrote.

    adapter_model.safetensors   base_model.model.<HF module name>.lora_A.weight  [r, in]
                                base_model.model.<HF module name>.lora_B.weight  [out, r]
                                base_model.model.<HF module name>.weight         (modules_to_save, full precision)
    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_rslora, ...

Because minilora keeps Hugging Face's module names, the keys are the model's own parameter names with PEFT's
`base_model.model.` prefix; nothing is renamed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minilora.lora import LoRALinear, inject_lora

PEFT_PREFIX = "base_model.model."


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.r > 0}


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor (LoRA A/B and modules_to_save), under the model's own names. A tied embedding is
    listed under both its names (model.embed_tokens.weight and lm_head.weight), as PEFT saves it when
    `ensure_weight_tying` is on; with one name only, PEFT would untie lm_head and keep it at the base weights."""
    return {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def _tied_trainable(model) -> bool:
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    return len(set(ids)) < len(ids)


def adapter_config(model, base_model_name_or_path: str = "") -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules (call inject_lora first)")
    first = next(iter(mods.values()))
    if any((m.r, m.lora_alpha, m.use_rslora) != (first.r, first.lora_alpha, first.use_rslora) for m in mods.values()):
        raise ValueError("LoRA modules differ in r/lora_alpha/use_rslora; PEFT's format needs one setting")
    lora_names = {f"{n}.lora_A.weight" for n in mods} | {f"{n}.lora_B.weight" for n in mods}
    saved = sorted({n.rsplit(".", 2)[-2] for n in adapter_state_dict(model) if n not in lora_names})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model_name_or_path),
        "r": first.r, "lora_alpha": first.lora_alpha, "lora_dropout": first.lora_dropout,
        "use_rslora": first.use_rslora, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}),
        "bias": "none", "modules_to_save": saved or None, "ensure_weight_tying": _tied_trainable(model),
        "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model, out_dir: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write adapter_model.safetensors + adapter_config.json into out_dir (created; replaced only by the caller)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, base_model_name_or_path)
    tensors, seen = {}, set()
    for n, t in adapter_state_dict(model).items():
        t = t.contiguous().cpu()
        shared = t.untyped_storage().data_ptr() in seen  # the second name of a tied embedding
        tensors[PEFT_PREFIX + n] = t.clone() if shared else t  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json (written by minilora or PEFT), checked to be a LoRA that minilora can apply."""
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no adapter config")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: only plain LoRA adapters are supported (got peft_type {cfg.get('peft_type')}, "
                         f"use_dora {cfg.get('use_dora')})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_path}: per-module rank_pattern/alpha_pattern are not supported")
    return cfg


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors under the model's parameter names (PEFT prefix and adapter name dropped)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter weights")
    return {_model_key(k): t for k, t in load_file(path).items()}


def load_adapter_weights(model, adapter_dir: str | Path):
    """Copy an adapter's tensors into a model that already has matching LoRA modules."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    params = dict(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}  # id(parameter) -> all its names: two for a tied embedding
    for n, p in params.items():
        names_of.setdefault(id(p), []).append(n)
    tensors = read_adapter_weights(adapter_dir)
    for name, t in tensors.items():
        if name not in params:
            raise ValueError(f"{path}: tensor {name!r} has no matching parameter in the model")
        if params[name].shape != t.shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the model has "
                             f"{tuple(params[name].shape)}")
        # a tied embedding is one Parameter here; PEFT keeps it tied only when it saved it under both names
        for alias in names_of[id(params[name])]:
            if alias != name and not (alias in tensors and torch.equal(tensors[alias], t)):
                raise ValueError(f"{path}: {name!r} is trained but the model ties it to {alias!r}, which the adapter "
                                 f"does not give the same values (saved by PEFT without ensure_weight_tying?)")
        with torch.no_grad():
            params[name].copy_(t)
    # every trainable tensor must come from the file: a LoRA B left at zero would pass silently
    missing = [n for n, p in params.items() if p.requires_grad and not set(names_of[id(p)]) & tensors.keys()]
    if missing:
        raise ValueError(f"{path}: no tensor for {len(missing)} trainable parameters of the model, e.g. "
                         f"{missing[:3]} (adapter written for other target_modules or layers?)")


def load_adapter(model, adapter_dir: str | Path):
    """Inject LoRA as described by adapter_config.json (written by minilora or PEFT), then load the weights."""
    cfg = read_adapter_config(adapter_dir)
    inject_lora(model, r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg.get("lora_dropout", 0.0),
                target_modules=cfg["target_modules"], use_rslora=cfg.get("use_rslora", False),
                modules_to_save=cfg.get("modules_to_save") or ())
    load_adapter_weights(model, adapter_dir)
    return cfg


def _model_key(key: str) -> str:
    """PEFT key -> model parameter name: drop the prefix and any adapter name (`.default`)."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    return name.replace(".modules_to_save.default.", ".")
