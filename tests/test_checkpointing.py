"""Activation checkpointing: loss and every gradient equal to the un-checkpointed model, in every mode.

Oracle: the same tiny minilora model run with model.layer_runners = None (autograd keeps everything).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import report
from minilora.checkpointing import HostOffloader, LayerCheckpoint, host_bytes, set_checkpointing
from minilora.config import ModelConfig
from minilora.models import build_model

LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GEMMA2 = dict(LLAMA, model_type="gemma2", head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)


def tiny_model(cfg=LLAMA, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_hf(cfg)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def batch(packed: bool, B=2, T=12, V=97):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    pos = None
    if packed:  # two documents in row 0, three in row 1
        pos = torch.stack([torch.cat([torch.arange(7), torch.arange(5)]),
                           torch.cat([torch.arange(3), torch.arange(4), torch.arange(5)])])
    return ids, pos


def loss_and_grads(model, modes, ids, pos, mlp_chunk=None):
    set_checkpointing(model, modes, mlp_chunk)
    model.zero_grad(set_to_none=True)
    logits = model(ids, pos)  # [B, T, V]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(name, got, ref, tol=1e-6):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert report(f"{name} loss", loss, ref_loss)[0] <= tol
    assert grads.keys() == ref_grads.keys(), f"{name}: gradients for {set(grads) ^ set(ref_grads)} differ in presence"
    worst = max((report(f"{name} grad {n}", grads[n], ref_grads[n])[0], n) for n in ref_grads)
    assert worst[0] <= tol, f"{name}: {worst[1]} off by {worst[0]}"


MODES = ["recompute", "offload", ["offload", "off", "recompute"], ["off", "offload", "offload"]]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA2], ids=["llama", "gemma2"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_all_modes_give_the_same_gradients(cfg, packed):
    model = tiny_model(cfg)
    ids, pos = batch(packed)
    ref = loss_and_grads(model, "off", ids, pos)
    assert model.layer_runners is None
    assert len(ref[1]) == len(list(model.parameters()))  # every parameter got a gradient
    for modes in MODES:
        assert_same(str(modes), loss_and_grads(model, modes, ids, pos), ref)


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA2], ids=["llama", "gemma2"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_mlp_in_token_chunks_gives_the_same_gradients(cfg, packed):
    """The MLP in chunks of 5 tokens (24 tokens: four whole chunks and a partial one), recomputed in backward,
    in every layer mode: loss and every gradient as the plain model's."""
    model = tiny_model(cfg)
    ids, pos = batch(packed)
    ref = loss_and_grads(model, "off", ids, pos)
    for modes in ["off", *MODES]:
        assert_same(f"mlp_chunk=5 {modes}", loss_and_grads(model, modes, ids, pos, mlp_chunk=5), ref)
    set_checkpointing(model, "off")
    assert all(layer.mlp.chunk_tokens is None for layer in model.model.layers)
    for bad in (0, 8192.0):
        with pytest.raises(ValueError, match="mlp_chunk must be a positive"):
            set_checkpointing(model, "recompute", mlp_chunk=bad)
        assert model.layer_runners is None  # left as it was: nothing half-applied


def test_mlp_chunks_keep_only_their_input_and_replay_lora_dropout():
    """With LoRA dropout: the chunked MLP's gradients equal plain autograd over the same chunks under the same
    seed (its recompute drew the same masks), and autograd keeps only the MLP's input for backward."""
    from minilora.lora import inject_lora
    model = tiny_model()
    inject_lora(model, r=4, lora_alpha=8, lora_dropout=0.5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)  # B = 0 would make every A gradient zero
    mlp = model.model.layers[0].mlp
    x0 = torch.randn(2, 12, LLAMA["hidden_size"])
    params = [p for p in mlp.parameters() if p.requires_grad]

    def grads(chunked: bool):
        torch.manual_seed(7)
        x = x0.clone().requires_grad_()
        if chunked:
            mlp.chunk_tokens = 5
            y = mlp(x)
        else:  # the same chunks through plain autograd, which keeps everything
            mlp.chunk_tokens = None
            y = torch.cat([mlp(c) for c in x.reshape(-1, x.shape[-1]).split(5)]).view(x.shape)
        return torch.autograd.grad(y.square().sum(), [x, *params])

    ref, got = grads(False), grads(True)
    for i, (a, b) in enumerate(zip(got, ref)):  # parameter gradients are summed in another order: relative
        assert report(f"dropout chunked grad {i}", a, b)[0] <= 1e-6 * b.abs().max(), b.abs().max()
    saved = []
    mlp.chunk_tokens = 5
    x = x0.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    assert sum(t.numel() for t in saved) == x.numel() + sum(p.numel() for p in params)


def test_offload_spans_several_host_slabs():
    """An input larger than a slab goes to host memory in slab-sized pieces and comes back intact; a later,
    smaller input reuses the freed slabs instead of allocating."""
    offloader = HostOffloader(slab_bytes=2**21)
    x = torch.randn(3, 500_000)  # 6 MB: three 2 MiB slabs
    st = offloader.stash([x])
    assert len(offloader.pool) == 3 and all(b.data.numel() == 2**21 for b in offloader.pool)
    assert torch.equal(st.fetch()[0], x)
    del st
    y = torch.randn(2, 300_000).to(torch.bfloat16)  # 1.2 MB: one slab of the same 2 MiB class
    st = offloader.stash([y])
    assert len(offloader.pool) == 3
    assert torch.equal(st.fetch()[0], y)
    assert host_bytes(6_000_000, 2**21) == 3 * 2**21 and host_bytes(1_200_000, 2**21) == 2**21


def test_offload_pool_keeps_free_slabs_when_a_small_class_changes():
    """A layer's stash mixes classes: slabs for its input and attention output, a smaller power of two for the
    logsumexp, whose class follows the length. A new small class releases the free small buffers, not the slabs."""
    offloader = HostOffloader(slab_bytes=2**23)
    x = torch.randn(4, 1_000_000)  # 16 MB: two 8 MiB slabs
    layers = [offloader.stash([x, torch.randn(750_000)]) for _ in range(2)]  # + 3 MB each: a 4 MiB buffer
    slabs = {id(b.data) for b in offloader.pool if b.data.numel() == 2**23}
    del layers  # a step later, a new length: the first layer's logsumexp takes the 2 MiB class
    st = offloader.stash([x, torch.randn(375_000)])
    sizes = sorted(b.data.numel() for b in offloader.pool)
    assert sizes == [2**21] + [2**23] * 4, sizes  # the second layer's slabs are still there for it
    assert {id(b.data) for b in offloader.pool if b.data.numel() == 2**23} == slabs
    assert torch.equal(st.fetch()[0], x)


def test_offload_keeps_the_strides():
    """A permuted tensor (attention's [B, H, T, D] view of [B, T, H, D] memory) comes back with its strides."""
    offloader = HostOffloader(slab_bytes=2**21)
    x, y = torch.randn(2, 5, 3, 4), torch.randn(7, 3)[::2]  # y: not dense (every other row)
    st = offloader.stash([x.transpose(1, 2)])
    st.add([y])
    back = st.fetch()
    assert torch.equal(back[0], x.transpose(1, 2)) and back[0].stride() == x.transpose(1, 2).stride()
    assert torch.equal(back[1], y)


class CountAttention(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the attention kernel ops that actually run (a replayed one never reaches this outer mode)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from minilora.checkpointing import ATTENTION_FORWARDS
        self.calls += func in ATTENTION_FORWARDS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("modes", MODES)
def test_keep_attention_same_gradients_one_attention_forward(modes, packed, monkeypatch):
    """keep_attention: loss and gradients as without checkpointing, and the recompute runs no attention kernel:
    one attention op per layer in forward + backward, where plain recompute runs one more per checkpointed
    layer. TAPE_HOST_MIN_BYTES = 0 sends even this tiny model's attention outputs to the host with offload."""
    from minilora import checkpointing
    monkeypatch.setattr(checkpointing, "TAPE_HOST_MIN_BYTES", 0)
    model = tiny_model()
    ids, pos = batch(packed)
    ref = loss_and_grads(model, "off", ids, pos)
    n_layers = LLAMA["num_hidden_layers"]
    per_layer = [modes] * n_layers if isinstance(modes, str) else modes
    calls = {}
    for keep in (False, True):
        set_checkpointing(model, modes, keep_attention=keep)
        model.zero_grad(set_to_none=True)
        with CountAttention() as count:
            logits = model(ids, pos)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
            loss.backward()
        got = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert_same(f"keep_attention={keep} {modes} packed={packed}", got, ref)
        calls[keep] = count.calls
    checkpointed = sum(m != "off" for m in per_layer)
    print(f"{modes} packed={packed}: attention ops run {calls[False]} recomputing, {calls[True]} keeping")
    assert calls[False] == n_layers + checkpointed, "the CPU SDPA path should be one fused op per layer"
    assert calls[True] == n_layers
    if "offload" in per_layer:  # x, the attention output and its logsumexp: three host buffers per layer
        pool = model.layer_runners[per_layer.index("offload")].offloader.pool
        assert len(pool) == 3 * per_layer.count("offload")


class CountMatmulFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2 m k n for each matrix product [m, k] x [k, n] run under it (torch.utils.flop_counter's FlopCounterMode
    would do, but its module hooks refuse the autograd.grad inside a checkpoint's backward)."""
    OPS = {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1, torch.ops.aten.addmm_.default: 1}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            a, b = args[self.OPS[func]:self.OPS[func] + 2]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def lora_model(cfg):
    """tiny_model with LoRA r=4 on the seven projections, B nonzero (B = 0 would zero every A gradient)."""
    from minilora.lora import inject_lora
    model = tiny_model(cfg)
    inject_lora(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [LLAMA, GEMMA2], ids=["llama", "gemma2"])
@pytest.mark.parametrize("mlp_chunk", [None, 5], ids=["whole", "chunks"])
def test_recompute_skips_down_proj_gemm(cfg, mlp_chunk, device, monkeypatch):
    """A recompute only backpropagates through the layer, so the Llama block's MLP leaves its output unset:
    down_proj's GEMM (and its LoRA B product) is not run, and MLP chunks inside a recomputed layer skip their
    whole forward. The LoRA gradients are those of the model without checkpointing, and the FLOPs saved against
    MINILORA_RECOMPUTE_OUTPUT=1 (which computes the output, as before) are exactly those. On CUDA down_proj is
    the fused GatedLoRAFunction, on the CPU LoRALinear over the torch activation. Gemma's block
    normalises the MLP output before adding it, so its layer recompute computes it; only the chunks' own
    recompute (whose output only the chunk's backward sees) skips down_proj there."""
    model = lora_model(cfg).to(device)
    ids, pos = batch(False)
    ids = ids.to(device)
    N, H, I, r = ids.numel(), cfg["hidden_size"], cfg["intermediate_size"], 4
    ref = loss_and_grads(model, "off", ids, pos, mlp_chunk)
    modes = ["recompute", "off", "offload"]

    def step_flops():
        with CountMatmulFlops() as fc:
            got = loss_and_grads(model, modes, ids, pos, mlp_chunk)
        return got, fc.flops

    monkeypatch.setenv("MINILORA_RECOMPUTE_OUTPUT", "1")
    computed, flops_computed = step_flops()
    monkeypatch.delenv("MINILORA_RECOMPUTE_OUTPUT")
    skipped, flops_skipped = step_flops()
    assert_same(f"recompute output computed, chunks {mlp_chunk}", computed, ref, tol=1e-5)
    assert_same(f"recompute output skipped, chunks {mlp_chunk}", skipped, ref, tol=1e-5)

    down = 2 * N * I * H + 2 * N * r * H  # x W₀ᵀ and xa Bᵀ of down_proj, per recompute
    mlp = model.model.layers[0].mlp
    with torch.no_grad(), CountMatmulFlops() as fc:
        mlp(torch.zeros(N, H, device=device))  # the MLP's whole forward at this many tokens
    if mlp_chunk is None:  # two checkpointed layers, each recomputed once (Gemma: none skipped)
        expected = 0 if cfg is GEMMA2 else 2 * down
    elif cfg is GEMMA2:  # every layer's chunks are recomputed in their own backward, which skips down
        expected = 3 * down
    else:  # as Gemma, and the two checkpointed layers' recomputes skip the whole (chunked) MLP
        expected = 3 * down + 2 * fc.flops
    print(f"{cfg['model_type']} {device} chunks={mlp_chunk}: step FLOPs {flops_computed:,} with the recompute's output, "
          f"{flops_skipped:,} without: {flops_computed - flops_skipped:,} saved, {expected:,} expected")
    assert flops_computed - flops_skipped == expected


def test_frozen_embeddings_still_train_the_layers():
    """LoRA setting: x_0 comes from a frozen embedding and does not require grad; the layers' trainable
    weights must get their gradients anyway (no enable_input_require_grads hack)."""
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_("q_proj" in n or "down_proj" in n)
    ids, pos = batch(False)
    ref = loss_and_grads(model, "off", ids, pos)
    assert len(ref[1]) == 2 * LLAMA["num_hidden_layers"]
    for modes in MODES:
        assert_same(f"frozen {modes}", loss_and_grads(model, modes, ids, pos), ref)


def test_autograd_grad_sees_parameter_grads():
    """Parameter grads are returned by the Function, not written to .grad behind autograd's back."""
    model = tiny_model()
    ids, _ = batch(False)
    w = model.model.layers[1].mlp.up_proj.weight
    grads = []
    for modes in ("off", "recompute", "offload"):
        set_checkpointing(model, modes)
        grads.append(torch.autograd.grad(model(ids).square().sum(), w)[0])
    report("autograd.grad recompute", grads[1], grads[0])
    report("autograd.grad offload", grads[2], grads[0])
    assert torch.allclose(grads[1], grads[0], rtol=0, atol=1e-6)
    assert torch.allclose(grads[2], grads[0], rtol=0, atol=1e-6)


class DropoutLayer(nn.Module):
    """A stand-in layer that draws random numbers, as LoRA dropout does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, inputs, need_output=True):  # LayerCheckpoint's layer interface (DecoderLayer.forward)
        return x + self.drop(self.proj(x))




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_recompute_replays_the_same_dropout_mask(mode, device):
    torch.manual_seed(0)
    layers = [DropoutLayer().to(device) for _ in range(3)]
    x0 = torch.randn(2, 5, 16, device=device)

    def run(runner):
        torch.manual_seed(123)
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        h = x
        for layer in layers:
            h = runner(layer, h, None) if runner else layer(h, None)
        h.square().sum().backward()
        after = torch.rand(1, device=device)  # the caller's RNG stream continues as if no recompute happened
        return [x.grad] + [p.grad for layer in layers for p in layer.parameters()] + [after]

    ref = run(None)
    got = run(LayerCheckpoint(HostOffloader() if mode == "offload" else None))
    for i, (a, b) in enumerate(zip(got, ref)):
        assert report(f"{mode} dropout tensor {i}", a, b)[0] <= 1e-6


def test_offload_pool_is_reused_and_survives_two_forwards():
    model = tiny_model()
    ids, pos = batch(True)
    ref = loss_and_grads(model, "off", ids, pos)
    set_checkpointing(model, "offload")
    offloader = model.layer_runners[0].offloader
    assert all(r.offloader is offloader for r in model.layer_runners)
    for _ in range(3):  # several steps: the same host buffers every time
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, pos)[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    pool_ids = {id(b.data) for b in offloader.pool}
    assert len(pool_ids) == LLAMA["num_hidden_layers"]

    # two forwards before one backward: the second must not overwrite the first one's stashed inputs
    model.zero_grad(set_to_none=True)
    la = F.cross_entropy(model(ids, pos)[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    lb = F.cross_entropy(model(ids, pos)[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    ((la + lb) / 2).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert_same("two forwards", (la.detach(), grads), ref)
    assert len(offloader.pool) == 2 * LLAMA["num_hidden_layers"]
    assert {id(b.data) for b in offloader.pool} >= pool_ids

    # a graph dropped without backward gives its buffers back
    model(ids, pos).sum()
    model(ids, pos).sum()
    assert len(offloader.pool) == 2 * LLAMA["num_hidden_layers"]


def test_eval_under_no_grad_saves_nothing():
    model = tiny_model()
    ids, _ = batch(False)
    with torch.no_grad():
        ref = model(ids)
        set_checkpointing(model, "offload")
        out = model(ids)
    assert model.layer_runners[0].offloader.pool == []
    assert report("no_grad logits", out, ref)[0] == 0


def test_bad_modes_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown mode"):
        set_checkpointing(model, "sometimes")
    with pytest.raises(ValueError, match="2 modes for 3 decoder layers"):
        set_checkpointing(model, ["off", "offload"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: side stream and pinned host memory")
def test_cuda_offload_matches_off():
    model = tiny_model().cuda()
    ids, pos = (t.cuda() for t in batch(True))
    ref = loss_and_grads(model, "off", ids, pos)
    for modes in MODES:
        assert_same(f"cuda {modes}", loss_and_grads(model, modes, ids, pos), ref, tol=1e-5)
    assert all(b.data.is_pinned() for b in model.layer_runners[1].offloader.pool)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: SDPA's fused GPU kernels")
@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_cuda_keep_attention_each_backend(backend, mode):
    """keep_attention with each fused GPU kernel (bf16, head_dim 64): the same gradients as recomputing, and
    no attention op runs in the recompute (the logsumexp the no-grad forward would skip is asked for)."""
    from torch.nn.attention import sdpa_kernel
    from minilora.models.common import SDPA_BACKENDS
    # torch 2.11's memory-efficient kernel takes no GQA (enable_gqa): equal heads for it
    cfg = dict(LLAMA, hidden_size=256, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=4 if backend == "efficient" else 2, max_position_embeddings=256)
    model = tiny_model(cfg).bfloat16().cuda()
    ids = batch(False, T=128)[0].cuda()
    res = {}
    for keep in (False, True):
        set_checkpointing(model, mode, keep_attention=keep)
        model.zero_grad(set_to_none=True)
        with sdpa_kernel([SDPA_BACKENDS[backend]]), CountAttention() as count:
            model(ids).float().square().mean().backward()
        res[keep] = count.calls, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    n = LLAMA["num_hidden_layers"]
    assert res[False][0] == 2 * n and res[True][0] == n, (res[False][0], res[True][0])
    for name, g in res[False][1].items():
        assert report(f"{backend} {mode} {name}", res[True][1][name], g)[0] <= 1e-2 * g.abs().max().item() + 1e-6
