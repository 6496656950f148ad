"""The RewardFunction family: rule scorers, verifiers, mixtures, and building them from config."""

from __future__ import annotations

import pytest
import torch

from posttrain.rl.rewards import (
    AnswerVerifier,
    BlocklistScorer,
    FormatScorer,
    LengthScorer,
    Mixture,
    RewardModelScorer,
    RewardOutput,
    build_reward,
    parse_reward_config,
)
from posttrain.train.reward_model import reward_model_from_lm, save_reward_model


# ----------------------------------------------------------------------------- scorers


def test_length_scorer_chars_and_tokens(tokenizer):
    chars = LengthScorer(min_length=3, max_length=5, unit="chars", penalty=0.5)
    out = chars(["p"] * 4, ["ab", "abc", "abcde", "abcdefgh"])
    assert out.scores.tolist() == [-0.5, 0.0, 0.0, -1.5]
    assert torch.equal(out.parts["length"], out.scores)
    tokens = LengthScorer(max_length=2, unit="tokens", tokenizer=tokenizer, penalty=1.0)
    text = "one two three four"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokens(["p"], [text]).scores.tolist() == [-(n - 2)]
    with pytest.raises(ValueError, match="needs the tokenizer"):
        LengthScorer(unit="tokens")


def test_format_blocklist_and_verifier():
    fmt = FormatScorer(r"<answer>.*</answer>")
    assert fmt(["p"] * 3, ["x <answer>4</answer>", "<answer>\n4\n</answer>", "4"]).scores.tolist() == [1.0, 1.0, 0.0]
    assert FormatScorer(r"\d+", fullmatch=True)(["p"] * 2, ["42", "42!"]).scores.tolist() == [1.0, 0.0]
    block = BlocklistScorer([r"\bidiot\b", "as an ai"], penalty=2.0)
    assert block(["p"] * 3, ["fine", "As an AI, you idiot", "IDIOT"]).scores.tolist() == [0.0, -4.0, -2.0]
    verify = AnswerVerifier()
    records = [{"answer": "42"}, {"answer": 7}, {"answer": "1234"}]
    assert verify(["q"] * 3, ["so 40+2 = 42.0", "it is 8", "1,234"], records).scores.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="record 1 has no 'answer'"):
        verify(["q"] * 2, ["1", "2"], [{"answer": "1"}, {}])
    with pytest.raises(ValueError, match="needs records"):
        verify(["q"], ["1"])
    with pytest.raises(ValueError, match="not a valid regex"):
        FormatScorer("(")


class Fixed:
    """A scorer returning given scores, to drive the mixture."""

    def __init__(self, values, name="fixed"):
        self.values, self.name = values, name

    def __call__(self, prompts, completions, records=None):
        s = torch.tensor(self.values(len(completions)) if callable(self.values) else self.values, dtype=torch.float32)
        return RewardOutput(s, {self.name: s})


def test_mixture_breakdown_sums_to_the_score():
    mix = Mixture({"fmt": FormatScorer("ok"), "len": LengthScorer(max_length=3, unit="chars", penalty=1.0),
                   "inner": Mixture({"a": Fixed([1.0, 2.0]), "b": Fixed([3.0, -1.0])}, {"a": 1.0, "b": 0.5})},
                  weights={"fmt": 2.0, "len": 0.5, "inner": 1.0})
    out = mix(["p", "p"], ["ok", "not this one"])
    total = sum(out.parts[e] * out.parts[f"weight/{e}"] for e in ("fmt", "len", "inner"))
    assert torch.allclose(out.scores, total)
    assert out.scores.tolist() == pytest.approx([2.0 + 2.5, 0.5 * -9 + 1.5])  # 12 chars: 9 over
    assert out.parts["inner/a"].tolist() == [1.0, 2.0] and out.parts["inner/weight/b"].tolist() == [0.5, 0.5]
    assert mix.weights_history == [{"fmt": 2.0, "len": 0.5, "inner": 1.0}]


def test_inverse_variance_weights_move_toward_the_steady_expert():
    gen = torch.Generator().manual_seed(0)
    noisy = Fixed(lambda n: (torch.randn(n, generator=gen) * 3.0).tolist(), "noisy")
    steady = Fixed(lambda n: (torch.randn(n, generator=gen) * 0.3).tolist(), "steady")
    mix = Mixture({"noisy": noisy, "steady": steady}, {"noisy": 1.0, "steady": 1.0}, dynamic="inverse_variance",
                  ema=0.5)
    for _ in range(10):
        out = mix(["p"] * 64, ["c"] * 64)
    w = mix.weights_history[-1]
    assert w["noisy"] + w["steady"] == pytest.approx(2.0)  # the static total
    assert w["steady"] / w["noisy"] == pytest.approx(10.0, rel=0.3)  # std ratio 3.0 / 0.3
    assert torch.allclose(out.scores, out.parts["noisy"] * w["noisy"] + out.parts["steady"] * w["steady"], atol=1e-5)
    state = mix.state_dict()
    resumed = Mixture({"noisy": noisy, "steady": steady}, dynamic="inverse_variance", ema=0.5)
    resumed.load_state_dict(state)
    assert resumed.current_weights() == mix.current_weights()


def test_tag_weights_upweight_the_tagged_expert_per_sample():
    mix = Mixture({"helpful": Fixed([1.0, 1.0, 1.0]), "safety": Fixed([-1.0, -1.0, -1.0])},
                  dynamic="tags", tag_weights={"safety": {"safety": 4.0}, "easy": {"helpful": 0.5}})
    records = [{"tags": ["safety"]}, {"tags": "easy"}, {}]
    out = mix(["p"] * 3, ["c"] * 3, records)
    assert out.parts["weight/safety"].tolist() == [4.0, 1.0, 1.0]
    assert out.parts["weight/helpful"].tolist() == [1.0, 0.5, 1.0]
    assert out.scores.tolist() == [-3.0, -0.5, 0.0]
    with pytest.raises(ValueError, match="record 0: 'tags'"):
        mix(["p"] * 3, ["c"] * 3, [{"tags": 3}, {}, {}])
    with pytest.raises(ValueError, match="expert 'helpful' returned scores of shape \\(3,\\), expected \\(1,\\)"):
        mix(["p"], ["c"], [{}])


# ----------------------------------------------------------------------------- configuration


def test_build_reward_from_yaml_config(tokenizer):
    import yaml

    cfg = yaml.safe_load("""
type: mixture
weights: {correct: 1.0, tidy: 0.2, safe: 1.0}
dynamic: tags
tag_weights: {sensitive: {safe: 5.0}}
experts:
  correct: {type: verifier}
  tidy: {type: length, max_length: 4, unit: tokens, penalty: 0.1}
  safe: {type: blocklist, patterns: ["\\\\bkill\\\\b"]}
""")
    fn = build_reward(cfg, tokenizer=tokenizer)
    out = fn(["q", "q"], ["42", "kill it, 41"], [{"answer": "42"}, {"answer": "41", "tags": ["sensitive"]}])
    assert out.parts["correct"].tolist() == [1.0, 1.0]
    assert out.parts["safe"].tolist() == [0.0, -1.0]
    assert out.parts["weight/safe"].tolist() == [1.0, 5.0]
    assert torch.allclose(out.scores, sum(out.parts[e] * out.parts[f"weight/{e}"] for e in ("correct", "tidy", "safe")))


def test_build_reward_model_from_config(tiny, tokenizer, tmp_path):
    rm = reward_model_from_lm(tiny, aspects=["overall", "safe"])
    save_reward_model(rm, tokenizer, tmp_path / "rm")
    fn = build_reward({"type": "reward_model", "path": str(tmp_path / "rm"), "aspect": "safe", "dtype": "fp32"})
    expected = RewardModelScorer(rm, tokenizer, aspect="safe")(["hi"], ["hello"]).scores
    assert torch.allclose(fn(["hi"], ["hello"]).scores, expected, atol=1e-6)


@pytest.mark.parametrize("cfg, message", [
    ({"type": "lenght"}, "type: must be one of reward_model, length"),
    ({"min_length": 3}, "type: must be one of .* \\(missing\\)"),
    ({"type": "length", "penalty": -1}, "penalty: Input should be greater than or equal to 0"),
    ({"type": "length", "max_len": 3}, "max_len: unknown key"),
    ({"type": "length", "min_length": 5, "max_length": 3}, "max_length: 3 is below min_length 5"),
    ({"type": "format", "pattern": "("}, "pattern: '\\(' is not a valid regex"),
    ({"type": "mixture", "experts": {"safe": {"type": "blocklist", "patterns": ["["]}}},
     "experts.safe.patterns: '\\[' is not a valid regex"),
    ({"type": "mixture", "experts": {"length": {"type": "length", "unit": "words"}}},
     "experts.length.unit: must be one of"),
    ({"type": "mixture", "experts": {"a": {"type": "verifier"}}, "weights": {"b": 1.0}},
     "weights: unknown experts \\['b'\\]"),
    ({"type": "mixture", "experts": {"a": {"type": "verifier"}}, "dynamic": "tags"}, "dynamic: 'tags' needs tag_weights"),
    ({"type": "mixture", "experts": {"a": {"type": "verifier"}}, "tag_weights": {"t": {"z": 2.0}}},
     "tag_weights.t: unknown experts \\['z'\\]"),
    ({"type": "reward_model", "path": "x", "aspect": "a", "weights": {"a": 1.0}}, "aspect, weights: give one"),
])
def test_config_errors_name_the_field(cfg, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_config(cfg)


def test_length_in_tokens_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tidy: unit 'tokens' needs a tokenizer"):
        build_reward({"type": "mixture", "experts": {"tidy": {"type": "length"}}})


def test_every_reward_type_has_one_builder_and_unknown_names_list_the_choices():
    from posttrain.rl.rewards import REWARD_TYPES, REWARDS

    assert REWARDS.names() == REWARD_TYPES  # each config type of the union builds through the registry
    with pytest.raises(ValueError, match="unknown reward type 'lenght'; choose one of reward_model, length, format"):
        REWARDS.get("lenght")
    with pytest.raises(ValueError, match="already registered"):
        REWARDS.register("length", lambda cfg, tokenizer, name: None)
