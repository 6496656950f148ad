"""The P2 law: post-training loss of a pruned model as a function of tokens, pruning rate, size.

Chen et al., "P2 Law: Scaling Law for Post-Training After Model Pruning" (ACL 2025):

    L(N0, D, rho, L0) = L0 + (1/rho)^gamma * (1/N0)^delta * (N_C / N0^alpha + D_C / D^beta + E)

N0: parameters before pruning, D: post-training tokens, rho: pruning rate, L0: loss of the
unpruned model. We fit it with scipy's least_squares (bounded, several random restarts) to
points (N0, D, rho, L0, loss) read from recovery runs (`posttrain prune` with a recovery
section logs eval_loss over tokens), and report R^2 and the average slope difference (ASD).

Identifiability: with a single base model size N0, (1/N0)^delta only rescales the bracket
and N_C / N0^alpha is a constant that merges with E, so delta, alpha and N_C cannot be
determined. `fit_p2` then fixes delta = alpha = N_C = 0 and says so in the result
(`fixed`); the fitted E and D_C absorb those constants. Predictions for that same N0 are
unaffected; predictions for another N0 are impossible and refused.

ASD: the paper picks among candidate forms by how well the *slope* of the predicted curve
matches the measured one. We compute, for each run, the secant slopes between consecutive
checkpoints, d loss / d ln D, of the measured and the predicted curve, and average
|difference| over all consecutive pairs of all runs. Slopes over ln D (not D) keep the
number independent of the token unit; this is our reading of the paper's definition, not
a copy of its formula.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from posttrain.config import Strict

PARAMS = ("log_N_C", "log_D_C", "E", "alpha", "beta", "gamma", "delta")
# Bounds: exponents of a power law in tokens/params stay in a sane range; constants in log space.
BOUNDS = {"log_N_C": (-30.0, 60.0), "log_D_C": (-30.0, 60.0), "E": (-50.0, 50.0), "alpha": (0.0, 3.0),
          "beta": (0.0, 3.0), "gamma": (-5.0, 5.0), "delta": (-3.0, 3.0)}


def p2_law(N0, D, rho, L0, N_C, D_C, E, alpha, beta, gamma, delta):
    """The P2 law, elementwise over numpy arrays (or floats)."""
    N0, D, rho, L0 = (np.asarray(v, dtype=float) for v in (N0, D, rho, L0))
    return L0 + (1.0 / rho) ** gamma * (1.0 / N0) ** delta * (N_C / N0 ** alpha + D_C / D ** beta + E)


def _as_arrays(points) -> dict[str, np.ndarray]:
    """points: dicts with N0, D, rho, L0, loss (and optional run) -> column arrays."""
    if not points:
        raise ValueError("no points to fit")
    cols = {}
    for key in ("N0", "D", "rho", "L0", "loss"):
        try:
            cols[key] = np.array([float(p[key]) for p in points])
        except KeyError:
            raise ValueError(f"every point needs {key!r}; one has only {sorted(points[0])}") from None
    if (cols["D"] <= 0).any():
        raise ValueError("D (post-training tokens) must be > 0: the D^-beta term diverges at D = 0")
    if (cols["rho"] <= 0).any() or (cols["N0"] <= 0).any():
        raise ValueError("rho and N0 must be > 0")
    return cols


def r_squared(measured, predicted) -> float:
    measured, predicted = np.asarray(measured, float), np.asarray(predicted, float)
    ss_res = float(((measured - predicted) ** 2).sum())
    ss_tot = float(((measured - measured.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def average_slope_difference(points, predicted) -> float:
    """Mean |slope_measured - slope_predicted| over consecutive checkpoints of each run (slope: d loss / d ln D)."""
    by_run: dict[object, list[int]] = {}
    for i, p in enumerate(points):
        by_run.setdefault(p.get("run", (p["N0"], p["rho"], p["L0"])), []).append(i)
    diffs = []
    for idx in by_run.values():
        idx = sorted(idx, key=lambda i: points[i]["D"])
        for a, b in itertools.pairwise(idx):
            dx = math.log(points[b]["D"]) - math.log(points[a]["D"])
            if dx <= 0:
                continue
            measured = (points[b]["loss"] - points[a]["loss"]) / dx
            pred = (predicted[b] - predicted[a]) / dx
            diffs.append(abs(measured - pred))
    return float(np.mean(diffs)) if diffs else float("nan")


def _unpack(theta: np.ndarray, free: list[str], fixed: dict[str, float]) -> dict[str, float]:
    values = dict(fixed)
    values.update(zip(free, (float(t) for t in theta)))
    return {"N_C": math.exp(values["log_N_C"]) if "log_N_C" in free else values["log_N_C"],
            "D_C": math.exp(values["log_D_C"]), "E": values["E"], "alpha": values["alpha"],
            "beta": values["beta"], "gamma": values["gamma"], "delta": values["delta"]}


def fit_p2(points: list[dict], restarts: int = 20, seed: int = 0, fixed: dict[str, float] | None = None) -> dict:
    """Least-squares fit of the P2 law to points {N0, D, rho, L0, loss}.

    Returns {"params", "fixed", "r2", "asd", "rmse", "n_points", "note"}. With one N0, alpha,
    delta and N_C are fixed at 0 (not identifiable; see the module docstring). `fixed` may pin
    any of N_C, D_C, E, alpha, beta, gamma, delta by hand.
    """
    from scipy.optimize import least_squares

    cols = _as_arrays(points)
    pinned: dict[str, float] = {}
    note = None
    if len(np.unique(cols["N0"])) == 1:
        pinned.update({"log_N_C": 0.0, "alpha": 0.0, "delta": 0.0})  # N_C = 0 (stored raw when pinned)
        note = ("one base model size N0: delta, alpha and N_C are not identifiable and were fixed at 0; "
                "E and D_C absorb the N0 factors, so the fit predicts for this N0 only")
    for key, value in (fixed or {}).items():
        if key in ("N_C", "D_C"):
            if key == "D_C" and value <= 0:
                raise ValueError("fixed D_C must be > 0")
            pinned["log_" + key] = value if key == "N_C" else math.log(value)
        elif key in PARAMS:
            pinned[key] = float(value)
        else:
            raise ValueError(f"fixed: unknown parameter {key!r}; choose from N_C, D_C, E, alpha, beta, gamma, delta")
    free = [p for p in PARAMS if p not in pinned]
    if len(points) <= len(free):
        raise ValueError(f"{len(points)} points cannot determine {len(free)} free parameters ({', '.join(free)})")
    lo = np.array([BOUNDS[p][0] for p in free])
    hi = np.array([BOUNDS[p][1] for p in free])

    def residuals(theta):
        v = _unpack(theta, free, pinned)
        pred = p2_law(cols["N0"], cols["D"], cols["rho"], cols["L0"], **v)
        return np.nan_to_num(pred - cols["loss"], nan=1e6, posinf=1e6, neginf=-1e6)

    rng = np.random.default_rng(seed)
    gap = max(float((cols["loss"] - cols["L0"]).mean()), 1e-3)
    starts = [np.array([{"log_N_C": 0.0, "log_D_C": math.log(gap) + 0.3 * math.log(float(np.median(cols["D"]))),
                         "E": 0.0, "alpha": 0.3, "beta": 0.3, "gamma": 0.0, "delta": 0.0}[p] for p in free])]
    for _ in range(max(restarts, 1) - 1):
        starts.append(np.array([rng.uniform(*_start_range(p, cols)) for p in free]))
    best = None
    for x0 in starts:
        x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
        try:
            res = least_squares(residuals, x0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=2000)
        except (ValueError, FloatingPointError):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        raise ValueError("the P2 fit failed from every start")
    params = _unpack(best.x, free, pinned)
    pred = predict(params, points)
    shown_fixed = {("N_C" if k == "log_N_C" else "D_C" if k == "log_D_C" else k):
                   (math.exp(v) if k == "log_D_C" else v) for k, v in pinned.items()}
    return {"params": params, "fixed": shown_fixed, "free": [p.removeprefix("log_") for p in free],
            "r2": r_squared(cols["loss"], pred), "asd": average_slope_difference(points, pred),
            "rmse": float(np.sqrt(np.mean((pred - cols["loss"]) ** 2))), "n_points": len(points), "note": note,
            "fit_N0": sorted(set(cols["N0"].tolist()))}


def _start_range(name: str, cols: dict[str, np.ndarray]) -> tuple[float, float]:
    log_d = float(np.log(cols["D"]).mean())
    return {"log_N_C": (0.0, 20.0), "log_D_C": (-2.0, 0.5 * log_d + 2), "E": (-1.0, 1.0), "alpha": (0.05, 1.0),
            "beta": (0.05, 1.0), "gamma": (-2.0, 2.0), "delta": (-0.5, 0.5)}[name]


def predict(params: dict[str, float], points) -> np.ndarray:
    """Predicted losses at points {N0, D, rho, L0} (loss not needed)."""
    cols = {k: np.array([float(p[k]) for p in points]) for k in ("N0", "D", "rho", "L0")}
    return p2_law(cols["N0"], cols["D"], cols["rho"], cols["L0"], **params)


def evaluate_fit(fit: dict, points: list[dict]) -> dict:
    """R^2, ASD and RMSE of a fit on other points (a held-out pruning ratio); refuses another N0
    when the N0 terms were not identifiable."""
    if fit.get("note") and any(float(p["N0"]) not in fit["fit_N0"] for p in points):
        raise ValueError(f"the fit saw only N0 = {fit['fit_N0']}; it cannot predict for another model size")
    cols = _as_arrays(points)
    pred = predict(fit["params"], points)
    return {"r2": r_squared(cols["loss"], pred), "asd": average_slope_difference(points, pred),
            "rmse": float(np.sqrt(np.mean((pred - cols["loss"]) ** 2))), "n_points": len(points)}


# ----------------------------------------------------------------------------- runs -> points

def points_from_runs(run_dirs: list[str | Path], rho: Literal["ratio", "param_reduction"] = "ratio",
                     min_tokens: int = 1) -> list[dict]:
    """(N0, D, rho, L0, loss) for every eval_loss row of each recovery run's metrics.jsonl.

    N0 = outputs.pruning.params_before, rho = outputs.pruning.<rho>, L0 = outputs.L0 from the
    run's manifest.json; D = the row's `tokens` (post-training tokens so far).
    """
    points = []
    for run in run_dirs:
        run = Path(run)
        manifest_path, metrics_path = run / "manifest.json", run / "metrics.jsonl"
        if not manifest_path.is_file():
            raise ValueError(f"{run}: no manifest.json (not a finished prune run)")
        manifest = json.loads(manifest_path.read_text())
        out = manifest.get("outputs", {})
        pruning = out.get("pruning") or {}
        for key, value in (("outputs.pruning.params_before", pruning.get("params_before")),
                           (f"outputs.pruning.{rho}", pruning.get(rho)), ("outputs.L0", out.get("L0"))):
            if value is None:
                raise ValueError(f"{manifest_path}: field {key} is missing or null (was the run given eval data?)")
        if not metrics_path.is_file():
            raise ValueError(f"{run}: no metrics.jsonl (the run had no recovery section)")
        n = 0
        for lineno, line in enumerate(metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{metrics_path}:{lineno}: not JSON: {exc}") from None
            if "eval_loss" not in row:
                continue
            if "tokens" not in row:
                raise ValueError(f"{metrics_path}:{lineno}: field 'tokens' missing from an eval row")
            if row["tokens"] < min_tokens:
                continue
            points.append({"run": str(run), "N0": float(pruning["params_before"]), "D": float(row["tokens"]),
                           "rho": float(pruning[rho]), "L0": float(out["L0"]), "loss": float(row["eval_loss"])})
            n += 1
        if n == 0:
            raise ValueError(f"{metrics_path}: no eval_loss rows (set recovery.train.eval_every)")
    return points


def plot_fit(fit: dict, groups: dict[str, list[dict]], path: str | Path, title: str | None = None) -> Path:
    """Measured points and fitted curves (loss vs tokens, log x) for each run; groups: label -> points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k = 0
    for label, pts in groups.items():
        runs: dict[str, list[dict]] = {}
        for p in pts:
            runs.setdefault(p.get("run", label), []).append(p)
        for rp in runs.values():
            rp = sorted(rp, key=lambda p: p["D"])
            c = colors[k % len(colors)]
            k += 1
            d = np.array([p["D"] for p in rp])
            grid = np.geomspace(d.min(), d.max(), 100)
            base = rp[0]
            curve = p2_law(base["N0"], grid, base["rho"], base["L0"], **fit["params"])
            ax.plot(d, [p["loss"] for p in rp], "o", color=c, ms=4,
                    label=f"{label} rho={base['rho']:.2f} measured")
            ax.plot(grid, curve, "-" if label == "fit" else "--", color=c, label=f"{label} rho={base['rho']:.2f} P2")
    ax.set_xscale("log")
    ax.set_xlabel("post-training tokens D")
    ax.set_ylabel("eval loss")
    ax.set_title(title or f"P2 law fit (R² {fit['r2']:.3f})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the stage

class ScalingFitConfig(Strict):
    stage: Literal["scaling_fit"] = "scaling_fit"
    output_dir: str = "runs/scaling_fit"
    runs: list[str] = Field(..., min_length=1, description="prune run dirs with recovery, fitted")
    heldout: list[str] = Field(default_factory=list, description="prune run dirs predicted, not fitted")
    rho: Literal["ratio", "param_reduction"] = "ratio"
    min_tokens: int = Field(1, ge=1, description="skip eval rows before this many tokens")
    restarts: int = Field(20, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ScalingFitConfig:
        both = set(self.runs) & set(self.heldout)
        if both:
            raise ValueError(f"heldout: {sorted(both)} also in runs; a held-out run must not be fitted")
        return self


def run_scaling_fit(cfg: ScalingFitConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Fit on cfg.runs, predict cfg.heldout; writes p2_fit.json, plots/p2_fit.png and the manifest.
    The fit takes seconds, so resume simply fits again."""
    from posttrain.stage import content_hash, start_stage, write_json_atomic

    run = start_stage(cfg, resume, overwrite, load=False)
    run_dir = run.run_dir
    fit_points = points_from_runs(cfg.runs, rho=cfg.rho, min_tokens=cfg.min_tokens)
    fit = fit_p2(fit_points, restarts=cfg.restarts, seed=cfg.seed)
    result = {"fit": fit, "fit_runs": cfg.runs}
    groups = {"fit": fit_points}
    if cfg.heldout:
        held = points_from_runs(cfg.heldout, rho=cfg.rho, min_tokens=cfg.min_tokens)
        result["heldout"] = evaluate_fit(fit, held)
        result["heldout_runs"] = cfg.heldout
        result["heldout_curve"] = [{"D": p["D"], "rho": p["rho"], "measured": p["loss"], "predicted": float(q)}
                                   for p, q in zip(held, predict(fit["params"], held))]
        groups["held-out"] = held
    write_json_atomic(run_dir / "p2_fit.json", result)
    plot_fit(fit, groups, run_dir / "plots" / "p2_fit.png")
    print(f"P2 fit: R2 {fit['r2']:.4f}, ASD {fit['asd']:.4g} on {fit['n_points']} points"
          + (f"; held-out R2 {result['heldout']['r2']:.4f}, ASD {result['heldout']['asd']:.4g}" if cfg.heldout else ""))
    inputs = {"runs": {r: {"manifest_sha256": content_hash(Path(r) / "manifest.json"),
                           "metrics_sha256": content_hash(Path(r) / "metrics.jsonl")}
                       for r in [*cfg.runs, *cfg.heldout]}}
    outputs = {k: v for k, v in result.items() if k != "heldout_curve"}
    return run.finish(inputs, outputs)
