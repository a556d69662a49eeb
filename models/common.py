"""Pieces every family shares: RMSNorm, rotary embeddings, attention with its masks, the gated MLP, a KV cache.

Shapes: B batch, T query tokens, S key tokens (T + cached), H query heads, K key/value heads, D head_dim.

Numerics follow transformers' modeling files where they differ from the textbook, so fp32 logits agree to
~1e-5 and bf16 runs round the same way: RMSNorm normalises in fp32 and casts back before the weight (Llama)
or after it (Gemma's `1 + w`); cos/sin are computed in fp32 and cast to the activations' dtype.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minilora.checkpointing import checkpoint_chunks
from minilora.config import ModelConfig, rope_inv_freq
from minilora.kernels.gated_act import gated_act
from minilora.kernels.rmsnorm import rmsnorm
from minilora.lora import project


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + w). Gemma stores w - 1 (offset 1, weights init at 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # kernels/rmsnorm.py: fused Triton forward/backward on CUDA (keeps only x and one fp32 rstd per row for
        # backward), its torch reference elsewhere; the numerics are the reference's, documented there
        return rmsnorm(x, self.weight, self.eps, self.offset)


def rope_cos_sin(config: ModelConfig, layer_type: str, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, T, D] for the given positions [B, T]. Recomputed per forward: it is a [B,T,D/2]
    outer product, negligible next to attention, and keeps the module free of buffers on the meta device."""
    rope = config.rope[layer_type]
    seq_len = 0  # only dynamic NTK scaling depends on the length, and reading it costs a device sync
    if rope["rope_type"] == "dynamic" and position_ids.numel():
        seq_len = int(position_ids.max()) + 1
    inv_freq, scale = rope_inv_freq(rope, config.head_dim, config.max_position_embeddings, seq_len)
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: [f0..f_{D/2-1}, f0..f_{D/2-1}]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None,
                   k_doc: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, S], True where query may attend key: causal by position, within the same packed
    document, and (sliding window) at most window-1 positions back, as transformers' `sliding_window_overlay`."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # [B, T, 1], [B, 1, S]
    mask = kp <= qp
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    if window is not None:
        mask = mask & (qp - kp < window)
    return mask[:, None]


# SDPA's CUDA backends by the names MINILORA_SDPA takes
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def _first(name: str) -> list[SDPBackend]:
    first = SDPA_BACKENDS[name]
    return [first, *(b for b in SDPA_BACKENDS.values() if b != first)]


def sdpa_priority() -> list[SDPBackend] | None:
    """The order MINILORA_SDPA asks for (flash, cudnn, efficient or math first, then the rest); None when it is
    unset or `torch`: `sdpa_order` decides then. A backend that cannot take the inputs is skipped for the next,
    so a first choice never turns into an error."""
    name = os.environ.get("MINILORA_SDPA", "torch")
    if name == "torch":
        return None
    if name not in SDPA_BACKENDS:
        raise ValueError(f"MINILORA_SDPA={name!r}: choose one of {sorted(SDPA_BACKENDS)} or 'torch'")
    return _first(name)


# (batch, length, device) of the plain causal path -> forward passes seen at it (sdpa_order's memory)
_FORWARDS_AT_SHAPE: dict[tuple, int] = {}


def sdpa_order(batch: int, length: int, device: torch.device) -> list[SDPBackend] | None:
    """The order in which SDPA tries its CUDA backends for one forward pass (every layer, and the recompute of a
    checkpointed one, which reuse the pass's AttentionInputs): MINILORA_SDPA's if set; otherwise flash first
    in the first forward at this batch and length, and torch's own order (None) from the second on.

    Why: torch 2.11 picks cuDNN on an H200 (sm90, cuDNN 9.19), the fastest at a fixed shape: 0.63 ms for forward
    + backward of the 8B shape's attention at 2 x 2048 against flash's 1.10, and 57 ms against 95 at 32k
    (scripts/bench_attention.py); the 8B step at 2 x 2048 ran 16,709 tok/s against 15,930 with flash first. But
    cuDNN builds a plan at every new length, ~110-145 ms on its first call there against ~1 ms for flash, and
    padded batches change length every step: with lengths uniform in [512, 2048], the 8B step ran 7,286 tok/s
    with cuDNN against 12,625 with flash first (issue 6, one device call, `bench.py --vary_len`). A length seen
    once is then cheapest with flash, and one that recurs pays cuDNN's plan once and runs its kernel after:
    11,576 tok/s on those lengths (another call), still below flash first throughout, since a length seen only
    twice pays a plan it hardly uses; MINILORA_SDPA=flash is the choice for such data."""
    order = sdpa_priority()
    if order is not None or device.type != "cuda":
        return order
    key = (batch, length, device)
    seen = _FORWARDS_AT_SHAPE.get(key, 0)
    _FORWARDS_AT_SHAPE[key] = seen + 1
    return _first("flash") if seen == 0 else None


def attention(q, k, v, mask, scale: float, softcap: float | None = None,
              order: list[SDPBackend] | None = None):
    """q [B, H, T, D], k/v [B, K, S, D], mask [B, 1, T, S] bool or None (plain causal, T == S).
    The plain causal path runs SDPA's CUDA backends in `order` (AttentionInputs' `sdpa_order`; None: torch's
    own). Soft-capping the scores (Gemma 2) is not expressible in SDPA, so that path computes the scores
    explicitly: softmax(cap * tanh(q k^T * scale / cap) + mask) v."""
    if softcap is None and mask is None:
        with contextlib.nullcontext() if order is None or not q.is_cuda else sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # With a mask, SDPA's memory-efficient kernel takes no GQA (enable_gqa would fall back to the math kernel,
    # which builds fp32 [B, H, T, S] scores): repeat each key/value head for its n_rep query heads instead.
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # [B, H, S, D]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


# Hugging Face's hidden_act names -> kernels/gated_act.py's activations
GATED_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu (Llama, Qwen, Mistral), GeGLU-tanh with gelu (Gemma)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        if config.hidden_act not in GATED_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: {sorted(GATED_ACTIVATIONS)}")
        self.activation = GATED_ACTIVATIONS[config.hidden_act]
        self.chunk_tokens: int | None = None  # set by minilora.checkpointing.set_checkpointing(mlp_chunk=...)

    def forward(self, x, need_output: bool = True):  # [B, T, H] -> [B, T, H]
        """need_output=False: the caller only backpropagates through the result and never reads its values (a
        checkpoint's recompute, whose block adds it to the residual stream), so a LoRA down_proj skips its GEMM
        and leaves them unset, as do MLP chunks (checkpoint_chunks)."""
        if self.chunk_tokens is not None and x.shape[:-1].numel() > self.chunk_tokens:
            # long sequences: chunks of tokens, each recomputed in backward, so the [tokens, I] activations
            # below exist for one chunk at a time (minilora/checkpointing.py, checkpoint_chunks)
            params = [p for p in self.parameters() if p.requires_grad]
            return checkpoint_chunks(self._forward, x, params, self.chunk_tokens, need_output)
        return self._forward(x, need_output)

    def _forward(self, x, need_output: bool = True):
        g, u = project(x, self.gate_proj, self.up_proj)  # [B, T, I] each (minilora/lora.py: one Function with LoRA)
        # A LoRALinear down_proj (minilora/lora.py) takes g and u itself: on CUDA it fuses the activation into
        # its autograd Function and recomputes act(g) * u in backward instead of keeping it. g and u are ours
        # alone (no projection keeps its output), so its backward may write their gradients over them.
        if hasattr(self.down_proj, "forward_gated"):
            return self.down_proj.forward_gated(g, u, self.activation, overwrite=True, need_output=need_output)
        # kernels/gated_act.py: act(g) * u fused on CUDA, keeping g and u for backward instead of g, u and act(g)
        return self.down_proj(gated_act(g, u, self.activation))


class KVCache:
    """Preallocated keys/values per layer, [B, K, max_len, D], filled left to right. `length` is the number
    of positions already written; a model forward appends T positions to every layer, then advances it."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, K, T, D] after the cached positions; return all keys/values so far [B, K, S, D]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class AttentionInputs:
    """What every layer's attention needs for one forward, computed once: cos/sin and the mask for each
    layer type present, and the SDPA backend order (`sdpa_order`). mask None means plain causal over a fresh
    sequence (SDPA's fast is_causal path)."""

    def __init__(self, config: ModelConfig, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                 cache: KVCache | None, dtype: torch.dtype):
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        device = input_ids.device
        packed = position_ids is not None and cache is None
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        # Packed rows (padding-free training): a position that restarts at 0 starts a new document.
        doc = (position_ids == 0).cumsum(-1) if packed else None
        k_pos = position_ids
        if past:  # cached keys sit at positions 0..past-1 (generation never packs)
            k_pos = torch.arange(past + T, device=device).expand(B, past + T)
        self.cos_sin, self.masks = {}, {}
        for lt in set(config.layer_types):
            self.cos_sin[lt] = rope_cos_sin(config, lt, position_ids, dtype)
            window = config.sliding_window if lt == "sliding_attention" else None
            needs_mask = packed or past or (window is not None and window < past + T)
            self.masks[lt] = attention_mask(position_ids, k_pos, doc, doc, window) if needs_mask else None
        plain = any(m is None for m in self.masks.values())
        self.sdpa_order = sdpa_order(B, T, device) if plain else None
