"""Checkpoint loading: sharded == single file, pickle refusal, and every bad input gives an error naming its file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import report
from minilora.config import ConfigError
from minilora.loading import CheckpointError, default_dtype, load_model
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = save_tiny("llama", path)
    return path, hf


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_sharded_equals_single_file(ckpt, tmp_path):
    src, hf = ckpt
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # forces several shards + index
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_model(src), load_model(tmp_path / "sharded")
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(ta, tb), ka
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        mx, _ = report("sharded vs single logits", a(x), b(x))
        report("minilora vs transformers", a(x), hf(x).logits)
    assert mx == 0


def test_dtype_conversion_and_default(ckpt):
    src, _ = ckpt
    m = load_model(src, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert default_dtype("cpu") == torch.float32


def test_missing_config(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(d)


def test_unsupported_model_type_lists_supported(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json.*'gpt2'.*llama, mistral, qwen2, qwen3, gemma"):
        load_model(d)


def test_missing_shard(ckpt, tmp_path):
    _, hf = ckpt
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="100KB")
    victim = sorted(d.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(d)


def _rewrite(d, fn):
    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch_names_file_and_key(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 64)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*model.layers.1.mlp.up_proj.weight.*\(3, 64\)"):
        load_model(d)


def test_missing_key(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.k_proj.weight"):
        load_model(d)


def test_unexpected_key(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*unexpected.*model.layers.0.extra.weight"):
        load_model(d)


def test_corrupt_safetensors(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(d)


@pytest.fixture(scope="module")
def bnb_ckpt(ckpt, tmp_path_factory):
    """The tiny llama as transformers + bitsandbytes save a pre-quantized NF4 checkpoint (a `*-bnb-4bit` repo)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    path = tmp_path_factory.mktemp("bnb")
    AutoModelForCausalLM.from_pretrained(ckpt[0], quantization_config=bnb, device_map="cpu",
                                         dtype=torch.float32).save_pretrained(path)
    return path


def test_prequantized_bad_quant_state_names_file_and_tensor(bnb_ckpt, tmp_path):
    key = "model.layers.1.self_attn.v_proj.weight"
    stored = load_file(bnb_ckpt / "model.safetensors")
    v = load_model(bnb_ckpt).model.layers[1].self_attn.v_proj.nf4  # the intact file: its bytes as they are
    assert torch.equal(v.packed, stored[key].view(-1)) and torch.equal(v.absmax, stored[f"{key}.absmax"])
    d = _copy(bnb_ckpt, tmp_path, "no-nested")
    _rewrite(d, lambda t: t.pop(f"{key}.nested_absmax"))  # as saved with compress_statistics=False
    with pytest.raises(ValueError, match=rf"model.safetensors: {key}.quant_state.bitsandbytes__nf4: absmax is not "
                                         rf"double-quantized"):
        load_model(d)
    d = _copy(bnb_ckpt, tmp_path, "short-absmax")
    _rewrite(d, lambda t: t.update({f"{key}.absmax": t[f"{key}.absmax"][:-1]}))
    with pytest.raises(ValueError, match=rf"model.safetensors: {key}.absmax: expected torch.uint8 with 32 values"):
        load_model(d)
    d = _copy(bnb_ckpt, tmp_path, "garbled-state")
    state = f"{key}.quant_state.bitsandbytes__nf4"
    _rewrite(d, lambda t: t.update({state: t[state].flip(0)}))  # the JSON's bytes reversed
    with pytest.raises(ValueError, match=rf"model.safetensors: {state}: not a bitsandbytes quant state"):
        load_model(d)


def test_pickle_refused_unless_opted_in(ckpt, tmp_path):
    src, hf = ckpt
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*allow_pickle"):
        load_model(d)
    m = load_model(d, allow_pickle=True)
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        mx, _ = report("pickle-loaded vs transformers", m(x), hf(x).logits)
    assert mx <= 1e-4


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_model(tmp_path / "no-such-dir")
