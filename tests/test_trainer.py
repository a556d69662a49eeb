"""The training loop (minilora/trainer.py) on a tiny random Llama in fp32 on CPU.

Oracles: plain `F.cross_entropy` over full logits (mean over label tokens) for the loss and its gradient;
an uninterrupted run for resumed runs; transformers' schedule functions for the learning rate; the un-checkpointed
model for the checkpointing modes. The last test runs scripts/train.py on the real SmolLM2 GGUF (slow).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import report
from minilora.checkpointing import set_checkpointing
from minilora.dataset import DEMO_EVAL, DEMO_TRAIN, EpochBatches, epoch_order
from minilora.loading import load_model
from minilora.lora import inject_lora
from minilora.trainer import (Trainer, TrainArgs, TrainingError, batch_loss_sum, evaluate, latest_checkpoint,
                              lr_lambda, n_label_tokens)
from tiny_models import save_tiny

V = 1000  # tiny_models vocab
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    save_tiny("llama", d)
    return d


def lora_model(path, dropout=0.0, dtype=torch.float32, init_seed=0, r=4, **kw):
    """The tiny model with LoRA on every projection; B drawn non-zero so that A gets gradients from step 1."""
    model = load_model(path, "cpu", dtype)
    inject_lora(model, r=r, lora_alpha=2 * r, lora_dropout=dropout, seed=init_seed, **kw)
    g = torch.Generator().manual_seed(init_seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, [p for p in model.parameters() if p.requires_grad]


def examples(n, seed=0, lo=3, hi=17):
    """Tokenizer-free examples of uneven lengths, labels aligned (the batcher shifts them); a random prefix is
    masked like a prompt, so label counts differ from lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, V, (T,), generator=g).tolist()
        prompt = int(torch.randint(0, T - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def make_trainer(path, out, exs, batch_size, accum, dropout=0.0, eval_exs=None, model=None, cls=Trainer, **kw):
    model, params = model or lora_model(path, dropout)
    kw = {"learning_rate": 1e-2, "warmup_steps": 1, "seed": 0, **kw}
    args = TrainArgs(output_dir=str(out), per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accum, **kw)
    eval_batches = EpochBatches(eval_exs, 4, 0, shuffle=False)(0) if eval_exs else None
    return cls(model, params, EpochBatches(exs, batch_size, seed=0), args, eval_batches=eval_batches)


def losses(history):
    return {r["step"]: r["loss"] for r in history if "loss" in r}


def adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(name, a: dict, b: dict) -> float:
    return max(report(f"{name} {k}", a[k], b[k])[0] for k in a)


def file_hashes(d: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def plain_ce(model, exs) -> torch.Tensor:
    """Oracle: full logits and F.cross_entropy, mean over every label token of `exs` batched together."""
    b = EpochBatches(exs, len(exs), 0, shuffle=False)(0)[0]
    logits = model(b["input_ids"])  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100)


# --- 1. gradient accumulation --------------------------------------------------------------------------------------
def test_accumulation_equals_one_big_batch(tiny_dir, tmp_path):
    """batch 4 × accum 1 == batch 2 × accum 2 == batch 1 × accum 4: same losses, gradients and weights, over an
    epoch of 10 uneven examples whose last window is short (4, 4, 2)."""
    exs = examples(10)
    runs = {}
    for bs, acc in [(4, 1), (2, 2), (1, 4)]:
        # TrainArgs' default lr: Adam divides each gradient by its own √v, so an element whose gradient is at
        # rounding level (~1e-9 here) can move by up to lr either way; at 2e-4 that stays under 1e-6
        tr = make_trainer(tiny_dir, tmp_path / f"{bs}x{acc}", exs, bs, acc, max_grad_norm=0.0, learning_rate=2e-4)
        grads = []  # per optimizer step, what the optimizer sees
        tr.opt.register_step_pre_hook(lambda opt, a, k, tr=tr, grads=grads: grads.append(
            {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad}))
        hist = tr.train()
        runs[bs, acc] = losses(hist), grads, adapter(tr.model)
        assert len(grads) == 3 == tr.step

    ref_loss, ref_grads, ref_w = runs[4, 1]
    for key in [(2, 2), (1, 4)]:
        got_loss, got_grads, got_w = runs[key]
        assert report(f"{key} losses", torch.tensor(list(got_loss.values())),
                      torch.tensor(list(ref_loss.values())))[0] <= 1e-6
        for s in range(3):
            assert max_diff(f"{key} step {s + 1} grad", got_grads[s], ref_grads[s]) <= 1e-6
        assert max_diff(f"{key} weights", got_w, ref_w) <= 1e-6

    # oracle for step 1: the mean CE over the label tokens of its 4 examples, through full logits
    model, params = lora_model(tiny_dir)
    first = [exs[i] for i in epoch_order(10, 0, 0)[:4]]
    loss = plain_ce(model, first)
    loss.backward()
    oracle = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert report("step 1 loss vs F.cross_entropy", torch.tensor(ref_loss[1]), loss.detach())[0] <= 1e-6
    assert max_diff("step 1 grad vs F.cross_entropy", ref_grads[0], oracle) <= 1e-6

    # the per-micro-batch mean (the old accumulation bug) is measurably different here, so the test can fail
    model.zero_grad()
    sum(plain_ce(model, [e]) for e in first).div(4).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert max(((naive[n] - oracle[n]).abs().max().item() for n in oracle)) > 1e-4


class DeviceReads(TorchDispatchMode):
    """Counts the ops that make the CPU wait for the GPU: scalar reads (.item(), int(), bool()) and nonzero.
    (.tolist() does not go through dispatch: the trainer's one read per step is not counted.)"""
    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.n, self.on = 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += self.on and func in self.READS
        return func(*args, **(kwargs or {}))


def test_no_device_read_per_micro_batch(tiny_dir, tmp_path):
    """A step of 4 micro-batches reads the device only where the model and the loss do on their own (measured
    batch by batch; plus the label counts, on the CPU batches): no loss.item() per micro-batch, no
    grad_norm.item(). Its loss is bit for bit the old per-micro-batch sum of .item()s."""
    tr = make_trainer(tiny_dir, tmp_path, examples(8, seed=9), 1, 4, max_steps=1)
    window, reads, old_total = tr.batches(0)[:4], 0, 0.0
    n_labels = sum(n_label_tokens(b) for b in window)
    for b in window:
        with DeviceReads() as r:
            n_label_tokens(b)
            loss = batch_loss_sum(tr.model, b) / n_labels
            loss.backward()
        reads += r.n
        old_total += loss.item()
    tr.model.zero_grad(set_to_none=True)
    with DeviceReads() as r:
        tr.opt.register_step_pre_hook(lambda *a: setattr(r, "on", False))  # CPU AdamW reads its step counters
        total, _, grad_norm = tr._optimizer_step()
    print(f"reads: step {r.n}, its micro-batches on their own {reads}; loss {total} vs {old_total}")
    assert r.n == reads > 0
    assert total == old_total and math.isfinite(grad_norm)


# --- 2. resume -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim", ["adamw", "adamw_8bit"])
def test_resume_repeats_the_uninterrupted_run(tiny_dir, tmp_path, optim):
    """With LoRA dropout (RNG) and across epoch boundaries: 3 steps per epoch, checkpoints at 3 (end of epoch 0)
    and 6, run to 7. A fresh trainer from a differently initialised model resumed from checkpoint-3 repeats steps
    4-7 bit for bit, and resume() without a path picks checkpoint-6. Resuming with the other optimizer is refused."""
    exs = examples(10, seed=1)
    kw = dict(dropout=0.1, max_steps=7, save_steps=3, save_total_limit=0, optim=optim)
    r = 64 if optim == "adamw_8bit" else 4  # A [64, 64]: 4096 elements, so some states are 8-bit (bnb's minimum)
    full = make_trainer(tiny_dir, tmp_path, exs, 2, 2, model=lora_model(tiny_dir, 0.1, r=r), **kw)
    ref = losses(full.train())
    if optim == "adamw_8bit":
        assert any(st["state1"].dtype == torch.uint8 for st in full.opt.state.values())
    ref_w = adapter(full.model)
    assert len({round(v, 6) for v in ref.values()}) == 7  # the steps really differ

    for ckpt, first in [(tmp_path / "checkpoint-3", 4), (None, 7)]:
        torch.manual_seed(1234)  # the resumed run must not depend on the RNG it starts with
        tr = make_trainer(tiny_dir, tmp_path, exs, 2, 2, model=lora_model(tiny_dir, 0.1, init_seed=5, r=r), **kw)
        assert tr.resume(ckpt) == (ckpt or tmp_path / "checkpoint-6") and tr.step == first - 1
        got = losses(tr.train())
        print({s: (got[s], ref[s]) for s in range(first, 8)})
        assert got == ref  # steps before the checkpoint come back from metrics.jsonl; the rest are recomputed
        assert all(torch.equal(w, ref_w[n]) for n, w in adapter(tr.model).items())
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(range(1, 8))

    tr = make_trainer(tiny_dir, tmp_path, exs, 2, 1, model=lora_model(tiny_dir, r=r), **kw)  # data position void
    with pytest.raises(TrainingError, match="gradient_accumulation_steps 2 -> 1"):
        tr.resume()
    other = "adamw" if optim == "adamw_8bit" else "adamw_8bit"
    tr = make_trainer(tiny_dir, tmp_path, exs, 2, 2, model=lora_model(tiny_dir, r=r), **{**kw, "optim": other})
    with pytest.raises(TrainingError, match=f"holds {optim} optimizer state .* resume with --optim {optim}"):
        tr.resume()


# --- 3. NaN / inf --------------------------------------------------------------------------------------------------
class PoisonAfterSave(Trainer):
    """Records the checkpoint's files, then puts a NaN into a LoRA weight: the next step's loss is NaN. (After the
    attention: torch's CPU SDPA turns a NaN query into finite output, so a poisoned q_proj gives a finite loss and
    a NaN gradient, which the next test covers.)"""

    def save_checkpoint(self):
        path = super().save_checkpoint()
        self.saved = file_hashes(path)
        with torch.no_grad():
            self.model.get_parameter("model.layers.1.mlp.down_proj.lora_B.weight")[0, 0] = float("nan")
        return path


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_dir, tmp_path):
    exs = examples(8, seed=2)
    tr = make_trainer(tiny_dir, tmp_path, exs, 2, 1, cls=PoisonAfterSave, max_steps=4, save_steps=2)
    with pytest.raises(TrainingError, match=r"step 3: loss is nan.*checkpoint-2, is kept") as e:
        tr.train()
    print(e.value)
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert file_hashes(tmp_path / "checkpoint-2") == tr.saved
    fresh = make_trainer(tiny_dir, tmp_path, exs, 2, 1, max_steps=4)
    fresh.resume()
    assert fresh.step == 2 and all(torch.isfinite(p).all() for p in fresh.params)
    assert losses(fresh.train()).keys() == {1, 2, 3, 4}


def test_nan_gradient_stops_before_the_weights_change(tiny_dir, tmp_path):
    tr = make_trainer(tiny_dir, tmp_path, examples(8, seed=2), 2, 1, max_steps=2)
    before = adapter(tr.model)
    tr.params[0].register_hook(lambda g: g * float("inf"))  # loss finite, gradient not
    with pytest.raises(TrainingError, match=r"step 1: gradient norm is (nan|inf).*no checkpoint was saved"):
        tr.train()
    assert all(torch.equal(w, before[n]) for n, w in adapter(tr.model).items())


# --- 4. atomic checkpoints -----------------------------------------------------------------------------------------
def test_checkpoints_are_atomic_and_pruned(tiny_dir, tmp_path, monkeypatch):
    tr = make_trainer(tiny_dir, tmp_path, examples(12, seed=3), 2, 1, max_steps=5, save_steps=1, save_total_limit=2)
    tr.train()
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    kept = {n: file_hashes(tmp_path / n) for n in ["checkpoint-3", "checkpoint-4"]}

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)  # dies after the adapter files are written, before trainer_state
    with pytest.raises(OSError, match="simulated"):
        tr.save_checkpoint()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    assert {n: file_hashes(tmp_path / n) for n in kept} == kept

    # what a killed process leaves: a temp dir (even a full one) and a half-written checkpoint-N are not picked
    tmp = tmp_path / ".checkpoint-9.tmp"
    (tmp_path / "checkpoint-4").rename(tmp)
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "adapter_model.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint-notes").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


# --- 5. schedule and step counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_transformers(kind, warmup):
    """Decay: transformers' get_*_schedule_with_warmup(W). Warm-up: theirs with W + 1 steps, one step ahead
    ((step + 1) / (W + 1)), so that the first step does not run at learning rate 0."""
    import transformers
    total = 12
    ours = lr_lambda(TrainArgs(warmup_steps=warmup, lr_scheduler_type=kind), total)

    def hf(w):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        make = getattr(transformers, f"get_{kind}_schedule_with_warmup")
        s = make(opt, w) if kind == "constant" else make(opt, w, total)
        return s.lr_lambdas[0]

    got = torch.tensor([ours(s) for s in range(total)])
    want = torch.tensor([hf(warmup + 1)(s + 1) if s < warmup else hf(warmup)(s) for s in range(total)])
    assert report(f"{kind} warmup={warmup}", got, want)[0] <= 1e-12
    assert got.min() > 0


def test_step_counts_and_logged_learning_rates(tiny_dir, tmp_path):
    """10 examples, batch 2 -> 5 batches; accumulation 2 -> 3 steps per epoch. The logged lr is the one the step
    used (the schedule at step - 1), not the next one."""
    exs = examples(10, seed=4)
    n_batches = len(EpochBatches(exs, 2, 0)(0))
    per_epoch = math.ceil(n_batches / 2)
    for kw, steps in [(dict(num_train_epochs=2), 2 * per_epoch),
                      (dict(num_train_epochs=1.5), math.ceil(1.5 * per_epoch)),
                      (dict(max_steps=4, num_train_epochs=9), 4)]:
        tr = make_trainer(tiny_dir, tmp_path / str(steps), exs, 2, 2, lr_scheduler_type="cosine", warmup_steps=2,
                          **kw)
        used = []  # the rate in the optimizer as each step runs
        tr.opt.register_step_pre_hook(lambda opt, a, k, used=used: used.append(opt.param_groups[0]["lr"]))
        hist = [r for r in tr.train() if "loss" in r]
        assert tr.total_steps == steps == len(hist)
        lam = lr_lambda(tr.args, steps)
        assert [r["lr"] for r in hist] == used == [1e-2 * lam(s) for s in range(steps)]
        if kw.get("num_train_epochs") == 2:  # every batch of both epochs used once, none of a third
            assert (tr.epoch, tr.batch_index) == (1, n_batches) and hist[-1]["epoch"] == 2.0


# --- 6. metrics and eval -------------------------------------------------------------------------------------------
def test_metrics_jsonl_and_eval_loss(tiny_dir, tmp_path):
    train_exs, eval_exs = examples(8, seed=5), examples(6, seed=6)
    (tmp_path / "metrics.jsonl").write_text('{"step": 99, "loss": 0}\n')  # an older run's: replaced
    tr = make_trainer(tiny_dir, tmp_path, train_exs, 2, 1, eval_exs=eval_exs, max_steps=4, eval_steps=2)
    before = plain_ce(tr.model, eval_exs).item()
    hist = tr.train()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs == hist and [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert all({"loss", "lr", "tok_s", "grad_norm", "tokens"} <= r.keys() for r in recs[1:])
    assert [r["step"] for r in recs if "eval_loss" in r] == [0, 2, 4]
    with torch.no_grad():
        after = plain_ce(tr.model, eval_exs).item()
    assert report("eval loss at step 0 vs F.cross_entropy", torch.tensor(recs[0]["eval_loss"]),
                  torch.tensor(before))[0] <= 1e-5
    assert report("eval loss at the end vs F.cross_entropy", torch.tensor(recs[-1]["eval_loss"]),
                  torch.tensor(after))[0] <= 1e-5
    assert recs[-1]["eval_loss"] == evaluate(tr.model, tr.eval_batches)
    assert (tmp_path / "loss.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


# --- 7. activation checkpointing -----------------------------------------------------------------------------------
def test_checkpointing_modes_train_the_same(tiny_dir, tmp_path):
    exs = examples(8, seed=7)
    runs = {}
    for modes in ["off", "recompute", "offload"]:  # mixed per-layer modes: tests/test_checkpointing.py
        model = lora_model(tiny_dir, dropout=0.1)
        set_checkpointing(model[0], modes)
        tr = make_trainer(tiny_dir, tmp_path / str(modes), exs, 2, 2, model=model, max_steps=3)
        runs[str(modes)] = torch.tensor(list(losses(tr.train()).values())), adapter(tr.model)
    ref_l, ref_w = runs["off"]
    for name, (l, w) in runs.items():
        assert report(f"{name} losses", l, ref_l)[0] <= 1e-6
        assert max_diff(f"{name} weights", w, ref_w) <= 1e-6


# --- 8. fp16 with loss scaling -------------------------------------------------------------------------------------
def test_fp16_uses_loss_scaling(tiny_dir, tmp_path):
    """fp16 weights turn on GradScaler (fp32 and bf16 do not); the fp16 run tracks the fp32 one and its scaler
    state goes through a checkpoint. CPU fp16 matmuls are slow but fine at this size."""
    exs = examples(8, seed=8)
    assert not make_trainer(tiny_dir, tmp_path / "32", exs, 2, 1, max_steps=3).scaler.is_enabled()
    bf16 = lora_model(tiny_dir, dtype=torch.bfloat16)
    assert not make_trainer(tiny_dir, tmp_path / "bf", exs, 2, 1, model=bf16, max_steps=3).scaler.is_enabled()

    ref = losses(make_trainer(tiny_dir, tmp_path / "32", exs, 2, 1, max_steps=3).train())
    half = make_trainer(tiny_dir, tmp_path / "16", exs, 2, 1, model=lora_model(tiny_dir, dtype=torch.float16),
                        max_steps=3, save_steps=2)
    assert half.scaler.is_enabled()
    got = losses(half.train())
    assert report("fp16 vs fp32 losses", torch.tensor(list(got.values())), torch.tensor(list(ref.values())))[0] \
        <= 1e-2 * max(ref.values())
    state = torch.load(tmp_path / "16" / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["scaler"]["scale"] > 1
    resumed = make_trainer(tiny_dir, tmp_path / "16", exs, 2, 1, model=lora_model(tiny_dir, dtype=torch.float16),
                           max_steps=3, save_steps=2)
    resumed.resume()
    assert resumed.scaler.get_scale() == state["scaler"]["scale"] and losses(resumed.train())[3] == got[3]

    with pytest.raises(TrainingError, match="fp32 trainable tensors"):  # GradScaler cannot unscale fp16 grads
        make_trainer(tiny_dir, tmp_path / "x", exs, 2, 1, model=lora_model(
            tiny_dir, dtype=torch.float16, modules_to_save=["lm_head"]), max_steps=1)


# --- scripts/train.py end to end (real SmolLM2 GGUF) ---------------------------------------------------------------
LAST_STDOUT = [""]


@pytest.mark.slow
def test_train_script_refuses_a_budget_it_cannot_fit(tmp_path):
    """--max_memory_gb below what even a fully offloaded step needs: a clear exit before any training or output."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--max_memory_gb", "0.01",
                        "--max_steps", "1", "--output_dir", str(out)], capture_output=True, text=True, timeout=600)
    print(p.stdout[-800:], p.stderr[-800:])
    assert p.returncode != 0
    assert "--max_memory_gb: memory budget 10.2 MiB is too small" in p.stderr, p.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_train_script_writes_adapter_and_resumes(tmp_path):
    out, small_eval = tmp_path / "run", tmp_path / "eval.jsonl"
    small_eval.write_text("".join(DEMO_EVAL.read_text().splitlines(keepends=True)[:4]))  # eval costs one batch
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--dataset", str(DEMO_TRAIN),
           "--eval_dataset", str(small_eval), "--max_steps", "2", "--save_steps", "1",
           "--per_device_train_batch_size", "4", "--lora_dropout", "0.1", "--output_dir", str(out)]

    def run(*extra):
        p = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        print(p.stdout[-1500:])
        LAST_STDOUT[:] = [p.stdout]
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    first = run("--exact_match", "2")
    assert "auto checkpointing for 4 x 52 tokens: offx30" in LAST_STDOUT[0]  # the default policy, planned on CPU: no layer checkpointed
    names = {f.name for f in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "checkpoint-1"} <= names
    assert names & {"tokenizer.json", "tokenizer.model"} and "tokenizer_config.json" in names
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and "exact_match" in summary["after"]
    trained = load_file(out / "adapter_model.safetensors")

    second = run("--resume", "--exact_match", "0")  # from checkpoint-1: step 2 again
    loss = {r["step"]: r.get("loss") for r in first}
    again = {r["step"]: r.get("loss") for r in second}
    assert again.keys() == loss.keys()
    assert report("resumed step-2 loss", torch.tensor(again[2]), torch.tensor(loss[2]))[0] <= 1e-6
    resumed = load_file(out / "adapter_model.safetensors")
    assert resumed.keys() == trained.keys()
    flat = [torch.cat([d[k].flatten().float() for k in sorted(trained)]) for d in (resumed, trained)]
    assert report("resumed final adapter", *flat)[0] <= 1e-6
