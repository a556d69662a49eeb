"""Peak memory while loading a checkpoint: host memory against the file size, and on a GPU with load_in_4bit,
peak GPU memory against the final 4-bit footprint plus one 16-bit tensor.

    python scripts/bench_load.py --make /tmp/ckpt1g      # writes a ~1 GB random bf16 Llama-shaped checkpoint
    python scripts/bench_load.py --make /tmp/m8b --make_shape 8b        # a real shape (scripts/bench.py presets)
    python scripts/bench_load.py --load /tmp/ckpt1g [--dtype bfloat16|float32] [--device cuda] [--load_in_4bit]

Each --load runs in its own process so ru_maxrss (peak resident set) belongs to that load alone. The figures to
compare: peak RSS minus the RSS after imports, against the bytes the loaded model keeps and the file size; on
CUDA, torch.cuda.max_memory_allocated during the load against memory_allocated after it (the footprint) and
the largest tensor of the checkpoint in the target dtype: the loader promises peak <= footprint + one tensor.

--make_shape writes fast: each tensor is drawn on the GPU when there is one (8B random values in about a
second), copied to the host and written shard by shard (~2 GB each), so host memory holds one shard at a time.
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch

MiB = 2**20


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


def make_shape(out: Path, name: str, device: str, shard_bytes: int = 2 << 30):
    """A Hugging Face-layout bf16 checkpoint of preset `name` with random weights (RMSNorm weights 1, or 0 where
    the family stores w - 1): config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json."""
    from safetensors.torch import save_file

    from bench import ALIASES, PRESETS, preset_config  # scripts/bench.py, beside this file
    from minilora.models import build_model
    t0 = time.perf_counter()
    config = preset_config(name)
    with torch.device("meta"):
        model = build_model(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # one tensor under the embedding's name, as HF saves tied weights
    shards, size = [[]], 0  # keys per shard, in state_dict order (layer by layer)
    for k, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(PRESETS[ALIASES.get(name, name)], torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator(device).manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in keys:
            if k.endswith("norm.weight"):
                t = torch.full(shapes[k], 0.0 if config.norm_offset else 1.0, dtype=torch.bfloat16)
            else:
                t = torch.randn(shapes[k], device=device, dtype=torch.bfloat16, generator=g).mul_(0.02).cpu()
            tensors[k] = t
            weight_map[k] = fname
            total += 2 * t.numel()
        save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    print(json.dumps({"made": str(out), "shape": name, "file_gib": round(total / 2**30, 2), "shards": len(shards),
                      "make_s": round(time.perf_counter() - t0, 1)}), flush=True)


def largest_tensors(path: Path) -> tuple[int, int]:
    """(numel of the largest tensor, of the largest decoder projection) in the checkpoint's files."""
    from safetensors import safe_open
    from minilora.loading import PROJECTIONS
    big = proj = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                big = max(big, n)
                if any(f".{p}." in k for p in PROJECTIONS):
                    proj = max(proj, n)
    return big, proj


def load(path: Path, dtype: str, device: str, load_in_4bit: bool):
    from minilora.loading import load_model
    from minilora.memory_policy import model_bytes
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    base, base_anon = rss_mb(), rss_mb("RssAnon")
    gpu_before = torch.cuda.memory_allocated() if cuda else 0
    t = time.perf_counter()
    model = load_model(path, device=device, dtype=getattr(torch, dtype), load_in_4bit=load_in_4bit)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kept = model_bytes(model) / MiB  # parameters, buffers and NF4 weights (not in state_dict)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / MiB
    res = {"file_mib": round(size), "model_mib_kept": round(kept), "rss_before_mib": round(base),
           "peak_rss_mib": round(peak), "peak_minus_before_mib": round(peak - base),
           "anon_after_minus_before_mib": round(rss_mb("RssAnon") - base_anon),
           "file_pages_after_mib": round(rss_mb("RssFile")),
           "device": device, "dtype": dtype, "load_in_4bit": load_in_4bit, "load_s": round(secs, 2)}
    if cuda:
        elt = torch.finfo(getattr(torch, dtype)).bits // 8
        big, proj = largest_tensors(path)
        gpu_peak = (torch.cuda.max_memory_allocated() - gpu_before) / MiB
        final = (torch.cuda.memory_allocated() - gpu_before) / MiB
        res.update(gpu=torch.cuda.get_device_name(), gpu_peak_mib=round(gpu_peak), gpu_final_mib=round(final),
                   gpu_final_gib=round(final / 1024, 3), largest_tensor_mib=round(big * elt / MiB),
                   largest_projection_mib=round(proj * elt / MiB),
                   peak_minus_final_mib=round(gpu_peak - final),
                   peak_within_final_plus_one_tensor=gpu_peak <= final + big * elt / MiB)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--make", type=Path, help="write a random checkpoint here")
    ap.add_argument("--make_shape", default=None,
                    help="with --make: a scripts/bench.py preset (llama-3.1-8b, 8b, qwen2.5-7b, ...) instead of ~1 GB")
    ap.add_argument("--make_device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--load", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--load_in_4bit", action="store_true")
    a = ap.parse_args()
    if a.make and a.make_shape:
        make_shape(a.make, a.make_shape, a.make_device)
    elif a.make:
        make(a.make)
    if a.load:
        load(a.load, a.dtype, a.device, a.load_in_4bit)
