"""Where forward passes run: the model's own PyTorch forward, or the native CPU decoder.

Both backends hold a set of live rows (one per prompt) over a KV cache and offer the
same four calls, which is all the decode loops need:

    start()          prefill every prompt; logits at each prompt's last token [n, V]
    extend(tokens)   feed L tokens to every live row; logits at all of them [n, L, V]
    keep(index)      continue with these live rows only (finished rows cost nothing)
    crop(n)          forget the last n positions of every row (rejected draft tokens)

`make_rows` picks the native decoder when it can run the model (see
`posttrain.generate.native`) and the PyTorch path otherwise. On the native decoder, prompts of
`TORCH_PREFILL_MIN` tokens or more are prefilled by the torch forward and decoded natively from
its K/V (`prefill_with_torch`): time to first token at the torch forward's from there, the native
prefill's below.
"""

from __future__ import annotations

import inspect

import torch

from posttrain.models import base_model

BACKENDS = ("auto", "native", "torch")
PREFILL_CHUNK = 256  # rows per native prefill call: bounds the step's scratch memory


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept either model style."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _contiguous_inputs(module, args):
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


class TorchRows:
    """Left-padded rows over the model's forward and a DynamicCache (what HF generate does)."""

    def __init__(self, model, prompt_ids: list[list[int]], pad_id: int):
        from transformers import DynamicCache

        self.model = model
        self.head = base_model(model).get_output_embeddings()
        self.device = next(model.parameters()).device
        self.cache_kw = _cache_kwarg(model)
        self.cache = DynamicCache(config=base_model(model).config)
        width = max(len(p) for p in prompt_ids)
        self.ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            self.ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.mask[i, width - len(p):] = 1
        self.ids, self.mask = self.ids.to(self.device), self.mask.to(self.device)

    def _forward(self, ids, positions, keep: int) -> torch.Tensor:
        # the head gets hidden[:, -keep:], a strided view; with a frozen bf16 head torch 2.13's CPU
        # linear then copies the head's weight per row (a LoRA SmolLM2, 50 prompts' prefill: 6.5 s
        # as is, 1.2 s contiguous; Gemma 3's 262k-row head: 17 s -> 0.1 s per call)
        hook = (self.head.register_forward_pre_hook(_contiguous_inputs, prepend=True)
                if self.head is not None else None)
        try:
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             logits_to_keep=keep, **{self.cache_kw: self.cache})
        finally:
            if hook is not None:
                hook.remove()
        return out.logits.float()

    def start(self) -> torch.Tensor:
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.last_pos = positions[:, -1:]
        return self._forward(self.ids, positions, 1)[:, -1]

    def extend(self, tokens: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        n, length = ids.shape
        self.mask = torch.cat([self.mask, self.mask.new_ones((n, length))], dim=1)
        positions = self.last_pos + torch.arange(1, length + 1, device=self.device)
        self.last_pos = positions[:, -1:]
        return self._forward(ids, positions, length)

    def keep(self, index: list[int]) -> None:
        idx = torch.tensor(index, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.last_pos = self.mask[idx], self.last_pos[idx]

    def crop(self, n: int) -> None:
        if n > 0:
            self.cache.crop(-n)
            self.mask, self.last_pos = self.mask[:, :-n], self.last_pos - n


# Prompts of at least this many tokens are prefilled by the model's torch forward (oneDNN GEMMs,
# SDPA attention) and their K/V copied into the native cache, where decoding goes on: the native
# prefill's per-row attention is O(T^2) vector work and falls behind from a few hundred tokens
# (bench/prefill.py). bf16 models without adapters or integer weights only (the case measured;
# their torch forward would run adapters unfolded or dequantize every weight).
TORCH_PREFILL_MIN = 352  # crossover on the default model (bf16, AMX, quiet): native wins at 320, torch at 384; BENCHMARKS.md


def torch_prefill_model(lm):
    """The model whose torch forward may prefill for `lm` (None: prefill natively)."""
    from posttrain.generate.native import _signature

    model = lm.model()
    if model is None or lm.dtype != torch.bfloat16 or not _plain_float(model) or _signature(model) != lm.signature:
        return None
    return model


@torch.inference_mode()
def prefill_with_torch(model, prompt: list[int], cache, slot: int) -> torch.Tensor:
    """Run `prompt` (alone) through the model's torch forward, copy its K/V into sequence `slot`
    of a native cache at positions 0..len-1, and return the last position's logits [V]. Alone,
    so a row's cache and first token do not depend on the rows decoded beside it."""
    was_training = model.training
    model.eval()
    try:
        rows = TorchRows(model, [prompt], 0)
        logits = rows.start()[0]
    finally:
        model.train(was_training)
    n = len(prompt)
    for layer, kc, vc in zip(rows.cache.layers, cache.kcache, cache.vcache):
        kc[slot, :, :, :n] = layer.keys[0].transpose(1, 2)  # [n_kv, T, hd] -> K transposed [n_kv, hd, T]
        vc[slot, :n] = layer.values[0].transpose(0, 1)  # -> [T, n_kv, hd]
    return logits


class NativeRows:
    """Rows as sequences of the native decoder's cache; a row's length is its next position."""

    def __init__(self, lm, prompt_ids: list[list[int]], extra: int, torch_prefill_min: int | None = None):
        self.lm = lm
        self.prompts = prompt_ids
        self.torch_prefill_min = TORCH_PREFILL_MIN if torch_prefill_min is None else torch_prefill_min
        lm.allocate(len(prompt_ids), max(len(p) for p in prompt_ids) + extra)
        self.live = list(range(len(prompt_ids)))
        self.length = [len(p) for p in prompt_ids]

    def start(self) -> torch.Tensor:
        """Prefill every prompt, packed into calls of up to PREFILL_CHUNK rows across prompts (a
        row's result does not depend on the rows beside it), or, from `torch_prefill_min` tokens
        on, each alone by the torch forward; the logits of each prompt's last row."""
        last: list[torch.Tensor] = []  # in prompt order: native prompts' rows come in order within each call
        order: list[int] = []  # the prompt of each row of torch.cat(last)
        flat, seq, pos, out, out_prompt = [], [], [], [], []
        model = torch_prefill_model(self.lm) if max(map(len, self.prompts)) >= self.torch_prefill_min else None

        def run() -> None:
            if flat:
                last.append(self.lm.forward(flat, seq, pos, out))
                order.extend(out_prompt)
                flat.clear(), seq.clear(), pos.clear(), out.clear(), out_prompt.clear()

        for s, p in enumerate(self.prompts):
            if model is not None and len(p) >= self.torch_prefill_min:
                last.append(prefill_with_torch(model, p, self.lm.cache, s)[None])
                order.append(s)
                continue
            for i, token in enumerate(p):
                flat.append(token), seq.append(s), pos.append(i)
                if i == len(p) - 1:
                    out.append(len(flat) - 1)
                    out_prompt.append(s)
                if len(flat) == PREFILL_CHUNK:
                    run()
        run()
        logits = torch.cat(last)
        if order != sorted(order):  # a torch-prefilled prompt came while native rows were pending
            logits = logits[torch.tensor(sorted(range(len(order)), key=order.__getitem__))]
        return logits

    def extend(self, tokens: list[list[int]]) -> torch.Tensor:
        length = len(tokens[0])
        flat, seq, pos = [], [], []
        for s, n, row in zip(self.live, self.length, tokens):
            flat.extend(row)
            seq.extend([s] * length)
            pos.extend(range(n, n + length))
        self.length = [n + length for n in self.length]
        logits = self.lm.forward(flat, seq, pos, list(range(len(flat))))
        return logits.view(len(self.live), length, -1)

    def keep(self, index: list[int]) -> None:
        self.live = [self.live[i] for i in index]
        self.length = [self.length[i] for i in index]

    def crop(self, n: int) -> None:
        self.length = [length - n for length in self.length]


# `auto` hands batches of this many rows or more to the torch forward on CPUs without AMX: there
# a decode step is compute-bound and oneDNN's GEMM beats the native vdpbf16ps kernels. Measured
# by bench/backend_crossover.py (default model, bf16, 2-core Xeon, 32 new tokens): without AMX
# native is 2.8x faster at batch 1, even at 16, 1.5x slower at 32. With AMX the native matmuls
# run on AMX tiles and stay ahead at every size (1 thread: 2.5x at 1, 3.2x at 16, 1.6x at 50).
# A model carrying PEFT adapters or integer weights stays native at every size: its torch
# forward runs the adapters unfolded (~2x slower) or dequantizes every weight at every step.
AUTO_TORCH_BATCH = 16


def _plain_float(model) -> bool:
    from posttrain.quantized import QuantLinear

    return not hasattr(model, "peft_config") and not any(isinstance(m, QuantLinear) for m in model.modules())


def make_rows(model, prompt_ids: list[list[int]], pad_id: int, extra: int, backend: str = "auto"):
    """Rows for these prompts on the chosen backend; `extra` = most tokens any row will add."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    from posttrain.generate.native import amx_available, native_lm

    if backend == "auto" and len(prompt_ids) >= AUTO_TORCH_BATCH and _plain_float(model) and not (
            amx_available() and next(model.parameters()).dtype == torch.bfloat16):
        return TorchRows(model, prompt_ids, pad_id)
    if backend != "torch":

        lm = native_lm(model, required=backend == "native")
        if lm is not None:
            return NativeRows(lm, prompt_ids, extra)
    return TorchRows(model, prompt_ids, pad_id)
