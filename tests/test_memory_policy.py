"""The automatic checkpointing policy: the selection logic on synthetic costs, the activation formula against
what autograd really saves (saved_tensors_hooks), and an auto plan that trains exactly like no checkpointing.

Oracles: `saved_tensors_hooks` for the bytes a layer keeps; the un-checkpointed model for loss and gradients;
on a CUDA machine, torch.cuda.max_memory_allocated for the predicted peak.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import report
from minilora.checkpointing import LayerCheckpoint, host_bytes, set_checkpointing
from minilora.config import ModelConfig
from minilora.lora import LoRALinear, inject_lora, replace_linears_for_4bit
from minilora.memory_policy import (GiB, MemoryBudgetError, ModeCost, apply_plan, auto_checkpointing,
                                    estimate_head_bytes, estimate_layer_costs, fmt_bytes, plan_checkpointing,
                                    predict_peak)
from minilora.models import build_model
from minilora.models.common import AttentionInputs

MiB = 2**20
LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
GEMMA2 = dict(LLAMA, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
QWEN3 = dict(LLAMA, model_type="qwen3", head_dim=16)


# --- selection on synthetic costs ------------------------------------------------------------------------------

def layer(off=800, x=40, bwd=300):
    """Costs shaped like a real layer: off keeps 20x its input; checkpointed backward re-makes the activations."""
    return {"off": ModeCost(off, off + 2 * x, bwd), "recompute": ModeCost(x, 3 * x, off + bwd),
            "offload": ModeCost(0, 3 * x, off + bwd + 2 * x)}


UNIFORM = [layer() for _ in range(12)]
MIXED = [layer(800 if i % 2 else 2000) for i in range(12)]  # Gemma 2-like: two layer types alternate
FIXED, HEAD, DY = 5000, 600, 40


def plan_at(costs, budget):
    return plan_checkpointing(costs, FIXED, HEAD, DY, budget)


@pytest.mark.parametrize("costs", [UNIFORM, MIXED], ids=["uniform", "mixed"])
def test_all_off_when_budget_is_large(costs):
    plan = plan_at(costs, 10**9)
    assert plan.modes == ["off"] * len(costs)
    assert plan.peak == predict_peak(plan.modes, costs, FIXED, HEAD, DY)


@pytest.mark.parametrize("costs", [UNIFORM, MIXED], ids=["uniform", "mixed"])
def test_all_offload_when_tiny(costs):
    """At the lean footprint, where the held bytes set the peak (here a big loss head at the end of forward),
    every layer offloads. Where an offloaded layer's backward sets it (two inputs in flight), some layers may
    recompute instead at no cost to the peak, which is faster; with uniform layers none can stay off, with
    mixed ones a small layer at the end may (its backward runs before the big layers' recompute)."""
    for head in (HEAD, 5 * HEAD):
        lean = predict_peak(["offload"] * len(costs), costs, FIXED, head, DY)
        plan = plan_checkpointing(costs, FIXED, head, DY, lean)
        assert plan.peak == lean == plan.lean, plan
        if head > HEAD:
            assert plan.modes == ["offload"] * len(costs)
        elif costs is UNIFORM:
            assert "off" not in plan.modes, plan.modes


def test_error_when_even_offloading_everything_does_not_fit():
    lean = predict_peak(["offload"] * 12, UNIFORM, FIXED, HEAD, DY)
    with pytest.raises(MemoryBudgetError) as e:
        plan_at(UNIFORM, lean - 1)
    msg = str(e.value)
    print(msg)
    assert "too small" in msg and "batch_size x seq_len" in msg and "--max_memory_gb" in msg
    assert fmt_bytes(lean) in msg


@pytest.mark.parametrize("costs", [UNIFORM, MIXED], ids=["uniform", "mixed"])
def test_monotone_in_budget(costs):
    """A larger budget never gives fewer off layers or more checkpointed ones; every plan fits its budget and
    keeps the layout [offload...][recompute...][off...]."""
    n = len(costs)
    lean = predict_peak(["offload"] * n, costs, FIXED, HEAD, DY)
    fat = predict_peak(["off"] * n, costs, FIXED, HEAD, DY)
    order = {"offload": 0, "recompute": 1, "off": 2}
    prev_off, seen = -1, set()
    for budget in range(lean, fat + 200, 37):
        plan = plan_at(costs, budget)
        n_off = plan.modes.count("off")
        assert plan.peak <= budget, f"budget {budget}: predicted peak {plan.peak}"
        assert n_off >= prev_off, f"budget {budget}: {n_off} off layers, fewer than {prev_off} at a smaller budget"
        assert [order[m] for m in plan.modes] == sorted(order[m] for m in plan.modes), plan.modes
        prev_off = n_off
        seen.add(plan.counts())
    assert prev_off == n and len(seen) > n // 2, f"the sweep should pass through many mixed plans: {seen}"


def test_uses_recompute_before_offload_when_it_fits():
    """When no layer can keep its activations, the checkpointed layers keep their input on the GPU (recompute)
    rather than sending it over PCIe (offload), as many as fit, the latest first; off layers come first
    when they fit, since they save a layer's forward, not just a copy."""
    costs = [{**layer(), "off": ModeCost(10**9, 10**9, 10**9)} for _ in range(12)]  # off never fits
    all_recompute = predict_peak(["recompute"] * 12, costs, FIXED, HEAD, DY)
    assert plan_at(costs, all_recompute).modes == ["recompute"] * 12
    plan = plan_at(costs, all_recompute - 3 * 40)  # three inputs short
    assert plan.modes == ["offload"] * 3 + ["recompute"] * 9, plan.modes
    plan = plan_at(UNIFORM, predict_peak(["recompute"] * 12, UNIFORM, FIXED, HEAD, DY))
    assert plan.modes.count("off") >= 1, plan.modes


def test_host_budget_trades_off_layers_for_recompute():
    """With little host memory for offloaded inputs, the plan keeps more inputs on the GPU (recompute) and pays
    with off layers; every plan still fits the GPU budget. Too little host memory for any plan: a named error."""
    n = len(UNIFORM)
    budget = predict_peak(["offload"] * 6 + ["off"] * 6, UNIFORM, FIXED, HEAD, DY)
    free = plan_at(UNIFORM, budget)
    per = host_bytes(DY)  # pinned bytes for one input: whole pieces of its size class (2 MiB at least)
    assert free.host == free.modes.count("offload") * per > 0, free
    prev = free
    for host in range(free.host - per, -1, -per):
        plan = plan_checkpointing(UNIFORM, FIXED, HEAD, DY, budget, host_budget=host)
        print(host, plan.counts())
        assert plan.host <= host and plan.peak <= budget, plan
        assert plan.modes.count("off") <= prev.modes.count("off")
        prev = plan
    assert prev.modes.count("off") < free.modes.count("off") and prev.modes.count("offload") == 0
    lean = predict_peak(["offload"] * n, UNIFORM, FIXED, HEAD, DY)
    with pytest.raises(MemoryBudgetError, match="host memory is too small") as e:
        plan_checkpointing(UNIFORM, FIXED, HEAD, DY, lean, host_budget=per - 1)
    print(e.value)


def test_host_extra_counts_kept_attention_outputs_per_offloaded_layer():
    """keep_attention's outputs travel with each offloaded layer's input: host_extra bytes more per layer, so a
    host budget that fits the inputs alone no longer fits, and the plan trades an off layer for recompute."""
    budget = predict_peak(["offload"] * 6 + ["off"] * 6, UNIFORM, FIXED, HEAD, DY)
    free = plan_at(UNIFORM, budget)
    extra = host_bytes(DY)
    kept = plan_checkpointing(UNIFORM, FIXED, HEAD, DY, budget, host_extra=extra)
    assert kept.host == free.modes.count("offload") * 2 * host_bytes(DY) and kept.modes == free.modes
    tight = plan_checkpointing(UNIFORM, FIXED, HEAD, DY, budget, host_budget=free.host, host_extra=extra)
    print(free.counts(), "|", tight.counts())
    assert tight.host <= free.host and tight.modes.count("off") < free.modes.count("off")


def test_keep_attention_only_from_long_sequences_on_cuda(monkeypatch):
    from minilora.memory_policy import KEEP_ATTENTION_MIN_SEQ, keep_attention_at
    monkeypatch.delenv("MINILORA_KEEP_ATTENTION", raising=False)
    assert keep_attention_at(KEEP_ATTENTION_MIN_SEQ, True) and not keep_attention_at(KEEP_ATTENTION_MIN_SEQ - 1, True)
    assert not keep_attention_at(10**6, False)  # the CPU formula does not model it
    monkeypatch.setenv("MINILORA_KEEP_ATTENTION", "0")
    assert not keep_attention_at(10**6, True)
    monkeypatch.setenv("MINILORA_KEEP_ATTENTION", "1")
    assert keep_attention_at(16, True)
    monkeypatch.setenv("MINILORA_KEEP_ATTENTION", "yes")
    with pytest.raises(ValueError, match="MINILORA_KEEP_ATTENTION='yes'"):
        keep_attention_at(16, True)


def test_dense_weights_take_only_the_room_left():
    """Dequantized weights come after activations: the modes are those of the plan without them, and they fill
    the room left over layer by layer, never past the budget."""
    n, dense = len(UNIFORM), [700] * len(UNIFORM)
    full = predict_peak(["off"] * n, UNIFORM, FIXED, HEAD, DY)
    for budget in (full - 500, full, full + 699, full + 700, full + 5 * 700 + 1, full + 100 * 700):
        plain, plan = plan_at(UNIFORM, budget), plan_checkpointing(UNIFORM, FIXED, HEAD, DY, budget, dense=dense)
        print(budget - full, plan.counts())
        assert plan.modes == plain.modes and plan.peak <= budget
        assert plan.dense_layers == min(n, (budget - plain.peak) // 700)
        assert plan.peak == plain.peak + 700 * plan.dense_layers


def test_apply_plan_keeps_dense_weights_that_train_the_same():
    """apply_plan keeps the planned layers' weights dequantized (the others not) and a plan made again drops
    them first; loss and gradients are bit for bit those of dequantizing on the fly."""
    torch.manual_seed(0)
    model = tiny_qlora(LLAMA, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    per_layer = sum(m.nf4.shape.numel() * 4 for m in model.model.layers[0].modules()
                    if isinstance(m, LoRALinear) and m.nf4 is not None)
    roomy = auto_checkpointing(model, 2, 32, budget=10 * GiB, reserve=0, chunk_sizes=[64])
    assert roomy.dense_layers == 4 and roomy.peak == roomy.full + 4 * per_layer  # counted in the peak
    plan = auto_checkpointing(model, 2, 32, budget=roomy.full + 2 * per_layer, reserve=0, chunk_sizes=[64])
    assert plan.modes == ["off"] * 4 and plan.dense_layers == 2, plan
    set_checkpointing(model, "off")
    ref_loss, ref = loss_and_grads(model, ids)
    apply_plan(model, plan)
    kept = [[m.dense is not None for m in layer.modules() if isinstance(m, LoRALinear)] for layer in model.model.layers]
    assert kept == [[True] * 7, [True] * 7, [False] * 7, [False] * 7]
    loss, got = loss_and_grads(model, ids)
    assert torch.equal(loss, ref_loss) and all(torch.equal(got[n], ref[n]) for n in ref)
    auto_checkpointing(model, 2, 32, budget=10 * GiB, reserve=0, chunk_sizes=[64])  # plans from NF4 alone
    assert all(m.dense is None for m in model.modules() if isinstance(m, LoRALinear))


# --- the formula against autograd ------------------------------------------------------------------------------

def tiny_qlora(cfg: dict, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig.from_hf(cfg)
    model = build_model(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    replace_linears_for_4bit(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.set_base_weight(m.weight.detach().clone(), quantize=True)
    inject_lora(model, r=4, lora_alpha=8)
    return model


def saved_bytes(model, mode: str, B: int, T: int) -> int:
    """Bytes of the distinct storages autograd saves for one layer's backward, parameters excluded."""
    config = model.config
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inputs = AttentionInputs(config, torch.zeros(B, T, dtype=torch.long), None, None, torch.bfloat16)
    x = torch.randn(B, T, config.hidden_size, dtype=torch.bfloat16, requires_grad=True) * 1.0
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    layer = model.model.layers[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, inputs) if mode == "off" else LayerCheckpoint()(layer, x, inputs)
    del y
    return sum(seen.values())


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA2, QWEN3], ids=["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("B,T,mlp_chunk", [(2, 48, None), (1, 96, None), (2, 48, 20)])
def test_formula_matches_what_autograd_saves(cfg, B, T, mlp_chunk):
    model = tiny_qlora(cfg)
    set_checkpointing(model, "off", mlp_chunk=mlp_chunk)
    est = estimate_layer_costs(model.config, B, T, dtype_bytes=2, r=4, mlp_chunk=mlp_chunk)[0]
    for mode in ("off", "recompute"):
        got = saved_bytes(model, mode, B, T)
        diff = abs(est[mode].kept - got)
        print(f"{cfg['model_type']} {mode} B={B} T={T} mlp_chunk={mlp_chunk}: formula {est[mode].kept} B, "
              f"saved {got} B, diff {diff}")
        # left out of the formula: the cos/sin tables (bf16 [B, T, D] each, shared by all layers) and Gemma's
        # fp32 (1 + w) [H] in each of its four norms
        slack = 2 * 2 * B * T * model.config.head_dim + (4 * 4 * model.config.hidden_size if cfg is GEMMA2 else 0)
        assert diff <= slack, f"{mode}: formula {est[mode].kept} vs saved {got}"
    assert est["offload"].kept == 0


def test_head_formula_counts_one_chunk_of_logits():
    config = ModelConfig.from_hf(dict(LLAMA, vocab_size=50000))
    small, big = (estimate_head_bytes(config, 2, 256, rows) for rows in (64, 512))
    assert big - small == (512 - 64) * 50000 * 10  # bf16 product + fp32 logits + fp32 gradient a logit


# --- end to end on CPU ---------------------------------------------------------------------------------------

def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)  # [B, T, V]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_auto_plan_trains_like_no_checkpointing():
    """A budget between the lean and the full footprint gives a mixed plan; loss and every LoRA gradient equal
    the un-checkpointed model's."""
    torch.manual_seed(0)
    model = tiny_qlora(LLAMA, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)  # B = 0 would make every A gradient zero: nothing to compare
    B, T = 2, 64
    roomy = auto_checkpointing(model, B, T, budget=10 * GiB, reserve=0, chunk_sizes=[64])
    plan = auto_checkpointing(model, B, T, budget=(roomy.lean + roomy.full) // 2, reserve=0, chunk_sizes=[64])
    print(roomy, plan, sep="\n")
    assert roomy.modes == ["off"] * 4 and roomy.lean < roomy.full
    assert 0 < plan.modes.count("off") < 4 and plan.modes[-1] == "off" and plan.modes[0] != "off", plan.modes
    ids = torch.randint(0, LLAMA["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    set_checkpointing(model, "off")
    ref_loss, ref = loss_and_grads(model, ids)
    set_checkpointing(model, plan.modes)
    loss, got = loss_and_grads(model, ids)
    assert report("auto plan loss", loss, ref_loss)[0] <= 1e-6
    assert got.keys() == ref.keys() and len(got) == 7 * 4 * 2
    worst = max(report(f"grad {n}", got[n], ref[n])[0] for n in ref)
    assert worst <= 1e-6


def test_long_sequences_fall_back_to_mlp_chunks():
    """A budget that not even every layer offloaded meets, but the same with the MLP in token chunks does:
    the plan chunks the MLP (and only then); below the chunked lean footprint it is an error."""
    from minilora.memory_policy import MLP_CHUNK_TOKENS
    model = tiny_qlora(LLAMA, dtype=torch.float32)
    B, T = 1, 4 * MLP_CHUNK_TOKENS  # the formula only: no tensor of this size is made on the CPU
    whole = auto_checkpointing(model, B, T, budget=1000 * GiB, reserve=0, chunk_sizes=[64])
    assert whole.mlp_chunk is None
    config, fixed_bytes = model.config, whole.fixed
    chunked_lean = predict_peak(["offload"] * 4, estimate_layer_costs(config, B, T, 4, 4, MLP_CHUNK_TOKENS),
                                fixed_bytes, whole.head, B * T * config.hidden_size * 4)
    print(f"lean: whole MLP {fmt_bytes(whole.lean)}, in chunks {fmt_bytes(chunked_lean)}")
    assert chunked_lean < whole.lean
    plan = auto_checkpointing(model, B, T, budget=(chunked_lean + whole.lean) // 2, reserve=0, chunk_sizes=[64])
    print(plan)
    assert plan.mlp_chunk == MLP_CHUNK_TOKENS and plan.lean == chunked_lean and "MLP in chunks" in str(plan)
    with pytest.raises(MemoryBudgetError, match="too small"):
        auto_checkpointing(model, B, T, budget=chunked_lean - 1, reserve=0, chunk_sizes=[64])


def test_fixed_bytes_count_the_optimizer_state():
    """torch AdamW: two moments like the parameters (fp32 LoRA: 8 bytes a weight); adamw_8bit: what
    minilora/optim.py allocates, read off a real step's state."""
    from minilora.optim import AdamW8bit
    # A [4, 1024] has 4096 elements, 8-bit state; k_proj's B [512, 4] keeps fp32 moments (bnb's min_8bit_size)
    model = tiny_qlora(dict(LLAMA, hidden_size=1024, intermediate_size=2048), dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    fp32, int8 = (auto_checkpointing(model, 1, 64, budget=10 * GiB, reserve=0, chunk_sizes=[64], optim=o)
                  for o in ("adamw", "adamw_8bit"))
    opt = AdamW8bit(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # state entries share flat buffers
                for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.numel() > 1}
    real = sum(storages.values())
    weights = sum(p.numel() * 4 for p in params)
    print(f"fixed: adamw {fmt_bytes(fp32.fixed)}, adamw_8bit {fmt_bytes(int8.fixed)}; 8-bit state allocated "
          f"{fmt_bytes(real)}, fp32 moments {fmt_bytes(2 * weights)}")
    assert real < weights and fp32.fixed - int8.fixed == 2 * weights - real  # under half of fp32 moments


def test_default_budget_obeys_a_per_process_memory_fraction(monkeypatch):
    """A cap set with torch.cuda.set_per_process_memory_fraction bounds the default budget: the allocator raises
    OOM past fraction * total however much the GPU has free. Faked here (CPU CI); the CUDA test below is real."""
    from minilora.memory_policy import default_budget
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GiB, 140 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda")  # no index, as users write it
    assert default_budget(cuda) == int(102 * GiB * 0.92)  # free + what the allocator holds
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.5, raising=False)
    assert default_budget(cuda) == int(70 * GiB * 0.92)  # capped at half of 140 GiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_budget_under_a_real_memory_fraction():
    from minilora.memory_policy import default_budget
    cuda = torch.device("cuda")  # no index: get/set_per_process_memory_fraction take none
    total = torch.cuda.get_device_properties(cuda).total_memory
    index = torch.cuda.current_device()
    before = torch.cuda.get_per_process_memory_fraction(index)
    try:
        torch.cuda.set_per_process_memory_fraction(0.25, index)
        got = default_budget(cuda)
    finally:
        torch.cuda.set_per_process_memory_fraction(before, index)
    print(f"budget {got / GiB:.2f} GiB under a cap of {0.25 * total / GiB:.2f} GiB")
    assert got <= 0.25 * total * 0.92 + 1


def test_auto_plan_error_names_the_budget():
    model = tiny_qlora(LLAMA, dtype=torch.float32)
    with pytest.raises(MemoryBudgetError, match="too small"):
        auto_checkpointing(model, 2, 64, budget=1024, reserve=0)


# --- on a CUDA machine: the prediction against the allocator --------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (memory is measured with torch.cuda)")
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("B,T", [(2, 2048), (1, 8192)])
def test_predicted_peak_matches_cuda(fraction, B, T):
    """The plan's predicted peak against torch.cuda.max_memory_allocated of real steps (with AdamW); at 8192
    tokens a row with the attention outputs kept (keep_attention)."""
    from minilora.loss import chunked_cross_entropy
    cfg = dict(LLAMA, vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    model = tiny_qlora(cfg).cuda()
    roomy = auto_checkpointing(model, B, T, budget=1000 * GiB, reserve=0)
    budget = int(roomy.lean + fraction * (roomy.full - roomy.lean)) + 16 * MiB  # + measurement jitter
    plan = auto_checkpointing(model, B, T, budget=budget, reserve=0)
    assert plan.keep_attention == (T >= 8192)
    apply_plan(model, plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    ids = torch.randint(0, cfg["vocab_size"], (B, T), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        loss = chunked_cross_entropy(model.hidden_states(ids), model.lm_head.weight, ids, chunk_size=plan.ce_chunk_size)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    got = torch.cuda.max_memory_allocated()
    print(f"{plan}: measured peak {got / GiB:.3f} GiB")
    assert abs(got - plan.peak) <= 0.1 * plan.peak + 64 * MiB
