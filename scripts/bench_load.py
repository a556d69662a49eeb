"""Peak host memory while loading a checkpoint, against its file size.

    python scripts/bench_load.py --make /tmp/ckpt1g      # writes a ~1 GB random bf16 Llama-shaped checkpoint
    python scripts/bench_load.py --load /tmp/ckpt1g [--dtype bfloat16|float32] [--device cuda] [--load_in_4bit]

Each --load runs in its own process so ru_maxrss (peak resident set) belongs to that load alone. The figure to
compare: peak RSS minus the RSS after imports, against the bytes the loaded model keeps and the file size.
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MiB; RssAnon is memory the process owns, RssFile pages of mmapped files (page cache)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make(out: Path):
    from safetensors.torch import save_file
    cfg = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=6,
               num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False, torch_dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    from minilora.config import ModelConfig
    from minilora.models import build_model
    with torch.device("meta"):
        model = build_model(ModelConfig.from_hf(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 2**20:.0f} MiB)")


def load(path: Path, dtype: str, device: str, load_in_4bit: bool):
    from minilora.loading import load_model
    base, base_anon = rss_mb(), rss_mb("RssAnon")
    t = time.perf_counter()
    model = load_model(path, device=device, dtype=getattr(torch, dtype), load_in_4bit=load_in_4bit)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kept = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    print(json.dumps({"file_mib": round(size), "model_mib_kept": round(kept), "rss_before_mib": round(base),
                      "peak_rss_mib": round(peak), "peak_minus_before_mib": round(peak - base),
                      "anon_after_minus_before_mib": round(rss_mb("RssAnon") - base_anon),
                      "file_pages_after_mib": round(rss_mb("RssFile")),
                      "device": device, "dtype": dtype, "load_s": round(secs, 2)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--make", type=Path)
    ap.add_argument("--load", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--load_in_4bit", action="store_true")
    a = ap.parse_args()
    if a.make:
        make(a.make)
    if a.load:
        load(a.load, a.dtype, a.device, a.load_in_4bit)
