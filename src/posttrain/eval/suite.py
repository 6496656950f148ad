"""The evaluation every stage runs before and after it trains (task scores plus the
forgetting perplexity, as one flat dict; the plots and table of a stage's run dir), and the
`eval` stage of a pipeline, which runs it on its input model and passes that model on."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.config import StageConfig, Strict
from posttrain.eval.tasks import EvalSpec
from posttrain.fileio import write_json_atomic


class EvalConfig(Strict):
    tasks: list[EvalSpec] = []
    before: bool = True
    forgetting: str | None = Field(None, description="general text JSONL: perplexity before/after")


def evaluate_all(model, tokenizer, cfg: EvalConfig) -> dict[str, float]:
    """Task scores plus the forgetting perplexity, as one flat dict."""
    from posttrain.eval.tasks import evaluate_perplexity, run_eval

    scores = run_eval(model, tokenizer, cfg.tasks) if cfg.tasks else {}
    if cfg.forgetting:
        scores["general_ppl"] = evaluate_perplexity(model, tokenizer, cfg.forgetting, name="general_ppl").score
    return scores


def write_reports(run_dir: Path, before: dict, after: dict) -> None:
    """plots/loss.png from metrics.jsonl, and the before/after table and bar chart."""
    from posttrain.eval.report import bar_chart, format_table, loss_curve

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if (run_dir / "metrics.jsonl").exists():
        loss_curve(run_dir / "metrics.jsonl", plots / "loss.png")
    if after:
        results = {"before": before, "after": after} if before else {"after": after}
        print(format_table(results))
        bar_chart(results, plots / "eval.png")


class EvalStageConfig(StageConfig):
    """An `eval` stage: score the previous stage's model (it is passed on unchanged)."""

    stage: Literal["eval"] = "eval"
    output_dir: str = "runs/eval"
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "EvalStageConfig":
        if not self.eval.tasks and not self.eval.forgetting:
            raise ValueError("eval stage: nothing to evaluate; give eval.tasks or eval.forgetting "
                             "(or the pipeline's eval: section)")
        return self


def run_eval_stage(cfg: EvalStageConfig, resume: bool = False, overwrite: bool = False) -> dict:
    from posttrain.stage import stage_inputs, start_stage

    run = start_stage(cfg, overwrite=True)
    scores = evaluate_all(run.model, run.tokenizer, cfg.eval)
    write_json_atomic(run.run_dir / "eval.json", {"after": scores})
    write_reports(run.run_dir, {}, scores)
    return run.finish(stage_inputs(cfg.model.name, {}, cfg.eval.tasks), {"eval_after": scores})
