"""Regenerate the reasoning eval sets under data/reason/, byte-for-byte.

    python data/reason/make_tasks.py            # rewrite the committed files in place
    python data/reason/make_tasks.py --out DIR  # write the same files under DIR

- game24.jsonl: 40 Game-of-24 puzzles (four numbers 1-13), solvable ones only, each with
  one solution found by the exact solver (kept for reference; any valid expression counts).
- arith.jsonl: 40 arithmetic word problems, 20 one-step and 20 two-step, integer answers.
- mc.jsonl: 40 four-option multiple-choice questions (20 hand-written general knowledge,
  20 generated arithmetic), options shuffled by the seed, answer = the letter.

Seeded (one RNG per set), no clock, no model: a test regenerates and compares bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from posttrain.fileio import write_text_atomic  # noqa: E402
from posttrain.reason.tasks import check24, format_mc, game24_prompt, solve24  # noqa: E402

SEED = 20261129
N = 40

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Ema", "Finn", "Gita", "Hugo", "Iris", "Jon", "Kai", "Lina"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "shells", "cards", "cookies"]


def game24(rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < N:
        numbers = sorted(rng.randint(1, 13) for _ in range(4))
        if tuple(numbers) in seen:
            continue
        seen.add(tuple(numbers))
        solution = solve24(numbers)
        if solution is None:
            continue
        assert check24(solution, numbers), (numbers, solution)
        rows.append({"id": f"g24-{len(rows):03d}", "prompt": game24_prompt(numbers), "numbers": numbers,
                     "answer": "24", "solution": solution})
    return rows


def _one_step(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(20, 90)
        b = rng.randint(2, a - 1)
        return f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b
    b, q = rng.randint(2, 8), rng.randint(2, 12)
    return f"{b * q} {item} are shared equally among {b} children. How many {item} does each child get?", q


def _two_step(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(5, 40), rng.randint(3, 30)
        c = rng.randint(1, a + b - 1)
        return (f"{name} has {a} {item}, gets {b} more and then gives away {c}. "
                f"How many {item} does {name} have now?", a + b - c)
    if kind == 1:
        a, b, c = rng.randint(2, 8), rng.randint(3, 10), rng.randint(1, 20)
        return (f"{name} buys {a} packs of {item} with {b} in each pack and already had {c}. "
                f"How many {item} does {name} have now?", a * b + c)
    if kind == 2:
        a, b = rng.randint(3, 9), rng.randint(4, 12)
        c = rng.randint(1, a * b - 1)
        return f"A hall has {a} rows of {b} chairs and {c} chairs are broken. How many chairs can be used?", a * b - c
    b, q, c = rng.randint(2, 6), rng.randint(3, 10), rng.randint(2, 5)
    return (f"{b * q} {item} are packed equally into {b} bags. {name} takes {c} bags. "
            f"How many {item} does {name} take?", q * c)


def arith(rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < N:
        steps = 1 if len(rows) < N // 2 else 2
        question, answer = (_one_step if steps == 1 else _two_step)(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"id": f"arith-{len(rows):03d}", "prompt": question, "answer": str(answer), "steps": steps})
    return rows


# (question, correct answer, three wrong options)
KNOWLEDGE = [
    ("What is the capital of France?", "Paris", ["Lyon", "Berlin", "Madrid"]),
    ("What is the largest ocean on Earth?", "Pacific Ocean", ["Atlantic Ocean", "Indian Ocean", "Arctic Ocean"]),
    ("How many legs does a spider have?", "8", ["6", "10", "4"]),
    ("Which gas do plants take in for photosynthesis?", "carbon dioxide", ["oxygen", "nitrogen", "helium"]),
    ("What is water made of?", "hydrogen and oxygen", ["carbon and oxygen", "nitrogen and hydrogen", "salt"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Jupiter", "Venus", "Saturn"]),
    ("How many days are in a week?", "7", ["5", "6", "10"]),
    ("What is the freezing point of water in degrees Celsius?", "0", ["100", "32", "10"]),
    ("Which animal is the largest mammal?", "blue whale", ["elephant", "giraffe", "shark"]),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Beijing", "Seoul"]),
    ("How many continents are there?", "7", ["5", "6", "9"]),
    ("What do bees make?", "honey", ["milk", "silk", "wax paper"]),
    ("Which organ pumps blood through the body?", "heart", ["lungs", "liver", "brain"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    ("Which is the longest river in Africa?", "Nile", ["Congo", "Niger", "Zambezi"]),
    ("How many minutes are in an hour?", "60", ["30", "100", "24"]),
    ("What color do you get by mixing blue and yellow?", "green", ["purple", "orange", "brown"]),
    ("Which instrument has 88 keys?", "piano", ["guitar", "violin", "flute"]),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100", ["50", "90", "212"]),
]


def _mc_row(rng: random.Random, idx: int, question: str, correct: str, wrong: list[str], kind: str) -> dict:
    options = [correct, *wrong]
    rng.shuffle(options)
    return {"id": f"mc-{idx:03d}", "prompt": format_mc(question, options), "options": options,
            "answer": "ABCD"[options.index(correct)], "kind": kind}


def mc(rng: random.Random) -> list[dict]:
    rows = [_mc_row(rng, i, q, c, w, "knowledge") for i, (q, c, w) in enumerate(KNOWLEDGE)]
    seen = set()
    while len(rows) < N:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        op = rng.choice("+-*")
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        wrong: list[int] = []
        for delta in rng.sample([-10, -2, -1, 1, 2, 10, 3, -3], 8):
            if value + delta not in wrong and len(wrong) < 3:
                wrong.append(value + delta)
        question = f"What is {a} {'×' if op == '*' else op} {b}?"
        rows.append(_mc_row(rng, len(rows), question, str(value), [str(w) for w in wrong], "arithmetic"))
    return rows


def build(out: Path) -> list[Path]:
    out = Path(out)
    sets = {"game24.jsonl": game24(random.Random(SEED)), "arith.jsonl": arith(random.Random(SEED + 1)),
            "mc.jsonl": mc(random.Random(SEED + 2))}
    paths = []
    for name, rows in sets.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        paths.append(write_text_atomic(out / name, text))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE), help="output directory (default: data/reason/)")
    args = parser.parse_args()
    for path in build(Path(args.out)):
        print(path)


if __name__ == "__main__":
    main()
