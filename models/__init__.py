"""Model definitions, one file per block design. `build_model` picks the file by config.model_type."""
from __future__ import annotations

from minilora.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig


def model_class(config: ModelConfig):
    """The nn.Module class for this config: Llama's block serves llama/mistral/qwen2/qwen3, Gemma's the rest."""
    if config.model_type in ("llama", "mistral", "qwen2", "qwen3"):
        from minilora.models.llama import LlamaForCausalLM
        return LlamaForCausalLM
    if config.model_type in ("gemma", "gemma2", "gemma3_text"):
        from minilora.models.gemma import GemmaForCausalLM
        return GemmaForCausalLM
    raise ConfigError(f"unsupported model_type {config.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def build_model(config: ModelConfig):
    return model_class(config)(config)
