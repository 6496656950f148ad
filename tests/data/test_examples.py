"""Training files -> examples, and the held-out split every training stage shares."""

import json

from posttrain.config import PairDataConfig
from posttrain.data.examples import split_eval, split_pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_split_eval_holds_out_a_seeded_fraction_and_at_least_one():
    examples = [{"i": i} for i in range(10)]
    train, held = split_eval(examples, 0.3, seed=1)
    assert len(held) == 3 and len(train) == 7
    assert sorted(e["i"] for e in train + held) == list(range(10))
    assert split_eval(examples, 0.3, seed=1) == (train, held)  # seeded
    assert len(split_eval(examples, 0.01, seed=1)[1]) == 1


def test_kto_from_pairs_keeps_both_sides_of_a_pair_on_one_side_of_the_split(tmp_path, tokenizer):
    rows = [{"prompt": f"Question number {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(20)]
    data = PairDataConfig(train=write_jsonl(tmp_path / "p.jsonl", rows), eval_fraction=0.25, max_length=64)
    train, held, report = split_pairs(tokenizer, data, seed=3, unpaired=True)
    assert report["examples"] == 40 and len(train) == 30 and len(held) == 10

    def prompts(part):
        return [tokenizer.decode([t for t, lab in zip(e["input_ids"], e["labels"]) if lab == -100]) for e in part]

    train_prompts, held_prompts = prompts(train), prompts(held)
    assert not set(train_prompts) & set(held_prompts)  # no pair is cut in two
    for part, names in ((train, train_prompts), (held, held_prompts)):
        assert all(names.count(p) == 2 for p in names)  # desirable and undesirable side of each prompt
        assert sum(e["desirable"] for e in part) == len(part) // 2
        assert all("kl_input_ids" in e for e in part)  # KL rows are made within each split
