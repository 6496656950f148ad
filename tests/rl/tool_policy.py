"""A scripted policy for tool-use rollout tests: it stands in for `generate`, writes the turns a
script gives, and reports a real model's log-probs of those tokens in their context."""

from __future__ import annotations

from typing import Callable

import torch

from posttrain.generate.engine import GenerationOutput
from posttrain.rl.tools import TOOL_CLOSE


def forced_logprobs(model, context: list[int], ids: list[int], temperature: float = 1.0) -> list[float]:
    """The model's log-probs of `ids` after `context` (teacher forcing)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + ids])).logits[0].float() / temperature
    logp = torch.log_softmax(logits[len(context) - 1:-1], -1)
    return logp[torch.arange(len(ids)), torch.tensor(ids)].tolist()


class ScriptedPolicy:
    """`respond(context_text) -> the next turn's text`. A turn holding </tool_call> ends there (the
    sampler stops on it), any other ends with EOS, as the real sampler's turns do. `contexts`
    records every context it was asked to continue."""

    def __init__(self, tokenizer, respond: Callable[[str], str]):
        self.tok, self.respond = tokenizer, respond
        self.contexts: list[list[int]] = []

    def __call__(self, model, tokenizer, prompts, config=None, **kw):
        assert TOOL_CLOSE in config.stop
        ids_out, lps = [], []
        for context in prompts:
            self.contexts.append(list(context))
            turn = self.respond(tokenizer.decode(context))
            ids = self.tok(turn, add_special_tokens=False)["input_ids"]
            if TOOL_CLOSE not in turn:
                ids = ids + [self.tok.eos_token_id]
            ids_out.append(ids)
            lps.append(forced_logprobs(model, list(context), ids, config.temperature if config.do_sample else 1.0))
        return GenerationOutput([self.tok.decode(i, skip_special_tokens=True) for i in ids_out], ids_out, lps)


def by_question(scripts: dict[str, list[str]]) -> Callable[[str], str]:
    """Each question's turns in order: the row whose context asks `q` gets q's next turn."""
    queues = {q: list(t) for q, t in scripts.items()}

    def respond(text: str) -> str:
        question = next(q for q in queues if f"user\n{q}<|im_end|>" in text)
        return queues[question].pop(0)

    return respond
