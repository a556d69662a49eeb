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
