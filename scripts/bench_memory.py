"""GPU memory and time of the memory-saving pieces of training, against the plain way (needs CUDA).

    python scripts/bench_memory.py                      # (a) chunked CE vs full-logits CE, then (b)
    python scripts/bench_memory.py --skip_checkpoint    # (a) only
    python scripts/bench_memory.py --layers 4 --tokens 4096

(a) Loss head: chunked_cross_entropy against F.cross_entropy(lm_head(h).float()) on Llama 3 8B's head
    (vocab 128256, hidden 4096), 8192 tokens, bf16; LM head frozen (QLoRA) and trainable; all tokens
    labelled, and half of them masked (prompt tokens, which the chunked loss skips).
(b) Checkpoint modes off / recompute / offload on decoder layers of the 8B shape in NF4 with LoRA r=16 on
    the seven projections, one sequence of --tokens.

"peak extra" = torch.cuda.max_memory_allocated() during one forward + backward, minus memory allocated
before it (inputs, weights): what the step adds on top of the model. Time: mean of --repeats fwd+bwd after
one warm-up, CUDA-synchronised wall clock. Each case is checked against the plain path before it is timed,
and a table is printed last.
"""
import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from bench import build_qlora_model, preset_config  # scripts/bench.py, beside this file
from minilora.checkpointing import set_checkpointing
from minilora.loss import chunked_cross_entropy

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# (a) loss head
p.add_argument("--vocab", type=int, default=128256)
p.add_argument("--hidden", type=int, default=4096)
p.add_argument("--tokens", type=int, default=8192)
p.add_argument("--chunk_size", type=int, default=None, help="rows per chunk (default: ~512 MB of fp32 logits)")
# (b) checkpointing
p.add_argument("--skip_checkpoint", action="store_true")
p.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B shape (32 is the full model)")
# both
p.add_argument("--repeats", type=int, default=5)
args = p.parse_args()

assert torch.cuda.is_available(), "bench_memory.py measures GPU memory: run it on a CUDA machine"
dev, dtype = torch.device("cuda"), torch.bfloat16
GiB = 2**30


def measure(step) -> tuple[float, float]:
    """(peak extra GiB, mean ms) of step(), which runs one forward + backward and frees what it made."""
    step()  # warm-up: cuBLAS workspaces, allocator pools
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GiB
    t = time.perf_counter()
    for _ in range(args.repeats):
        step()
    torch.cuda.synchronize()
    return peak, (time.perf_counter() - t) / args.repeats * 1e3


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# --- (a) chunked CE vs full logits -----------------------------------------------------------------------------
def full_ce(h, w, y):
    logits = h @ w.T  # [N, V] bf16: 2 GB at 8192 x 128256, then 4 GB more in fp32 below
    return F.cross_entropy(logits.float(), y, reduction="sum")


def chunked_ce(h, w, y):
    return chunked_cross_entropy(h, w, y, chunk_size=args.chunk_size)


def bench_loss() -> list[tuple]:
    g = torch.Generator(device=dev).manual_seed(0)
    h0 = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype, generator=g)
    w0 = torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype, generator=g) * 0.02
    y_all = torch.randint(0, args.vocab, (args.tokens,), device=dev, generator=g)
    y_half = y_all.clone()
    y_half[: args.tokens // 2] = -100  # a prompt half: no labels there
    rows = []
    for train_w in (False, True):
        h = h0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(train_w)
        for y, labelled in ((y_all, "all"), (y_half, "half")):
            grads = {}
            for name, fn in (("full logits", full_ce), ("chunked", chunked_ce)):
                def step():
                    h.grad = w.grad = None
                    fn(h, w, y).backward()
                loss = fn(h, w, y)
                loss.backward()
                grads[name] = (loss.detach(), h.grad, w.grad)
                peak, ms = measure(step)
                h.grad = w.grad = None
                ref = grads["full logits"]
                err = (f"loss {max_rel(grads[name][0], ref[0]):.1e}, dh {max_rel(grads[name][1], ref[1]):.1e}"
                       + (f", dW {max_rel(grads[name][2], ref[2]):.1e}" if train_w else ""))
                rows.append((name, "trainable" if train_w else "frozen", labelled, peak, ms, err))
                print(rows[-1], flush=True)
            del grads
    del h0, w0, h, w
    return rows


# --- (b) checkpoint modes ----------------------------------------------------------------------------------
def model_8b_shape(n_layers: int):
    """n_layers decoder layers of Llama 3.1 8B as QLoRA trains them: the seven projections in NF4 (double
    quantization), LoRA r=16 alpha=16 on them, everything else frozen bf16 (scripts/bench.py builds it).
    lora_B gets small random values instead of zeros, so every LoRA gradient is non-zero and the modes can be
    compared on all of them (with B = 0 the A gradients are exactly zero)."""
    config = preset_config("llama-3.1-8b")
    config = dataclasses.replace(config, num_hidden_layers=n_layers, layer_types=config.layer_types[:n_layers])
    model = build_qlora_model(config, dev, dtype, r=16, lora_alpha=16)
    with torch.no_grad():
        for n, p_ in model.named_parameters():
            if "lora_B" in n:
                p_.normal_(0.0, 0.01)
    return model, "NF4 base + LoRA r=16 on q/k/v/o/gate/up/down"


def bench_checkpointing() -> list[tuple]:
    model, what = model_8b_shape(args.layers)
    print(f"(b) model: {args.layers} layers of Llama 3.1 8B, {what}", flush=True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=dev)
    labels = torch.roll(ids, -1, 1)
    ref, rows = None, []
    for mode in ("off", "recompute", "offload"):
        set_checkpointing(model, mode)

        def step():
            model.zero_grad(set_to_none=True)
            # the loss is chunked in every mode, so only the layers' activation memory differs
            chunked_cross_entropy(model.hidden_states(ids), model.lm_head.weight, labels).backward()
        step()
        grads = [p_.grad.clone() for p_ in model.parameters() if p_.grad is not None]
        ref = ref or grads
        err = max(max_rel(a, b) for a, b in zip(grads, ref))
        try:
            peak, ms = measure(step)
        except torch.OutOfMemoryError:
            peak, ms = float("nan"), float("nan")
        rows.append((mode, f"{args.layers} layers", f"{args.tokens} tok", peak, ms, f"max grad rel diff {err:.1e}"))
        print(rows[-1], flush=True)
        model.zero_grad(set_to_none=True)
    return rows


rows = bench_loss()
if not args.skip_checkpoint:
    torch.cuda.empty_cache()
    rows += bench_checkpointing()

print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16; (a) V={args.vocab} H={args.hidden} "
      f"N={args.tokens}")
print(f"{'method':<12} {'weight/layers':<14} {'labels':<9} {'peak extra GiB':>14} {'ms fwd+bwd':>11}  check vs plain")
for name, a, b, peak, ms, err in rows:
    print(f"{name:<12} {a:<14} {b:<9} {peak:>14.2f} {ms:>11.1f}  {err}")
