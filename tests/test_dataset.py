"""Data tests: every source and row format, errors that name the file and row, truncation and the all-masked
guard, packing layout, and the check that matters most: padded and packed batches give the same summed loss and
the same gradients as running each example on its own (the oracle: plain next-token CE of one unpadded sequence).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import report
from minilora import dataset as ds
from minilora.dataset import DataError, Row

REPO = Path(__file__).resolve().parents[1]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Convert 3 kg to grams."},
                {"role": "assistant", "content": "3000 g"}]
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


# --- a tiny real tokenizer (byte-level BPE trained on a few sentences), saved as a Hugging Face folder -------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from minilora.chat_templates import BUILTIN_TEMPLATES
    from minilora.tokenizer import Tokenizer as MiniTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Convert 3 kg to grams. 3000 g", "Be brief. How many meters are in 5 km? 5000 m",
              "user assistant system the quick brown fox jumps over the lazy dog"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "add_bos_token": True,
         "chat_template": BUILTIN_TEMPLATES["chatml"]}))
    return MiniTokenizer.from_dir(d)


def rows_of(*datas) -> list[Row]:
    return [Row(f"mem, line {i + 1}", d) for i, d in enumerate(datas)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- sources --------------------------------------------------------------------------------------------------------
ALPACA = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three")]


def test_each_file_type_reads_the_same_rows(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    (tmp_path / "lines.json").write_text(jsonl.read_text())  # JSON lines under a .json name, as on the Hub
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA)
    for name in ("a.jsonl", "a.json", "lines.json", "a.csv"):
        rows = ds.load_rows(tmp_path / name)
        assert [r.data for r in rows] == ALPACA, name
        assert all(str(tmp_path / name) in r.where for r in rows)


def test_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # without pyarrow, a clear error; the file content does not matter
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pyarrow"):
            ds.load_rows(tmp_path / "x.parquet")
        return
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "x.parquet")
    assert [r.data for r in ds.load_rows(tmp_path / "x.parquet")] == ALPACA


def test_folder_split_matching(tmp_path):
    write_jsonl(tmp_path / "data" / "train-00000-of-00001.jsonl", ALPACA[:2])
    write_jsonl(tmp_path / "data" / "validation.jsonl", ALPACA[2:])
    (tmp_path / "dataset_info.json").write_text("{}")  # Hub metadata, not data
    assert [r.data for r in ds.load_rows(tmp_path, "train")] == ALPACA[:2]
    assert [r.data for r in ds.load_rows(tmp_path, "validation")] == ALPACA[2:]
    assert len(ds.load_rows(tmp_path, None)) == 3
    with pytest.raises(DataError, match="split 'test'.*validation.jsonl"):
        ds.load_rows(tmp_path, "test")
    # no file names a split: they all form "train"
    write_jsonl(tmp_path / "plain" / "part1.jsonl", ALPACA[:1])
    write_jsonl(tmp_path / "plain" / "part2.jsonl", ALPACA[1:])
    assert [r.data for r in ds.load_rows(tmp_path / "plain")] == ALPACA
    # the package's demo folder: demo.jsonl names no split (train), demo_eval.jsonl is "eval"
    assert ds.load_rows(ds.DEMO_TRAIN.parent, "train") == ds.load_rows(ds.DEMO_TRAIN)
    assert ds.load_rows(ds.DEMO_TRAIN.parent, "eval") == ds.load_rows(ds.DEMO_EVAL)


def test_hub_dataset_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert [r.data for r in ds.load_rows("someone/some-data")] == ALPACA
    (repo_id, kw), = calls
    assert repo_id == "someone/some-data" and kw["repo_type"] == "dataset"
    assert {"*.jsonl", "*.json", "*.parquet"} <= set(kw["allow_patterns"])


def test_split_eval_is_deterministic_and_disjoint():
    rows = rows_of(*({"text": str(i)} for i in range(50)))
    train, held = ds.split_eval(rows, 0.2, seed=7)
    assert len(held) == 10 and len(train) == 40
    assert {r.where for r in train}.isdisjoint({r.where for r in held})
    assert ds.split_eval(rows, 0.2, seed=7) == (train, held)
    assert ds.split_eval(rows, 0.2, seed=8)[1] != held


# --- errors name the file and the row -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, match", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "broken\n', r"bad.jsonl, line 2: not valid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n\n[1, 2]\n', r"bad.jsonl, line 3: expected a JSON object"),
    ("bad.json", '{"text": "a dict, not a list"}', r"bad.json: expected a list"),
    ("bad.json", '[{"text": "ok"}, 5]', r"bad.json, item 1: expected a JSON object"),
    ("bad.csv", 'text,other\nfine,1\nshort\n', r"bad.csv, line 3: 1 fields where the header has 2"),
    ("bad.txt", 'hello', r"bad.txt: unsupported file type"),
])
def test_unreadable_rows_name_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        ds.load_rows(tmp_path / name)


@pytest.mark.parametrize("rows, fmt, match", [
    ([{"messages": CONVERSATION}, {"mesages": CONVERSATION}], "messages", r"line 2: missing field 'messages'"),
    ([{"messages": CONVERSATION}, {"messages": "hi"}], "messages", r"line 2: field 'messages' should be list"),
    ([{"messages": [{"role": "user", "content": 3}]}], "messages", r"line 1: messages\[0\]: `content`"),
    ([{"conversations": [{"from": "robot", "value": "x"}]}], "sharegpt", r"line 1: conversations\[0\].*robot"),
    ([{"instruction": "a", "output": 5}], "alpaca", r"line 1: field 'output' should be str"),
    ([{"text": None}], "text", r"line 1: field 'text' should be str"),
    ([{"prompt": "a", "completion": "b"}], None, r"line 1: cannot tell the format"),
])
def test_bad_fields_name_the_row(tmp_path, tokenizer, rows, fmt, match):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=f"rows.jsonl, {match}"):
        ds.tokenize_rows(ds.load_rows(path), tokenizer, 64, format=fmt)


# --- formats ----------------------------------------------------------------------------------------------------------
def test_sharegpt_and_alpaca_become_the_same_conversation():
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "Convert 3 kg to grams."},
                                  {"from": "gpt", "value": "3000 g"}]}
    alpaca = {"system": "Be brief.", "instruction": "Convert 3 kg to grams.", "input": "", "output": "3000 g"}
    for data in ({"messages": CONVERSATION}, sharegpt, alpaca):
        row, = rows_of(data)
        assert ds.to_messages(row, ds.detect_format(row)) == CONVERSATION
    row, = rows_of({"instruction": "Translate.", "input": "chat", "output": "cat"})
    assert ds.to_messages(row, "alpaca")[0] == {"role": "user", "content": "Translate.\n\nchat"}
    row, = rows_of({"conversations": CONVERSATION})  # OpenAI roles under `conversations`
    assert ds.to_messages(row, "sharegpt") == CONVERSATION


def test_responses_only_labels(tokenizer):
    from minilora.chat_templates import encode_chat, BUILTIN_TEMPLATES
    rows = rows_of({"messages": CONVERSATION})
    (ex,), stats = ds.tokenize_rows(rows, tokenizer, 128, template="chatml")
    ids, mask = encode_chat(tokenizer, BUILTIN_TEMPLATES["chatml"], CONVERSATION)
    assert ex["input_ids"] == list(ids)
    trained = [t for t in ex["labels"] if t != ds.IGNORE]
    assert tokenizer.decode(trained).strip().startswith("3000 g")  # the answer, then the end-of-turn token
    assert "Convert" not in tokenizer.decode(trained)
    assert stats.n_label_tokens == len(trained) and stats.n_tokens == len(ids)
    (ex_all,), _ = ds.tokenize_rows(rows, tokenizer, 128, template="chatml", train_on_responses_only=False)
    assert ex_all["labels"] == ex_all["input_ids"]


def test_text_format_trains_every_token_with_bos_and_eos(tokenizer):
    (ex,), stats = ds.tokenize_rows(rows_of({"text": "the quick brown fox"}), tokenizer, 64)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][0] == tokenizer.encode("x", add_special_tokens=True)[0] == 1  # bos, as the tokenizer adds
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert stats.n_label_tokens == len(ex["input_ids"]) - 1  # every token but the first has a predictor


# --- truncation and the all-masked guard ------------------------------------------------------------------------------
def conv(answer_words: int, prompt_words: int = 2) -> dict:
    return {"messages": [{"role": "user", "content": " ".join(["fox"] * prompt_words)},
                         {"role": "assistant", "content": " ".join(["dog"] * answer_words)}]}


def test_truncation_is_counted(tokenizer):
    rows = rows_of(conv(2), conv(40), conv(3), conv(60))
    lengths = [len(ds.tokenize_rows([r], tokenizer, 10_000, template="chatml")[0][0]["input_ids"]) for r in rows]
    L = sorted(lengths)[1] + 1  # the two short rows fit, the two long ones are cut (after their answer starts)
    examples, stats = ds.tokenize_rows(rows, tokenizer, L, template="chatml")
    print(stats)
    assert stats.n_truncated == 2 and stats.n_examples == 4 and stats.longest == max(lengths)
    assert [len(e["input_ids"]) for e in examples] == [min(n, L) for n in lengths]
    assert stats.n_tokens == sum(min(n, L) for n in lengths)
    assert stats.n_label_tokens == sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)


def test_rows_cut_before_the_answer_are_skipped_then_refused(tokenizer):
    short, long_prompt = conv(2, 2), conv(2, 60)
    n_short = len(ds.tokenize_rows(rows_of(short), tokenizer, 10_000, template="chatml")[0][0]["input_ids"])
    # one row in three loses its answer: skipped and counted
    examples, stats = ds.tokenize_rows(rows_of(short, long_prompt, short), tokenizer, n_short, template="chatml")
    assert stats.n_skipped_no_labels == 1 and len(examples) == 2 and stats.n_truncated == 1
    # most rows lose it: refuse, saying why and what to change
    with pytest.raises(DataError, match=r"2 of 3 rows have no trained token.*line 1.*raise max_seq_length"):
        ds.tokenize_rows(rows_of(long_prompt, long_prompt, short), tokenizer, n_short, template="chatml")
    # no assistant turn at all
    with pytest.raises(DataError, match="train_on_responses_only=False"):
        ds.tokenize_rows(rows_of({"messages": [{"role": "user", "content": "hi"}]}), tokenizer, 64,
                         template="chatml")


# --- batching -----------------------------------------------------------------------------------------------------------
def random_examples(n: int, seed: int = 0, vocab: int = 1000, max_len: int = 12) -> list[dict]:
    """Examples with random ids, lengths and prompt/answer split (the answer is the tail, as in chat data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, max_len + 1, (), generator=g))
        prompt = int(torch.randint(1, length - 1, (), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [ds.IGNORE] * prompt + ids[prompt:]})
    return out


def test_packed_rows_layout():
    examples = random_examples(30)
    batches = list(ds.iterate_batches(examples, 3, seed=0, epoch=0, packing=True, max_seq_length=20,
                                      pad_token_id=0))
    seen = []
    for b in batches:
        ids, labels, pos = b["input_ids"], b["labels"], b["position_ids"]
        assert ids.shape == labels.shape == pos.shape and ids.shape[1] <= 20
        for r in range(ids.shape[0]):
            starts = (pos[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for s, e in zip(starts[:-1], starts[1:]):
                assert pos[r, s:e].tolist() == list(range(e - s))
                doc = ids[r, s:e].tolist()
                match = [ex for ex in examples if ex["input_ids"] == doc]
                if not match:  # the padding tail: one more document, never trained
                    assert e == ids.shape[1] and set(doc) == {0} and (labels[r, s:e] == -100).all()
                    continue
                seen.append(doc)
                # shifted per document: position t predicts the next token of the same document, the last nothing
                assert labels[r, s:e].tolist() == match[0]["labels"][1:] + [-100]
    assert sorted(seen) == sorted(e["input_ids"] for e in examples)  # every example exactly once


def test_padded_and_packed_loss_and_grads_equal_single_examples(tmp_path):
    from minilora.loading import load_model
    from tiny_models import save_tiny
    save_tiny("llama", tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    examples = random_examples(9, seed=1, max_len=16)

    def run(loss_of_batches):
        model.zero_grad(set_to_none=True)
        loss = loss_of_batches()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    def single():  # oracle: each example alone, no padding, no position_ids, the usual HF shift
        total = 0
        for e in examples:
            logits = model(torch.tensor([e["input_ids"]]))[0]  # [T, V]
            total = total + F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), reduction="sum")
        return total

    def batched(**kw):
        def f():
            total = 0
            for b in ds.iterate_batches(examples, 4, seed=0, epoch=0, pad_token_id=0, **kw):
                logits = model(b["input_ids"], b.get("position_ids"))  # [B, T, V]
                total = total + F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
            return total
        return f

    ref_loss, ref_grad = run(single)
    for name, kw in [("padded", {}), ("packed", dict(packing=True, max_seq_length=32))]:
        loss, grad = run(batched(**kw))
        report(f"{name} summed loss", loss, ref_loss)
        report(f"{name} grads", grad, ref_grad)
        n_labels = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
        assert abs(loss - ref_loss).item() / n_labels <= 1e-5  # per-token loss, fp32
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    n_packed = sum(1 for _ in ds.iterate_batches(examples, 1, 0, 0, packing=True, max_seq_length=32))
    assert n_packed < len(examples)  # packing did put several documents in a row


def test_shuffle_is_deterministic_and_resumable():
    examples = random_examples(23)
    kw = dict(packing=True, max_seq_length=24)

    def firsts(epoch, start=0, **extra):
        return [b["input_ids"][:, :3].tolist() for b in ds.iterate_batches(examples, 2, 5, epoch, start,
                                                                           **{**kw, **extra})]
    epoch0 = firsts(0)
    assert firsts(0) == epoch0  # same (seed, epoch): same batches
    assert firsts(1) != epoch0  # a new epoch reshuffles
    assert firsts(0, start=3) == epoch0[3:]  # resuming at batch 3 continues where the run stopped
    assert [b["input_ids"][:, :3].tolist() for b in ds.EpochBatches(examples, 2, 5, **kw)(0)] == epoch0
    unshuffled = list(ds.iterate_batches(examples, 1, 5, 0, shuffle=False))
    assert [b["input_ids"][0].tolist() for b in unshuffled] == [e["input_ids"] for e in examples]
    assert "position_ids" not in unshuffled[0]  # padded batches keep the model's default positions


def eager_epoch(examples, batch_size, seed, epoch, packing=False, max_seq_length=None, pad_token_id=0,
                shuffle=True) -> list[dict]:
    """Oracle: an epoch's batches as they were built before batching became lazy, all of them up front: rows
    filled greedily in epoch order (one example each when padding), then collated batch_size rows at a time."""
    order = ds.epoch_order(len(examples), seed, epoch, shuffle)
    rows, row, used = [], [], 0
    for i in order:
        n = len(examples[i]["input_ids"])
        if row and (not packing or used + n > max_seq_length):
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    rows += [row] if row else []
    return [ds.collate([[examples[i] for i in r] for r in rows[k:k + batch_size]], pad_token_id, packing)
            for k in range(0, len(rows), batch_size)]


def assert_same_batches(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)


@pytest.mark.parametrize("packing", [False, True])
def test_lazy_batches_equal_the_eager_ones(packing):
    """Batch k of a lazy epoch, by index, slice, iteration or iterate_batches' resume, is the eager batch k, over
    two epochs with a short last batch; drop_last drops that one."""
    examples = random_examples(41, seed=3)
    kw = dict(packing=packing, max_seq_length=25 if packing else None, pad_token_id=7)
    batches = ds.EpochBatches(examples, 4, 11, **kw)
    for epoch in (0, 1):
        want = eager_epoch(examples, 4, 11, epoch, **kw)
        got = batches(epoch)
        n_rows = sum(b["input_ids"].shape[0] for b in want)
        assert n_rows % 4 and (n_rows < 41) == packing  # a short last batch; packing did pack
        assert_same_batches([got[k] for k in range(len(got))], want)
        assert_same_batches(list(got), want)
        assert_same_batches(got[2:5], want[2:5])  # the trainer's window
        assert_same_batches([got[-1], got[-len(got)]], [want[-1], want[0]])
        assert_same_batches(list(ds.iterate_batches(examples, 4, 11, epoch, 3, **kw)), want[3:])
        with pytest.raises(IndexError, match=f"batch {len(want)} of an epoch of {len(want)} batches"):
            got[len(want)]
        dropped = ds.epoch_batches(examples, 4, 11, epoch, drop_last=True, **kw)
        assert len(dropped) == n_rows // 4 == len(want) - 1
        assert_same_batches(list(dropped), want[:-1])


def test_epoch_batches_build_nothing_until_used(monkeypatch):
    """An epoch over 200k examples is planned without collating a batch; indexing builds that batch alone, the
    trainer's window slice builds only its batches, and nothing is kept (asking again builds again)."""
    calls = []  # rows per collated batch
    real_collate = ds.collate
    monkeypatch.setattr(ds, "collate", lambda docs, *a: calls.append(len(docs)) or real_collate(docs, *a))
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 200_000  # one shared dict: no memory
    for kw, n_batches in [({}, 25_000), (dict(packing=True, max_seq_length=12), 6_250)]:  # packed: 4 per row
        calls.clear()
        batches = ds.EpochBatches(examples, 8, 0, **kw)
        epoch = batches(0)
        assert len(epoch) == n_batches and calls == []
        assert batches(0) is epoch  # the trainer asks before every window: planned once per epoch
        window = epoch[100:103]
        assert calls == [8, 8, 8] and window[0]["input_ids"].shape == (8, 3 if not kw else 12)
        assert_same_batches([epoch[100]], window[:1])
        assert calls == [8] * 4
        assert len(epoch[-1]["input_ids"]) == 8 and calls == [8] * 5


# --- the demo data ----------------------------------------------------------------------------------------------------
def test_demo_data_is_what_the_script_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out_dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("demo.jsonl", "demo_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "minilora" / "data" / name).read_bytes(), name
    train, held = ds.load_rows(ds.DEMO_TRAIN), ds.load_rows(ds.DEMO_EVAL)
    assert 300 <= len(train) <= 600 and len(held) >= 30
    assert ds.DEMO_TRAIN.stat().st_size + ds.DEMO_EVAL.stat().st_size < 200_000
    assert {r.data["messages"][0]["content"] for r in train}.isdisjoint(r.data["messages"][0]["content"] for r in held)
    for r in train + held:  # the reference answers are right: value × or ÷ 1000
        q, a = r.data["messages"][0]["content"], r.data["messages"][1]["content"]
        v = int(next(w for w in q.split() if w.isdigit()))
        n = int(a.split()[0])
        assert n in (v * 1000, v // 1000), (q, a)


@pytest.mark.slow
def test_demo_rows_are_short_for_smollm2(real_hf_dir):
    from minilora.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(real_hf_dir("smollm2-135m-instruct"))
    data = ds.prepare_data(ds.DEMO_TRAIN, tok, 64, eval_source=ds.DEMO_EVAL)
    print(data.train_stats, data.eval_stats, sep="\n")
    for stats in (data.train_stats, data.eval_stats):
        assert stats.n_truncated == 0 and stats.n_skipped_no_labels == 0 and stats.longest < 64
    # the trained tokens are exactly the answer and SmolLM2's end-of-turn token
    ex, row = data.train[0], ds.load_rows(ds.DEMO_TRAIN)[0]
    trained = [t for t in ex["labels"] if t != ds.IGNORE]
    assert tok.decode(trained) == row.data["messages"][-1]["content"] + "<|im_end|>"


def test_prepare_data_holds_out_a_fraction(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [conv(2, n) for n in range(1, 21)])
    data = ds.prepare_data(path, tokenizer, 64, eval_fraction=0.25, seed=1, template="chatml")
    assert len(data.train) == 15 and len(data.eval) == 5 and data.eval_stats.n_rows == 5
    again = ds.prepare_data(path, tokenizer, 64, eval_fraction=0.25, seed=1, template="chatml")
    assert again.eval == data.eval
