"""Where a checkpoint comes from: a local directory, a GGUF file, or a Hugging Face Hub repo id.

Hub downloads go through huggingface_hub, which honours HF_HOME (cache location), HF_HUB_OFFLINE (cache only) and
HF_TOKEN (gated repos). Only what minilora reads is fetched: config, tokenizer and safetensors files — never the
pickle `.bin` weights that many repos also carry.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(source: str | Path) -> Path:
    """A local directory holding config.json and weights, converting or downloading as needed."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from minilora.gguf import load_gguf_dir
        return load_gguf_dir(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a checkpoint directory, a .gguf file or a Hub repo id")
    if not _REPO_ID.match(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory, and not a Hub repo id (owner/name)")
    return _download(str(source))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth, offline mode with an empty cache: all end here
        raise RuntimeError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline? Point "
            f"--model at a local directory or .gguf file, or set HF_TOKEN for a gated repo.") from e
