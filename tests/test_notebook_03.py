"""Smoke test of notebook 03: proposals and estimator variances, quick preset."""

import math

import pytest

# Monte Carlo agreement within this many standard errors (means and variances).
NUM_SIGMAS = 4.0
# The paper's proxy p ~ E[g] is within a few percent of the optimum here (measured
# 1.3% to 1.9%); a larger gap would mean the moments or the proposals are wrong.
ADAPTIVE_EXCESS_BOUND = 0.05
# For a single Gaussian with its exact denoiser E[g^2] = (1 + 2/D) E[g]^2 exactly;
# the two proposals then differ by binning alone (measured 1.5e-5 on 50 bins).
DEGENERATE_TOLERANCE = 1e-3
# The optimal proposal must beat the cosine schedule clearly (measured 0.59-0.61).
OPTIMAL_RATIO_BOUND = 0.8
# Uniform-in-logsnr draws waste most of them at high logsnr for this weighting: their
# variance is several times the cosine schedule's (measured 3.70 and 3.83).
LINEAR_RATIO_FLOOR = 2.0


@pytest.mark.notebook
def test_schedule_invariance_and_variance_notebook(run_quick_notebook):
    metrics = run_quick_notebook("03_schedule_invariance_and_variance")

    table = metrics["proposals"]
    assert set(table) == {"exact", "perturbed"}
    for denoiser, rows in table.items():
        assert set(rows) == {"cosine", "edm", "linear", "fm_ot", "adaptive", "optimal"}
        for name, entry in rows.items():
            assert abs(entry["z_score"]) < NUM_SIGMAS, (denoiser, name)
            deviation = abs(entry["variance_mc"] - entry["variance"])
            assert deviation < NUM_SIGMAS * entry["variance_mc_stderr"], (
                denoiser,
                name,
            )
        # The optimal proposal has the smallest variance of all, and the paper's
        # adaptive proxy comes within a few percent of it.
        optimal = rows["optimal"]["ratio_to_cosine"]
        for name, entry in rows.items():
            if name != "optimal":
                assert optimal < entry["ratio_to_cosine"], (denoiser, name)
        excess = rows["adaptive"]["ratio_to_cosine"] / optimal - 1
        assert 0 <= excess < ADAPTIVE_EXCESS_BOUND, (denoiser, excess)
        assert rows["linear"]["ratio_to_cosine"] > LINEAR_RATIO_FLOOR

    for denoiser, entry in metrics["optimum"].items():
        assert entry["optimal_is_lowest"], denoiser
        assert entry["closed_form"] <= entry["optimal_piecewise"]
        assert entry["optimal_ratio_to_cosine"] < OPTIMAL_RATIO_BOUND
        assert 1.0 <= entry["adaptive_over_optimal"] < 1 + ADAPTIVE_EXCESS_BOUND

    single = metrics["single_gaussian"]
    low, high = single["rms_to_mean_ratio_range"]
    assert math.isclose(low, math.sqrt(2), rel_tol=1e-9)
    assert math.isclose(high, math.sqrt(2), rel_tol=1e-9)
    assert abs(single["adaptive_over_optimal"] - 1) < DEGENERATE_TOLERANCE
