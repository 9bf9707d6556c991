"""Smoke test of notebook 04: the ODE likelihood and the samplers, quick preset."""

import math

import pytest

# The accuracy requirement for the oracle at tight tolerance (float64).
ORACLE_ACCURACY = 1e-5
# From rtol = 1e-3 to 1e-8 the error must fall by at least this factor (a 5th-order
# solver's global error falls about in proportion to the tolerance: ~1e5 here).
MIN_ERROR_REDUCTION = 1e3
# The k-probe Hutchinson error falls like 1/sqrt(k): from 1 to 64 probes, 1/8. Each
# RMS is over 16 examples x 64 / k groups, so allow a generous factor for noise.
HUTCHINSON_REDUCTION_BOUND = 0.35
# 1000 samples: a mean responsibility has standard error below sqrt(0.25 / 1000);
# four standard errors.
PROPORTION_TOLERANCE = 4 * math.sqrt(0.25 / 1000)
# Mean of 1000 samples with total variance ~4.2 (trace of the mixture covariance):
# four standard errors of the mean vector's norm.
MEAN_TOLERANCE = 4 * math.sqrt(4.2 / 1000)


@pytest.mark.notebook
def test_ode_likelihood_notebook(run_quick_notebook):
    metrics = run_quick_notebook("04_ode_likelihood")

    # Accuracy against tolerance on the oracle.
    sweep = metrics["accuracy"]
    errors, nfe = sweep["max_abs_error"], sweep["mean_nfe"]
    assert errors[-1] < ORACLE_ACCURACY
    assert errors[0] / errors[-1] > MIN_ERROR_REDUCTION
    assert all(a <= b for a, b in zip(nfe[:-1], nfe[1:], strict=True)), nfe

    # Hutchinson: error shrinks with probes; Rademacher never worse than Gaussian.
    hutchinson = metrics["hutchinson"]
    for name, entry in hutchinson.items():
        rms = entry["rms_error"]
        assert rms[-1] < HUTCHINSON_REDUCTION_BOUND * rms[0], (name, rms)
    assert (
        hutchinson["rademacher"]["per_probe_variance"]
        <= hutchinson["gaussian"]["per_probe_variance"]
    )

    # ODE against ELBO for the exact denoiser: the ODE is exact up to the prior's
    # mismatch, and the ELBO lies below it (within its quadrature noise).
    exact = metrics["ode_vs_elbo"]["exact"]
    assert abs(exact["ode_minus_exact_mean"]) < 1e-3
    assert exact["ode_minus_elbo_mean"] > -3 * exact["ode_minus_elbo_stderr"]
    perturbed = metrics["ode_vs_elbo"]["perturbed"]
    assert math.isfinite(perturbed["ode_mean"]) and math.isfinite(
        perturbed["elbo_mean"]
    )

    # Samplers: moments and proportions of the mixture, and their evaluation counts.
    samplers = metrics["samplers"]
    assert set(samplers) == {"probability-flow ODE", "DDPM ancestral", "EDM stochastic"}
    for name, entry in samplers.items():
        assert entry["proportion_max_error"] < PROPORTION_TOLERANCE, name
        assert entry["mean_error"] < MEAN_TOLERANCE, name
    assert samplers["DDPM ancestral"]["nfe_mean"] == 64
    assert samplers["EDM stochastic"]["nfe_mean"] == 2 * 16 - 1
    assert 20 < samplers["probability-flow ODE"]["nfe_mean"] < 1000
