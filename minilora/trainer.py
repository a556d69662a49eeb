"""The training loop: gradient accumulation normalised by label tokens, AdamW, warm-up + decay, eval, checkpoints
that a failed run resumes from.

One optimizer step = `gradient_accumulation_steps` micro-batches (a "window"). Its loss is

    loss = sum over the window of per-token CE  /  number of label tokens in the whole window

so batch 4 × accumulation 1 and batch 1 × accumulation 4 give the same gradients even with uneven lengths (the
usual mean-per-micro-batch average weights short sequences' tokens more: the gradient-accumulation bug that
transformers fixed in 2024). The window's batches are known before its first backward, so the count is exact.
A window never crosses an epoch boundary: the last one of an epoch may be shorter (as in transformers), so an
epoch is the same set of steps whatever the accumulation.

Batches come from `batches(epoch)`, a sequence of batch dicts (a list, or dataset.EpochBatches' lazily built one),
deterministic per epoch: a resumed run asks for the same epoch and skips to the saved position. Each batch holds
`input_ids` [B, T], `labels` [B, T] already shifted (labels[t] is the target for position t, -100 where nothing is
trained) and optionally `position_ids` [B, T] (packed rows).

Checkpoints (`output_dir/checkpoint-<step>/`) hold the adapter, optimizer, scheduler, loss scaler, RNG states and
data position, written to a temporary directory and renamed, so an interrupted save never looks complete. Resuming
restores all of it, so the following steps repeat an uninterrupted run's losses exactly (LoRA dropout included).

The loop itself reads the GPU once per optimizer step: the micro-batches' losses stay on the device and come back
together with the gradient norm, just before the optimizer step that a non-finite value must prevent. Label tokens
are counted on the CPU batches, and batches go to the GPU from pinned memory without waiting for the GPU.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from minilora.adapter import load_adapter_weights, save_adapter
from minilora.atomic import save_atomic
from minilora.loss import chunked_cross_entropy
from minilora.optim import OPTIMIZERS, AdamW8bit

SCHEDULERS = ("linear", "cosine", "constant")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # a complete checkpoint's directory name; temp dirs start with "."
# what must match between a checkpoint and the run resuming from it for the saved data position to mean anything
RESUME_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "seed")


@dataclass
class TrainArgs:
    output_dir: str = "outputs"
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    warmup_steps: int = 5
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    lr_scheduler_type: str = "linear"  # linear | cosine | constant
    seed: int = 3407
    logging_steps: int = 1  # progress-bar refresh; metrics.jsonl gets every step
    eval_steps: int = 0  # 0: eval only at the start and the end
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int = 2  # <= 0: keep every checkpoint
    ce_chunk_size: int | None = None  # rows per loss-head chunk (None: the loss's default; auto checkpointing sets it)
    # adamw: torch's, fp32 moments (8 bytes a trainable weight); adamw_8bit: minilora/optim.py, bitsandbytes'
    # blockwise 8-bit moments (2 bytes), what Unsloth's notebooks train with
    optim: str = "adamw"

    def __post_init__(self):
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim {self.optim!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"lr_scheduler_type {self.lr_scheduler_type!r}: expected one of {', '.join(SCHEDULERS)}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(f"set max_steps > 0 or num_train_epochs > 0 (got {self.max_steps}, "
                             f"{self.num_train_epochs})")


class TrainingError(RuntimeError):
    pass


def lr_lambda(args: TrainArgs, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warm-up, then linear/cosine
    decay to 0 at total_steps. The decay is transformers' get_{linear,cosine}_schedule_with_warmup; the warm-up is
    (step + 1) / (warmup + 1) instead of step / warmup, so the first step does not run at learning rate 0."""
    def f(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        if args.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        if args.lr_scheduler_type == "cosine":
            return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
        return max(0.0, 1 - progress)  # linear
    return f


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch tensor on `device`. To CUDA through pinned memory with non_blocking: a copy from pageable memory
    synchronises the stream (the CPU waits for every queued kernel); this one is queued behind them. The pinned
    buffer is not reused before the copy has run (torch's host allocator records the stream)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batch_loss_sum(model, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of per-token CE over the batch's labelled positions (fp32). Logits exist only there, chunk by chunk."""
    device = model.lm_head.weight.device
    hidden = model.hidden_states(to_device(batch["input_ids"], device),
                                 to_device(batch["position_ids"], device) if "position_ids" in batch else None)
    return chunked_cross_entropy(hidden, model.lm_head.weight, to_device(batch["labels"], device),
                                 softcap=model.config.final_logit_softcapping, chunk_size=chunk_size)


def n_label_tokens(batch: dict) -> int:
    """Positions with a target. Batches are built on the CPU, so counting there costs no device sync."""
    return int((batch["labels"] != -100).sum())


def _read_floats(values: list[torch.Tensor]) -> list[float]:
    """Device scalars as Python floats in one transfer (one sync), each exactly what its .item() would give:
    float64 holds every fp32/bf16/fp16 value exactly."""
    return torch.stack([v.detach().to(values[0].device, torch.float64) for v in values]).tolist()


@torch.no_grad()
def evaluate(model, batches: Iterable[dict]) -> float:
    """Mean per-token loss over the eval batches (every label token weighs the same, as in training)."""
    was_training = model.training
    model.eval()
    sums, n = [], 0
    for b in batches:
        sums.append(batch_loss_sum(model, b))
        n += n_label_tokens(b)
    model.train(was_training)
    total = 0.0
    for v in _read_floats(sums) if sums else []:  # summed in float64 in batch order, as .item() by .item()
        total += v
    return total / max(n, 1)


class Trainer:
    def __init__(self, model, params: list[torch.nn.Parameter], batches: Callable[[int], Sequence[dict]],
                 args: TrainArgs, eval_batches: Sequence[dict] | None = None, adapter_meta: dict | None = None):
        self.model, self.params, self.batches, self.args = model, params, batches, args
        self.eval_batches = eval_batches or []
        self.adapter_meta = adapter_meta or {}
        self.out = Path(args.output_dir)
        self.batches_per_epoch = len(batches(0))  # packed epochs may differ by a row or two: epoch 0 sets the count
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise TrainingError("the training set produced no batches")
        self.total_steps = args.max_steps if args.max_steps > 0 else math.ceil(
            args.num_train_epochs * self.steps_per_epoch)
        device = params[0].device
        if args.optim == "adamw_8bit":
            self.opt = AdamW8bit(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                         fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(args, self.total_steps))
        # fp16 weights need loss scaling against gradient underflow; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type, enabled=model.lm_head.weight.dtype == torch.float16)
        if self.scaler.is_enabled() and any(p.dtype == torch.float16 for p in params):
            # GradScaler refuses to unscale fp16 gradients (they would underflow/overflow once unscaled)
            raise TrainingError("fp16 training needs fp32 trainable tensors (LoRA A/B are fp32; modules_to_save "
                                "in fp16 are not): train in bf16/fp32, or drop modules_to_save")
        self.step, self.epoch, self.batch_index = 0, 0, 0  # data position: next micro-batch to use
        self.history: list[dict] = []

    # --- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.step == 0:  # a fresh run: its own metrics file, and RNG streams (LoRA dropout) from the seed
            (self.out / "metrics.jsonl").write_text("")
            _seed_everything(self.args.seed)
            if self.eval_batches:
                self._log({"step": 0, "eval_loss": evaluate(self.model, self.eval_batches)})
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            lr = self.sched.get_last_lr()[0]  # the rate this step uses; sched.step() below sets the next one
            loss, n_tokens, grad_norm = self._optimizer_step()
            self.step += 1
            rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                   "tok_s": n_tokens / (time.perf_counter() - t0),
                   "epoch": round(self.epoch + self.batch_index / self.batches_per_epoch, 4)}
            if self.step % self.args.logging_steps == 0 or self.step == self.total_steps:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_s']:.0f}")
            if self.eval_batches and (self.step == self.total_steps or
                                      (self.args.eval_steps and self.step % self.args.eval_steps == 0)):
                rec["eval_loss"] = evaluate(self.model, self.eval_batches)
                bar.write(f"step {self.step}: eval loss {rec['eval_loss']:.4f}")
            self._log(rec)
            bar.update(1)
            if self.args.save_steps and self.step % self.args.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        _plot(self.history, self.out / "loss.png")
        return self.history

    def _next_window(self) -> list[dict]:
        """The next micro-batches of this epoch, up to gradient_accumulation_steps of them; an epoch's last window
        may be shorter. A finished epoch moves the position to the start of the next. Slicing a lazy epoch builds
        only the window's batches."""
        if self.batch_index >= len(self.batches(self.epoch)):
            self.epoch, self.batch_index = self.epoch + 1, 0
        epoch_batches = self.batches(self.epoch)
        window = epoch_batches[self.batch_index:self.batch_index + self.args.gradient_accumulation_steps]
        if not window:
            raise TrainingError(f"epoch {self.epoch} produced no batches")
        self.batch_index += len(window)
        return window

    def _optimizer_step(self) -> tuple[float, int, float]:
        window = self._next_window()
        n_labels = sum(n_label_tokens(b) for b in window)  # on the CPU batches, before they move to the device
        if n_labels == 0:
            raise TrainingError(f"step {self.step + 1}: no label tokens in the accumulation window (every label "
                                f"is -100); check the data's responses-only masks")
        losses = []  # per micro-batch, on the device: read once with the gradient norm, not one sync each
        try:
            for b in window:
                loss = batch_loss_sum(self.model, b, self.args.ce_chunk_size) / n_labels
                self.scaler.scale(loss).backward()
                losses.append(loss.detach())
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(
                "CUDA out of memory. Knobs that help, cheapest first: a smaller --per_device_train_batch_size (with a "
                "larger --gradient_accumulation_steps to keep the batch), a shorter --max_seq_length, "
                "--gradient_checkpointing recompute or offload, --load_in_4bit, a smaller --r.") from e
        self.scaler.unscale_(self.opt)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf  # inf: measure, no clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        *values, grad_norm = _read_floats(losses + [norm])  # the step's one GPU -> CPU sync
        total = 0.0
        for v in values:  # summed in float64 micro-batch by micro-batch, as the logged loss always was
            total += v
            if not math.isfinite(total):
                raise TrainingError(self._not_finite(f"loss is {total}"))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # with fp16 loss scaling an inf gradient is routine (the scaler skips the step and lowers the scale);
            # without it, stepping would write NaN into the adapter
            raise TrainingError(self._not_finite(f"gradient norm is {grad_norm} (loss {total:.4f})"))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        # tokens: positions run through the model, padding included
        return total, sum(int(b["input_ids"].numel()) for b in window), grad_norm

    def _not_finite(self, what: str) -> str:
        last = latest_checkpoint(self.out)
        kept = f"the last good checkpoint, {last}, is kept" if last else f"no checkpoint was saved in {self.out}"
        return (f"step {self.step + 1}: {what}; stopping before the optimizer step, so {kept}. Try a lower "
                f"--learning_rate, bf16 instead of fp16, or check the data for empty or odd rows.")

    def _log(self, rec: dict):
        self.history.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step> (via a temp dir + rename) and prune the oldest beyond save_total_limit."""
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                 "batch_index": self.batch_index, "rng": _rng_state(), "args": asdict(self.args)}

        def write(tmp: Path):
            save_adapter(self.model, tmp, **self.adapter_meta)
            torch.save(state, tmp / "trainer_state.pt")

        final = save_atomic(write, self.out / f"checkpoint-{self.step}", overwrite=True)
        if self.args.save_total_limit > 0:
            for old in checkpoints(self.out)[: -self.args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self, checkpoint: str | Path | None = None) -> Path:
        """Continue from `checkpoint` or the newest complete one in output_dir."""
        ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(self.out)
        if ckpt is None:
            raise TrainingError(f"--resume: no checkpoint-* directory in {self.out}")
        if not (ckpt / "trainer_state.pt").is_file():
            raise TrainingError(f"--resume: {ckpt / 'trainer_state.pt'} is missing; not a complete checkpoint")
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        changed = [f"{k} {state['args'][k]} -> {getattr(self.args, k)}" for k in RESUME_FIELDS
                   if state["args"].get(k) != getattr(self.args, k)]
        saved_optim = state["args"].get("optim", "adamw")  # checkpoints from before the field: torch's AdamW
        if saved_optim != self.args.optim:
            raise TrainingError(f"--resume: {ckpt / 'trainer_state.pt'} holds {saved_optim} optimizer state and this "
                                f"run uses --optim {self.args.optim}; resume with --optim {saved_optim}")
        if changed:
            raise TrainingError(f"--resume: {ckpt / 'trainer_state.pt'} was saved with other settings "
                                f"({', '.join(changed)}); its data position would not match this run's batches")
        load_adapter_weights(self.model, ckpt)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        _set_rng_state(state["rng"])
        # metrics.jsonl and the history continue from the checkpoint: records past it (a run that went further
        # before it stopped) are dropped
        metrics = self.out / "metrics.jsonl"
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.is_file() else []
        self.history = [r for r in recs if r["step"] <= self.step]
        self.out.mkdir(parents=True, exist_ok=True)
        metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        return ckpt


def checkpoints(out: str | Path) -> list[Path]:
    """The complete checkpoint-<step> directories in `out`, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*")
             if CHECKPOINT.fullmatch(p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name)[1]))


def latest_checkpoint(out: str | Path) -> Path | None:
    done = checkpoints(out)
    return done[-1] if done else None


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _plot(history: list[dict], path: Path):
    """loss.png with train and eval loss against step, when matplotlib is installed (it is not required).
    A bare Figure, not pyplot: no global backend or figure state is touched."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(path, dpi=100)
