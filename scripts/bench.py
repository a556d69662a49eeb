"""QLoRA training speed, memory and MFU of minilora on a randomly initialised model of a real shape.

    python scripts/bench.py --preset llama-3.1-8b --batch_size 2 --seq_len 2048            # --gc auto (default)
    python scripts/bench.py --preset llama-3.1-8b --gc auto --max_memory_gb 7              # a memory budget
    python scripts/bench.py --preset llama-3.2-1b --gc off                                 # off|recompute|offload
    python scripts/bench.py --preset llama-3.1-8b --batch_size 1 --seq_len 360448 --gpu_memory_gb 79.1  # an H100's room
    python scripts/bench.py --preset tiny --device cpu --warmup 1 --steps 2                # code paths on CPU

No checkpoint on disk: the model is built on the meta device, then every projection gets a random bf16 weight
made on the GPU and quantized there (`LoRALinear.set_base_weight(w, quantize=True)`: NF4 with double
quantization), everything else a random bf16 tensor; LoRA r=16, alpha=16 on the seven q/k/v/o/gate/up/down
projections. The workload is `../shared/bench/peers_gpu.py`'s, so the numbers sit beside Unsloth's and HF's:
random tokens of batch_size x seq_len, labels = the inputs shifted by one (labels[t] = input[t+1], the last
-100; minilora.dataset's convention, what HF does inside the model when given labels = inputs), `--warmup`
untimed steps then `--steps` timed ones, 8-bit AdamW like the peers' bitsandbytes AdamW8bit (minilora/optim.py;
`--optim adamw` for torch's fused fp32 one: for the 8B shape's 42M LoRA weights, 0.31 GiB of state against 0.08).

Output: one line `RESULT {json}` with peers_gpu.py's keys (step_s = median of the timed steps, tok_s,
peak_alloc_gb and peak_reserved_gb in GiB like theirs, first_loss, last_loss, load_s, trainable) plus mfu.

FLOP model of one step (`train_flops`), N = batch x seq tokens, P = matmul weights of the decoder layers plus
the LM head, P_layer one layer's, P_lora the adapters':
    forward 2NP + input gradient 2NP (the frozen weights get no weight gradient)
    + recompute 2N P_layer for each checkpointed layer, less down_proj's 2N H I, which the recompute skips
      (its output is only backpropagated: minilora.checkpointing.recompute_output; Gemma's sandwich norm
      reads it, so there it is run)
    + adapters 2N P_lora x (3: forward, input and weight gradients; +1 when recomputed)
    + attention 4 B nh D x (causal query-key pairs) per layer forward, x3 with backward, +1 when recomputed
      (not with keep_attention: the recompute takes the kept outputs)
    + gate_proj and up_proj once more, 2N 2 H I, when the MLP runs in token chunks (--mlp_chunk, or --gc auto at
      long context): each chunk's backward recomputes them; inside a recomputed layer the chunks skip their
      forward (down_proj included), so the layer's recompute then counts 2N (P_layer - 3 H I), and Gemma's 2N P_layer
MFU = FLOPs / step_s / peak. Peak: `--peak_tflops`, default 989 (H100 SXM, dense bf16). Recompute is counted
as work done, so checkpointed runs score a little higher than their tokens/s alone would say.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

from minilora.allocator import prefer_expandable_segments

ALLOC_CONF = prefer_expandable_segments()  # before torch loads: then a memory plan's peak is what the GPU must hold

import torch
import torch.nn as nn

from minilora.checkpointing import recompute_output, set_checkpointing
from minilora.config import ModelConfig
from minilora.cuda_graphs import GraphedLayer
from minilora.lora import DEFAULT_TARGETS, LoRALinear, inject_lora, lora_parameters, replace_linears_for_4bit
from minilora.loss import chunked_cross_entropy
from minilora.memory_policy import GiB, apply_plan, auto_checkpointing
from minilora.models import build_model
from minilora.optim import OPTIMIZERS, AdamW8bit

# Shapes from each model's Hugging Face config.json (weights are random; only the shape matters here).
PRESETS = {
    # meta-llama/Llama-3.2-1B/config.json
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    # meta-llama/Llama-3.1-8B/config.json
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    # Qwen/Qwen2.5-7B/config.json (use_sliding_window false: full attention in every layer)
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       sliding_window=131072, use_sliding_window=False, max_window_layers=28,
                       tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    # google/gemma-2-9b/config.json
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                       bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # mistralai/Mistral-7B-v0.3/config.json
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                       sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # for running the code paths on CPU
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5),
    "tiny-gemma2": dict(model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=512, query_pre_attn_scalar=16, sliding_window=32),
}
ALIASES = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b"}  # peers_gpu.py's --size names


def preset_config(name: str) -> ModelConfig:
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise SystemExit(f"--preset {name!r}: unknown; choose from {sorted(PRESETS)} or {sorted(ALIASES)}")
    return ModelConfig.from_hf(PRESETS[name])


# --- the model ------------------------------------------------------------------------------------------------

def build_qlora_model(config: ModelConfig, device, dtype=torch.bfloat16, r: int = 16, lora_alpha: float = 16,
                      quantize: bool = True, seed: int = 0) -> nn.Module:
    """A random-weight model of `config` on `device`: projections in NF4 (or `dtype` with quantize=False),
    the rest in `dtype`, LoRA on the seven projections. Each weight is made on the device and, for the
    projections, quantized there and dropped, so the GPU never holds more than one 16-bit projection extra."""
    device = torch.device(device)
    with torch.device("meta"):
        model = build_model(config)
    replace_linears_for_4bit(model, list(DEFAULT_TARGETS))  # r = 0 LoRALinear placeholders, weights on meta
    g = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            w = torch.randn(module.out_features, module.in_features, device=device, dtype=dtype, generator=g)
            module.set_base_weight(w.mul_(0.02), quantize=quantize)
    for name, p in list(model.named_parameters()):  # embeddings, norms, biases, an untied LM head
        if not p.is_meta:
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "weight" and p.dim() == 1:  # RMSNorm: y = x̂ (offset + w); Gemma stores w - 1
            t = torch.full(p.shape, 0.0 if config.norm_offset else 1.0, device=device, dtype=dtype)
        else:
            t = torch.randn(p.shape, device=device, dtype=dtype, generator=g).mul_(0.02)
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    model.tie_weights()
    inject_lora(model, r=r, lora_alpha=lora_alpha, target_modules=DEFAULT_TARGETS, seed=seed)
    return model.train()


# --- FLOPs ----------------------------------------------------------------------------------------------------

def causal_pairs(seq: int, window: int | None) -> int:
    """Query-key pairs a causal (sliding-window) attention scores: Σ_t min(t + 1, window)."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def train_flops(config: ModelConfig, batch: int, seq: int, modes: list[str], r: int = 16,
                mlp_chunk: int | None = None, keep_attention: bool = False,
                recompute_output: bool = False) -> float:
    """FLOPs of one training step under the model in the module docstring; modes: one per decoder layer.
    An MLP in token chunks (mlp_chunk < batch x seq) recomputes gate and up in each chunk's backward; with
    keep_attention a checkpointed layer's recompute skips attention's forward. recompute_output: the recompute
    computes the layer's output too (MINILORA_RECOMPUTE_OUTPUT=1), as the issue's FLOP model counts it."""
    c = config
    H, I, D, V = c.hidden_size, c.intermediate_size, c.head_dim, c.vocab_size
    nh, nkv, L = c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers
    p_layer = H * nh * D + 2 * H * nkv * D + nh * D * H + 3 * H * I  # q, k, v, o, gate, up, down
    p_lora = r * (2 * (H + nh * D) + 2 * (H + nkv * D) + 3 * (H + I))  # A [r, in] and B [out, r] of each
    tokens = batch * seq
    chunked = mlp_chunk is not None and tokens > mlp_chunk
    if recompute_output:  # every chunk runs its whole MLP in a layer's recompute, and again in its own backward
        p_recompute, p_chunk = p_layer, 3 * H * I
    elif c.sandwich_norm:  # the layer's recompute computes the MLP output (the norm after it reads it)
        p_recompute, p_chunk = p_layer, 2 * H * I
    else:
        p_recompute, p_chunk = p_layer - (3 if chunked else 1) * H * I, 2 * H * I
    n_ckpt = sum(m != "off" for m in modes)
    flops = 2 * tokens * (2 * (L * p_layer + H * V) + n_ckpt * p_recompute)
    flops += 2 * tokens * p_lora * (3 * L + n_ckpt)
    if chunked:
        flops += 2 * tokens * L * (p_chunk + r * 3 * (H + I))  # the chunks' own recompute, and their adapters
    for layer_type, mode in zip(c.layer_types, modes):
        window = c.sliding_window if layer_type == "sliding_attention" else None
        fwd = 4 * batch * nh * D * causal_pairs(seq, window)  # Q Kᵀ and P V
        flops += fwd * (3 + (mode != "off" and not keep_attention))
    return float(flops)


# --- the loop -------------------------------------------------------------------------------------------------

def random_batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0, vary_len: bool = False):
    """n (input_ids, labels) pairs on the CPU; labels[t] = input_ids[t + 1], the last position -100.
    vary_len: each batch's length drawn uniformly from [seq / 4, seq], as padded batches of real data vary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(max(seq // 4, 2), seq + 1, (), generator=g)) if vary_len else seq
        ids = torch.randint(3, vocab, (batch, t), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        out.append((ids, labels))
    return out


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, ids, labels, config, chunk):
    hidden = model.hidden_states(ids)  # [B, T, H]
    loss = chunked_cross_entropy(hidden, model.lm_head.weight, labels, chunk_size=chunk,
                                 softcap=config.final_logit_softcapping) / (labels != -100).sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


# kernel-name patterns -> what the time is spent on, for the profile's summary (first match wins)
KERNEL_KINDS = [
    ("attention", r"flash|fmha|attention"),
    ("nf4 dequant", r"dequantize_nf4"),
    ("rmsnorm / rope / gated act / loss (Triton)", r"_rmsnorm_|_rope_|_gated_act_|_ce_kernel"),
    ("optimizer", r"adam|_optim|multi_tensor"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|splitk|sm90|sm80"),
    ("host <-> device copy", r"Memcpy HtoD|Memcpy DtoH|Memcpy PtoP"),
    ("reduction", r"reduce"),
    ("elementwise / copy / other", r"."),
]


def print_profile(model, opt, batch, config, chunk, device, rows: int = 25):
    """The kernels of one step, by total self time on the device (torch.profiler), then the same time summed
    by kind (KERNEL_KINDS)."""
    from torch.profiler import ProfilerActivity, profile
    ids, labels = batch[0].to(device), batch[1].to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_step(model, opt, ids, labels, config, chunk)
        sync(device)
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = events.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    except Exception:  # newer torch names it by device
        key = key.replace("cuda", "device")
        table = events.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    print(table, flush=True)
    if device.type != "cuda":
        return
    kinds = dict.fromkeys([k for k, _ in KERNEL_KINDS], 0.0)
    for e in events:
        if not _is_kernel(e):  # CPU-side ops and annotation spans would count kernel time twice
            continue
        kind = next(k for k, pat in KERNEL_KINDS if re.search(pat, e.key, re.IGNORECASE))
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        kinds[kind] += us / 1e3
    total = sum(kinds.values())
    print(f"device time by kind (ms, of {total:.1f}):", flush=True)
    for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:8.1f}  {100 * ms / total:5.1f}%  {k}", flush=True)
    print_idle(prof)


def _is_kernel(e) -> bool:
    """A device-side event that is a kernel or copy, not a record_function span the profiler also puts on the
    GPU timeline (Optimizer.step#..., ProfilerStep#...), which would count the kernels inside it again."""
    name = getattr(e, "key", None) or e.name
    return (e.device_type == torch.autograd.DeviceType.CUDA and "annotation" not in name.lower()
            and not name.startswith(("Optimizer.", "ProfilerStep")))


def print_idle(prof, top: int = 8):
    """Where the GPU waited for the CPU during the profiled step: gaps between one kernel's end and the next
    one's start (any stream), their total, and the longest with the kernels either side. The profiler slows
    the CPU side, so these overstate the idle time of an unprofiled step; where they sit is the point."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if _is_kernel(e))
    if not spans:
        return
    gaps, end, prev = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, prev, name))
        if stop > end:
            end, prev = stop, name
    idle = sum(g for g, _, _ in gaps) / 1e3
    small = sum(g for g, _, _ in gaps if g < 20) / 1e3
    print(f"GPU idle between kernels: {idle:.1f} ms of {(end - spans[0][0]) / 1e3:.1f} ms "
          f"({len(gaps)} gaps; {small:.1f} ms in gaps under 20 us); longest:", flush=True)
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        print(f"  {g / 1e3:7.2f} ms  after {a[:50]}  before {b[:50]}", flush=True)


def gpu_bound_step(model, opt, batch, config, chunk, device, head_start_s: float = 0.5) -> tuple[float, float]:
    """(device seconds, host seconds) of one step issued while the GPU is held back by a spin kernel
    (`torch.cuda._sleep`) for head_start_s: the CPU then queues the step's kernels ahead of the GPU, which runs
    them back to back. The device time is the step as fast as it would be with a CPU that is never late; the
    difference to step_s is what the GPU waits on Python and launches in an ordinary step. The host time is what
    issuing the step costs the CPU (it blocks, and so overstates, only if the launch queue fills)."""
    ids, labels = batch[0].to(device), batch[1].to(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    torch.cuda._sleep(int(head_start_s * 2e9))  # cycles, at ~2 GHz (H100/H200 boost: 1.98)
    start.record()
    t = time.perf_counter()
    train_step(model, opt, ids, labels, config, chunk)
    host_s = time.perf_counter() - t
    end.record()
    sync(device)
    return start.elapsed_time(end) / 1e3, host_s


def run(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = preset_config(args.preset)
    cuda = device.type == "cuda"
    if args.gpu_memory_gb is not None:  # a smaller GPU on this one: the allocator raises OOM past the cap
        if not cuda:
            raise ValueError(f"--gpu_memory_gb caps CUDA memory; --device {args.device} has none to cap")
        total = torch.cuda.mem_get_info(device)[1]
        if not 0 < args.gpu_memory_gb * GiB <= total:
            raise ValueError(f"--gpu_memory_gb {args.gpu_memory_gb}: expected a cap within {args.device}'s "
                             f"{total / GiB:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_gb * GiB / total,
                                                   torch.cuda.current_device() if device.index is None else device.index)
    t = time.perf_counter()
    model = build_qlora_model(config, device, dtype, args.r, args.lora_alpha)
    sync(device)
    load_s = time.perf_counter() - t
    params = lora_parameters(model)
    print(f"built {args.preset} on {device} in {load_s:.1f}s; {sum(p.numel() for p in params):,} LoRA parameters",
          flush=True)

    out = {}
    chunk, mlp_chunk, keep = args.ce_chunk, args.mlp_chunk, False
    if args.gc == "auto":
        budget = None if args.max_memory_gb is None else int(args.max_memory_gb * GiB)
        plan = auto_checkpointing(model, args.batch_size, args.seq_len, budget,
                                  mlp_chunks=None if mlp_chunk is None else [mlp_chunk], optim=args.optim)
        print(f"auto checkpointing: {plan}", flush=True)
        modes, chunk, mlp_chunk = plan.modes, chunk or plan.ce_chunk_size, mlp_chunk or plan.mlp_chunk
        keep = plan.keep_attention
        out.update(budget_gb=plan.budget / GiB, predicted_peak_gb=plan.peak / GiB, dense_layers=plan.dense_layers,
                   cuda_graphs=plan.cuda_graphs)
        apply_plan(model, plan)
    else:
        modes = [args.gc] * config.num_hidden_layers
        if args.max_memory_gb is not None:
            print(f"note: --max_memory_gb applies to --gc auto only; --gc {args.gc} ignores it", flush=True)
        set_checkpointing(model, modes, mlp_chunk)
    opt = (AdamW8bit(params, lr=2e-4, weight_decay=0.01) if args.optim == "adamw_8bit" else
           torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=cuda))

    data = random_batches(config.vocab_size, args.batch_size, args.seq_len, args.warmup + args.steps,
                          vary_len=args.vary_len)
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for ids, labels in data:
        ids, labels = ids.to(device), labels.to(device)
        sync(device)
        t = time.perf_counter()
        loss = train_step(model, opt, ids, labels, config, chunk)
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())

    graphed = next((r for r in model.layer_runners or [] if isinstance(r, GraphedLayer)), None)
    if graphed is not None:  # minilora/cuda_graphs.py: captured once, replayed from the steady shape on
        g = graphed.graphs
        out.update(graph_captures=g.captures, graph_replays=g.replays, graph_failed=g.failed)
    if args.gpu_bound and cuda:
        out["gpu_bound_step_s"], out["host_issue_s"] = gpu_bound_step(model, opt, data[-1], config, chunk, device)
        print(f"one step with the CPU ahead: {out['gpu_bound_step_s'] * 1e3:.1f} ms on the GPU, "
              f"{out['host_issue_s'] * 1e3:.1f} ms to issue on the CPU", flush=True)
    if args.profile:  # one more step under the profiler: where the time goes, kernel by kernel
        print_profile(model, opt, data[-1], config, chunk, device, args.profile_rows)

    # --vary_len: every length is a workload of its own, so all timed tokens over all timed time, not a median
    timed = data[args.warmup:]
    step = (statistics.mean if args.vary_len else statistics.median)(times[args.warmup:])
    tokens = statistics.mean(ids.numel() for ids, _ in timed)
    flops = statistics.mean(train_flops(config, args.batch_size, ids.shape[1], modes, args.r, mlp_chunk, keep,
                                        recompute_output()) for ids, _ in timed)
    out.update(
        step_s=step, tok_s=tokens / step,
        peak_alloc_gb=torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
        peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GiB if cuda else None,
        first_loss=losses[0], last_loss=losses[-1], load_s=load_s, trainable=sum(p.numel() for p in params),
        mfu=flops / step / (args.peak_tflops * 1e12), tflops=flops / step / 1e12, flops_per_step=flops,
        modes=" ".join(f"{m}x{modes.count(m)}" for m in ("off", "recompute", "offload") if m in modes),
        ce_chunk=chunk, mlp_chunk=mlp_chunk, keep_attention=keep, optim=args.optim, kernels=os.environ.get("MINILORA_TRITON", "1"),
        sdpa=os.environ.get("MINILORA_SDPA", "torch"), recompute_output=recompute_output(),
        device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
    )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--preset", default="llama-3.2-1b", help=f"one of {sorted(PRESETS)} or {sorted(ALIASES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora_alpha", type=float, default=16)
    # workload
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps; step_s is their median")
    p.add_argument("--vary_len", action="store_true", help="each batch's length uniform in [seq_len/4, seq_len]; "
                   "step_s is then the mean, tok_s all timed tokens over all timed time (new lengths cost plans)")
    # memory
    p.add_argument("--gc", default="auto", choices=["off", "recompute", "offload", "auto"],
                   help="activation checkpointing of every layer, or auto: per layer within --max_memory_gb")
    p.add_argument("--max_memory_gb", type=float, default=None,
                   help="--gc auto: peak allocated GiB (2^30 bytes, as peak_alloc_gb) to stay under "
                        "(default: what the GPU has free)")
    p.add_argument("--gpu_memory_gb", type=float, default=None,
                   help="cap this process's CUDA memory at this many GiB (torch.cuda.set_per_process_memory_fraction)"
                        ", to measure what fits on a smaller GPU, e.g. 79.1 for an 80 GB H100; --gc auto plans "
                        "within it")
    p.add_argument("--optim", default="adamw_8bit", choices=OPTIMIZERS,
                   help="adamw_8bit: the peers' optimizer (bitsandbytes AdamW8bit), rebuilt in minilora/optim.py")
    p.add_argument("--ce_chunk", type=int, default=None, help="rows per loss-head chunk (default: the loss's)")
    p.add_argument("--mlp_chunk", type=int, default=None,
                   help="tokens per MLP chunk, each recomputed in backward (default: whole, or --gc auto's plan)")
    # report
    p.add_argument("--profile", action="store_true", help="after the timed steps, profile one more and print "
                   "the kernels that take the most device time")
    p.add_argument("--gpu_bound", action="store_true", help="after the timed steps, time one more with the "
                   "GPU held back until the CPU has queued it (gpu_bound_step_s, host_issue_s)")
    p.add_argument("--profile_rows", type=int, default=25, help="--profile: kernels listed")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    args = p.parse_args()

    res = dict(framework="minilora", preset=args.preset, bs=args.batch_size, seq=args.seq_len, r=args.r,
               gc=args.gc, max_memory_gb=args.max_memory_gb, gpu_memory_gb=args.gpu_memory_gb,
               alloc_conf=ALLOC_CONF)
    try:
        res.update(run(args), ok=True)
    except Exception as e:  # report, never hide: one RESULT line per run, as peers_gpu.py does
        import traceback
        traceback.print_exc()
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
