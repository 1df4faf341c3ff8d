"""Combination math: percentiles against a reference, weights from ρ, the no-label case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difficulty.combine import (
    SKETCH_SIZE,
    TIE_BREAK,
    CombineFit,
    candidate_weights,
    combine,
    ecdf_midrank,
    fit_weights,
    percentiles,
    quantile_sketch,
    risk_coverage_area,
    sketch_percentile,
    spearman,
)
from difficulty.tiers import TierConfig, assign_tiers


def test_ecdf_midrank_hand_example() -> None:
    ref = np.array([1.0, 2.0, 2.0, 3.0])
    got = ecdf_midrank(np.array([0.0, 1.0, 2.0, 2.5, 3.0, 4.0, np.nan]), ref)
    # (#< + ½·#=) / 4
    np.testing.assert_allclose(got[:6], [0.0, 0.125, 0.5, 0.75, 0.875, 1.0])
    assert np.isnan(got[6])


def test_ecdf_with_empty_reference_is_nan() -> None:
    assert np.isnan(ecdf_midrank(np.array([1.0]), np.array([np.nan]))).all()


def test_sketch_percentile_interpolates_and_mid_ranks_ties() -> None:
    sketch = [0.0, 1.0, 2.0]  # probabilities 0, 0.5, 1
    got = sketch_percentile(np.array([-1.0, 0.5, 1.0, 1.5, 3.0]), sketch)
    np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 0.75, 1.0])
    tied = [0.0, 1.0, 1.0, 2.0]  # probabilities 0, 1/3, 2/3, 1: value 1 sits at their mid-point
    np.testing.assert_allclose(sketch_percentile(np.array([1.0]), tied), [0.5])


def test_quantile_sketch_shape() -> None:
    v = np.random.default_rng(0).normal(size=1000)
    sk = quantile_sketch(np.append(v, np.nan))
    assert len(sk) == SKETCH_SIZE
    assert sk[0] == pytest.approx(v.min()) and sk[-1] == pytest.approx(v.max())
    assert np.all(np.diff(sk) >= 0)
    assert quantile_sketch(np.array([np.nan])) == []


def test_sketch_percentile_close_to_exact_ecdf() -> None:
    v = np.random.default_rng(1).gamma(2.0, size=5000)
    exact = ecdf_midrank(v, v)
    approx = sketch_percentile(v, quantile_sketch(v))
    assert np.abs(exact - approx).max() < 0.01


def test_stored_reference_makes_runs_comparable() -> None:
    rng = np.random.default_rng(2)
    first = pd.DataFrame({"a": rng.normal(size=500)})
    ref = {"a": quantile_sketch(first["a"].to_numpy())}
    later = pd.DataFrame({"a": first["a"] + 1.0})  # the same items, all harder now
    own = percentiles(later, ["a"])
    against = percentiles(later, ["a"], ref)
    # ranked against itself the later run looks the same; against the reference it moved up
    assert own["a"].mean() == pytest.approx(0.5)
    assert against["a"].mean() > 0.75


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60))
def test_percentiles_in_range_and_monotone(values: list[float]) -> None:
    v = np.array(values)
    for p in (ecdf_midrank(v, v), sketch_percentile(v, quantile_sketch(v))):
        assert np.all((p >= 0) & (p <= 1))
        order = np.argsort(v, kind="stable")
        assert np.all(np.diff(p[order]) >= -1e-12)


def test_candidate_weights_hand_example() -> None:
    rhos = {"a": 0.5, "b": 0.25, "c": -0.3, "d": float("nan")}
    assert candidate_weights(rhos, "single") == {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}
    w = candidate_weights(rhos, "rho")
    assert (
        w["a"] == pytest.approx(2 / 3)
        and w["b"] == pytest.approx(1 / 3)
        and w["c"] == 0
        and w["d"] == 0
    )
    w2 = candidate_weights(rhos, "rho2")
    assert w2["a"] == pytest.approx(0.8) and w2["b"] == pytest.approx(0.2)
    assert candidate_weights({"a": -0.1}, "rho") == {}


def test_combine_renormalises_over_available_values() -> None:
    pct = pd.DataFrame({"a": [0.2, np.nan, np.nan], "b": [0.8, 0.4, np.nan]})
    got = combine(pct, {"a": 0.75, "b": 0.25})
    assert got[0] == pytest.approx(0.75 * 0.2 + 0.25 * 0.8)
    assert got[1] == pytest.approx(0.4)
    assert np.isnan(got[2])


def test_no_labels_is_fourier_alone() -> None:
    pct = pd.DataFrame({"fourier": [0.1, 0.5, 0.9], "entropy": [0.9, 0.5, 0.1]})
    fit = fit_weights(pct, np.full(3, np.nan))
    assert fit.method == "default"
    assert fit.weights == {"fourier": 1.0, "entropy": 0.0}
    assert fit.n_labeled == 0
    np.testing.assert_allclose(combine(pct, fit.weights), pct["fourier"])


def test_no_labels_without_fourier_is_equal_weights() -> None:
    pct = pd.DataFrame({"a": [0.1, 0.9], "b": [0.3, 0.7]})
    fit = fit_weights(pct, np.array([np.nan, np.nan]))
    assert fit.method == "equal"
    assert fit.weights == {"a": 0.5, "b": 0.5}


def test_too_few_labels_falls_back_but_reports_correlations() -> None:
    rng = np.random.default_rng(3)
    err = np.full(200, np.nan)
    err[:10] = rng.random(10)
    pct = pd.DataFrame(
        {"fourier": rng.random(200), "x": np.where(np.isnan(err), rng.random(200), err)}
    )
    fit = fit_weights(pct, err, min_labeled=30)
    assert fit.method == "default" and fit.n_labeled == 10
    assert fit.correlations["x"] == pytest.approx(1.0)


def _synthetic(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    err = rng.random(n)
    good = err + rng.normal(scale=0.15, size=n)
    also_good = err + rng.normal(scale=0.15, size=n)
    noise = rng.random(n)
    anti = -err + rng.normal(scale=0.2, size=n)
    raw = pd.DataFrame({"fourier": noise, "good": good, "also_good": also_good, "anti": anti})
    return percentiles(raw, list(raw.columns)), err


def test_fit_prefers_a_blend_of_two_independent_good_scorers() -> None:
    pct, err = _synthetic(600, 4)
    fit = fit_weights(pct, err)
    assert fit.method in ("rho", "rho2")
    assert fit.weights["anti"] == 0.0  # negative ρ never gets weight
    singles = [v for k, v in fit.cv_aurc.items() if k.startswith("single:")]
    assert fit.cv_aurc[fit.method] < min(singles)  # lower risk–coverage area than any part
    best_single = max(fit.correlations.values())
    assert spearman(combine(pct, fit.weights), err) > best_single

    by_rho = fit_weights(pct, err, criterion="rho")
    assert by_rho.method in ("rho", "rho2")
    assert by_rho.cv_rho[by_rho.method] >= by_rho.cv_rho["single"]


def test_fit_is_never_worse_than_the_best_part_out_of_sample() -> None:
    rng = np.random.default_rng(5)
    n = 1200
    err = rng.random(n)
    raw = pd.DataFrame(
        {
            "fourier": rng.random(n),
            "good": err + rng.normal(scale=0.1, size=n),
            "weak": err + rng.normal(scale=2.0, size=n),
        }
    )
    pct = percentiles(raw, list(raw.columns))
    train = np.zeros(n, dtype=bool)
    train[: n // 2] = True
    held = ~train
    fit = fit_weights(pct, np.where(train, err, np.nan), criterion="rho")
    combined = spearman(combine(pct[held], fit.weights), err[held])
    best = max(spearman(pct[c].to_numpy()[held], err[held]) for c in raw.columns)
    assert combined >= best - 0.01

    fit = fit_weights(pct, np.where(train, err, np.nan))
    combined_area = risk_coverage_area(fit.score(pct[held]), err[held])
    best_area = min(risk_coverage_area(pct[c].to_numpy()[held], err[held]) for c in raw.columns)
    assert combined_area <= best_area + 0.005


def test_no_positive_agreement_falls_back_to_default() -> None:
    rng = np.random.default_rng(6)
    err = rng.random(100)
    pct = pd.DataFrame({"fourier": 1 - err, "x": 1 - err + rng.normal(scale=0.1, size=100)})
    fit = fit_weights(pct, err)
    assert fit.method == "default"
    assert "no scorer agrees" in fit.reason


def test_fit_to_dict_is_json_safe() -> None:
    pct, err = _synthetic(200, 7)
    d = fit_weights(pct, err).to_dict()
    assert set(d) == {
        "method",
        "criterion",
        "weights",
        "correlations",
        "cv_rho",
        "cv_aurc",
        "tie_break",
        "dropped",
        "n_labeled",
        "reason",
    }
    assert sum(d["weights"].values()) == pytest.approx(1.0)
    json.dumps(d)


def test_signed_weights_use_reversed_scorers() -> None:
    rhos = {"a": 0.5, "b": -0.8}
    assert candidate_weights(rhos, "single", signed=True) == {"a": 0.0, "b": -1.0}
    w = candidate_weights(rhos, "rho", signed=True)
    assert w["a"] == pytest.approx(0.5 / 1.3) and w["b"] == pytest.approx(-0.8 / 1.3)
    pct = pd.DataFrame({"a": [0.2, 0.9], "b": [0.3, 0.6]})
    got = combine(pct, {"a": 0.25, "b": -0.75})
    np.testing.assert_allclose(got, [0.25 * 0.2 + 0.75 * 0.7, 0.25 * 0.9 + 0.75 * 0.4])


def test_signed_fit_beats_unsigned_when_the_best_scorer_is_backwards() -> None:
    rng = np.random.default_rng(8)
    n = 400
    err = rng.random(n)
    raw = pd.DataFrame(
        {
            "fourier": rng.random(n),
            "weak": err + rng.normal(scale=1.0, size=n),
            "backwards": -err + rng.normal(scale=0.1, size=n),
        }
    )
    pct = percentiles(raw, list(raw.columns))
    unsigned = fit_weights(pct, err)
    signed = fit_weights(pct, err, signed=True)
    assert unsigned.weights["backwards"] == 0.0
    assert signed.weights["backwards"] < 0
    assert (
        spearman(combine(pct, signed.weights), err)
        > spearman(combine(pct, unsigned.weights), err) + 0.3
    )


def test_risk_coverage_area_hand_example() -> None:
    # easiest first: errors 0, 1, 0 → risks 0/1, 1/2, 1/3
    assert risk_coverage_area(np.array([0.1, 0.2, 0.3]), np.array([0.0, 1.0, 0.0])) == (
        pytest.approx((0.0 + 0.5 + 1 / 3) / 3)
    )
    # a tie has no order: its error is spread evenly (risk 1/3 at every position)
    tied = risk_coverage_area(np.zeros(3), np.array([0.0, 1.0, 0.0]))
    assert tied == pytest.approx(1 / 3)
    assert np.isnan(risk_coverage_area(np.array([0.1, np.nan]), np.array([0.0, 1.0])))


def test_aurc_prefers_the_score_whose_easy_end_is_clean() -> None:
    """A coarse count ranks the whole error better (ρ), a continuous score keeps the easy
    end cleaner: the gate calibrates the second one to more coverage, so it is chosen."""
    rng = np.random.default_rng(11)
    n = 800
    err = (rng.random(n) < 0.15).astype(float)
    err[rng.random(n) < 0.3] *= 0.5
    # coarse: 0 for most items whatever their error, high values for many wrong ones
    coarse = np.where(err > 0, rng.integers(0, 4, n), rng.integers(0, 2, n)).astype(float)
    # continuous: wrong items never among the easiest 40 %, weak order above that
    smooth = np.where(err > 0, 0.4 + 0.6 * rng.random(n), rng.random(n))
    raw = pd.DataFrame({"fourier": rng.random(n), "coarse": coarse, "smooth": smooth})
    pct = percentiles(raw, list(raw.columns))
    fit = fit_weights(pct, err)
    assert fit.criterion == "aurc"
    assert fit.weights["smooth"] > 0
    assert fit.cv_aurc["single:smooth"] < fit.cv_aurc["single:coarse"]


def test_a_constant_scorer_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(12)
    n = 300
    err = rng.random(n)
    raw = pd.DataFrame(
        {"fourier": rng.random(n), "good": err + rng.normal(scale=0.2, size=n), "flat": 0.7}
    )
    pct = percentiles(raw, list(raw.columns))
    with caplog.at_level("WARNING"):
        fit = fit_weights(pct, err)
    assert "flat" in fit.dropped and fit.weights["flat"] == 0.0
    assert "flat" not in (fit.tie_break or {})
    assert any("flat" in r.getMessage() for r in caplog.records)
    # without labels too: a constant default scorer gives way to the others
    raw["fourier"] = 0.0
    pct = percentiles(raw, list(raw.columns))
    fit = fit_weights(pct, np.full(n, np.nan))
    assert fit.method == "equal" and fit.weights["fourier"] == 0.0 and fit.weights["flat"] == 0.0


def test_ties_are_broken_by_the_continuous_scorers_so_quantile_cuts_hold() -> None:
    rng = np.random.default_rng(13)
    n = 1000
    err = rng.random(n)
    # a coarse scorer: 60 % of the items share its lowest value
    coarse = np.where(rng.random(n) < 0.6, 0.0, 1.0 + np.floor(3 * err))
    raw = pd.DataFrame({"coarse": coarse, "fine": err + rng.normal(scale=0.5, size=n)})
    pct = percentiles(raw, list(raw.columns))
    fit = CombineFit("single", {"coarse": 1.0, "fine": 0.0}, {"coarse": 0.6, "fine": 0.4})
    primary = combine(pct, fit.weights)
    tiers = assign_tiers(primary, TierConfig())
    assert (tiers == "easy").mean() > 0.55  # the tie swallows the easy cut
    score = fit.score(pct)
    tiers = assign_tiers(score, TierConfig())
    shares = [(tiers == t).mean() for t in ("easy", "medium", "hard")]
    np.testing.assert_allclose(shares, [0.3, 0.4, 0.3], atol=0.01)
    # distinct primary values keep their order: the secondary moves a score by ≤ η
    assert np.abs(score - primary).max() <= TIE_BREAK
    order = np.argsort(primary, kind="stable")
    distinct = np.diff(primary[order]) > TIE_BREAK
    assert np.all(np.diff(score[order])[distinct] > 0)
    assert np.all((score >= 0) & (score <= 1))


def test_a_scorer_constant_up_to_float_rounding_ranks_nothing() -> None:
    """An untrained model's predicted loss: the same value for every item, give or take
    10⁻⁹; its noise must not become a ranking."""
    rng = np.random.default_rng(14)
    n = 200
    raw = pd.DataFrame(
        {
            "fourier": rng.random(n),
            "predicted_loss": 0.024008 + 1e-9 * rng.random(n),
            "coarse": rng.integers(0, 3, n).astype(float),
        }
    )
    pct = percentiles(raw, list(raw.columns))
    assert set(pct["predicted_loss"]) == {0.5}
    assert pct["coarse"].nunique() == 3  # a real, discrete spread is kept
    fit = fit_weights(pct, rng.random(n))
    assert "predicted_loss" in fit.dropped and fit.weights["predicted_loss"] == 0.0


def _parts(seed: int, n: int, scales: dict[str, float]) -> tuple[pd.DataFrame, np.ndarray]:
    """A binary error (a quarter wrong) and one scorer per ``scales`` entry: the error plus
    Gaussian noise of that scale, independent across scorers; ``fourier`` is pure noise."""
    rng = np.random.default_rng(seed)
    err = (rng.random(n) < 0.25).astype(float)
    raw = pd.DataFrame(
        {"fourier": rng.random(n)}
        | {name: err + rng.normal(scale=s, size=n) for name, s in scales.items()}
    )
    return percentiles(raw, list(raw.columns)), err


def test_every_agreeing_scorer_counts_unless_one_alone_is_measurably_better() -> None:
    """Three equally noisy scorers, 120 labeled items: the blend ranks the easy end better
    than any of them, though not by two standard errors on these few items.  The blend is
    the default, so it is taken and every scorer that agrees gets a weight."""
    pct, err = _parts(0, 120, {"part0": 0.6, "part1": 0.6, "part2": 0.6})
    fit = fit_weights(pct, err)
    assert fit.method == "rho"
    assert all(fit.weights[p] > 0.2 for p in ("part0", "part1", "part2"))
    singles = [v for k, v in fit.cv_aurc.items() if k.startswith("single:")]
    assert fit.cv_aurc["rho"] < min(singles)
    assert "unless a single scorer" in fit.reason


def test_a_single_scorer_that_is_measurably_better_replaces_the_blend() -> None:
    """One sharp scorer among weak ones: the blend dilutes it, and it wins alone by more
    than two standard errors out of sample."""
    pct, err = _parts(0, 300, {"sharp": 0.05} | {f"weak{i}": 2.0 for i in range(4)})
    fit = fit_weights(pct, err)
    assert fit.method == "single" and fit.weights["sharp"] == 1.0
    assert sum(abs(w) for w in fit.weights.values()) == 1.0
    by_rho = fit_weights(pct, err, criterion="rho")
    assert by_rho.weights["sharp"] > 0


def test_overlapping_cross_validation_folds_do_not_count_as_independent_evidence() -> None:
    """15 rows of repeated 5-fold cross-validation: a mean advantage three plain standard
    errors wide is within the noise once the overlap of the folds is accounted for
    (Nadeau–Bengio), and a wide one still wins."""
    from difficulty.combine import _wins

    rng = np.random.default_rng(0)
    noise = rng.normal(size=15)
    noise = (noise - noise.mean()) / noise.std(ddof=1)  # exactly mean 0, sd 1
    sd = 0.0129
    narrow = pd.DataFrame({"rho": 0.05 + sd * noise, "single:a": 0.04 + np.zeros(15)})
    assert (narrow["rho"] - narrow["single:a"]).mean() / (sd / np.sqrt(15)) > 2.9
    assert not _wins(narrow, "single:a", "rho", lower=True, folds=5)
    wide = pd.DataFrame({"rho": 0.07 + sd * noise, "single:a": 0.04 + np.zeros(15)})
    assert _wins(wide, "single:a", "rho", lower=True, folds=5)
    assert not _wins(wide, "rho", "single:a", lower=True, folds=5)


def test_spearman_without_scipy_gives_scipys_bits() -> None:
    """The rank correlation is computed without importing scipy.stats (seconds of start-up),
    to the same bits as ``scipy.stats.spearmanr`` on ties, NaNs and ordinary data."""
    from scipy.stats import rankdata, spearmanr

    from difficulty.combine import average_ranks

    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(3, 300))
        x = rng.integers(0, 1 + trial % 20, n).astype(float) if trial % 2 else rng.random(n)
        y = rng.random(n) * (rng.random(n) < 0.7)
        x[rng.random(n) < 0.05] = np.nan
        ok = np.isfinite(x)
        assert np.array_equal(average_ranks(x[ok]), rankdata(x[ok]))
        if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
            assert np.isnan(spearman(x, y))
            continue
        assert spearman(x, y) == float(spearmanr(x[ok], y[ok]).statistic)


def test_fitting_weights_does_not_import_scipy_stats() -> None:
    """The scoring process fits the combination; scipy.stats costs it about 0.7 s to import."""
    import subprocess
    import sys

    script = """
import sys
import numpy as np, pandas as pd
from difficulty.combine import fit_weights, percentiles
rng = np.random.default_rng(0)
err = rng.random(200)
raw = pd.DataFrame({"fourier": rng.random(200), "good": err + rng.normal(scale=0.2, size=200)})
fit = fit_weights(percentiles(raw, list(raw.columns)), err)
print(fit.method, "scipy.stats" in sys.modules)
"""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.split()[1] == "False", out.stdout + out.stderr
