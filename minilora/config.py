"""One config dataclass for every supported family, parsed from a checkpoint's `config.json`.

Behaviour is chosen by fields that mean something (`qk_norm`, `qkv_bias`, `norm_offset`, `sandwich_norm`,
`sliding_window`, ...), never by the model's name. The only place `model_type` matters is `from_hf`, where each
family's config.json conventions (what transformers' `<Family>Config` fixes in code rather than in the file)
become those fields, and `models.build_model`, which picks the file that defines the block.

RoPE comes in two spellings on disk:
  classic:  "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8, ...}
  newer:    "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8, ...}
            or per layer type (Gemma 3): {"full_attention": {...}, "sliding_attention": {...}}
Both become `rope[layer_type] = {"rope_type": ..., "rope_theta": ..., <scaling keys>}`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma)
    tie_word_embeddings: bool = False
    # attention block
    qkv_bias: bool = False  # Qwen2: biases on q/k/v only
    o_bias: bool = False  # Llama's `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores scaled by this**-0.5, not head_dim**-0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # per layer: "full_attention" | "sliding_attention"
    rope: dict[str, dict] = field(default_factory=dict)  # per layer type, see module docstring
    # Gemma family
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight); Gemma stores weight - 1
    scale_embeddings: bool = False  # embeddings multiplied by sqrt(hidden_size)
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention and around the MLP too
    final_logit_softcapping: float | None = None
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, for export

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = set(self.layer_types) - set(LAYER_TYPES)
        if bad:
            raise ConfigError(f"unsupported layer_types {sorted(bad)}; supported: {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        for lt in set(self.layer_types):
            if lt not in self.rope:
                raise ConfigError(f"no RoPE parameters for layer type {lt!r}")
            rtype = self.rope[lt]["rope_type"]
            if rtype not in ROPE_TYPES:
                raise ConfigError(f"unsupported rope_type {rtype!r}; supported: {ROPE_TYPES}")

    # derived, computed from the fields above
    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        try:
            return cls.from_hf(d)
        except (ConfigError, KeyError, TypeError) as e:
            msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ConfigError(f"{path}: {msg}") from None

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Map a transformers config.json dict onto the fields. Per-family conventions are the transformers
        defaults of `<Family>Config` and what `<Family>Attention` hard-codes (e.g. Qwen2's q/k/v bias)."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("use_bidirectional_attention"):  # EmbeddingGemma: an encoder, not a causal LM
            raise ConfigError("use_bidirectional_attention is true; minilora supports causal language models only")
        gemma = mt.startswith("gemma")
        n_layers = d["num_hidden_layers"]
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
        # Gemma 1 configs on the Hub say "gelu" but mean the tanh approximation (transformers rewrites it too)
        act = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if gemma and act == "gelu":
            act = "gelu_pytorch_tanh"
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            hidden_act=act,
            tie_word_embeddings=d.get("tie_word_embeddings", gemma),
            qkv_bias=True if mt == "qwen2" else attention_bias,
            o_bias=False if mt == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "gemma3_text"),
            # missing Gemma 2/3 keys take transformers' Gemma2Config/Gemma3TextConfig defaults; null means off
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if mt in ("gemma2", "gemma3_text") else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0) if mt == "gemma2" else None,
            sliding_window=_sliding_window(d, mt),
            layer_types=_layer_types(d, mt, n_layers),
            rope=_rope(d, mt),
            norm_offset=1.0 if gemma else 0.0,
            scale_embeddings=gemma,
            sandwich_norm=mt in ("gemma2", "gemma3_text"),
            final_logit_softcapping=(d.get("final_logit_softcapping", 30.0 if mt == "gemma2" else None)
                                     if mt in ("gemma2", "gemma3_text") else None),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            raw=d,
        )


def _sliding_window(d: dict, mt: str) -> int | None:
    if mt in ("qwen2", "qwen3") and not d.get("use_sliding_window", False) and "layer_types" not in d:
        return None  # Qwen configs carry a sliding_window value that is off unless use_sliding_window
    if mt in ("gemma2", "gemma3_text"):
        return d.get("sliding_window", 4096)  # transformers' default for both
    return d.get("sliding_window")


def _layer_types(d: dict, mt: str, n: int) -> list[str]:
    if d.get("layer_types"):
        return list(d["layer_types"])
    full, slide = "full_attention", "sliding_attention"
    if mt == "gemma2":  # alternate, starting with a sliding layer
        return [slide if (i + 1) % 2 else full for i in range(n)]
    if mt == "gemma3_text":  # 5 sliding then 1 global, by default
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        return [slide if (i + 1) % pattern else full for i in range(n)]
    if mt in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window", False) or not d.get("sliding_window"):
            return [full] * n
        first = d.get("max_window_layers", n)
        return [slide if i >= first else full for i in range(n)]
    return [slide if d.get("sliding_window") else full] * n  # llama, mistral, gemma


def _rope(d: dict, mt: str) -> dict[str, dict]:
    """Normalise both on-disk spellings to {layer_type: {"rope_type", "rope_theta", <scaling keys>}}."""
    default_theta = 10000.0
    params = d.get("rope_parameters")
    if params and set(params) <= set(LAYER_TYPES):  # already per layer type (Gemma 3, newer files)
        return {lt: _rope_one(p, d.get("rope_theta", default_theta)) for lt, p in params.items()}
    if params:
        one = _rope_one(params, d.get("rope_theta", default_theta))
    else:
        one = _rope_one(d.get("rope_scaling") or {}, d.get("rope_theta", default_theta))
    out = {"full_attention": one, "sliding_attention": one}
    if mt == "gemma3_text":  # classic Gemma 3: sliding layers use plain RoPE with their own base (default 10k)
        out["sliding_attention"] = {"rope_type": "default", "rope_theta": float(d.get("rope_local_base_freq", 1e4))}
    return out


def _rope_one(p: dict, theta: float) -> dict:
    p = dict(p)
    p["rope_type"] = p.pop("type", None) or p.get("rope_type") or "default"
    p.setdefault("rope_theta", theta)
    p["rope_theta"] = float(p["rope_theta"])
    if p["rope_type"] in ("linear", "dynamic", "llama3") and p.get("factor") is None:  # yarn derives its own
        raise ConfigError(f"rope_type {p['rope_type']!r} needs a 'factor'")
    return p


def rope_inv_freq(p: dict, head_dim: int, max_position_embeddings: int, seq_len: int = 0):
    """Inverse frequencies [head_dim/2] (fp32) and the cos/sin multiplier for one RoPE parameter dict.

    Formulas follow the papers as implemented in transformers' `modeling_rope_utils.py` (linear: position
    interpolation; dynamic: NTK-aware base change once seq_len > max_position_embeddings; yarn: ramped mix of
    interpolated and extrapolated frequencies with attention factor 0.1 ln(s) + 1; llama3: wavelength-banded
    scaling from Llama 3.1). `seq_len` matters only for `dynamic`.
    """
    import torch

    rtype, base = p["rope_type"], p["rope_theta"]
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim/2]
    inv_freq = 1.0 / base ** exponents
    if rtype == "default":
        return inv_freq, 1.0
    factor = p.get("factor")
    if rtype == "linear":
        return inv_freq / factor, 1.0
    if rtype == "dynamic":
        seq_len = max(seq_len, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** exponents, 1.0
    if rtype == "llama3":
        old_len = p.get("original_max_position_embeddings", max_position_embeddings)
        low_wl, high_wl = old_len / p["low_freq_factor"], old_len / p["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    if rtype == "yarn":
        return _yarn(p, base, dim, max_position_embeddings)
    raise ConfigError(f"unsupported rope_type {rtype!r}")


def _yarn(p: dict, base: float, dim: int, max_pos: int):
    import torch

    orig = p.get("original_max_position_embeddings", max_pos)
    factor = p.get("factor") or max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength completes `rotations` turns in `orig` tokens
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)
