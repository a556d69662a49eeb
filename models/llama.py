"""The Llama block, which Mistral, Qwen2 and Qwen3 share: pre-norm attention and a gated MLP.

    x -> x + o_proj(attn(rope(q_proj(norm1 x)), rope(k_proj(...)), v_proj(...)))
      -> x + mlp(norm2 x)

Family differences are config fields: `qkv_bias`/`o_bias` (Qwen2, Llama's attention_bias), `qk_norm`
(Qwen3), `sliding_window` + `layer_types` (Mistral, Qwen2), tied embeddings (Llama 3.2 1B/3B, SmolLM2).
Module names are Hugging Face's, so `state_dict()` keys equal the checkpoint's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minilora.config import ModelConfig
from minilora.kernels.rope import rope_qk
from minilora.lora import project
from minilora.models.common import AttentionInputs, GatedMLP, KVCache, RMSNorm, attention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.layer_type = config.layer_types[layer_idx]
        h, d = config.hidden_size, config.head_dim
        nh, nkv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(h, nh * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, nkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, nkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * d, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        d = self.config.head_dim
        # minilora/lora.py: with LoRA on all three, one autograd Function that reads x once for their A products
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q, k = q.view(B, T, -1, d), k.view(B, T, -1, d)  # [B, T, H, D], [B, T, K, D]
        v = v.view(B, T, -1, d).transpose(1, 2)  # [B, K, T, D]
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = inputs.cos_sin[self.layer_type]
        # kernels/rope.py: on CUDA one fused kernel for q and k instead of rotate-half's cat, two muls and an add
        q, k = rope_qk(q, k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, K, T, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, K, S, D]
        y = attention(q, k, v, inputs.masks[self.layer_type], self.config.attn_scale,
                      self.config.attn_logit_softcapping, inputs.sdpa_order)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)

    def forward(self, x, inputs: AttentionInputs, cache: KVCache | None = None, need_output: bool = True):
        """need_output=False: a checkpoint's recompute, which backpropagates through the result but never reads
        it. The MLP's output only joins the residual sum, whose backward reads no values, so the MLP may leave
        it unset and skip down_proj's GEMM (GatedMLP.forward)."""
        x = x + self.self_attn(self.input_layernorm(x), inputs, cache)
        return x + self.mlp(self.post_attention_layernorm(x), need_output)


class Model(nn.Module):
    def __init__(self, config: ModelConfig, decoder_layer=DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(decoder_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [B, T]) -> logits [B, T, vocab]. `hidden_states` stops before the LM head, for the
    chunked loss that never builds all logits. position_ids restarting at 0 inside a row mark packed documents.
    `decoder_layer` is the block class; Gemma 2/3 pass their sandwich-norm block (models/gemma.py)."""

    def __init__(self, config: ModelConfig, decoder_layer=DecoderLayer):
        super().__init__()
        self.config = config
        self.model = Model(config, decoder_layer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Each entry runs one decoder layer; the training loop swaps in checkpointed versions per layer.
        self.layer_runners: list | None = None
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def hidden_states(self, input_ids, position_ids=None, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, T, hidden]
        inputs = AttentionInputs(self.config, input_ids, position_ids, cache, x.dtype)
        for i, layer in enumerate(self.model.layers):
            run = self.layer_runners[i] if self.layer_runners else None
            x = run(layer, x, inputs) if run is not None and cache is None else layer(x, inputs, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids, position_ids=None, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, position_ids, cache))
