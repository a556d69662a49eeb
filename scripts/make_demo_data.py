"""Write the demo fine-tuning set, minilora/data/demo.jsonl (train) and demo_eval.jsonl (held out), deterministically.

The task is unit conversion by a factor of 1000 with a terse, fixed answer format:

    user:      How many grams are in 37 kg?          user:      Convert 5000 mL to liters.
    assistant: 37000 g                                assistant: 5 L

A small instruct model (SmolLM2-135M-Instruct) already knows roughly what a kilogram is but answers in a sentence
("37 kg is equal to 37,000 grams."), so exact match against the reference starts near 0 and climbs to most of the
held-out set after a few minutes of LoRA training on a CPU: the change fine-tuning makes is visible and checkable.
The arithmetic is only appending or dropping "000", which a 135M model can learn; the format is what it must adopt.
Held-out rows use numbers never seen with the same unit pair in training. Measured (2026-11-23, LoRA r=16 on all
projections, lr 1e-3, batch 8, fp32 on CPU): exact match on 30 held-out rows went from 0/30 to 29/30 after 40 steps.

    python scripts/make_demo_data.py            # rewrites both files; same bytes every run for the same --seed
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (large unit: abbreviation, singular, plural), (small unit: ...); small = 1000 × large
UNIT_PAIRS = [
    (("kg", "kilogram", "kilograms"), ("g", "gram", "grams")),
    (("km", "kilometer", "kilometers"), ("m", "meter", "meters")),
    (("L", "liter", "liters"), ("mL", "milliliter", "milliliters")),
    (("s", "second", "seconds"), ("ms", "millisecond", "milliseconds")),
    (("kW", "kilowatt", "kilowatts"), ("W", "watt", "watts")),
]
# {v} value, {a} its unit's abbreviation, {n} its unit's name; {to} the target unit's plural name
PHRASINGS = [
    "Convert {v} {a} to {to}.",
    "How many {to} are in {v} {a}?",
    "What is {v} {n} in {to}?",
    "Express {v} {a} in {to}.",
    "{v} {a} is how many {to}?",
]


def make_row(rng: random.Random, src, dst, value: int, factor: int) -> dict:
    """One conversation: `value` in unit `src` -> value * factor in unit `dst` (factor 1000 or 1/1000)."""
    answer = value * factor if factor >= 1 else value // round(1 / factor)
    name = src[1] if value == 1 else src[2]
    question = rng.choice(PHRASINGS).format(v=value, a=src[0], n=name, to=dst[2])
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"{answer} {dst[0]}"}]}


def make_split_rows(seed: int, n_train_per_direction: int, n_eval_per_direction: int):
    rng = random.Random(seed)
    train, evals = [], []
    for large, small in UNIT_PAIRS:
        for src, dst, up in ((large, small, True), (small, large, False)):
            # distinct numbers per direction; the held-out ones never appear in training for this direction
            values = rng.sample(range(1, 1000), n_train_per_direction + n_eval_per_direction)
            for i, v in enumerate(values):
                row = make_row(rng, src, dst, v, 1000) if up else make_row(rng, src, dst, v * 1000, 0.001)
                (train if i < n_train_per_direction else evals).append(row)
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {path}: {len(rows)} rows, {path.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train_per_direction", type=int, default=48, help="10 directions: 480 training rows")
    p.add_argument("--eval_per_direction", type=int, default=6, help="10 directions: 60 held-out rows")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parents[1] / "minilora" / "data"))
    args = p.parse_args()

    train, evals = make_split_rows(args.seed, args.train_per_direction, args.eval_per_direction)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "demo.jsonl", train)
    write_jsonl(out / "demo_eval.jsonl", evals)
