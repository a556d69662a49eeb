"""CUDA graphs for the un-checkpointed layers (minilora/cuda_graphs.py): the same loss and LoRA gradients as eager
layers, step after step, with gradient accumulation, beside checkpointed layers and across a change of batch
shape; and the memory plan's rule for turning them on. The graphs themselves need a GPU; on the CPU the runners
must pass every layer through eagerly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import report
from minilora.checkpointing import set_checkpointing
import minilora.cuda_graphs as cuda_graphs
from minilora.cuda_graphs import STEADY_STEPS, GraphedLayer
from minilora.memory_policy import Plan, cuda_graphs_for
from test_checkpointing import LLAMA, lora_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batches(device, T=12, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, LLAMA["vocab_size"], (2, T), generator=g).to(device) for _ in range(n)]


def train(model, steps, micro=1):
    """Loss and LoRA gradients of each step (`micro` micro-batches accumulated); plain SGD on the LoRA weights
    between steps, so every step replays with new weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(0, len(steps), micro):
        for p in params:
            p.grad = None
        losses = []
        for ids in steps[i:i + micro]:
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            losses.append(loss.detach())
        out.append((torch.stack(losses), [p.grad.clone() for p in params]))
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
    return out


def assert_same_training(name, got, ref, tol):
    for s, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, ref)):
        assert report(f"{name} step {s} loss", loss, ref_loss)[0] <= tol
        worst = max(report(f"{name} step {s} grad {j}", g, r)[0] / max(1.0, r.abs().max().item())
                    for j, (g, r) in enumerate(zip(grads, ref_grads)))
        assert worst <= tol, f"{name} step {s}: a LoRA gradient off by {worst} (relative)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["all_off", "accumulate", "mixed", "shape_change"])
def test_graphed_layers_train_as_eager_ones(device, case):
    """Six steps (three with two micro-batches each for 'accumulate'); 'mixed' checkpoints the middle layer, so
    the graphed layers are not consecutive; 'shape_change' runs a step at another length in the middle,
    eagerly, while the graphs wait for their shape to return. On CUDA the graphs must have been captured once and replayed."""
    modes = ["off", "recompute", "off"] if case == "mixed" else "off"
    steps = batches(device)
    if case == "shape_change":
        steps[3:4] = batches(device, T=9, n=1, seed=2)
    micro = 2 if case == "accumulate" else 1
    model = lora_model(LLAMA).to(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    set_checkpointing(model, modes)
    ref = train(model, steps, micro)
    model.load_state_dict(state)
    set_checkpointing(model, modes, cuda_graphs=True)
    runners = model.layer_runners
    assert [type(r).__name__ for r in runners] == (
        ["GraphedLayer", "LayerCheckpoint", "GraphedLayer"] if case == "mixed" else ["GraphedLayer"] * 3)
    got = train(model, steps, micro)
    assert_same_training(f"{device} {case}", got, ref, 1e-5)
    graphs = runners[0].graphs
    if device == "cuda":
        assert graphs.captures == 1 and not graphs.failed
        # forwards from the STEADY_STEPS-th at the steady shape replay (the reference run has been through
        # sdpa_order's first forward at it), the one at the other shape does not
        expected = len(steps) - STEADY_STEPS + 1 - (case == "shape_change")
        assert graphs.replays == expected, (graphs.replays, expected)
    else:
        assert graphs.captures == graphs.replays == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graphs are captured on the GPU only")
def test_lengths_settling_in_turns_stop_capturing_at_the_limit(monkeypatch):
    """Lengths 12, 12, 9, 9, 12, 12, 9, 9: each pair is a new steady shape, captured in place of the last until
    MAX_CAPTURES (here 2); after that the new shapes run eagerly, the captured one replays, and training is the
    same as eager throughout."""
    monkeypatch.setattr(cuda_graphs, "MAX_CAPTURES", 2)
    steps = [ids for T in (12, 9, 12, 9) for ids in batches("cuda", T=T, n=2, seed=T)]
    model = lora_model(LLAMA).to("cuda")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    set_checkpointing(model, "off")
    ref = train(model, steps)
    model.load_state_dict(state)
    set_checkpointing(model, "off", cuda_graphs=True)
    got = train(model, steps)
    assert_same_training("settling in turns", got, ref, 1e-5)
    graphs = model.layer_runners[0].graphs
    # captured at the second 12 and the second 9; the third pair (12) is not the captured shape (9) and is past the
    # limit, so it runs eagerly; the fourth (9) replays at both of its forwards
    assert graphs.captures == 2 and not graphs.failed
    assert graphs.replays == 1 + 1 + 2, graphs.replays


def test_no_graphs_with_lora_dropout_or_mlp_chunks():
    from minilora.lora import inject_lora
    from test_checkpointing import tiny_model
    model = tiny_model()
    inject_lora(model, r=4, lora_alpha=8, lora_dropout=0.1)  # each replay would draw the same mask
    set_checkpointing(model, "off", cuda_graphs=True)
    assert model.layer_runners is None
    model = lora_model(LLAMA)
    set_checkpointing(model, "off", mlp_chunk=5, cuda_graphs=True)
    assert model.layer_runners is None
    set_checkpointing(model, ["recompute", "off", "off"], cuda_graphs=True)
    assert [isinstance(r, GraphedLayer) for r in model.layer_runners] == [False, True, True]


def test_plan_turns_graphs_on_where_half_the_budget_holds_the_peak(monkeypatch):
    def plan(modes, peak, budget, mlp_chunk=None):
        return Plan(modes=modes, peak=peak, budget=budget, fixed=0, head=0, lean=0, full=0, mlp_chunk=mlp_chunk)
    monkeypatch.delenv("MINILORA_CUDA_GRAPHS", raising=False)
    assert cuda_graphs_for(plan(["off"] * 4, 50, 100), cuda=True)
    assert not cuda_graphs_for(plan(["off"] * 4, 51, 100), cuda=True)  # no room for a second shape's step
    assert not cuda_graphs_for(plan(["off"] * 4, 10, 100), cuda=False)
    assert not cuda_graphs_for(plan(["offload"] * 4, 10, 100), cuda=True)  # nothing to graph
    assert not cuda_graphs_for(plan(["off"] * 4, 10, 100, mlp_chunk=8192), cuda=True)
    monkeypatch.setenv("MINILORA_CUDA_GRAPHS", "1")
    assert cuda_graphs_for(plan(["off"] * 4, 90, 100), cuda=True)
    monkeypatch.setenv("MINILORA_CUDA_GRAPHS", "0")
    assert not cuda_graphs_for(plan(["off"] * 4, 10, 100), cuda=True)
