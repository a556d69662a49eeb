"""Training data: read rows (local files or a Hub dataset), turn each into a conversation or a plain text, tokenize
with the responses-only mask, and cut the examples into batches, padded or packed.

    rows = load_rows("data.jsonl")                              # .jsonl/.json/.csv/.parquet, a folder, or a Hub id
    train_rows, eval_rows = split_eval(rows, eval_fraction=0.05, seed=3407)
    examples, stats = tokenize_rows(train_rows, tokenizer, max_seq_length=2048)   # stats: truncated, skipped, tokens
    for batch in iterate_batches(examples, batch_size=4, seed=3407, epoch=0, packing=True, max_seq_length=2048):
        ...

Row formats, detected from the first row's fields (or named with `format=`):
    messages       {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}   (OpenAI roles)
    sharegpt       {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}     (human/gpt/system)
    alpaca         {"instruction": ..., "input": ..., "output": ...}     -> a user turn and an assistant turn
    text           {"text": ...}      continued pre-training: loss on every token, bos/eos as the tokenizer adds them

What a batch holds, the contract with the models and trainer.py:

    input_ids    [B, T] int64
    labels       [B, T] int64, ALREADY SHIFTED: labels[b, t] is the token that logits[b, t] must predict, i.e. the
                 next token input_ids[b, t+1] of the same document; -100 where nothing is trained: the prompt
                 (responses-only), padding, and each document's last position (its next token belongs to the
                 next document or to no one). The trainer computes a plain per-position cross-entropy, no shift.
    position_ids [B, T] int64, packed batches only. Each document counts 0, 1, 2, ...; a reset to 0 starts a new
                 document and the model confines attention to it (models/common.py `AttentionInputs`). Padded
                 batches leave it out: right padding keeps the default positions 0..T-1 correct, and without it
                 the model takes SDPA's plain causal path instead of building a mask.

Examples, before batching, keep Hugging Face's convention instead: `labels` aligned with `input_ids`
(labels[t] = input_ids[t] where trained, else -100). Batching shifts each document on its own (`shift_labels`),
which is why a packed row never asks a document's first token to be predicted from the previous document.
"""
from __future__ import annotations

import csv
import json
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jinja2
import numpy as np
import torch

from minilora.chat_templates import BUILTIN_TEMPLATES, compile_template, encode_chat

IGNORE = -100  # label of a position that is not trained (PyTorch cross_entropy's default ignore_index)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_WORDS = {"train", "test", "validation", "valid", "val", "eval", "dev"}
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("messages", "sharegpt", "alpaca", "text")

DEMO_TRAIN = Path(__file__).parent / "data" / "demo.jsonl"  # written by scripts/make_demo_data.py
DEMO_EVAL = Path(__file__).parent / "data" / "demo_eval.jsonl"


class DataError(ValueError):
    pass


class Row(NamedTuple):
    where: str  # "path, line 12": every error about this row starts with it
    data: dict


# --- reading rows -------------------------------------------------------------------------------------------------
def load_rows(source: str | Path, split: str | None = "train", revision: str | None = None) -> list[Row]:
    """Rows of a file, of the data files in a folder that match `split`, or of a Hub dataset repo (downloaded
    with huggingface_hub, then read as a folder). A file is read whole whatever `split` says."""
    path = Path(source)
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        return _read_files(split_files(path, split))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return _read_files(split_files(_download(str(source), revision), split))
    raise DataError(f"{source}: no such file or folder, and not a Hub dataset id (owner/name)")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      allow_patterns=[f"*{s}" for s in DATA_SUFFIXES]))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise DataError(f"{repo_id}: could not download the dataset from the Hugging Face Hub ({e}). For a local "
                        f"file, check the path; for a gated repo, log in (huggingface-cli login).") from e


def split_files(root: Path, split: str | None) -> list[Path]:
    """The data files under `root` that belong to `split`: those whose relative path contains the split name as a
    word (`train.jsonl`, `data/train-00000-of-00001.parquet`, `eval/part1.jsonl`, `demo_eval.jsonl`). Files that
    name no split (train/test/validation/valid/val/eval/dev) belong to "train". split=None takes every file."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and p.name not in METADATA_FILES and not any(s.startswith(".") for s in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{root}: no data files ({', '.join(DATA_SUFFIXES)})")
    words = {p: set(re.split(r"[^a-z0-9]+", str(p.relative_to(root).with_suffix("")).lower())) for p in files}
    if split is None:
        return files
    chosen = [p for p in files if split.lower() in words[p] or (split == "train" and not words[p] & SPLIT_WORDS)]
    if not chosen:
        listing = ", ".join(str(p.relative_to(root)) for p in files[:20])
        raise DataError(f"{root}: no data file for split {split!r}; files: {listing}")
    return chosen


def _read_files(files: list[Path]) -> list[Row]:
    return [row for f in files for row in read_file(f)]


def read_file(path: Path) -> list[Row]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(readers)}")
    rows = readers[path.suffix](path)
    for row in rows:
        if not isinstance(row.data, dict):
            raise DataError(f"{row.where}: expected a JSON object, got {type(row.data).__name__}")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(Row(f"{path}, line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def _read_json(path: Path) -> list[Row]:
    """A list of objects. Files named .json that hold JSON lines are common on the Hub; they are read as such."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one value then more: JSON lines
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or one object per line), got {type(data).__name__}")
    return [Row(f"{path}, item {i}", item) for i, item in enumerate(data)]


def _read_csv(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for data in reader:
            where = f"{path}, line {reader.line_num}"
            if None in data or None in data.values():  # DictReader's marks for too many / too few fields
                n = sum(v is not None for k, v in data.items() if k is not None) + len(data.get(None, []))
                raise DataError(f"{where}: {n} fields where the header has {len(reader.fieldnames)} "
                                f"({', '.join(reader.fieldnames)})")
            rows.append(Row(where, data))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), which minilora does not "
                        f"require; or convert the file to .jsonl") from None
    return [Row(f"{path}, row {i + 1}", data) for i, data in enumerate(pq.read_table(path).to_pylist())]


def split_eval(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, eval): a random `eval_fraction` of the rows held out, the same rows for the same seed."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction {eval_fraction}: expected a number in [0, 1)")
    n_eval = round(len(rows) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(rows) > 1:
        n_eval = 1  # a small file with a small fraction still gets an eval row
    held = set(np.random.default_rng(seed).permutation(len(rows))[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# --- rows -> conversations or texts -------------------------------------------------------------------------------
def detect_format(row: Row) -> str:
    keys = row.data.keys()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(f"{row.where}: cannot tell the format from the fields {sorted(keys)}; expected `messages` "
                    f"(OpenAI roles), `conversations` (ShareGPT), `instruction`/`input`/`output` (Alpaca) or "
                    f"`text` (raw text); or name it with format=")


def to_messages(row: Row, fmt: str) -> list[dict] | str:
    """The row as a list of {"role", "content"} messages, or as one string for the `text` format."""
    if fmt == "messages":
        return _openai_messages(row, "messages")
    if fmt == "sharegpt":
        return _sharegpt_messages(row)
    if fmt == "alpaca":
        instruction, inp, output = (_field(row, k, str, k == "input") for k in ("instruction", "input", "output"))
        system = _field(row, "system", str, optional=True)
        user = f"{instruction}\n\n{inp}" if inp else instruction  # Alpaca's optional input follows the instruction
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "text":
        return _field(row, "text", str)
    raise DataError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")


def _field(row: Row, key: str, kind: type, optional: bool = False):
    value = row.data.get(key)
    if value is None and optional:
        return None
    if key not in row.data:
        raise DataError(f"{row.where}: missing field {key!r} (fields: {', '.join(sorted(row.data))})")
    if not isinstance(value, kind):
        raise DataError(f"{row.where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _openai_messages(row: Row, key: str) -> list[dict]:
    messages = []
    for i, m in enumerate(_field(row, key, list)):
        at = f"{row.where}: {key}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{at} should be an object with a string `role`, got {json.dumps(m)[:80]}")
        messages.append({"role": m["role"], "content": _content(m.get("content"), at)})
    return messages


def _content(content, at: str) -> str:
    """A message's text. OpenAI's list-of-parts form is joined when every part is text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise DataError(f"{at}: `content` should be a string (or a list of text parts), got {json.dumps(content)[:80]}")


def _sharegpt_messages(row: Row) -> list[dict]:
    turns = _field(row, "conversations", list)
    if turns and all(isinstance(t, dict) and "role" in t for t in turns):  # OpenAI form under this name
        return _openai_messages(row, "conversations")
    messages = []
    for i, t in enumerate(turns):
        at = f"{row.where}: conversations[{i}]"
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"{at}: expected `from` in {sorted(SHAREGPT_ROLES)}, got {json.dumps(t)[:80]}")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": _content(t.get("value"), at)})
    return messages


# --- tokenizing ---------------------------------------------------------------------------------------------------
@dataclass
class DataStats:
    n_rows: int = 0
    n_examples: int = 0  # rows kept (at least one trained token)
    n_truncated: int = 0  # rows cut to max_seq_length (kept or not)
    n_skipped_no_labels: int = 0
    n_tokens: int = 0  # in the kept examples, after truncation
    n_label_tokens: int = 0  # positions with a target (what the loss averages over)
    longest: int = 0  # longest row before truncation

    def __str__(self):
        return (f"{self.n_examples}/{self.n_rows} rows kept, {self.n_truncated} truncated (longest "
                f"{self.longest} tokens), {self.n_skipped_no_labels} skipped with no trained token; "
                f"{self.n_tokens} tokens, {self.n_label_tokens} trained")


def tokenize_rows(rows: list[Row], tokenizer, max_seq_length: int, template: str | None = None,
                  format: str | None = None, train_on_responses_only: bool = True) -> tuple[list[dict], DataStats]:
    """Examples {"input_ids": [...], "labels": [...]} (labels aligned, -100 where not trained) and their stats.

    Conversations are rendered with `template` (a name in chat_templates.BUILTIN_TEMPLATES or Jinja source;
    default: the tokenizer's own) and trained on the assistant turns only, unless train_on_responses_only=False.
    Rows left with nothing to train (truncated before the answer, no assistant turn) are skipped and counted;
    when they are most of the data, this raises instead of training on nothing."""
    if not rows:
        raise DataError("no rows to tokenize")
    fmt = format or detect_format(rows[0])
    compiled = None if fmt == "text" else _compiled_template(tokenizer, template)
    stats = DataStats(n_rows=len(rows))
    examples, first_skipped = [], None
    for row in rows:
        ids, labels = _encode_row(row, fmt, tokenizer, compiled, train_on_responses_only)
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            stats.n_truncated += 1
        n_trained = sum(lab != IGNORE for lab in labels[1:])  # position 0 has no previous token to predict it from
        if n_trained == 0:
            stats.n_skipped_no_labels += 1
            first_skipped = first_skipped or row.where
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.n_examples += 1
        stats.n_tokens += len(ids)
        stats.n_label_tokens += n_trained
    if stats.n_skipped_no_labels * 2 > stats.n_rows:
        raise DataError(_all_masked_message(stats, first_skipped, max_seq_length, fmt))
    return examples, stats


def _encode_row(row: Row, fmt: str, tokenizer, template, train_on_responses_only: bool):
    conversation = to_messages(row, fmt)
    if isinstance(conversation, str):  # raw text: bos as the tokenizer adds it, eos so packed documents end
        ids = list(tokenizer.encode(conversation, add_special_tokens=True))
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, list(ids)
    try:
        ids, mask = encode_chat(tokenizer, template, conversation)
    except (ValueError, TypeError, jinja2.TemplateError) as e:  # about this row's roles or content: say which
        raise DataError(f"{row.where}: the chat template cannot render this conversation: {e}") from e
    if not train_on_responses_only:
        return ids, list(ids)
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def _compiled_template(tokenizer, template: str | None):
    """`template` (a BUILTIN_TEMPLATES name or Jinja source), else the tokenizer's own, compiled once."""
    if template is None:
        template = tokenizer.chat_template
        if not template:
            raise DataError(f"{tokenizer.path}: the tokenizer has no chat template; pass template= one of "
                            f"{', '.join(BUILTIN_TEMPLATES)} (or Jinja source)")
    return compile_template(template)


def _all_masked_message(s: DataStats, first: str, max_seq_length: int, fmt: str) -> str:
    why = [f"{s.n_skipped_no_labels} of {s.n_rows} rows have no trained token: every label is -100, so training "
           f"would learn nothing (or divide by zero). First one: {first}."]
    if s.n_truncated:
        why.append(f"{s.n_truncated} rows were cut at max_seq_length={max_seq_length} (the longest has {s.longest} "
                   f"tokens): the answer may be past the cut; raise max_seq_length.")
    if fmt != "text":
        why.append("Responses-only training found no assistant tokens in them: check that the rows have assistant "
                   "turns and that the chat template is the model's (template=), or pass "
                   "train_on_responses_only=False to train on every token.")
    return " ".join(why)


class Prepared(NamedTuple):
    train: list[dict]
    eval: list[dict]
    train_stats: DataStats
    eval_stats: DataStats | None


def prepare_data(source: str | Path, tokenizer, max_seq_length: int, *, split: str = "train",
                 eval_source: str | Path | None = None, eval_split: str | None = None, eval_fraction: float = 0.0,
                 seed: int = 3407, template: str | None = None, format: str | None = None,
                 train_on_responses_only: bool = True, revision: str | None = None) -> Prepared:
    """What a training script needs: train and eval examples with their stats. The eval rows come from
    `eval_source` / `eval_split` when given (eval_split alone: another split of `source`), else from a held-out
    `eval_fraction` of the training rows."""
    rows = load_rows(source, split, revision)
    if eval_source is not None or eval_split is not None:
        eval_rows = load_rows(eval_source if eval_source is not None else source, eval_split, revision)
    else:
        rows, eval_rows = split_eval(rows, eval_fraction, seed)
    kw = dict(template=template, format=format, train_on_responses_only=train_on_responses_only)
    train, train_stats = tokenize_rows(rows, tokenizer, max_seq_length, **kw)
    if not eval_rows:
        return Prepared(train, [], train_stats, None)
    held, eval_stats = tokenize_rows(eval_rows, tokenizer, max_seq_length, **kw)
    return Prepared(train, held, train_stats, eval_stats)


# --- batching -----------------------------------------------------------------------------------------------------
def shift_labels(labels: list[int]) -> list[int]:
    """One document's aligned labels -> shifted: out[t] = labels[t + 1], and -100 at the last position."""
    return labels[1:] + [IGNORE]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The example order of one epoch: a permutation drawn from (seed, epoch) alone, so a resumed run sees the
    same order without saving it."""
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def row_starts(lengths: list[int], order: list[int], packing: bool, max_seq_length: int | None) -> np.ndarray:
    """Where each training row begins in the epoch's `order`, plus its end: row r holds the examples
    order[starts[r]:starts[r + 1]]. One example per row when padding; when packing, examples in epoch order fill a
    row until the next one does not fit (greedy, keeps the shuffle's order). A few bytes per example, so a whole
    epoch's layout is planned up front while its tensors are not (`LazyBatches`)."""
    if not packing:
        return np.arange(len(order) + 1)
    if not max_seq_length:
        raise DataError("packing needs max_seq_length (the length of a packed row)")
    starts, used = [0], 0
    for k, i in enumerate(order):
        if lengths[i] > max_seq_length:
            raise DataError(f"example {i} has {lengths[i]} tokens > max_seq_length {max_seq_length}; "
                            f"tokenize with the same max_seq_length")
        if k > starts[-1] and used + lengths[i] > max_seq_length:  # the current row is not empty and is full
            starts.append(k)
            used = 0
        used += lengths[i]
    return np.array(starts + ([len(order)] if order else []))


def collate(docs_per_row: list[list[dict]], pad_token_id: int, packed: bool) -> dict:
    """Lay out rows of documents (examples) into a batch, right-padded to the longest row. Padding gets labels
    -100; in packed batches its positions restart at 0 too, so it is one more document nothing attends across."""
    T = max(sum(len(d["input_ids"]) for d in docs) for docs in docs_per_row)
    B = len(docs_per_row)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, docs in enumerate(docs_per_row):
        t = 0
        for d in docs:
            n = len(d["input_ids"])
            input_ids[b, t:t + n] = torch.tensor(d["input_ids"])
            labels[b, t:t + n] = torch.tensor(shift_labels(d["labels"]))
            position_ids[b, t:t + n] = torch.arange(n)
            t += n
        position_ids[b, t:] = torch.arange(T - t)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
    return batch


class LazyBatches(Sequence):
    """One epoch's batches, each collated when it is asked for and not kept: `len()`, `batches[k]`, slices (a list
    of the batches in the slice) and iteration. The plan, which examples go in which row of which batch, is fixed
    at construction; the tensors are built on demand, so a million-row epoch costs its plan (8 bytes an example and
    8 a row), not a million padded tensors, before the first step."""

    def __init__(self, examples: list[dict], order: np.ndarray, starts: np.ndarray, batch_size: int,
                 pad_token_id: int, packed: bool, drop_last: bool = False):
        # order [n_examples]: example indices in epoch order; starts [n_rows + 1]: row boundaries in `order`
        self.examples, self.order, self.starts = examples, order, starts
        self.batch_size, self.pad_token_id, self.packed = batch_size, pad_token_id, packed
        n_rows = len(starts) - 1
        self.n = n_rows // batch_size if drop_last else -(-n_rows // batch_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int | slice) -> dict | list[dict]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.n))]
        k = operator.index(k)
        if not -self.n <= k < self.n:
            raise IndexError(f"batch {k} of an epoch of {self.n} batches")
        k %= self.n
        bounds = self.starts[k * self.batch_size:(k + 1) * self.batch_size + 1].tolist()  # this batch's rows
        docs = [[self.examples[i] for i in self.order[a:b].tolist()] for a, b in zip(bounds[:-1], bounds[1:])]
        return collate(docs, self.pad_token_id, self.packed)

    def __iter__(self) -> Iterator[dict]:
        return (self[k] for k in range(self.n))


def epoch_batches(examples: list[dict], batch_size: int, seed: int, epoch: int, *, packing: bool = False,
                  max_seq_length: int | None = None, pad_token_id: int = 0, shuffle: bool = True,
                  drop_last: bool = False, lengths: list[int] | None = None) -> LazyBatches:
    """The batches of one epoch, planned now and built when used. The order depends only on (seed, epoch). With
    packing, a batch is `batch_size` rows of up to max_seq_length tokens, each holding several examples.
    `lengths`: the examples' lengths, when the caller already has them."""
    if lengths is None:
        lengths = [len(e["input_ids"]) for e in examples]
    order = epoch_order(len(examples), seed, epoch, shuffle)
    starts = row_starts(lengths, order, packing, max_seq_length)
    return LazyBatches(examples, np.array(order, dtype=np.int64), starts, batch_size, pad_token_id, packing,
                       drop_last)


def iterate_batches(examples: list[dict], batch_size: int, seed: int, epoch: int, start_step: int = 0, *,
                    packing: bool = False, max_seq_length: int | None = None, pad_token_id: int = 0,
                    shuffle: bool = True, drop_last: bool = False) -> Iterator[dict]:
    """Batches of one epoch (see `epoch_batches`), from batch number `start_step` on (a resumed run skips what it
    has seen; skipped batches are never built)."""
    batches = epoch_batches(examples, batch_size, seed, epoch, packing=packing, max_seq_length=max_seq_length,
                            pad_token_id=pad_token_id, shuffle=shuffle, drop_last=drop_last)
    for k in range(start_step, len(batches)):
        yield batches[k]


class EpochBatches:
    """`batches(epoch) -> LazyBatches`, the callable trainer.Trainer takes. The trainer asks for the current
    epoch's batches before every window and indexes them by position (which is how a resumed run finds its
    place), so the last epoch's plan is kept; its batches are built as the trainer reaches them."""

    def __init__(self, examples: list[dict], batch_size: int, seed: int, *, packing: bool = False,
                 max_seq_length: int | None = None, pad_token_id: int = 0, shuffle: bool = True):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.kw = dict(packing=packing, max_seq_length=max_seq_length, pad_token_id=pad_token_id, shuffle=shuffle)
        self._epoch, self._batches = None, None

    def __call__(self, epoch: int) -> LazyBatches:
        if epoch != self._epoch:
            self._batches = epoch_batches(self.examples, self.batch_size, self.seed, epoch, lengths=self.lengths,
                                          **self.kw)
            self._epoch = epoch
        return self._batches
