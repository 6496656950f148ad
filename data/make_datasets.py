"""Regenerate every dataset shipped under data/, byte-for-byte.

    python data/make_datasets.py            # rewrite the committed files in place
    python data/make_datasets.py --out DIR  # write the same tree under DIR

Synthetic sets come from seeded generators; prose comes from the hand-written files in
data/sources/. Nothing depends on the machine, the clock or installed packages beyond
the standard library, so a test can compare a fresh run with the committed files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"
SEED = 20251125

Row = dict
Chat = list[dict[str, str]]


# ---------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """Write one JSON object per line, atomically (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_paragraphs(path: Path) -> list[str]:
    """Blocks separated by blank lines; '#' lines are comments; inner newlines become spaces."""
    lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8").splitlines()]
    blocks, cur = [], []
    for ln in lines + [""]:
        if ln.startswith("#"):
            continue
        if ln.strip():
            cur.append(ln.strip())
        elif cur:
            blocks.append(" ".join(cur))
            cur = []
    return blocks


def chat(user: str, assistant: str) -> Chat:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------- quickstart: arithmetic

# The base model (SmolLM2-135M-Instruct) answers "What is 47 + 38?" with a rambling,
# usually wrong explanation; a few minutes of LoRA teach it to reply with the right bare
# number. Held-out rows use operand pairs never seen in training (in either order).
QUICKSTART_TRAIN = 2000
QUICKSTART_TEST = 200


def arith_problem(rng: random.Random) -> tuple[str, int, int, int]:
    """(op, a, b, answer): two-digit addition, or subtraction with a non-negative result."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return "+", a, b, a + b
    a, b = max(a, b), min(a, b)
    return "-", a, b, a - b


def quickstart(rng: random.Random) -> tuple[list[Row], list[Row]]:
    seen: set[tuple[str, frozenset[int]]] = set()
    problems = []
    while len(problems) < QUICKSTART_TRAIN + QUICKSTART_TEST:
        op, a, b, ans = arith_problem(rng)
        key = (op, frozenset((a, b)))
        if key in seen:
            continue
        seen.add(key)
        problems.append((f"What is {a} {op} {b}?", str(ans)))
    test = [{"prompt": p, "answer": ans} for p, ans in problems[:QUICKSTART_TEST]]
    train = [{"messages": chat(p, ans)} for p, ans in problems[QUICKSTART_TEST:]]
    return train, test


# ---------------------------------------------------------------- general text


def general() -> list[Row]:
    return [{"text": p} for p in read_paragraphs(SOURCES / "general.txt")]


# ---------------------------------------------------------------- fictional domain


def domain() -> tuple[list[Row], list[Row]]:
    text = [{"text": p} for p in read_paragraphs(SOURCES / "domain.txt")]
    qa = []
    for n, line in enumerate((SOURCES / "domain_qa.tsv").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"{SOURCES / 'domain_qa.tsv'}:{n}: expected 'question<TAB>answer'")
        qa.append({"prompt": parts[0].strip(), "answer": parts[1].strip()})
    return text, qa


# ---------------------------------------------------------------- multitask

MULTITASK_TRAIN_PER_TASK = 400
MULTITASK_TEST_PER_TASK = 50
WORDS = (
    "apple river stone cloud green quiet morning harbour silver window garden winter "
    "lantern forest candle bright yellow orange ocean mountain little happy paper bread "
    "market valley golden shadow music summer village kettle meadow thunder gentle copper "
    "island bridge feather purple orchard crystal evening autumn basket castle pebble"
).split()


def multitask(rng: random.Random) -> tuple[list[Row], list[Row]]:
    """Two tasks, one file: 'arith' (add two numbers) and 'upper' (uppercase a phrase)."""
    n = MULTITASK_TRAIN_PER_TASK + MULTITASK_TEST_PER_TASK
    arith: list[tuple[str, str]] = []
    seen: set = set()
    while len(arith) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if frozenset((a, b)) in seen:
            continue
        seen.add(frozenset((a, b)))
        arith.append((f"Add {a} and {b}.", str(a + b)))
    upper: list[tuple[str, str]] = []
    seen = set()
    while len(upper) < n:
        phrase = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        if phrase in seen:
            continue
        seen.add(phrase)
        upper.append((f"Uppercase: {phrase}", phrase.upper()))
    k = MULTITASK_TEST_PER_TASK
    train = [{"task": "arith", "messages": chat(p, a)} for p, a in arith[k:]]
    train += [{"task": "upper", "messages": chat(p, a)} for p, a in upper[k:]]
    rng.shuffle(train)
    test = [{"task": "arith", "prompt": p, "answer": a} for p, a in arith[:k]]
    test += [{"task": "upper", "prompt": p, "answer": a} for p, a in upper[:k]]
    return train, test


# ---------------------------------------------------------------- format samples

PREFERENCES = [
    ("What causes the seasons on Earth?",
     "The tilt of the Earth's axis: each hemisphere gets more direct sunlight and longer days when it leans toward the sun.",
     "The Earth is much closer to the sun in summer and farther away in winter."),
    ("Why does bread rise?",
     "Yeast feeds on sugars in the dough and releases carbon dioxide, which gluten traps as bubbles.",
     "Because the oven pushes air into it."),
    ("What is 12 + 30?", "42", "32"),
    ("What is 75 - 28?", "47", "53"),
    ("How many squares are on a chessboard?", "64", "100"),
    ("What gas do plants release during photosynthesis?", "Oxygen.", "Carbon dioxide."),
    ("Name the largest living land animal.", "The elephant.", "The giraffe."),
    ("What causes tides?",
     "Mainly the moon's gravity, with a smaller pull from the sun.",
     "Wind blowing across the ocean every morning and evening."),
    ("What is a glacier?",
     "A large mass of ice, formed from compressed snow, that slowly flows downhill.",
     "A kind of cloud that forms over mountains."),
    ("Uppercase this phrase: quiet morning harbour", "QUIET MORNING HARBOUR", "Quiet Morning Harbour"),
    ("Reply with one word: what colour is a clear daytime sky?", "Blue.",
     "The sky can appear in many colours depending on the time of day, the weather and the amount of dust in the air."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What is the metre a unit of?", "Length.", "Mass."),
    ("Summarise in one sentence: Honeybees live in colonies with one queen, drones and many workers.",
     "A honeybee colony has a single queen, some drones and many workers.",
     "Bees are insects. They make honey. They live in hives. Some bees sting. Bees like flowers."),
    ("What is 9 + 16?", "25", "24"),
    ("Is the moon a planet?", "No, it is the Earth's natural satellite.", "Yes, it is the smallest planet."),
    ("Where did potatoes first grow as a crop?", "In the Andes mountains of South America.", "In Ireland."),
    ("What makes thunder?",
     "Lightning heats the air so suddenly that it expands with a boom.",
     "Clouds bumping into each other."),
    ("Give a short greeting.", "Hello! How can I help you today?",
     "I cannot help with that request."),
    ("What is 64 - 19?", "45", "55"),
]


def samples(rng: random.Random) -> tuple[list[Row], list[Row]]:
    completion = []
    for _ in range(16):
        op, a, b, ans = arith_problem(rng)
        completion.append({"prompt": f"Q: What is {a} {op} {b}?\nA:", "completion": f" {ans}"})
    preference = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PREFERENCES]
    return completion, preference


# ---------------------------------------------------------------- driver


def build(out: Path) -> list[Path]:
    """Write every dataset under `out`; returns the paths written. Each set has its own RNG
    so that changing one generator does not reshuffle the others."""
    out = Path(out)
    files: dict[str, list[Row]] = {}
    files["quickstart/train.jsonl"], files["quickstart/test.jsonl"] = quickstart(random.Random(SEED))
    files["general/text.jsonl"] = general()
    files["domain/text.jsonl"], files["domain/qa.jsonl"] = domain()
    files["multitask/train.jsonl"], files["multitask/test.jsonl"] = multitask(random.Random(SEED + 1))
    files["samples/completion.jsonl"], files["samples/preference.jsonl"] = samples(random.Random(SEED + 2))
    written = []
    for rel, rows in files.items():
        write_jsonl(out / rel, rows)
        written.append(out / rel)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="root to write under (default: data/)")
    args = ap.parse_args(argv)
    for path in build(args.out):
        print(path)


if __name__ == "__main__":
    main()
