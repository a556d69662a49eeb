"""Export check on a real fine-tune (not collected by pytest: it needs the default training run first).

    python scripts/train.py                      # SmolLM2-135M-Instruct on the demo data -> outputs/minilora
    python tests/check_export_smollm2.py [OUT]   # exports to OUT (default /tmp/exp), then compares

Greedy answers of the merged_16bit model loaded by transformers (the oracle) against minilora's own base + adapter
on the held-out demo questions, token for token; exact-match accuracy of both; the size of each output.
"""
import json, subprocess, sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from minilora.adapter import load_adapter
from minilora.chat_templates import compile_template, render, template_tokens
from minilora.dataset import DEMO_EVAL, load_rows
from minilora.generation import generate
from minilora.hub import resolve_checkpoint
from minilora.loading import load_model
from minilora.tokenizer import Tokenizer

adapter = Path("outputs/minilora")
out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp")
for method, extra in [("merged_16bit", []), ("merged_4bit", []), ("gguf", ["--gguf_outtype", "f16"])]:
    if not (out / method).exists():
        t = time.time()
        subprocess.run([sys.executable, "scripts/export.py", str(adapter), "--save_method", method,
                        "--output_dir", str(out / method), *extra], check=True)
        print(method, f"{time.time() - t:.0f}s")
size = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
print("sizes MB: adapter", round((adapter / "adapter_model.safetensors").stat().st_size / 1e6, 1),
      *(f"{m} {size(out / m) / 1e6:.1f}" for m in ("merged_16bit", "merged_4bit", "gguf")))

cfg = json.loads((adapter / "adapter_config.json").read_text())
base = resolve_checkpoint(cfg["base_model_name_or_path"])
ours = load_model(base); load_adapter(ours, adapter)
hf = AutoModelForCausalLM.from_pretrained(out / "merged_16bit", dtype=torch.float32).eval()
tok = Tokenizer.from_dir(adapter)
tmpl = compile_template(tok.chat_template)
rows = load_rows(DEMO_EVAL, split=None)[:30]
same = hits_ours = hits_hf = 0
for r in rows:
    msgs = r.data["messages"]
    ids = tok.encode(render(tmpl, msgs[:-1], add_generation_prompt=True, **template_tokens(tok)), add_special_tokens=False)
    a = generate(ours, ids, max_new_tokens=24, eos_token_ids=tok.eos_token_ids)
    with torch.no_grad():
        b = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_ids,
                        pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    same += a == b
    ans = msgs[-1]["content"].strip()
    hits_ours += tok.decode(a, skip_special_tokens=True).strip() == ans
    hits_hf += tok.decode(b, skip_special_tokens=True).strip() == ans
print(f"greedy token-identical: {same}/{len(rows)}; exact match minilora {hits_ours}/{len(rows)}, "
      f"transformers(merged_16bit) {hits_hf}/{len(rows)}")
