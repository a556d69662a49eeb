"""Exports against their oracles.

- `lora`: peft.PeftModel.from_pretrained on the transformers base gives minilora's logits (fp32, every family,
  tied embeddings trained through modules_to_save), and minilora loads what PEFT's save_pretrained wrote.
- `merged_16bit`: transformers.AutoModelForCausalLM gives the adapted model's logits; tensors without LoRA are
  byte-identical to the source; targeted ones are W₀ + s·B·A with W₀ read from the 16-bit source even when the
  model was trained on NF4; bf16 sources, several shards, a pre-quantized bitsandbytes base (and a damaged one
  named in the error), PEFT's own merge.
- `merged_4bit`: the same bytes that bitsandbytes writes when it quantizes the 16-bit merge, and transformers +
  bitsandbytes load it on the CPU; its logits against the 16-bit merge are printed.
- Atomicity (an export that fails half-way leaves nothing), --overwrite, the Hub dry run, scripts/export.py.

Every model is a tiny random checkpoint (tests/tiny_models.py) whose LoRA was trained for three AdamW steps on
random tokens, so B != 0 and A has left its initialisation.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import report
from tiny_models import FAMILIES, save_tiny

import minilora.export as export
from minilora.adapter import load_adapter, lora_modules, save_adapter
from minilora.export import LoRAWeights, push_to_hub, save_merged
from minilora.loading import load_model
from minilora.lora import inject_lora

IDS = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))  # in every tiny vocab
REPO = Path(__file__).resolve().parents[1]


def check(name, ours, ref, tol):
    mx, _ = report(name, ours, ref)
    assert mx <= tol, f"{name}: max abs diff {mx:.3g} > {tol}"


def train_lora(model, steps=3, **lora_kw):
    """Inject LoRA (r=4, alpha=8) and train it for `steps` AdamW steps on random next-token data."""
    inject_lora(model, r=4, lora_alpha=8, **lora_kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=gen)
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert all(m.lora_B.weight.abs().max() > 1e-3 for m in lora_modules(model).values())
    return model.eval()


def trained(family, path: Path, dtype=torch.float32, load_in_4bit=False, steps=3, **lora_kw):
    """The tiny checkpoint written to path/base, loaded in fp32 (NF4 projections with load_in_4bit), LoRA-trained."""
    save_tiny(family, path / "base", dtype=dtype)
    return train_lora(load_model(path / "base", dtype=torch.float32, load_in_4bit=load_in_4bit), steps, **lora_kw)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).float()


def hf_model(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw)


@torch.no_grad()
def hf_logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (one file or shards)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def expected_merge(base: dict, model, key: str) -> torch.Tensor:
    """The oracle's W₀ + s·B·A in fp64 from the source tensor, for the LoRA module that owns `key`."""
    m = lora_modules(model)[key.removesuffix(".weight")]
    return (base[key].double() + m.scaling * (m.lora_B.weight.double() @ m.lora_A.weight.double())).detach()


def check_untouched_bytes(src: dict, out: dict, targeted: set[str]):
    """Every source tensor is in the output; those the adapter does not touch have the same dtype and bytes."""
    assert set(src) == set(out)
    same = [k for k in src if k not in targeted]
    assert same and all(src[k].dtype == out[k].dtype and torch.equal(src[k].view(torch.uint8), out[k].view(torch.uint8))
                        for k in same), "untargeted tensors differ from the source"


# --- lora and merged_16bit, every family ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_lora_and_merged_16bit(family, tmp_path):
    from peft import PeftModel
    ours = trained(family, tmp_path)
    ref = logits(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "adapter")
    check(f"{family} lora: peft vs minilora logits", hf_logits(peft_model), ref, 1e-5)

    save_merged(LoRAWeights.from_model(ours), tmp_path / "base", tmp_path / "merged")
    check(f"{family} merged_16bit: transformers vs minilora logits", hf_logits(hf_model(tmp_path / "merged")), ref,
          1e-5)
    src, out = tensors_of(tmp_path / "base"), tensors_of(tmp_path / "merged")
    targeted = {f"{n}.weight" for n in lora_modules(ours)}
    check_untouched_bytes(src, out, targeted)
    k = sorted(targeted)[0]
    check(f"{family} {k} = W0 + s*B*A", out[k], expected_merge(src, ours, k), 1e-6)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and (tmp_path / "merged" / "generation_config.json").is_file()


def test_tied_embeddings_in_modules_to_save(tmp_path):
    """A tied embedding is one Parameter: saved under both names with ensure_weight_tying, as PEFT does, so PEFT
    keeps lm_head tied to the trained embedding (with one name it would keep lm_head at the base weights)."""
    from peft import PeftModel
    ours = trained("llama-tied", tmp_path, modules_to_save=["embed_tokens"])
    ref = logits(ours)
    save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"] and cfg["ensure_weight_tying"] is True
    peft_model = PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "adapter")
    check("tied lora: peft vs minilora logits", hf_logits(peft_model), ref, 1e-5)
    again = load_model(tmp_path / "base", dtype=torch.float32)
    load_adapter(again, tmp_path / "adapter")
    check("tied lora: minilora reloaded", logits(again), ref, 0)
    assert again.lm_head.weight is again.model.embed_tokens.weight

    save_merged(LoRAWeights.from_dir(tmp_path / "adapter"), tmp_path / "base", tmp_path / "merged")
    assert "lm_head.weight" not in tensors_of(tmp_path / "merged")  # still tied, as in the source
    check("tied merged_16bit: transformers vs minilora", hf_logits(hf_model(tmp_path / "merged")), ref, 1e-5)


@pytest.mark.parametrize("family, tie", [("llama", False), ("llama-tied", True)])
def test_adapter_written_by_peft(family, tie, tmp_path):
    """PEFT's save_pretrained -> minilora's load_adapter gives PEFT's logits; merging it gives PEFT's own
    merge_and_unload weights."""
    from peft import LoraConfig, get_peft_model
    hf = save_tiny(family, tmp_path / "base")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                     modules_to_save=["embed_tokens"] if tie else ["lm_head"], ensure_weight_tying=tie)
    peft_model = get_peft_model(hf, cfg)
    with torch.no_grad():  # as if trained: B != 0 and the saved modules moved
        for i, p in enumerate(p for p in peft_model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ref = hf_logits(peft_model)

    ours = load_model(tmp_path / "base", dtype=torch.float32)
    load_adapter(ours, tmp_path / "peft")
    check(f"{family}: minilora with PEFT's adapter vs peft", logits(ours), ref, 1e-5)

    save_merged(LoRAWeights.from_dir(tmp_path / "peft"), tmp_path / "base", tmp_path / "merged")
    merged = tensors_of(tmp_path / "merged")
    theirs = peft_model.merge_and_unload().state_dict()
    check(f"{family}: merged vs peft merge_and_unload", torch.cat([merged[k].flatten() for k in merged]),
          torch.cat([theirs[k].flatten() for k in merged]), 1e-6)


def test_peft_adapter_that_unties_embeddings_is_refused(tmp_path):
    """PEFT without ensure_weight_tying trains a copy of embed_tokens and leaves lm_head at the base: minilora's
    tied model cannot be both, so it says so instead of loading something else."""
    from peft import LoraConfig, get_peft_model
    hf = save_tiny("llama-tied", tmp_path / "base")
    peft_model = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="ties it to 'lm_head.weight'"):
        load_adapter(load_model(tmp_path / "base", dtype=torch.float32), tmp_path / "peft")
    with pytest.raises(ValueError, match="embed_tokens is trained without lm_head"):
        save_merged(LoRAWeights.from_dir(tmp_path / "peft"), tmp_path / "base", tmp_path / "merged")


def test_adapter_missing_a_trained_tensor_is_refused(tmp_path):
    """An adapter written for other targets would otherwise 'load' with lora_B left at zero."""
    from safetensors.torch import save_file
    save_tiny("llama", tmp_path / "base")
    model = load_model(tmp_path / "base", dtype=torch.float32)
    inject_lora(model, r=2, target_modules=["q_proj", "v_proj"])
    save_adapter(model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".v_proj." not in k},
              tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: no tensor for 4 trainable parameters"):
        load_adapter(load_model(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter")


# --- merged_16bit: dtype, shards, where W₀ comes from -------------------------------------------------------------

def test_bf16_source_several_shards(tmp_path):
    ours = trained("qwen2", tmp_path, dtype=torch.bfloat16)
    save_merged(LoRAWeights.from_model(ours), tmp_path / "base", tmp_path / "merged", max_shard_size="40KB")
    out_dir = tmp_path / "merged"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:
        with safe_open(str(s), "pt") as f:
            assert all(index["weight_map"][k] == s.name for k in f.keys()) and f.metadata() == {"format": "pt"}
    src, out = tensors_of(tmp_path / "base"), tensors_of(out_dir)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in out.values())
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    targeted = {f"{n}.weight" for n in lora_modules(ours)}
    check_untouched_bytes(src, out, targeted)
    # rounded once from fp32: within half a bf16 step (8 significant bits: 2**-8 relative) of the exact merge
    for k in sorted(targeted):
        exact = expected_merge(src, ours, k)
        assert ((out[k].double() - exact).abs() <= exact.abs() * 2**-8).all(), k
    # transformers on the bf16 merge vs minilora on the bf16 base + fp32 LoRA, both computing in fp32: they differ
    # only by the merged weights' bf16 rounding
    ref = logits(ours)
    mx, _ = report("bf16 merged_16bit: transformers vs minilora logits", hf_logits(hf_model(out_dir)), ref)
    assert mx <= 2**-8 * ref.abs().max().item()
    check("bf16 merged_16bit: minilora loads it", logits(load_model(out_dir, dtype=torch.float32)),
          hf_logits(hf_model(out_dir)), 1e-5)


def test_qlora_merge_reads_the_16bit_source(tmp_path):
    """Trained on NF4, merged into the original fp32 weights: the merge equals the 16-bit model with the same
    adapter, and is far from the merge into the dequantized NF4 weights."""
    ours = trained("llama", tmp_path, load_in_4bit=True)
    save_merged(LoRAWeights.from_model(ours), tmp_path / "base", tmp_path / "merged")
    src, out = tensors_of(tmp_path / "base"), tensors_of(tmp_path / "merged")
    for name, m in lora_modules(ours).items():
        k = f"{name}.weight"
        assert m.nf4 is not None
        check(f"{k} vs 16-bit W0 + s*B*A", out[k], expected_merge(src, ours, k), 1e-6)
        mx, _ = report(f"{k} vs NF4 W0 + s*B*A", out[k], m.merge())
        assert mx > 1e-3  # the NF4 rounding the merge must not carry
    save_adapter(ours, tmp_path / "adapter")
    dense = load_model(tmp_path / "base", dtype=torch.float32)
    load_adapter(dense, tmp_path / "adapter")
    check("QLoRA merged_16bit: transformers vs the 16-bit adapted model", hf_logits(hf_model(tmp_path / "merged")),
          logits(dense), 1e-5)


def test_prequantized_base_merges_into_dequantized_weights(tmp_path):
    """A bitsandbytes 4-bit checkpoint has no 16-bit original: a warning, and W = dequant(NF4) + s·B·A."""
    from transformers import BitsAndBytesConfig
    save_tiny("qwen2", tmp_path / "fp32")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    hf_model(tmp_path / "fp32", quantization_config=bnb, device_map="cpu").save_pretrained(tmp_path / "bnb")
    ours = load_model(tmp_path / "bnb", dtype=torch.float32)
    inject_lora(ours, r=4, lora_alpha=8)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.weight.normal_(0, 0.1)
    with pytest.warns(UserWarning, match="pre-quantized bitsandbytes 4-bit"):
        save_merged(LoRAWeights.from_model(ours), tmp_path / "bnb", tmp_path / "merged")
    out = tensors_of(tmp_path / "merged")
    assert not any(".weight." in k for k in out) and {t.dtype for t in out.values()} == {torch.float32}
    for name, m in lora_modules(ours).items():
        assert torch.equal(out[f"{name}.weight"], m.merge())
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    check("merged pre-quantized base: transformers vs minilora", hf_logits(hf_model(tmp_path / "merged")),
          logits(ours), 1e-5)
    # a damaged quant state: the error names the file and the tensor
    key, f = "model.layers.1.self_attn.v_proj.weight", tmp_path / "bnb" / "model.safetensors"
    stored = load_file(f)
    stored[f"{key}.absmax"] = stored[f"{key}.absmax"][:-1]
    save_file(stored, f, metadata={"format": "pt"})
    with (pytest.raises(ValueError, match=rf"{re.escape(str(f))}: {key}.absmax: expected torch.uint8 with 32 values"),
          pytest.warns(UserWarning, match="pre-quantized bitsandbytes 4-bit")):
        save_merged(LoRAWeights.from_model(ours), tmp_path / "bnb", tmp_path / "merged-bad")


# --- merged_4bit --------------------------------------------------------------------------------------------------

def test_merged_4bit_is_what_bitsandbytes_writes_and_loads(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig
    ours = trained("llama", tmp_path)
    weights = LoRAWeights.from_model(ours)
    save_merged(weights, tmp_path / "base", tmp_path / "merged")
    with pytest.warns(UserWarning, match="re-quantizes"):
        save_merged(weights, tmp_path / "base", tmp_path / "merged4", four_bit=True)
    # the oracle: bitsandbytes quantizing the 16-bit merge while transformers loads it, then saving it
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    hf_model(tmp_path / "merged", quantization_config=bnb, device_map="cpu").save_pretrained(tmp_path / "oracle")
    mine, theirs = tensors_of(tmp_path / "merged4"), tensors_of(tmp_path / "oracle")
    assert mine.keys() == theirs.keys() and len([k for k in mine if k.endswith("bitsandbytes__nf4")]) == 14
    assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    q_cfg = json.loads((tmp_path / "merged4" / "config.json").read_text())["quantization_config"]
    assert q_cfg == json.loads((tmp_path / "oracle" / "config.json").read_text())["quantization_config"]

    # transformers + bitsandbytes read it as it is (train mode, dropout 0: in eval mode bitsandbytes on the CPU
    # repacks the weights for a bf16 kernel); the difference to the 16-bit merge is the NF4 rounding
    model4 = hf_model(tmp_path / "merged4", device_map="cpu").train()
    assert type(model4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    got, ref16 = hf_logits(model4), hf_logits(hf_model(tmp_path / "merged"))
    mx, mean = report("merged_4bit vs merged_16bit logits (transformers)", got, ref16)
    assert mean < 0.1 * ref16.abs().mean().item()
    check("merged_4bit: minilora vs transformers + bitsandbytes", logits(load_model(tmp_path / "merged4",
                                                                                    dtype=torch.float32)), got, 1e-5)


# --- atomic saves, the Hub, the script ------------------------------------------------------------------------------

def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    ours = trained("llama", tmp_path, steps=1)
    weights = LoRAWeights.from_model(ours)
    real_save, calls = export.save_file, []

    def fail_after_first_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt("simulated interruption")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(export, "save_file", fail_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        save_merged(weights, tmp_path / "base", tmp_path / "merged", max_shard_size="60KB")
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    # replacing an existing export: it survives a failure untouched
    monkeypatch.setattr(export, "save_file", real_save)
    save_merged(weights, tmp_path / "base", tmp_path / "merged")
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "merged").iterdir())
    monkeypatch.setattr(export, "save_file", fail_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        save_merged(weights, tmp_path / "base", tmp_path / "merged", max_shard_size="60KB", overwrite=True)
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "merged").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged"]
    monkeypatch.setattr(export, "save_file", real_save)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_merged(weights, tmp_path / "base", tmp_path / "merged")
    save_merged(weights, tmp_path / "base", tmp_path / "merged", max_shard_size="60KB", overwrite=True)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()


def test_push_to_hub(tmp_path, monkeypatch):
    import huggingface_hub
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"x" * 123)
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    (tmp_path / "out" / "checkpoint-5" / "optimizer.pt").write_bytes(b"y")
    calls = []

    class FakeApi:  # records what would go over the network
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private))

        def upload_folder(self, repo_id, folder_path, ignore_patterns, commit_message):
            calls.append(("upload_folder", repo_id, Path(folder_path), ignore_patterns))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    listing = push_to_hub(tmp_path / "out", "me/model", ignore_patterns=["checkpoint-*/*"], dry_run=True)
    assert listing == [("adapter_config.json", 2), ("adapter_model.safetensors", 123)] and calls == []
    assert push_to_hub(tmp_path / "out", "me/model", private=True, ignore_patterns=["checkpoint-*/*"]) == listing
    assert calls == [("init", None), ("create_repo", "me/model", True),
                     ("upload_folder", "me/model", tmp_path / "out", ["checkpoint-*/*"])]


def test_export_script(tmp_path):
    ours = trained("gemma", tmp_path, steps=1)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cmd = [sys.executable, str(REPO / "scripts" / "export.py"), str(tmp_path / "adapter"), "--save_method",
           "merged_16bit", "--push_to_hub", "me/model", "--dry_run"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "would upload 3 files" in run.stdout and "model.safetensors" in run.stdout, run.stdout
    check("scripts/export.py merged_16bit: transformers vs minilora",
          hf_logits(hf_model(tmp_path / "adapter" / "merged_16bit")), logits(ours), 1e-5)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_save_gguf(tmp_path):
    """The gguf method: a 16-bit merge handed to minilora.gguf_export, read back within f16 rounding."""
    from test_gguf_export import VOCAB as GGUF_VOCAB, tiny_tokenizer  # skips without the gguf package
    from minilora.export import save_gguf
    from minilora.gguf import gguf_to_hf_dir
    save_tiny("llama", tmp_path / "base", vocab_size=GGUF_VOCAB)
    tiny_tokenizer(tmp_path / "base", "llama3")
    ours = train_lora(load_model(tmp_path / "base", dtype=torch.float32), steps=2)
    weights = LoRAWeights.from_model(ours)
    save_gguf(weights, tmp_path / "base", tmp_path / "gguf", outtype="f16")
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["Modelfile", "model-f16.gguf"]
    save_merged(weights, tmp_path / "base", tmp_path / "merged")
    back = load_model(gguf_to_hf_dir(tmp_path / "gguf" / "model-f16.gguf", tmp_path / "back"), dtype=torch.float32)
    ref = logits(load_model(tmp_path / "merged", dtype=torch.float32))
    mx, _ = report("gguf f16 vs merged_16bit logits", logits(back), ref)
    assert mx < 2e-3 * ref.abs().max()  # f16 keeps 11 significant bits of each weight
