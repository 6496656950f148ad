"""The single-controller driver on a tiny model: batches, GRPO/RLOO/PPO runs, local vs Ray."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.models import save_model, tiny_model
from posttrain.rl.controller import Batch, RLConfig, micro_batches, packed_sequences, run_rl


def test_batch_split_cat_union_roundtrip():
    b = Batch({"x": torch.arange(5), "m": torch.ones(5, 3)}, {"p": list("abcde")})
    parts = b.split(2)
    assert [len(p) for p in parts] == [2, 3]
    back = Batch.cat(parts)
    assert torch.equal(back["x"], b["x"]) and back["p"] == b["p"]
    narrow = Batch({"m": torch.ones(2, 1)})
    wide = Batch({"m": torch.ones(1, 4)})
    assert Batch.cat([narrow, wide])["m"].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    joined = b.union(Batch({"y": torch.zeros(5)}))
    assert set(joined.tensors) == {"x", "m", "y"}
    with pytest.raises(ValueError, match="different 'x'"):
        b.union(Batch({"x": torch.zeros(5, dtype=torch.long)}))
    with pytest.raises(ValueError, match="disagree"):
        Batch({"x": torch.zeros(2)}, {"p": ["a"]})
    assert b.index([4, 0])["p"] == ["e", "a"]


def test_packed_sequences_put_labels_on_responses_in_row_order():
    batch = packed_sequences([[1, 2], [3]], [[10, 11], [12, 13, 14]])
    assert batch["input_ids"].tolist() == [[1, 2, 10, 11, 3, 12, 13, 14]]
    labels = batch["labels"][0].tolist()
    assert [t for t in labels if t != -100] == [10, 11, 12, 13, 14]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["seq_index"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert micro_batches([3, 3, 5, 1], 6) == [[0, 1], [2, 3]]
    assert micro_batches([9, 2], 6) == [[0], [1]]  # a row longer than the budget goes alone


def _rows(cfg):
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("stage", ["grpo", "rloo", "ppo"])
def test_rl_raises_the_reward_of_fresh_samples(rl_setup, stage, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    cfg = rl_setup(stage, 20, backend=backend)
    manifest = run_rl(cfg)
    first, last = manifest["outputs"]["reward_first5"], manifest["outputs"]["reward_last5"]
    assert last > first + 0.15, (first, last)  # measured: grpo 0.78 -> 0.99, ppo 0.69 -> 0.96
    rows = _rows(cfg)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(r["drift/max_abs"] < 1e-4 for r in rows)  # fp32: rollout copy == trainer
    assert all(-1e-3 < r["kl"] < 5 for r in rows)  # k1 estimate: ~0 (either sign) while policy == base
    assert ("critic/loss" in rows[0]) == (stage == "ppo")
    assert {"time/rollout", "time/reward", "time/logprobs", "time/actor_update"} <= set(rows[0])
    assert (Path(cfg.output_dir) / "final" / "adapter_config.json").exists()
    assert (Path(cfg.output_dir) / "plots" / f"{stage}.png").exists()


def test_kl_to_the_reference_grows_only_as_the_policy_moves(rl_setup):
    cfg = rl_setup("grpo", 3, train={"lr": 1e-9})
    run_rl(cfg)
    assert all(abs(r["kl"]) < 1e-3 for r in _rows(cfg))  # adapters start at B=0: policy == reference


def test_truncated_importance_weights_and_adaptive_kl(rl_setup):
    cfg = rl_setup("ppo", 4, algo={"tis_cap": 2.0, "kl_target": 0.01, "kl_coef": 0.1})
    run_rl(cfg)
    coefs = [r["kl_coef"] for r in _rows(cfg)]
    assert coefs[0] == 0.1 and coefs[-1] != 0.1


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_ray_backend_gives_the_local_result(rl_setup, ray_cluster, stage):
    local = rl_setup(stage, 3)
    remote = rl_setup(stage, 3, backend="ray")
    run_rl(local)
    run_rl(remote)
    a, b = _rows(local), _rows(remote)
    for x, y in zip(a, b, strict=True):
        for key in ("reward", "kl", "loss", "actor/grad_norm", "response_length"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("extra,message", [
    ({"stage": "grpo", "rollout": {"samples_per_prompt": 1}}, "compares samples of the same prompt"),
    ({"stage": "grpo", "algo": {"advantage": "gae"}}, "gae needs a critic"),
    ({"algo": {"advantage": "nope"}}, "unknown estimator 'nope'"),
    ({"backend": "slurm"}, "backend"),
    ({"reward": {"type": "lenght"}}, "invalid reward"),
    ({"algo": {"policy_loss": "grpo"}}, "algo.policy_loss: unknown loss 'grpo'"),
    ({"algo": {"loss_agg": "seq-sum"}}, "loss_agg"),
    ({"algo": {"overlong_buffer": 500}}, "longer than rollout.max_new_tokens"),
    ({"algo": {"mis_threshold": 0.5}}, "mis_threshold"),
    ({"stage": "ppo", "rollout": {"dynamic_sampling": True}}, "needs groups"),
    ({"reward": None}, "reward: missing; give a reward function, or an env"),
    ({"env": {"name": "shell"}}, "unknown environment 'shell'; choose one of python, kb"),
    ({"env": {"name": "python", "timout": 1}}, "env.timout: unknown key"),
    ({"env": {"name": "python"}, "algo": {"overlong_buffer": 2}}, "overlong_buffer: not supported with env"),
    ({"env": {"name": "python"}, "rollout": {"decoding": "sam"}}, "rollout.decoding: multi-turn"),
    ({"rollout": {"max_turns": 0}}, "max_turns"),
    ({"rollout": {"mode": "sync", "max_staleness": 1}}, "max_staleness: 1 needs rollout.mode one_step_off"),
    ({"rollout": {"mode": "one_step_off", "max_staleness": 2}}, "one_step_off lags exactly one version"),
    ({"rollout": {"mode": "async", "max_staleness": 0}}, "async needs >= 1"),
    ({"rollout": {"mode": "streaming"}}, "rollout.mode"),
    ({"rollout": {"mode": "async", "dynamic_sampling": True}}, "dynamic_sampling: .* rollout.mode async"),
    ({"rollout": {"workers": 2}}, "rollout.workers: separate rollout workers sample only"),
    ({"actor_workers": 2}, "actor_workers: .* use backend: ray"),
    ({"critic_workers": 2, "stage": "ppo"}, "critic_workers: .* use backend: ray"),
])
def test_bad_rl_configs_name_the_field(extra, message):
    raw = {"data": {"prompts": "p.jsonl"}, "reward": {"type": "verifier"}}
    for key, value in extra.items():
        raw[key] = value
    with pytest.raises(ValueError, match=message):
        RLConfig.model_validate(raw)


def test_greedy_sam_rollouts_equal_plain_and_repeated_prompts_decode_once(rl_setup):
    from posttrain.rl.controller import ActorWorker, prompt_batch

    cfg = rl_setup("grpo", 1, rollout={"max_new_tokens": 12})
    actor = ActorWorker(cfg)
    prompts = prompt_batch([{"prompt": "Count to 3."}, {"prompt": "Say hi."}], 3)
    plain = actor.generate(prompts, greedy=True)
    actor.cfg.rollout.decoding = "sam"
    sam = actor.generate(prompts, greedy=True)
    assert sam["response_ids"] == plain["response_ids"]
    ids = plain["response_ids"]
    assert ids[0] == ids[1] == ids[2] and ids[3] == ids[4] == ids[5] and len(ids) == 6
    sampled = actor.generate(prompts, seed=1)  # SAM sampling: each row its own random stream
    assert len({tuple(r) for r in sampled["response_ids"][:3]}) > 1


def test_skipping_the_old_logprob_pass_changes_nothing_on_policy(rl_setup):
    skip = rl_setup("grpo", 4)
    assert not skip.recompute_old_logp  # one update per batch, KL in the loss: the pass is not needed
    full = rl_setup("grpo", 4, output_dir=skip.output_dir + "-full", algo={"recompute_old_logp": True})
    run_rl(skip)
    run_rl(full)
    for x, y in zip(_rows(skip), _rows(full), strict=True):
        for key in ("reward", "kl", "loss", "actor/grad_norm", "drift/mean_abs"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    assert rl_setup("ppo", 1).recompute_old_logp  # several updates per batch need them fixed


@pytest.mark.parametrize("name,extra", [
    ("dapo", {"algo": {"clip_high": 0.28, "overlong_buffer": 1}, "rollout": {"dynamic_sampling": True}}),
    ("dr_grpo", {"algo": {"scale_by_std": False, "loss_agg": "seq-mean-token-sum-norm"}}),
    ("gspo", {"algo": {"policy_loss": "gspo", "loss_agg": "seq-mean-token-mean", "clip": 0.02, "clip_high": 0.03}}),
    ("cispo", {"algo": {"policy_loss": "cispo", "clip_high": 0.28}}),
    ("reinforce_pp", {"algo": {"advantage": "reinforce_pp", "kl_in": "reward"}}),
    ("masked_is", {"algo": {"mis_threshold": 2.0, "tis_cap": 2.0}}),
])
def test_grpo_loss_variants_raise_the_reward(rl_setup, name, extra):
    cfg = rl_setup("grpo", 20, output_dir=f"{rl_setup('grpo', 1).output_dir}-{name}", **extra)
    manifest = run_rl(cfg)
    first, last = manifest["outputs"]["reward_first5"], manifest["outputs"]["reward_last5"]
    assert last > first + 0.1, (name, first, last)
    rows = _rows(cfg)
    if name == "dapo":
        assert all(0 <= r["dynamic_sampling/kept_share"] <= 1 for r in rows)
        assert rows[0]["dynamic_sampling/kept_share"] > 0
        # a round that kept every group it drew needed no refill
        assert all(r["dynamic_sampling/rounds"] == 1 for r in rows if r["dynamic_sampling/kept_share"] == 1)
        assert any(r["dynamic_sampling/rounds"] > 1 for r in rows)  # as the policy agrees, groups get dropped
        assert all(r["overlong_penalty"] < 0 for r in rows)  # 3-token replies always hit the 1-token buffer
    if name == "masked_is":
        assert all(r["mis/masked_share"] == 0 for r in rows)  # fp32: the rollout copy is the trainer


def test_dynamic_sampling_drops_groups_that_agree_and_refills():
    from posttrain.rl.controller import Groups, prompt_batch, sample_scored

    class Stub:
        """Generates one token per row; group g scores all-equal unless g is odd."""

        def call(self, method, batch, seed=None):
            n = len(batch)
            if method == "generate":
                return Batch({"mask": torch.ones(n, 1), "rollout_logp": torch.zeros(n, 1)},
                             {"prompt_ids": [[1]] * n, "response_ids": [[2]] * n, "response": ["x"] * n})
            g = batch["group"]
            return Batch({"scores": torch.where(g % 2 == 1, torch.arange(n) % 2, 0).float()})

    stub = Stub()
    cfg = RLConfig.model_validate({"data": {"prompts": "p.jsonl"}, "reward": {"type": "verifier"},
                                   "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "dynamic_sampling": True,
                                               "max_sampling_rounds": 5}})
    records = [{"prompt": f"q{i}"} for i in range(2)]
    drawn = [0]

    def refill():
        drawn[0] += 2
        return prompt_batch(records, 2, first_group=drawn[0])

    batch, m = sample_scored(Groups(stub, stub, stub, None), cfg, prompt_batch(records, 2), seed=0, refill=refill)
    # groups 0,1 then 2,3: the odd ones (1, 3) disagree and are kept; two rounds were enough
    assert sorted(set(batch["group"].tolist())) == [1, 3] and len(batch) == 4
    assert m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/kept_share"] == 0.5



@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_sigkill_mid_rl_then_resume_matches_the_uninterrupted_run(rl_setup, stage):
    """Policy, critic, optimizers, schedules, RNG, prompt cursor and adaptive KL all come back:
    a run killed with SIGKILL and resumed ends on the uninterrupted run's weights exactly."""
    from tests.rl.rl_worker import assert_resume_exact

    extra = {"train": {"save_every": 2, "warmup_ratio": 0.2, "schedule": "cosine"},
             "algo": {"kl_target": 0.01, "kl_coef": 0.1}, "adapter": {"dropout": 0.1}}
    straight = rl_setup(stage, 12, **extra)
    killed = rl_setup(stage, 12, output_dir=straight.output_dir + "-killed", **extra)
    assert_resume_exact(straight, killed, 12, ("reward", "kl", "kl_coef", "loss"))


# ----------------------------------------------------------------------------- multi-turn tool use


def _two_turn_episode(tokenizer):
    """A hand-built episode: prompt, a tool call, the observation turn, the answer."""
    from posttrain.rl.tools import TurnFormat, observation_ids

    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc("<|im_start|>user\nWhat is 6 * 7?<|im_end|>\n<|im_start|>assistant\n")
    call = enc('<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>')
    obs = observation_ids(tokenizer, TurnFormat.of(tokenizer), "42", None)
    answer = enc("The answer is 42.") + [tokenizer.eos_token_id]
    return prompt, call + obs + answer, [1] * len(call) + [0] * len(obs) + [1] * len(answer), (call, obs, answer)


def test_observation_and_prompt_tokens_get_no_label_no_logprob_and_no_gradient(tokenizer, tiny):
    from posttrain.models import base_model
    from posttrain.rl.algorithms import kl_estimate, policy_loss
    from posttrain.rl.controller import AlgoSettings, _response_logps
    from posttrain.train.objectives import label_token_logps

    prompt, tokens, mask, (call, obs, answer) = _two_turn_episode(tokenizer)
    packed = packed_sequences([prompt], [tokens], [mask])
    labels = packed["labels"][0].tolist()
    n = len(prompt)
    model_positions = [*range(n, n + len(call)), *range(n + len(call) + len(obs), n + len(tokens))]
    assert [j for j, t in enumerate(labels) if t != -100] == model_positions  # the loss mask: 0 on prompt + obs
    assert [labels[j] for j in model_positions] == call + answer
    with pytest.raises(ValueError, match="row 0: .* response tokens but a loss mask of 3"):
        packed_sequences([prompt], [tokens], [[1, 0, 1]])

    # the policy gradient: PPO surrogate + k3 KL, as the actor's update computes them, through the
    # hidden state at every position (position p predicts token p + 1)
    captured = {}

    def keep_hidden(module, args, output):
        output.last_hidden_state.retain_grad()
        captured["h"] = output.last_hidden_state

    handle = base_model(tiny).get_decoder().register_forward_hook(keep_hidden)
    logp = label_token_logps(tiny, packed)
    handle.remove()
    assert logp.shape == (len(call) + len(answer),)  # one log-prob per model token, none for observations
    loss, _ = policy_loss("ppo", logp, logp.detach(), torch.ones_like(logp), torch.zeros_like(logp), AlgoSettings())
    loss = loss + 0.05 * kl_estimate(logp, logp.detach() - 0.1, "k3").mean()
    loss.backward()
    grad = captured["h"].grad[0].abs().sum(-1)
    predicts_model_token = torch.tensor([labels[p + 1] != -100 for p in range(len(labels) - 1)] + [False])
    assert torch.all(grad[~predicts_model_token] == 0)  # prompt and observation tokens: exactly zero
    assert torch.all(grad[predicts_model_token] > 0)

    # the ratio's and the KL's [B, T] log-probs (old, reference, rollout) run over the model tokens only
    rollout = Batch(meta={"prompt_ids": [prompt], "response_ids": [tokens], "response_mask": [mask]})
    per_token = _response_logps(tiny, rollout, 1.0, 4096)
    assert per_token.shape == (1, len(call) + len(answer))
    torch.testing.assert_close(per_token[0], logp.detach(), atol=1e-5, rtol=1e-5)


@pytest.fixture
def tool_setup(tmp_path, tokenizer):
    save_model(tiny_model(tokenizer, seed=2), tokenizer, tmp_path / "tiny")
    prompts = tmp_path / "tools.jsonl"
    pairs = [(12, 34), (56, 78), (91, 23), (45, 67)]
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} * {b}?", "answer": str(a * b)}) + "\n"
                               for a, b in pairs))

    def config(steps, name="grpo-tools", stage="grpo", **extra):
        raw = {
            "stage": stage, "output_dir": str(tmp_path / name),
            "model": {"name": str(tmp_path / "tiny"), "dtype": "fp32"},
            "adapter": {"method": "lora", "r": 8, "alpha": 16}, "data": {"prompts": str(prompts)},
            "env": {"name": "python", "tool_call_reward": 0.1},
            "rollout": {"samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 8, "max_turns": 2,
                        "top_k": 8},
            "train": {"max_steps": steps, "lr": 1e-2, "progress": False},
            "eval": {"held_out_reward": {"prompts": str(prompts), "limit": 2}},
        }
        for key, value in extra.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
        return RLConfig.model_validate(raw)

    return config


def test_tool_grpo_runs_two_steps_end_to_end_with_the_python_env(tool_setup):
    cfg = tool_setup(2)
    manifest = run_rl(cfg)
    rows = _rows(cfg)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"reward/env", "reward/tool_shaping", "tools/valid_rate", "tools/calls", "tools/turns"} <= set(r)
        assert 1 <= r["tools/turns"] <= 2 and r["reward"] == pytest.approx(r["reward/env"] + r["reward/tool_shaping"])
        assert r["drift/max_abs"] < 1e-4  # the trainer scores exactly the tokens the sampler drew
    for phase in ("eval_before", "eval_after"):
        assert {"held_out/accuracy", "held_out/valid_rate", "held_out/turns"} <= set(manifest["outputs"][phase])
    assert (Path(cfg.output_dir) / "final" / "adapter_config.json").exists()
    assert (Path(cfg.output_dir) / "plots" / "grpo.png").exists()


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_tool_rl_trains_on_multi_turn_episodes_and_logs_the_tool_figures(tool_setup, tokenizer, monkeypatch, stage):
    """A scripted policy (the tiny model's own log-probs of scripted turns): per prompt one sample
    calls python and answers with its result, the other guesses wrong, so every group has an
    advantage and every step's figures are known exactly. PPO adds the old log-prob pass, the
    KL in the reward and the critic's values, all over the model's tokens only."""
    import re

    from tests.rl.tool_policy import ScriptedPolicy

    first_turns = [0]

    def respond(text: str) -> str:
        question = text.rsplit("<|im_start|>user\n", 1)[1]
        if "<|im_start|>tool\n" in question:  # after the observation: answer with it
            return f"The answer is {question.rsplit('<|im_start|>tool' + chr(10), 1)[1].split('<|im_end|>')[0]}."
        first_turns[0] += 1
        if first_turns[0] % 2:
            a, b = re.search(r"What is (\d+) \* (\d+)\?", question).groups()
            return f'<tool_call>{{"name": "python", "arguments": {{"code": "print({a} * {b})"}}}}</tool_call>'
        return "The answer is 0."

    monkeypatch.setattr("posttrain.generate.engine.generate", ScriptedPolicy(tokenizer, respond))
    cfg = tool_setup(3, name=f"scripted-{stage}", stage=stage)
    run_rl(cfg)
    for r in _rows(cfg):
        assert r["reward/env"] == 0.5 and r["tools/valid_rate"] == 1.0 and r["tools/calls"] == 0.5
        assert r["tools/turns"] == 1.5 and r["reward"] == pytest.approx(0.55)
        assert r["drift/max_abs"] < 1e-4 and r["actor/grad_norm"] > 0 and r["adv_abs"] > 0
        assert ("critic/loss" in r) == (stage == "ppo")
