"""Data files -> tokenized training examples: what every training stage reads.

SFT, pre-training, distillation, pruning recovery and QAT read chat/completion/text files
(`encode_file`); the reward model and the DPO family read preference pairs (`load_pairs`).
Both hold out a seeded part of the training file when no eval file is given (`split_eval`).
"""

from __future__ import annotations

import random
from typing import Callable



def encode_file(tokenizer, path: str, kind: str | None, max_length: int, skip_invalid: bool,
                tasks: list[str] | None = None) -> tuple[list[dict], dict]:
    """Load, validate and tokenize a data file; returns examples and a report of counts."""
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record

    data = load_records(path, kind=kind, skip_invalid=skip_invalid)
    if data.kind not in ("chat", "completion", "text"):
        raise ValueError(f"{path}: {data.kind} records cannot be used for SFT/pre-training")
    examples, no_loss = [], 0
    for i, record in enumerate(data.records):
        if tasks is not None and record.get("task") not in tasks:
            raise ValueError(f"{path}: record {i + 1}: field 'task' must be one of {tasks}; got {record.get('task')!r}")
        ex = encode_record(tokenizer, record, data.kind, max_length=max_length)
        if ex is None or not any(t != -100 for t in ex["labels"][1:]):
            no_loss += 1
            continue
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no example carries a loss token after truncation to {max_length} tokens")
    report = {"path": path, "kind": data.kind, "records": len(data.records), "skipped_invalid": data.skipped,
              "dropped_no_loss": no_loss, "examples": len(examples)}
    return examples, report


def split_eval(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded `fraction` of the examples (at least one) held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(examples) * fraction))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def load_pairs(tokenizer, path: str, max_length: int, skip_invalid: bool,
               aspects: list[str] | None = None) -> tuple[list[dict], dict]:
    """Load, validate and encode preference records. With `aspects`, a record's `aspect`
    (a name from that list, or absent = the first) becomes the reward head's index;
    without, the field is ignored (DPO)."""
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_preference

    data = load_records(path, kind="preference", skip_invalid=skip_invalid)
    examples, dropped = [], 0
    for i, record in enumerate(data.records):
        record = dict(record)
        aspect = record.pop("aspect", None)
        if aspects is not None:
            if aspect is None:
                aspect = aspects[0]
            if aspect not in aspects:
                raise ValueError(f"{path}: record {i + 1}: field 'aspect' must be one of {aspects}; got {aspect!r}")
            record["aspect"] = aspects.index(aspect)
        ex = encode_preference(tokenizer, record, max_length=max_length)
        if ex is None:
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no pair fits in {max_length} tokens")
    report = {"path": path, "records": len(data.records), "skipped_invalid": data.skipped,
              "dropped_too_long": dropped, "pairs": len(examples)}
    return examples, report


def with_held_out(data, seed: int, encode: Callable[[str, str], tuple[list[dict], dict]]
                  ) -> tuple[list[dict], list[dict] | None, dict]:
    """(train examples, held-out examples or None, data report): `encode(path, "train")` of
    data.train, and `encode(path, "eval")` of data.eval when given, else a seeded
    data.eval_fraction of the train examples held out."""
    examples, report = encode(data.train, "train")
    held = None
    if data.eval:
        held, _ = encode(data.eval, "eval")
    elif data.eval_fraction:
        examples, held = split_eval(examples, data.eval_fraction, seed)
    return examples, held, report


def split_pairs(tokenizer, data, seed: int, aspects: list[str] | None = None):
    """(train pairs, held-out pairs or None, data report) of a PairDataConfig."""
    return with_held_out(data, seed, lambda path, _: load_pairs(tokenizer, path, data.max_length, data.skip_invalid,
                                                             aspects))
