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


def load_unpaired(tokenizer, path: str, max_length: int, skip_invalid: bool) -> tuple[list[list[dict]], dict]:
    """Unpaired records (prompt, completion, label), or preference pairs as two unpaired examples
    each (chosen desirable, rejected undesirable), for KTO: one list of examples per record, so
    a held-out split keeps a pair's two sides together. No KL rows yet (`add_kl_completions`)."""
    from posttrain.data.formats import DataError, load_records
    from posttrain.data.templates import encode_unpaired

    data = load_records(path, skip_invalid=skip_invalid)
    if data.kind not in ("unpaired", "preference"):
        raise DataError(f"{path}: an unpaired loss reads unpaired records (prompt, completion, label) or "
                        f"preference pairs (prompt, chosen, rejected); this file holds {data.kind} records")
    groups, dropped = [], 0
    for i, record in enumerate(data.records):
        try:
            encoded = encode_unpaired(tokenizer, record, max_length=max_length)
        except ValueError as e:
            raise DataError(f"{path}: record {i + 1}: {e}") from e
        dropped += (2 if data.kind == "preference" else 1) - len(encoded)
        if encoded:
            groups.append(encoded)
    if not groups:
        raise ValueError(f"{path}: no completion fits in {max_length} tokens")
    examples = [e for g in groups for e in g]
    report = {"path": path, "kind": data.kind, "records": len(data.records), "skipped_invalid": data.skipped,
              "dropped_too_long": dropped, "examples": len(examples),
              "desirable": sum(e["desirable"] for e in examples)}
    return groups, report


def split_pairs(tokenizer, data, seed: int, aspects: list[str] | None = None, unpaired: bool = False):
    """(train pairs, held-out pairs or None, data report) of a PairDataConfig. `unpaired`: unpaired
    examples with their KL rows (KTO), from an unpaired or a preference file."""
    if not unpaired:
        return with_held_out(data, seed, lambda path, _: load_pairs(tokenizer, path, data.max_length,
                                                                    data.skip_invalid, aspects))
    from posttrain.data.templates import add_kl_completions

    groups, held_groups, report = with_held_out(
        data, seed, lambda path, _: load_unpaired(tokenizer, path, data.max_length, data.skip_invalid))
    examples = [e for g in groups for e in g]
    held = None if held_groups is None else [e for g in held_groups for e in g]
    for part in (examples, held):  # KL rows mismatch prompts and completions within each split
        if part is not None:
            add_kl_completions(part, seed, data.max_length)
    return examples, held, report


INSPECTABLE = ("chat", "completion", "text", "unpaired")  # kinds that encode to one sequence with a loss mask


def inspect_file(get_tokenizer: Callable[[], object], path: str, kind: str | None = None, n: int = 3,
                 max_length: int = 1024) -> dict:
    """A data file as the trainer sees it (`posttrain data inspect`, the web studio's data page):
    counts, the invalid rows named by file and line, and the first `n` records rendered through the
    chat template as (text, carries loss) runs. Kinds without a single sequence (preference, prompt)
    get counts and errors only, and `get_tokenizer` is called only when a record is rendered."""
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record, loss_spans

    data = load_records(path, kind=kind, skip_invalid=True)
    shown = []
    tokenizer = get_tokenizer() if data.kind in INSPECTABLE and data.records[:n] else None
    for i, record in enumerate(data.records[:n] if tokenizer is not None else []):
        ex = encode_record(tokenizer, record, data.kind, max_length=max_length)
        if ex is None:
            shown.append({"index": i + 1, "tokens": 0, "loss_tokens": 0, "spans": []})
            continue
        shown.append({"index": i + 1, "tokens": len(ex["input_ids"]),
                      "loss_tokens": sum(1 for t in ex["labels"] if t != -100),
                      "spans": loss_spans(tokenizer, ex)})
    return {"path": str(path), "kind": data.kind, "valid": len(data.records), "invalid": data.skipped,
            "errors": list(data.skip_reasons), "records": shown, "max_length": max_length}
