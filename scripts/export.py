"""Export a trained adapter: merged into its base model, as a GGUF, or as the adapter itself; then, if asked,
upload the result to the Hugging Face Hub.

    python scripts/export.py outputs/minilora                          # merged_16bit -> outputs/minilora/merged_16bit
    python scripts/export.py outputs/minilora --save_method merged_4bit --base HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/export.py outputs/minilora --save_method gguf --gguf_outtype q8_0
    python scripts/export.py outputs/minilora --save_method lora --base HuggingFaceTB/SmolLM2-135M-Instruct \\
        --push_to_hub me/smollm2-units-lora --dry_run                  # lists what would be uploaded

Methods (minilora/export.py has the details):
    lora          the adapter in PEFT's format (adapter_model.safetensors + adapter_config.json) and the tokenizer
    merged_16bit  W = W0 + s*B*A against the base's original weights, read again from its safetensors
    merged_4bit   the same, re-quantized to bitsandbytes' NF4 (loses accuracy against merged_16bit)
    gguf          a GGUF file (f16, bf16 or q8_0) and an Ollama Modelfile

The base is adapter_config.json's base_model_name_or_path unless --base names another (a directory, Hub id or
.gguf). The tokenizer and chat template come from the adapter directory when it has them (scripts/train.py saves
them there), else from the base. Nothing existing is replaced without --overwrite.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from minilora.adapter import read_adapter_config
from minilora.atomic import save_atomic
from minilora.export import DEFAULT_SHARD_SIZE, LoRAWeights, push_to_hub, save_gguf, save_merged
from minilora.tokenizer import TOKENIZER_FILES, Tokenizer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("adapter_dir", help="a LoRA adapter in PEFT's format (written by scripts/train.py or by PEFT)")
g = p.add_argument_group("output")
g.add_argument("--save_method", default="merged_16bit", choices=["lora", "merged_16bit", "merged_4bit", "gguf"])
g.add_argument("--base", default=None, help="base checkpoint (default: the adapter's base_model_name_or_path)")
g.add_argument("--output_dir", default=None, help="default: <adapter_dir>/<save_method>")
g.add_argument("--max_shard_size", default=DEFAULT_SHARD_SIZE, help="safetensors shard size, e.g. 5GB, 500MB")
g.add_argument("--gguf_outtype", default="f16", choices=["f16", "bf16", "q8_0"])
g.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
g = p.add_argument_group("Hugging Face Hub")
g.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the output folder (token: HF_TOKEN)")
g.add_argument("--private", action="store_true", help="create the repo private")
g.add_argument("--dry_run", action="store_true", help="list what would be uploaded, with sizes; no network")
args = p.parse_args()

adapter_dir = Path(args.adapter_dir)
out_dir = Path(args.output_dir) if args.output_dir else adapter_dir / args.save_method
try:
    config = read_adapter_config(adapter_dir)
except (FileNotFoundError, ValueError) as e:
    sys.exit(str(e))
base = args.base or config.get("base_model_name_or_path")
if args.save_method != "lora" and not base:
    sys.exit(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; pass --base")
if out_dir.exists() and not args.overwrite:
    sys.exit(f"{out_dir} exists; pass --overwrite to replace it")
has_tokenizer = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
tokenizer = Tokenizer.from_dir(adapter_dir) if has_tokenizer else None  # None: the base's


def copy_adapter(tmp: Path):
    """The adapter and tokenizer files as they are; --base, if given, becomes the recorded base model."""
    tmp.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "README.md", *TOKENIZER_FILES):
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, tmp / name)
    (tmp / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}, indent=2) + "\n")


# --- write --------------------------------------------------------------------------------------------------------
print(f"{args.save_method}: {adapter_dir} on {base} -> {out_dir}")
if args.save_method == "lora":
    save_atomic(copy_adapter, out_dir, overwrite=args.overwrite)
elif args.save_method == "gguf":
    save_gguf(LoRAWeights.from_dir(adapter_dir), base, out_dir, outtype=args.gguf_outtype, tokenizer=tokenizer,
              overwrite=args.overwrite)
else:
    save_merged(LoRAWeights.from_dir(adapter_dir), base, out_dir, four_bit=args.save_method == "merged_4bit",
                max_shard_size=args.max_shard_size, tokenizer=tokenizer, overwrite=args.overwrite)
files = sorted(f for f in out_dir.rglob("*") if f.is_file())
for f in files:
    print(f"  {f.relative_to(out_dir)}  {f.stat().st_size / 1e6:.2f} MB")
print(f"wrote {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB")

# --- upload -------------------------------------------------------------------------------------------------------
if args.push_to_hub:
    uploaded = push_to_hub(out_dir, args.push_to_hub, private=args.private, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(uploaded)} files ({sum(n for _, n in uploaded) / 1e6:.1f} MB) to "
          f"https://huggingface.co/{args.push_to_hub}:")
    for path, n in uploaded:
        print(f"  {path}  {n} bytes")
