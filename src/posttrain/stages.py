"""The stage registry: every verb `posttrain VERB` runs and a pipeline stage may name, registered once.

An entry says where the stage's config class and run function live (imported only when the
stage is used, so `posttrain --help` stays fast), its one-line help, the sections of its
config, its example recipe, the config keys the verb itself sets, and the placeholders
`--print-config` fills in for required keys. The CLI's subcommands, the pipeline's verbs
and the recipe tests are all read from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable, Literal

from posttrain.registry import Registry


@dataclass(frozen=True)
class Stage:
    verb: str
    help: str
    config: str  # "module:ConfigClass"
    run: str  # "module:run_function(cfg, resume=False, overwrite=False) -> manifest"
    sections: tuple[str, ...]  # the config's sections shown in --help (tests/test_stages.py checks them)
    recipe: str | None = None  # recipes/NAME.yaml: the example in --help
    presets: dict[str, Any] = field(default_factory=dict)  # config keys the verb sets (pretrain: stage=pretrain)
    placeholders: tuple[str, ...] = ()  # key=value --print-config fills in when no recipe gives them
    # model: makes a model; compress: makes a smaller one (the report's trade-offs section);
    # export: writes deployable files (not a deploy source, no model metrics); eval: scores its
    # input and passes it on (pipeline-only: `posttrain eval` is its own command);
    # analysis: reads other runs, makes no model (not a pipeline stage)
    role: Literal["model", "compress", "export", "eval", "analysis"] = "model"
    backends: bool = False  # --backend local|ray (the RL worker groups)

    def load(self) -> tuple[type, Callable[..., dict]]:
        """(config class, run function), imported now."""
        return _resolve(self.config), _resolve(self.run)


def _resolve(ref: str):
    module, name = ref.split(":")
    return getattr(import_module(module), name)


STAGES: Registry[Stage] = Registry("stage")


def register_stage(verb: str, help: str, config: str, run: str, sections: str, **kw: Any) -> Stage:
    return STAGES.register(verb, Stage(verb, help, config, run, tuple(s.strip() for s in sections.split(",")), **kw))


_SFT = ("posttrain.train.sft:SFTConfig", "posttrain.train.sft:run_sft")
_RL = ("posttrain.rl.controller:RLConfig", "posttrain.rl.controller:run_rl")
_RL_SECTIONS = "backend, model, adapter, data, reward, env, rollout, algo, critic, train, eval, eval_every"
_PROMPTS = ("data.prompts=PROMPTS.jsonl", "reward.type=verifier")
_TRAIN_FILE = ("data.train=TRAIN.jsonl",)

register_stage("sft", "supervised fine-tuning (full, freeze, LoRA/DoRA, IA3, prompt tuning, bottleneck adapters)",
               *_SFT, "model, adapter, data, train, eval, ewc", recipe="sft_lora", placeholders=_TRAIN_FILE)
register_stage("pretrain", "continued pre-training on raw text (domain adaptation)", *_SFT,
               "model, adapter, data, train, eval, ewc", recipe="pretrain_domain", presets={"stage": "pretrain"},
               placeholders=_TRAIN_FILE)
register_stage("rm", "train a reward model (Bradley-Terry on preference pairs; one head per aspect)",
               "posttrain.train.preference:RMConfig", "posttrain.train.preference:run_rm",
               "model, adapter, aspects, data, train", recipe="rm", placeholders=_TRAIN_FILE)
register_stage("dpo", "preference optimisation: DPO, conservative DPO, IPO, hinge, SimPO, ORPO, KTO",
               "posttrain.train.preference:DPOConfig", "posttrain.train.preference:run_dpo",
               "model, adapter, data, dpo, train, eval", recipe="dpo", placeholders=_TRAIN_FILE)
register_stage("online-dpo", "online DPO: sample from the policy, rank with a reward function, DPO step",
               "posttrain.rl.online_dpo:OnlineDPOConfig", "posttrain.rl.online_dpo:run_online_dpo",
               "model, adapter, data, reward, sampling, dpo, train, eval, eval_every", recipe="online_dpo",
               placeholders=_PROMPTS)
for _verb, _help in (("ppo", "PPO (actor, critic with GAE, frozen reference, reward function; KL penalty)"),
                     ("grpo", "GRPO: k samples per prompt, group-relative advantages, KL (k3) in the loss"),
                     ("rloo", "RLOO: k samples per prompt, leave-one-out baseline")):
    register_stage(_verb, _help, *_RL, _RL_SECTIONS, recipe=_verb, presets={"stage": _verb}, placeholders=_PROMPTS,
                   backends=True)
register_stage("quantize", "quantize weights: int8 / int4 PTQ, int8 dynamic activations, or QAT then convert",
               "posttrain.compress.quantize:QuantizeConfig", "posttrain.compress.quantize:run_quantize",
               "model, quant, calibration, qat, train, eval", recipe="quantize_int8", role="compress")
register_stage("prune", "prune: magnitude, Wanda, 2:4, depth (layers) or width (heads, MLP channels), "
                        "with optional recovery training",
               "posttrain.compress.prune:PruneConfig", "posttrain.compress.prune:run_prune",
               "model, method, calibration, recovery, eval", recipe="prune_depth", role="compress")
register_stage("distill", "knowledge distillation: logit (forward/reverse KL, JSD), sequence-level, on-policy",
               "posttrain.compress.distill:DistillConfig", "posttrain.compress.distill:run_distill",
               "model, teacher, adapter, data, distill, train, eval", recipe="distill", role="compress")
register_stage("export", "export a model: merged HF directory, GGUF (F16, Q8_0, Q4_0, Q4_K_M) with a round-trip check",
               "posttrain.compress.export:ExportConfig", "posttrain.compress.export:run_export",
               "model, formats, check", recipe="export", role="export")
register_stage("scaling-fit", "fit the P2 law to pruning-recovery runs and predict a held-out ratio",
               "posttrain.compress.scaling:ScalingFitConfig", "posttrain.compress.scaling:run_scaling_fit",
               "runs, heldout, rho, restarts", recipe="scaling_fit", role="analysis")
register_stage("eval", "score the previous stage's model with the pipeline's eval section; pass the model on",
               "posttrain.eval.suite:EvalStageConfig", "posttrain.eval.suite:run_eval_stage",
               "model, eval", role="eval")


def stage_of_recipe(data: dict) -> Stage:
    """The stage a recipe configures, from its `stage:` key (sft when absent; online_dpo = online-dpo)."""
    return STAGES.get(str(data.get("stage", "sft")).replace("_", "-"))


def verbs(*roles: str) -> tuple[str, ...]:
    """Registered verbs, in registration order, of the given roles (all when none given)."""
    return tuple(v for v, st in STAGES.items() if not roles or st.role in roles)


PIPELINE_ROLES = ("model", "compress", "export", "eval")
CLI_ROLES = ("model", "compress", "export", "analysis")  # `posttrain VERB`; the eval stage is pipeline-only
