"""Tiny random checkpoints of every supported family, built and saved by transformers (the oracle).

Two layers, small widths, vocab 1000; weights re-drawn with std 0.1 (norm weights too) so that differences
in the forward are not hidden by near-zero activations. Each entry covers a feature the family needs.
"""
from __future__ import annotations

import torch

SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# name -> (transformers config class, overrides)
TINY = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "llama-rope-llama3": ("LlamaConfig", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                 high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama-rope-linear": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    # max_position_embeddings below the test length, so the dynamic base change actually happens
    "llama-rope-dynamic": ("LlamaConfig", dict(rope_scaling=dict(rope_type="dynamic", factor=4.0),
                                               max_position_embeddings=16)),
    "llama-rope-yarn": ("LlamaConfig", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                               original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                             layer_types=["sliding_attention", "full_attention"],
                                             rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                                                     rope_theta=100000.0),
                                                              "sliding_attention": dict(rope_type="default",
                                                                                        rope_theta=10000.0)})),
}
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]


def tiny_hf_model(name: str, seed: int = 0, **overrides):
    """A transformers *ForCausalLM in fp32 with random weights (std 0.1), in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kw = TINY[name]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **kw, **overrides})
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def save_tiny(name: str, path, seed: int = 0, dtype=torch.float32, **overrides):
    """Write config.json + model.safetensors for a tiny model; returns the transformers model (fp32)."""
    model = tiny_hf_model(name, seed, **overrides)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return model.float()
