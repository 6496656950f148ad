"""P2 law: recovery of known parameters from synthetic curves, held-out prediction, run dirs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from posttrain.compress.scaling import (
    ScalingFitConfig,
    average_slope_difference,
    evaluate_fit,
    fit_p2,
    p2_law,
    points_from_runs,
    predict,
    run_scaling_fit,
)

N0 = 1.35e8
TRUE = {"N_C": 0.0, "D_C": 40.0, "E": 0.1, "alpha": 0.0, "beta": 0.3, "gamma": -1.0, "delta": 0.0}


def synthetic(rhos, params=TRUE, n0s=(N0,), noise=0.002, seed=0, L0=2.0):
    rng = np.random.default_rng(seed)
    points = []
    for n0 in n0s:
        for rho in rhos:
            for d in np.geomspace(1e5, 1e7, 12):
                loss = float(p2_law(n0, d, rho, L0, **params)) + rng.normal(0, noise)
                points.append({"run": f"{n0}-{rho}", "N0": n0, "D": float(d), "rho": rho, "L0": L0, "loss": loss})
    return points


def test_law_matches_the_formula_by_hand():
    # L0 + (1/rho)^g (1/N0)^d (N_C/N0^a + D_C/D^b + E) at one point
    got = p2_law(100.0, 16.0, 0.5, 2.0, N_C=3.0, D_C=8.0, E=0.5, alpha=0.5, beta=0.25, gamma=1.0, delta=0.5)
    assert float(got) == pytest.approx(2.0 + 2.0 * 0.1 * (3.0 / 10.0 + 8.0 / 2.0 + 0.5))


def test_fit_recovers_known_parameters_and_predicts_a_held_out_ratio():
    fit_points = synthetic([0.2, 0.3, 0.4, 0.5])
    held = synthetic([0.6], seed=1)
    fit = fit_p2(fit_points)
    assert fit["r2"] > 0.99
    p = fit["params"]
    assert p["beta"] == pytest.approx(0.3, abs=0.02)
    assert p["gamma"] == pytest.approx(-1.0, abs=0.05)
    assert p["D_C"] == pytest.approx(40.0, rel=0.15)
    assert p["E"] == pytest.approx(0.1, abs=0.02)
    # one N0: the N0 terms are fixed, and said to be
    assert fit["fixed"] == {"N_C": 0.0, "alpha": 0.0, "delta": 0.0} and "not identifiable" in fit["note"]
    held_out = evaluate_fit(fit, held)
    assert held_out["r2"] > 0.99 and held_out["asd"] < 0.02
    with pytest.raises(ValueError, match="another model size"):
        evaluate_fit(fit, [{**held[0], "N0": 2 * N0}])


def test_fit_with_several_model_sizes_frees_the_n0_terms():
    params = {"N_C": 5e3, "D_C": 40.0, "E": 0.1, "alpha": 0.5, "beta": 0.3, "gamma": -1.0, "delta": 0.1}
    points = synthetic([0.2, 0.3, 0.4, 0.5], params=params, n0s=(1e8, 3e8, 1e9), noise=0.001)
    fit = fit_p2(points, restarts=8)
    assert fit["fixed"] == {} and fit["note"] is None
    assert fit["r2"] > 0.99
    assert fit["params"]["beta"] == pytest.approx(0.3, abs=0.03)
    assert fit["params"]["gamma"] == pytest.approx(-1.0, abs=0.05)


def test_asd_is_zero_for_the_truth_and_grows_with_a_wrong_slope():
    points = synthetic([0.3], noise=0.0)
    truth = predict(TRUE, points)
    assert average_slope_difference(points, truth) == pytest.approx(0.0, abs=1e-12)
    flatter = predict({**TRUE, "beta": 0.2}, points)
    assert average_slope_difference(points, flatter) > 0.01


def test_fit_input_errors():
    with pytest.raises(ValueError, match="'loss'"):
        fit_p2([{"N0": 1, "D": 1, "rho": 0.5, "L0": 1}])
    with pytest.raises(ValueError, match="D .* must be > 0"):
        fit_p2([{"N0": 1, "D": 0, "rho": 0.5, "L0": 1, "loss": 2}] * 10)
    with pytest.raises(ValueError, match="cannot determine"):
        fit_p2(synthetic([0.3])[:3])
    with pytest.raises(ValueError, match="unknown parameter"):
        fit_p2(synthetic([0.3]), fixed={"zeta": 1.0})


def _fake_run(path, rho, points, L0=2.0, params_before=N0, extra_rows=()):
    path.mkdir(parents=True)
    manifest = {"stage": "prune", "outputs": {"pruning": {"ratio": rho, "param_reduction": rho / 2,
                                                          "params_before": params_before},
                                              "L0": L0, "loss_after_prune": 5.0}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    rows = [{"step": i + 1, "loss": 3.0, "tokens": 7} for i in range(2)] + list(extra_rows)
    rows += [{"step": 10 * (i + 1), "loss": 3.0, "tokens": p["D"], "eval_loss": p["loss"]} for i, p in enumerate(points)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_points_from_runs_reads_manifest_and_eval_rows(tmp_path):
    pts = synthetic([0.4], noise=0.0)[:3]
    run = _fake_run(tmp_path / "r", 0.4, pts)
    got = points_from_runs([run])
    assert [(p["N0"], p["D"], p["rho"], p["L0"], p["loss"]) for p in got] == \
        [(N0, p["D"], 0.4, 2.0, p["loss"]) for p in pts]
    assert [p["rho"] for p in points_from_runs([run], rho="param_reduction")] == [0.2] * 3
    assert len(points_from_runs([run], min_tokens=int(pts[1]["D"]))) == 2


def test_points_from_runs_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        points_from_runs([tmp_path])
    run = _fake_run(tmp_path / "noL0", 0.4, synthetic([0.4])[:2], L0=None)
    with pytest.raises(ValueError, match="outputs.L0"):
        points_from_runs([run])
    run = _fake_run(tmp_path / "bad", 0.4, synthetic([0.4])[:2])
    with open(f"{run}/metrics.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:5: not JSON"):
        points_from_runs([run])
    run = _fake_run(tmp_path / "noeval", 0.4, [])
    with pytest.raises(ValueError, match="no eval_loss rows"):
        points_from_runs([run])


def test_run_scaling_fit_writes_json_and_plot(tmp_path):
    runs = [_fake_run(tmp_path / f"rho{r}", r, synthetic([r], seed=i)) for i, r in enumerate([0.2, 0.3, 0.4, 0.5])]
    held = _fake_run(tmp_path / "rho0.6", 0.6, synthetic([0.6], seed=9))
    cfg = ScalingFitConfig(output_dir=str(tmp_path / "fit"), runs=runs, heldout=[held], restarts=5)
    manifest = run_scaling_fit(cfg)
    result = json.loads((tmp_path / "fit" / "p2_fit.json").read_text())
    assert result["fit"]["r2"] > 0.99 and result["heldout"]["r2"] > 0.99
    assert len(result["heldout_curve"]) == 12
    assert manifest["outputs"]["heldout"]["r2"] == result["heldout"]["r2"]
    png = (tmp_path / "fit" / "plots" / "p2_fit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_config_refuses_a_held_out_run_in_the_fit_set():
    with pytest.raises(ValueError, match="must not be fitted"):
        ScalingFitConfig(runs=["a", "b"], heldout=["b"])
    with pytest.raises(ValueError):
        ScalingFitConfig(runs=[])
