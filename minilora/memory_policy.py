"""Automatic activation checkpointing: given a GPU memory budget, keep as many decoder layers' activations on
the GPU as fit and checkpoint (with offload) only the rest.

Unsloth makes its user pick one mode for the whole model: checkpoint everything and offload (lean, slower) or
nothing (fast, 3-4x the memory). Between the two there is a whole curve, one layer at a time. This file
predicts the peak memory of a training step for any per-layer choice of `minilora.checkpointing` modes and
picks the fastest choice that fits; the caller applies it with
`set_checkpointing(model, plan.modes, plan.mlp_chunk)`.

The memory model of one step (bytes; layers i = 0..n-1 in forward order):

    fixed            weights (NF4 + 16-bit embeddings, norms, head), LoRA weights, their grads, AdamW state
                     (fp32, or 8-bit with minilora/optim.py)
    kept_i           what layer i holds from its forward until its backward:
                       off: its activations        recompute: its input x_i [B, T, H]      offload: nothing
    forward peak     max_i  Σ_{j<i} kept_j + fwd_i        fwd_i: layer i's own peak while it runs (input, output,
                                                          temporaries, what it keeps)
    loss-head peak   Σ_j kept_j + head                    final norm + chunked cross-entropy with its gradient
    backward peak    max_i  Σ_{j≤i} kept_j + dy + bwd_i   bwd_i: what layer i's backward adds: the recomputed
                                                          activations when checkpointed, gradient temporaries
    peak = fixed + max(forward peak, loss-head peak, backward peak)

The per-layer numbers come from a dry forward + backward of one real layer per layer type, in each mode, read
off `torch.cuda.max_memory_allocated` (`measure_layer_costs`): exact for this model, batch, sequence length,
attention kernel and torch version, where a formula would drift with each of them. `estimate_layer_costs` is
the formula, for CPU runs and tests (it counts what autograd saves in minilora's layers; a test checks it
against `saved_tensors_hooks`).

The policy, in layer order:   [offload × a] [recompute × b] [off × c]
    1. c as large as fits: an off layer skips its recompute (about a quarter of its step time).
    2. then b as large as fits: recompute keeps x_i on the GPU, so no PCIe traffic at all.
    3. offload the rest, the earliest layers: their backward comes last, so while it waits the whole later
       backward runs and each prefetch has time to land; and their inputs leave first in forward.
    4. with the room still left, keep the NF4 weights of as many layers as fit dequantized on the GPU
       (`LoRALinear.keep_dense`): each saves its layer two dequantizations a step (and their kernel launches,
       on which a small batch waits), for ~4x its weights' bytes. Activations come first: an off layer saves
       ~10x more time per byte (8B shape at 2 x 2048: ~4 ms for 0.41 GiB, against ~0.4 ms for 0.41 GiB).
Off layers sit at the end because their backward comes first: their activations are freed before any
recompute starts, so the recomputed layer never coexists with them (one layer less at the peak).
Each step stops at the first layer that does not fit, so a larger budget never gives fewer off layers.
`apply_plan` puts a plan into a model.
When not even every layer offloaded fits (in the GPU budget, or its offloaded inputs in host memory), what is
left at long context is one layer's [tokens, intermediate]
MLP activations: the layers are measured again with their MLP in chunks of MLP_CHUNK_TOKENS tokens, each
recomputed in its backward (`checkpoint_chunks`), and the same policy runs on those costs.
From KEEP_ATTENTION_MIN_SEQ tokens a row, checkpointed layers also keep their attention kernel's outputs
(`keep_attention`, minilora/checkpointing.py): the recompute skips attention's forward, whose cost grows with
T² while the kept bytes grow with T. The dry runs measure the layers that way; where no plan fits with them,
the plan is made without.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from minilora.checkpointing import MODES, HostOffloader, LayerCheckpoint, host_bytes, set_checkpointing
from minilora.cuda_graphs import cuda_graphs_env
from minilora.config import ModelConfig
from minilora.lora import LoRALinear
from minilora.optim import OPTIMIZERS
from minilora.optim import state_bytes as optimizer_state_bytes

GiB = 2**30
# Tokens per MLP chunk when the MLP must run in chunks (checkpoint_chunks): an 8B model's [8192, 14336] bf16
# activations are 0.22 GiB each, and a GEMM of 8192 rows still runs at full speed.
MLP_CHUNK_TOKENS = 8192
INFEASIBLE = 1 << 62  # cost of a mode that did not even run in the dry measurement (out of memory)
# Sequence length (tokens a row) from which checkpointed layers keep their attention outputs. Below it the
# attention forward a recompute saves is small (8B shape at 2 x 2048: ~0.15 ms a layer) next to what keeping
# costs: every op of the layer passes through a Python dispatch mode twice, a few microseconds each, on a step
# whose GPU already waits on the CPU. At 8k the forward is ~1 ms a layer and rises with T²; 32k: ~17 ms.
KEEP_ATTENTION_MIN_SEQ = 8192


class MemoryBudgetError(ValueError):
    pass


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class ModeCost:
    """Bytes one decoder layer costs in one checkpointing mode (see the module docstring for where each counts)."""

    kept: int  # held from the layer's forward until its backward
    forward: int  # peak on top of the earlier layers' kept bytes while its forward runs
    backward: int  # peak on top of kept (its own and earlier layers') + dy while its backward runs


LayerCosts = dict  # mode -> ModeCost, for one layer


@dataclass
class Plan:
    modes: list[str]  # one per decoder layer, for minilora.checkpointing.set_checkpointing
    peak: int  # predicted peak allocated bytes of a training step
    budget: int
    fixed: int
    head: int
    lean: int  # predicted peak with every layer offloaded: the least this batch can train in
    full: int  # predicted peak with no checkpointing at all
    ce_chunk_size: int | None = None  # rows per chunk of the loss head that the prediction assumed
    mlp_chunk: int | None = None  # tokens per MLP chunk (set_checkpointing's mlp_chunk) that it assumed
    host: int = 0  # bytes of layer inputs offloaded to host memory
    dense_layers: int = 0  # layers 0..dense_layers-1 keep their weights dequantized (counted in peak)
    keep_attention: bool = False  # checkpointed layers keep their attention outputs (set_checkpointing's)
    cuda_graphs: bool = False  # the "off" layers run as CUDA graphs (set_checkpointing's; cuda_graphs_for)

    def counts(self) -> str:
        counts = " ".join(f"{m}x{self.modes.count(m)}" for m in MODES if m in self.modes)
        counts += f", MLP in chunks of {self.mlp_chunk} tokens" if self.mlp_chunk else ""
        counts += ", attention outputs kept" if self.keep_attention and self.modes.count("off") < len(self.modes) else ""
        counts += f", {self.dense_layers} layers' weights dequantized" if self.dense_layers else ""
        return counts + (", CUDA graphs" if self.cuda_graphs else "")

    def __str__(self) -> str:
        return (f"{self.counts()}: predicted peak {fmt_bytes(self.peak)} of {fmt_bytes(self.budget)} (all offloaded "
                f"{fmt_bytes(self.lean)}, none checkpointed {fmt_bytes(self.full)}; fixed {fmt_bytes(self.fixed)}, "
                f"loss head {fmt_bytes(self.head)}; offloaded to host {fmt_bytes(self.host)})")


# --- the selection, pure arithmetic ------------------------------------------------------------------------

def predict_peak(modes: list[str], costs: list[LayerCosts], fixed: int, head: int, dy: int) -> int:
    """Peak allocated bytes of one step with these per-layer modes (formula in the module docstring)."""
    before = [0, *itertools.accumulate(costs[i][m].kept for i, m in enumerate(modes))]  # Σ_{j<i} kept_j
    fwd = max(before[i] + costs[i][m].forward for i, m in enumerate(modes))
    bwd = max(before[i + 1] + dy + costs[i][m].backward for i, m in enumerate(modes))
    return fixed + max(fwd, before[-1] + head, bwd)


def plan_checkpointing(costs: list[LayerCosts], fixed: int, head: int, dy: int, budget: int,
                       reserve: int = 0, host_budget: int | None = None, dense: list[int] = (),
                       host_extra: int = 0) -> Plan:
    """The per-layer modes with the most off layers, then the most recompute layers, whose predicted peak
    fits `budget - reserve`; layout [offload...][recompute...][off...]. Raises MemoryBudgetError if none does.
    Then, `dense` giving the bytes of each layer's dequantized weights (layer 0 first), as many layers' as still
    fit keep them (`dense_layers`; empty `dense`: none).

    `host_budget`: bytes of host memory the offloaded inputs (dy bytes each) may take. At long context they are
    gigabytes a layer, and running out of host memory kills the process instead of raising: when the plan
    offloads too much, it trades off layers for recompute layers (one off layer's activations hold several
    layers' inputs) until the host side fits. `host_extra`: pinned bytes an offloaded layer holds besides its
    input (its attention outputs, with keep_attention)."""
    n, limit = len(costs), budget - reserve

    def peak(modes):
        return predict_peak(modes, costs, fixed, head, dy)

    lean, full = peak(["offload"] * n), peak(["off"] * n)
    if lean > limit:
        layer = max(dy + c["offload"].backward for c in costs)
        raise MemoryBudgetError(
            f"memory budget {fmt_bytes(budget)} is too small: even with every layer checkpointed and offloaded a "
            f"step needs ~{fmt_bytes(lean)} (weights, LoRA and optimizer {fmt_bytes(fixed)}, loss head "
            f"{fmt_bytes(head)}, one layer's backward {fmt_bytes(layer)}), plus {fmt_bytes(reserve)} kept in "
            f"reserve. Lower batch_size x seq_len, or raise the budget (--max_memory_gb)")

    def fill(max_off: int) -> list[str]:
        modes = ["offload"] * n
        for new in ("off", "recompute"):  # off layers first (from the end), then recompute below them
            for i in reversed(range(n)):
                if modes[i] != "offload":
                    continue
                trial = modes[:i] + [new] + modes[i + 1:]
                if (new == "off" and trial.count("off") > max_off) or peak(trial) > limit:
                    break
                modes = trial
        return modes

    per_input = host_bytes(dy) + host_extra  # what the HostOffloader pins for one offloaded layer
    modes = fill(n)
    max_off = modes.count("off")
    while host_budget is not None and modes.count("offload") * per_input > host_budget:
        if max_off == 0:
            raise MemoryBudgetError(
                f"host memory is too small: within the GPU budget of {fmt_bytes(budget)}, {modes.count('offload')} "
                f"layer inputs of {fmt_bytes(dy)} each must go to host memory "
                f"({fmt_bytes(modes.count('offload') * per_input)}), and {fmt_bytes(host_budget)} is available. Lower batch_size x seq_len, or raise the GPU budget")
        max_off -= 1
        modes = fill(max_off)
    at = peak(modes)
    n_dense = 0
    while n_dense < len(dense) and at + dense[n_dense] <= limit:
        at += dense[n_dense]
        n_dense += 1
    return Plan(modes, at, budget, fixed, head, lean, full, host=modes.count("offload") * per_input,
                dense_layers=n_dense)


# --- the formula: what autograd keeps in minilora's layers ---------------------------------------------------

def estimate_layer_costs(config: ModelConfig, batch: int, seq: int, dtype_bytes: int = 2,
                         r: int = 16, mlp_chunk: int | None = None) -> list[LayerCosts]:
    """Per-layer costs from a count of the tensors minilora's decoder layer saves for backward on the torch
    reference path, which CPU runs take (bf16: b = 2, N = batch·seq tokens; on CUDA the fused kernels keep less,
    and `measure_layer_costs` reads that off the device instead):

        each RMSNorm       fp32 copy of its input, fp32 rstd; its bf16 output where the next op saves it
                           (the projections after input/pre-MLP norms do; the residual add after Gemma's
                           post-sublayer norms and RoPE after qk_norm multiply by constants and do not)
        LoRA (7 modules)   xa = x Aᵀ [N, r] each; their inputs are the norms' outputs, counted there; A and B
                           cast to the activations' dtype (none when that is fp32: the parameters themselves)
        attention (SDPA)   q, k, v after RoPE, the output (o_proj's input is a view of it), fp32 logsumexp;
                           RoPE multiplies by constant cos/sin, so nothing more of q or k is kept
        soft-capped        (Gemma 2: explicit scores) q, GQA-repeated k and v, o_proj's input copy, and per
                           score the tanh output (b), fp32 softmax (4), bf16 probabilities (b); a bool mask
        qk_norm            an RMSNorm over head_dim on q and one on k
        gated MLP          gate output, act(gate), up output, their product (down's input): 4 [N, I];
                           in chunks (`mlp_chunk` tokens, checkpoint_chunks): nothing more (it keeps only
                           its input, the norm's output counted above)
    Transients (forward and backward peaks) are rougher: the largest dequantized weight, three [N, I]
    (three [chunk, I] in chunks, and the chunk's own activations in backward)."""
    c, b = config, dtype_bytes
    N, H, I, D = batch * seq, c.hidden_size, c.intermediate_size, c.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    x = b * N * H  # one [B, T, H] activation: a layer's input, output, or their gradients

    def norm(rows, width, output_saved):
        return (4 + (b if output_saved else 0)) * rows * width + 4 * rows

    chunked = mlp_chunk is not None and N > mlp_chunk
    # A [r, in] + B [out, r] of the 7 modules; the MLP's three keep theirs (and xa) per chunk only, when chunked
    lora_weights = r * (2 * (H + nh * D) + 2 * (H + nkv * D) + (0 if chunked else 3 * (H + I)))
    lora = (4 if chunked else 7) * b * N * r
    acts = 2 * norm(N, H, True) + lora + (b * lora_weights if b < 4 else 0) + (0 if chunked else 4 * b * N * I)
    if c.sandwich_norm:
        acts += 2 * norm(N, H, False)
    if c.attn_logit_softcapping is None:
        acts += b * N * D * (2 * nh + 2 * nkv) + 4 * N * nh
    else:
        acts += 4 * b * N * nh * D + (2 * b + 4) * batch * nh * seq * seq + seq * seq  # q, k, v, o_proj input
    if c.qk_norm:
        acts += norm(N * nh, D, False) + norm(N * nkv, D, False)
    weight = b * max(I, nh * D) * H  # the largest dequantized weight, a temporary in forward and backward
    # gate, up and their product alive at once: no-grad MLP forward, MLP backward (a chunk's, and its saved four)
    mlp = 7 * b * mlp_chunk * I if chunked else 3 * b * N * I
    costs = {
        "off": ModeCost(kept=acts, forward=x + acts + x + weight + (mlp if chunked else 0), backward=mlp + weight + x),
        "recompute": ModeCost(kept=x, forward=x + x + mlp + weight, backward=acts + mlp + weight + x),
        # backward: the fetched input, the previous layer's input arriving meanwhile, then as recompute
        "offload": ModeCost(kept=0, forward=x + x + mlp + weight, backward=2 * x + acts + mlp + weight + x),
    }
    return [costs] * c.num_hidden_layers


def estimate_head_bytes(config: ModelConfig, batch: int, seq: int, chunk_rows: int, dtype_bytes: int = 2) -> int:
    """The loss head at the end of forward: the last layer's output, the final norm's saved tensors, the
    labelled rows' copy and gradient [N, H], and one chunk's logits (bf16 product, fp32 copy, fp32 gradient)."""
    b, N, H, V = dtype_bytes, batch * seq, config.hidden_size, config.vocab_size
    return b * N * H + (4 + b) * N * H + 4 * N + 2 * b * N * H + min(chunk_rows, N) * V * (b + 4 + 4)


# --- measuring one real layer ------------------------------------------------------------------------------

def attention_kept_bytes(config: ModelConfig, batch: int, seq: int, dtype_bytes: int = 2) -> list[int]:
    """Bytes of what keep_attention keeps per layer, by tensor: the attention output [B, H, T, D] and its fp32
    logsumexp [B, H, T] (the fused kernels' outputs; the RNG state beside them is a few bytes)."""
    rows = batch * config.num_attention_heads * seq
    return [rows * config.head_dim * dtype_bytes, rows * 4]


def measure_layer_costs(model, batch: int, seq: int, keep_attention: bool = False) -> list[LayerCosts]:
    """Costs from a dry forward + backward of the first layer of each layer type, in each mode, on random
    inputs on the model's CUDA device. A mode that runs out of memory here is marked infeasible. Offloaded
    layers get one more layer's stash in backward: the previous layer's input (and kept attention outputs),
    prefetched meanwhile."""
    from minilora.models.common import AttentionInputs, sdpa_priority

    config, layers = model.config, model.model.layers
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    inputs = AttentionInputs(config, ids, None, None, dtype)
    inputs.sdpa_order = sdpa_priority()  # measure with the backends of the steady state, not a first forward's
    by_type = {}
    for lt in dict.fromkeys(config.layer_types):
        layer = layers[config.layer_types.index(lt)]
        try:  # first use allocates for good (cuBLAS workspace): not a cost of the first mode measured
            with torch.no_grad():
                layer(torch.zeros(batch, seq, config.hidden_size, device=device, dtype=dtype), inputs)
        except torch.OutOfMemoryError:
            pass  # the modes' own dry runs will say which ones fit
        by_type[lt] = {m: _measure_mode(layer, m, inputs, (batch, seq, config.hidden_size), dtype, device,
                                        keep_attention) for m in MODES}
        x = batch * seq * config.hidden_size * torch.finfo(dtype).bits // 8
        if keep_attention:
            x += sum(attention_kept_bytes(config, batch, seq, torch.finfo(dtype).bits // 8))
        off = by_type[lt]["offload"]
        by_type[lt]["offload"] = ModeCost(off.kept, off.forward, off.backward + x)
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return [by_type[lt] for lt in config.layer_types]


def _measure_mode(layer, mode: str, inputs, shape, dtype, device, keep_attention: bool = False) -> ModeCost:
    run = {"off": None, "recompute": LayerCheckpoint(None, keep_attention),
           "offload": LayerCheckpoint(HostOffloader(), keep_attention)}[mode]
    torch.cuda.synchronize(device)
    try:
        x_prev = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        x = x_prev * 1.0  # [B, T, H], not a leaf: only the layer can keep it alive once we drop it
        nx = x.numel() * x.element_size()
        base = torch.cuda.memory_allocated(device) - nx
        torch.cuda.reset_peak_memory_stats(device)
        y = layer(x, inputs) if run is None else run(layer, x, inputs)
        del x
        torch.cuda.synchronize(device)
        forward = torch.cuda.max_memory_allocated(device) - base
        kept = torch.cuda.memory_allocated(device) - base - y.numel() * y.element_size()
        dy = torch.randn_like(y)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        y.backward(dy)
        torch.cuda.synchronize(device)
        backward = torch.cuda.max_memory_allocated(device) - start
    except torch.OutOfMemoryError:
        return ModeCost(INFEASIBLE, INFEASIBLE, INFEASIBLE)
    finally:
        x_prev = x = y = dy = None  # noqa: F841 - drop everything the dry run made
        layer.zero_grad(set_to_none=True)
    return ModeCost(max(kept, 0), forward, backward)


def measure_head_bytes(model, batch: int, seq: int, chunk_size: int | None) -> int:
    """Peak bytes of the final norm + chunked cross-entropy + its backward, on a random last-layer output."""
    from minilora.loss import chunked_cross_entropy

    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        h = torch.randn(batch, seq, model.config.hidden_size, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
        loss = chunked_cross_entropy(model.model.norm(h), model.lm_head.weight, labels,
                                     softcap=model.config.final_logit_softcapping, chunk_size=chunk_size)
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    except torch.OutOfMemoryError:
        return INFEASIBLE
    finally:
        h = labels = loss = None  # noqa: F841
        model.zero_grad(set_to_none=True)


# --- putting it together ------------------------------------------------------------------------------------

def default_budget(device: torch.device) -> int:
    """What this process could hold at its peak: CUDA's free memory plus what the caching allocator already
    holds, no more than a cap set with torch.cuda.set_per_process_memory_fraction, less 8% for fragmentation
    (reserved memory runs a few percent above allocated); on CPU, available RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = free + torch.cuda.memory_reserved(device)
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
        if get_fraction is not None:  # the allocator raises OOM past fraction * total, whatever is free
            index = torch.cuda.current_device() if device.index is None else device.index  # it takes no bare "cuda"
            held = min(held, int(get_fraction(index) * total))
        return int(held * 0.92)
    return _available_ram()


def _available_ram() -> int:
    """MemAvailable (free plus reclaimable page cache; free pages where /proc is missing), and no more than a
    container's cgroup v2 limit leaves (memory.max - memory.current), which MemAvailable does not see."""
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def model_bytes(model) -> int:
    """Bytes of parameters, buffers and NF4 weights (which are neither), each storage once."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        q = getattr(m, "nf4", None)
        if q is not None:
            tensors += [q.packed, q.absmax, q.nested_absmax, q.offset, q.quant_map, q.nested_quant_map]
    for t in tensors:
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def auto_checkpointing(model, batch: int, seq: int, budget: int | None = None, reserve: int | None = None,
                       chunk_sizes: list[int | None] | None = None,
                       mlp_chunks: list[int | None] | None = None, optim: str = "adamw") -> Plan:
    """The plan for this model at batch × seq within `budget` bytes of peak allocated memory (default: what the
    device has free). Call after LoRA is injected and before the optimizer exists; the gradients of the
    trainable parameters and the optimizer's state are added here (`optim`: "adamw", two moments in the
    parameters' dtype; "adamw_8bit", minilora/optim.py's). CUDA: measured costs; elsewhere: the formula.

    `reserve` (default 128 MiB + 2% of the budget) is kept back for what the model does not see (cuBLAS
    workspaces, allocator rounding). The loss head's chunk size is chosen too: the largest of `chunk_sizes`
    (default: the loss's own default, then 1/4 and 1/16 of it) with which a plan fits; and, only if none does,
    the MLP in chunks of MLP_CHUNK_TOKENS tokens (`plan.mlp_chunk`, for set_checkpointing); `mlp_chunks`
    replaces that list ([8192]: plan with chunks from the start, skipping the dry runs of the whole MLP).
    On CUDA from KEEP_ATTENTION_MIN_SEQ tokens a row, each of those is tried first with keep_attention
    (MINILORA_KEEP_ATTENTION=0 or 1 overrides the choice, for before/after runs)."""
    from minilora.loss import default_chunk_size

    device = model.lm_head.weight.device
    cuda = device.type == "cuda"
    budget = default_budget(device) if budget is None else int(budget)
    reserve = int(128 * 2**20 + 0.02 * budget) if reserve is None else int(reserve)
    # offloaded inputs go to pinned host memory; on a CPU-only machine "host" is the budget itself
    host_budget = int(0.8 * _available_ram()) if cuda else None
    dtype = model.model.embed_tokens.weight.dtype
    dy = batch * seq * model.config.hidden_size * torch.finfo(dtype).bits // 8
    r = max((getattr(m, "r", 0) for m in model.modules()), default=0)
    rows = default_chunk_size(batch * seq, model.config.vocab_size, device)
    # MLP in token chunks only when nothing fits without: it costs one more MLP forward per layer
    if optim not in OPTIMIZERS:
        raise ValueError(f"auto_checkpointing: optim {optim!r}: expected one of {', '.join(OPTIMIZERS)}")
    if mlp_chunks is None:
        mlp_chunks = [None] + ([MLP_CHUNK_TOKENS] if batch * seq > MLP_CHUNK_TOKENS else [])
    if not mlp_chunks:
        raise ValueError("auto_checkpointing: mlp_chunks is empty; pass None for the default [None, MLP_CHUNK_TOKENS]")
    keep_dense_layers(model, 0)  # plan from the NF4 weights alone: copies kept by an earlier plan go
    dense = [sum(m.nf4.shape.numel() * m.nf4.dtype.itemsize for m in layer.modules()
                 if isinstance(m, LoRALinear) and m.nf4 is not None) for layer in model.model.layers]
    # soft-capped attention (Gemma 2) is computed explicitly, not by a fused kernel: nothing to keep
    keeps = [True, False] if keep_attention_at(seq, cuda) and model.config.attn_logit_softcapping is None else [False]
    kept = attention_kept_bytes(model.config, batch, seq, torch.finfo(dtype).bits // 8)
    error = None
    for mlp_chunk, keep in itertools.product(mlp_chunks, keeps):
        for layer in model.model.layers:  # the dry runs below measure the layers as they will run
            layer.mlp.chunk_tokens = mlp_chunk
        try:
            costs = (measure_layer_costs(model, batch, seq, keep) if cuda else
                     estimate_layer_costs(model.config, batch, seq, torch.finfo(dtype).bits // 8, r, mlp_chunk))
        finally:
            for layer in model.model.layers:
                layer.mlp.chunk_tokens = None  # the caller applies the plan's with set_checkpointing
        # after the dry runs: what they allocated for good (cuBLAS workspaces) is part of the fixed bytes now
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = sum(p.numel() * p.element_size() for p in trainable)
        state = 2 * grads if optim == "adamw" else optimizer_state_bytes([p.numel() for p in trainable])
        fixed = (torch.cuda.memory_allocated(device) if cuda else model_bytes(model)) + grads + state
        for chunk in chunk_sizes or [rows, max(1, rows // 4), max(1, rows // 16)]:
            chunk = chunk or rows
            head = (measure_head_bytes(model, batch, seq, chunk) if cuda else
                    estimate_head_bytes(model.config, batch, seq, chunk, torch.finfo(dtype).bits // 8))
            try:
                plan = plan_checkpointing(costs, fixed, head, dy, budget, reserve, host_budget, dense,
                                          sum(host_bytes(n) for n in kept) if keep else 0)
            except MemoryBudgetError as e:
                error = e
                continue
            plan.ce_chunk_size, plan.mlp_chunk, plan.keep_attention = chunk, mlp_chunk, keep
            plan.cuda_graphs = cuda_graphs_for(plan, cuda)
            return plan
    raise error


def keep_attention_at(seq: int, cuda: bool) -> bool:
    """Whether plans at this sequence length try keep_attention: MINILORA_KEEP_ATTENTION=1/0, else on CUDA from
    KEEP_ATTENTION_MIN_SEQ tokens (the CPU formula does not model it)."""
    env = os.environ.get("MINILORA_KEEP_ATTENTION")
    if env not in (None, "0", "1"):
        raise ValueError(f"MINILORA_KEEP_ATTENTION={env!r}: expected 0 or 1")
    if env is not None:
        return env == "1" and cuda
    return cuda and seq >= KEEP_ATTENTION_MIN_SEQ


def cuda_graphs_for(plan: Plan, cuda: bool) -> bool:
    """Whether the plan's "off" layers run as CUDA graphs (minilora/cuda_graphs.py): MINILORA_CUDA_GRAPHS=1/0,
    else on CUDA when the predicted peak is at most half the budget. The graphs' pool keeps those layers'
    activations allocated between steps, so a step at another batch shape (run eagerly) needs as much again;
    half the budget leaves room for that. The plans that checkpoint most layers are the tight ones, where the
    recompute's kernels are long enough that launches matter less."""
    env = cuda_graphs_env()
    if "off" not in plan.modes or plan.mlp_chunk is not None or not cuda:
        return False
    return env if env is not None else 2 * plan.peak <= plan.budget


def apply_plan(model, plan: Plan) -> None:
    """Checkpointing modes, MLP chunks, keep_attention and CUDA graphs as planned (`set_checkpointing`), and the
    dequantized weights of layers 0..plan.dense_layers-1 kept (every other layer's dropped)."""
    set_checkpointing(model, plan.modes, plan.mlp_chunk, plan.keep_attention, plan.cuda_graphs)
    keep_dense_layers(model, plan.dense_layers)


def keep_dense_layers(model, n: int) -> None:
    """Decoder layers 0..n-1 keep their NF4 weights dequantized (`LoRALinear.keep_dense`), the others not."""
    for i, layer in enumerate(model.model.layers):
        for m in layer.modules():
            if isinstance(m, LoRALinear):
                m.keep_dense(i < n)
