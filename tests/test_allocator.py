"""minilora/allocator.py: the scripts ask CUDA's allocator for expandable segments, unless the user chose a setting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.allocator import EXPANDABLE, prefer_expandable_segments

ROOT = Path(__file__).resolve().parents[1]


def _env_without_alloc_conf(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    return {**env, **extra}


def test_sets_expandable_segments_where_nothing_is_set():
    env = {"PATH": "/bin"}
    assert prefer_expandable_segments(env) == EXPANDABLE
    assert env == {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE}


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_the_users_setting_wins_whole(name):
    env = {name: "max_split_size_mb:128"}
    assert prefer_expandable_segments(env) == "max_split_size_mb:128"
    assert env == {name: "max_split_size_mb:128"}  # not merged, and the other name not added


def test_it_runs_before_torch_loads():
    """The scripts call it above `import torch`; that only helps if minilora.allocator itself pulls in no torch."""
    code = "import sys, minilora.allocator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("user", [None, "expandable_segments:False"])
def test_bench_reports_the_setting_it_ran_with(user, tmp_path):
    env = _env_without_alloc_conf(**({"PYTORCH_CUDA_ALLOC_CONF": user} if user else {}))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "tiny", "--device", "cpu",
                          "--seq_len", "32", "--warmup", "1", "--steps", "1"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, out.stderr[-2000:]
    r = json.loads(line[-1][len("RESULT "):])
    print(f"user {user!r}: bench ran with {r['alloc_conf']!r}, ok={r['ok']}")
    assert r["ok"], r.get("error")
    assert r["alloc_conf"] == (user or EXPANDABLE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_segments_are_expandable_in_the_scripts_import_order(tmp_path):
    """On a GPU: set as the scripts do (before `import torch`), the allocator's segments come out expandable; a
    user's expandable_segments:False still gets the plain ones."""
    code = ("from minilora.allocator import prefer_expandable_segments; prefer_expandable_segments()\n"
            "import torch\n"
            "x = torch.empty(64 << 20, dtype=torch.uint8, device='cuda')\n"
            "print(any(s.get('is_expandable') for s in torch.cuda.memory_snapshot()))")
    for user, want in ((None, "True"), ("expandable_segments:False", "False")):
        env = _env_without_alloc_conf(**({"PYTORCH_CUDA_ALLOC_CONF": user} if user else {}))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
        print(f"user {user!r}: expandable segments {out.stdout.strip()}")
        assert out.stdout.strip() == want, out.stderr[-2000:]
