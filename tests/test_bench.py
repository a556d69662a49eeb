"""scripts/bench.py's workload: the peers' random batches (labels = inputs shifted by one) and --vary_len."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import preset_config, random_batches, train_flops  # noqa: E402


def test_random_batches_label_the_next_token():
    for ids, labels in random_batches(vocab=100, batch=2, seq=16, n=3):
        assert ids.shape == labels.shape == (2, 16)
        assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == -100).all()


def test_vary_len_draws_lengths_between_a_quarter_and_the_whole():
    lengths = [ids.shape[1] for ids, _ in random_batches(vocab=100, batch=2, seq=64, n=40, vary_len=True)]
    print("lengths", lengths)
    assert all(16 <= t <= 64 for t in lengths) and len(set(lengths)) > 10
    # the same seed gives the same lengths: a before/after pair of runs sees the same workload
    again = [ids.shape[1] for ids, _ in random_batches(vocab=100, batch=2, seq=64, n=40, vary_len=True)]
    assert again == lengths


def test_train_flops_at_a_length_counts_its_causal_attention():
    cfg = preset_config("tiny")
    modes = ["off"] * cfg.num_hidden_layers
    short, long = train_flops(cfg, 1, 100, modes), train_flops(cfg, 1, 200, modes)
    # twice the tokens: twice the matmul FLOPs, ~four times the attention's
    assert 2 * short < long < 4 * short


def test_train_flops_keep_attention_drops_the_recomputed_attention_forward():
    """A checkpointed layer recomputes attention's forward (4 B nh D x causal pairs) unless keep_attention."""
    cfg = preset_config("tiny")
    L, T = cfg.num_hidden_layers, 100
    att_fwd = 4 * cfg.num_attention_heads * cfg.head_dim * T * (T + 1) // 2
    off, rec = train_flops(cfg, 1, T, ["off"] * L), train_flops(cfg, 1, T, ["recompute"] * L)
    kept = train_flops(cfg, 1, T, ["recompute"] * L, keep_attention=True)
    assert rec - kept == L * att_fwd
    assert train_flops(cfg, 1, T, ["off"] * L, keep_attention=True) == off


def test_train_flops_recompute_skips_down_proj():
    """The recompute skips down_proj (2 N H I a checkpointed layer) unless recompute_output; Gemma's sandwich
    norm reads the MLP output, so there it is run. MLP chunks: each chunk's backward recomputes gate and up
    (2 N 2 H I a layer), and a recomputed Llama layer skips its chunks' forward (2 N 3 H I)."""
    for name in ("tiny", "gemma-2-9b"):
        cfg = preset_config(name)
        L, T, H, I = cfg.num_hidden_layers, 64, cfg.hidden_size, cfg.intermediate_size
        off, rec = ["off"] * L, ["recompute"] * L
        old = train_flops(cfg, 1, T, rec, recompute_output=True)
        new = train_flops(cfg, 1, T, rec)
        assert old - new == (0 if cfg.sandwich_norm else L * 2 * T * H * I), name
        # chunks of 16 tokens: the old model counted the whole MLP once more in every layer
        assert (train_flops(cfg, 1, T, off, mlp_chunk=16, recompute_output=True)
                - train_flops(cfg, 1, T, off, mlp_chunk=16)) == L * 2 * T * H * I
        saved = train_flops(cfg, 1, T, rec, mlp_chunk=16, recompute_output=True) - train_flops(cfg, 1, T, rec,
                                                                                                mlp_chunk=16)
        assert saved == L * 2 * T * H * I * (1 if cfg.sandwich_norm else 4), name
        assert train_flops(cfg, 1, T, off) == train_flops(cfg, 1, T, off, recompute_output=True)
