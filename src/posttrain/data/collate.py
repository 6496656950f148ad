"""Examples -> batches of tensors, and the deterministic batch plan of an epoch.

A batch is a dict of tensors: ``input_ids [B,T]`` long, ``labels [B,T]`` (-100 where
no loss, not shifted) and either ``attention_mask [B,T]`` (padded batches) or
``position_ids [1,T]`` (one packed row, positions restart at 0 per example). When
examples carry ``task``, ``task_ids [B,T]`` holds each token's index in ``tasks``.

Packing and attention (transformers 5.24, measured in tests/data/test_collate.py):
with no attention mask, ``masking_utils.find_packed_sequence_indices`` reads the
restarts in ``position_ids`` and builds a block-diagonal causal mask (tested with
sdpa and eager), so examples in a packed row never attend to each other. It does
that only when the model runs **without a KV cache**: Llama's config has
``use_cache=True``, which makes the model create a cache even in training and
skips the detection, silently letting examples attend across boundaries. So call
the model with ``model(**model_inputs(batch))``, which passes ``use_cache=False``.
"""

from __future__ import annotations

import numpy as np
import torch

from posttrain.data.templates import IGNORE


def _task_index(examples: list[dict], tasks: list[str] | None) -> list[int] | None:
    """Each example's index in ``tasks``; None when no example has a task."""
    has = ["task" in e for e in examples]
    if not any(has):
        return None
    if not all(has):
        raise ValueError("some examples have a 'task' and some do not; give every example one")
    if tasks is None:
        raise ValueError("examples carry 'task' but no task list was given to the collator")
    index = {t: i for i, t in enumerate(tasks)}
    unknown = sorted({e["task"] for e in examples} - index.keys())
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(tasks)}")
    return [index[e["task"]] for e in examples]


def collate_padded(examples: list[dict], pad_token_id: int, tasks: list[str] | None = None,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch with an attention mask.

    Padding positions get ``pad_token_id``, label -100, mask 0, and the row's own
    task id (so a row's task_ids are uniform and ``task_ids[:, 0]`` names its task).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    task_idx = _task_index(examples, tasks)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
        batch["labels"][row, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][row, :n] = 1
    if task_idx is not None:
        batch["task_ids"] = torch.tensor(task_idx, dtype=torch.long)[:, None].expand(-1, width).contiguous()
    return batch


def collate_packed(examples: list[dict], tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All examples concatenated into one row, no padding.

    ``position_ids`` restart at 0 for each example, which is what keeps attention
    within an example (see the module docstring: run with ``use_cache=False``).
    Each example's first label is set to -100: it would be predicted from the
    previous example's last token.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    task_idx = _task_index(examples, tasks)
    ids, labels, positions, task_ids = [], [], [], []
    for k, e in enumerate(examples):
        n = len(e["input_ids"])
        if n == 0:
            raise ValueError("cannot pack an empty example")
        ids += e["input_ids"]
        labels += [IGNORE] + list(e["labels"][1:])
        positions += range(n)
        if task_idx is not None:
            task_ids += [task_idx[k]] * n
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }
    if task_idx is not None:
        batch["task_ids"] = torch.tensor([task_ids], dtype=torch.long)
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments for a HF causal LM's forward on this batch.

    Never the labels (objectives compute their own loss from the logits) and always
    ``use_cache=False``: training needs no cache, and packed rows need its absence to
    get transformers' block-diagonal mask.
    """
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    return kwargs


def plan_batches(lengths: list[int], *, batch_size: int | None, max_tokens: int | None, packing: bool,
                 shuffle: bool, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches as lists of example indices; a pure function of its arguments.

    The order is a permutation seeded by (seed, epoch), so a resumed run rebuilds
    the same plan and skips to its step. With ``packing``, examples are added in that
    order to a row until the next would pass ``max_tokens`` (``batch_size``, if given,
    caps examples per row); an example longer than ``max_tokens`` gets a row alone
    (truncate earlier to avoid that). Without packing, batches take ``batch_size``
    examples in order, fewer when ``max_tokens`` caps the padded size rows x longest.
    """
    if any(n < 1 for n in lengths):
        raise ValueError("every example needs at least one token")
    if packing and not max_tokens:
        raise ValueError("packing needs max_tokens (tokens per packed row)")
    if not packing and not (batch_size or max_tokens):
        raise ValueError("give batch_size or max_tokens")
    n = len(lengths)
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist() if shuffle else list(range(n))

    groups: list[list[int]] = []
    group: list[int] = []
    longest = total = 0
    for i in order:
        size = total + lengths[i] if packing else (len(group) + 1) * max(longest, lengths[i])
        if group and ((batch_size and len(group) >= batch_size) or (max_tokens and size > max_tokens)):
            groups.append(group)
            group, longest, total = [], 0, 0
        group.append(i)
        longest, total = max(longest, lengths[i]), total + lengths[i]
    if group:
        groups.append(group)
    return groups


PAIR_FIELDS = {"margin": torch.float32, "aspect": torch.long,
               "ref_chosen_logp": torch.float32, "ref_rejected_logp": torch.float32}


def collate_pairs(examples: list[dict], pad_token_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Preference pairs -> one batch of 2B sequences: chosen 0..B-1, rejected B..2B-1.

    Both halves go through one forward (DPO's concatenated forward, one reward-model pass).
    Right-padded rows by default; `packed=True` puts all 2B sequences in one row without
    padding (as `collate_packed`) and adds `seq_index` [1, T], each token's sequence, so
    per-sequence sums need no rows (DPO only: a reward model reads each row's last token).
    Per-pair fields (margin, aspect, precomputed reference log-probs) come as [B] tensors;
    a field that only some examples carry is an error rather than silently dropped.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of pairs")
    for i, e in enumerate(examples):
        missing = [k for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
                   if k not in e]
        if missing:
            raise ValueError(f"pair example {i} has no {', '.join(missing)} (encode it with encode_preference)")
    return _two_halves(examples, ("chosen_", "rejected_"), PAIR_FIELDS, pad_token_id, packed, "pair examples")


def _two_halves(examples: list[dict], prefixes: tuple[str, str], fields: dict, pad_token_id: int,
                packed: bool, what: str) -> dict[str, torch.Tensor]:
    rows = [{"input_ids": e[f"{p}input_ids"], "labels": e[f"{p}labels"]} for p in prefixes for e in examples]
    if packed:
        batch = collate_packed(rows)
        batch["seq_index"] = torch.tensor([[k for k, r in enumerate(rows) for _ in r["input_ids"]]],
                                          dtype=torch.long)
    else:
        batch = collate_padded(rows, pad_token_id)
    for key, dtype in fields.items():
        has = [key in e for e in examples]
        if all(has):
            batch[key] = torch.tensor([e[key] for e in examples], dtype=dtype)
        elif any(has):
            raise ValueError(f"some {what} have {key!r} and some do not; give every example one or none")
    return batch


UNPAIRED_FIELDS = {"desirable": torch.bool, "ref_logp": torch.float32, "ref_kl_logp": torch.float32}


def collate_unpaired(examples: list[dict], pad_token_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Unpaired (KTO) examples -> 2B sequences: completions 0..B-1, their KL rows B..2B-1.

    The KL row (prompt_i + another example's completion, `add_kl_completions`) rides in the
    same forward, as a pair's rejected side does; padding/packing as `collate_pairs`.
    `desirable` [B] bool and precomputed `ref_logp`/`ref_kl_logp` [B] come along.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of unpaired examples")
    for i, e in enumerate(examples):
        missing = [k for k in ("input_ids", "labels", "kl_input_ids", "kl_labels", "desirable") if k not in e]
        if missing:
            raise ValueError(f"unpaired example {i} has no {', '.join(missing)} "
                             "(encode it with encode_unpaired, then add_kl_completions)")
    return _two_halves(examples, ("", "kl_"), UNPAIRED_FIELDS, pad_token_id, packed, "unpaired examples")


def is_two_sided(example: dict) -> bool:
    """A pair (chosen, rejected) or an unpaired example with its KL row: two sequences, one loss unit."""
    return "chosen_input_ids" in example or "kl_input_ids" in example


def two_sided_lengths(example: dict) -> tuple[int, int]:
    if "chosen_input_ids" in example:
        return len(example["chosen_input_ids"]), len(example["rejected_input_ids"])
    return len(example["input_ids"]), len(example["kl_input_ids"])


def collate_two_sided(examples: list[dict], pad_token_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """collate_pairs or collate_unpaired, by the first example's fields."""
    if examples and "kl_input_ids" in examples[0]:
        return collate_unpaired(examples, pad_token_id, packed)
    return collate_pairs(examples, pad_token_id, packed)
