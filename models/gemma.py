"""The Gemma family (Gemma 1, 2, 3 text): Llama's attention and gated MLP with four differences.

    x = embed(ids) * sqrt(hidden)                      scale_embeddings (the scale rounded to the weights' dtype)
    norms compute x / rms(x) * (1 + w)                 norm_offset = 1 (checkpoints store w - 1)
    Gemma 1 block: Llama's, with GeGLU-tanh            hidden_act = gelu_pytorch_tanh
    Gemma 2/3 block ("sandwich"):                      sandwich_norm
        x -> x + post_attention_layernorm(attn(input_layernorm x))
          -> x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm x))
    logits = cap * tanh(lm_head(h) / cap)              final_logit_softcapping (Gemma 2)

The attention itself is `models.llama.Attention`, whose config fields cover the rest: scores scaled by
query_pre_attn_scalar**-0.5 (Gemma 2/3), soft-capped scores (Gemma 2), RMSNorm on q/k (Gemma 3), sliding and
global layers from `layer_types`, each layer type with its own RoPE base (Gemma 3: 10k local, 1M global).
Module names are Hugging Face's, so `state_dict()` keys equal the checkpoint's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minilora.config import ModelConfig
from minilora.models.common import AttentionInputs, GatedMLP, KVCache, RMSNorm
from minilora.models.llama import Attention, DecoderLayer, LlamaForCausalLM


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): smooth clamp to (-cap, cap), ~identity for |x| << cap (Gemma 2 logits)."""
    return x if cap is None else torch.tanh(x / cap) * cap


class SandwichDecoderLayer(nn.Module):
    """Gemma 2/3 block: each sublayer's output is normalised again before it joins the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h, eps, off = config.hidden_size, config.rms_norm_eps, config.norm_offset
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(h, eps, off)
        self.post_attention_layernorm = RMSNorm(h, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, off)
        self.post_feedforward_layernorm = RMSNorm(h, eps, off)

    def forward(self, x, inputs: AttentionInputs, cache: KVCache | None = None, need_output: bool = True):
        # need_output (models/llama.py's DecoderLayer) is not passed on: post_feedforward_layernorm's backward
        # reads the MLP's output, so the MLP must compute it even in a recompute
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), inputs, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with Gemma's block, scaled embeddings and soft-capped logits; same interface
    (`hidden_states`, `logits`, `forward`, `embed`, `tie_weights`, `layer_runners`)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, SandwichDecoderLayer if config.sandwich_norm else DecoderLayer)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        if not self.config.scale_embeddings:
            return x
        # transformers keeps sqrt(hidden) as an fp32 buffer and casts it to the weights' dtype before
        # multiplying, so in bf16 sqrt(3072) = 55.43 becomes 55.5. A Python float holding that rounded value
        # gives the same products (x * s in fp32, rounded once) without a tensor op to make the scalar.
        scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=torch.float32).to(x.dtype).item()
        return x * scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(hidden), self.config.final_logit_softcapping)
