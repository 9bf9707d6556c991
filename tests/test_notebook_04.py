"""Smoke test of notebook 04: the ODE likelihood and the samplers, quick preset.

Sizes (examples, probes, samples, steps) are read from the parameters the notebook
records in its metrics, never assumed from its defaults.
"""

import math

import pytest

# The accuracy requirement for the oracle at tight tolerance (float64).
ORACLE_ACCURACY = 1e-5
# From rtol = 1e-3 to 1e-8 the error must fall by at least this factor (a 5th-order
# solver's global error falls about in proportion to the tolerance: ~1e5 here).
MIN_ERROR_REDUCTION = 1e3
# The k-probe Hutchinson RMS error falls like 1/sqrt(k). The last RMS is over only
# `num_examples` single estimates (16 in quick), whose spread is heavy-tailed: allow
# 2.8 times the ideal reduction (1/8 from 1 to 64 probes becomes 0.35).
HUTCHINSON_SLACK = 2.8
# 2-D solves at rtol = atol = 1e-8: the ODE matches the exact log-density plus the
# prior's exact error to 2e-8 nats (measured, 32 draws) and 2e-7 at the far nodes of
# a Gauss-Hermite rule; 1e-6 bounds the solver error of any one example.
ODE_ACCURACY = 1e-6
# Monte Carlo comparisons: four standard errors.
NUM_STANDARD_ERRORS = 4.0
# Quadrature comparisons: the error estimate is the change from a rule with 3/4 of
# the nodes, which overstates a converging rule's error; a margin of three of them
# covers slower convergence.
NUM_QUADRATURE_ERRORS = 3.0
# Mixture proportions: a mean responsibility (in [0, 1]) has variance at most 1/4.
RESPONSIBILITY_VARIANCE_BOUND = 0.25
# Tsit5 at rtol = atol = 1e-5 on the 2-D mixture takes about 120 evaluations
# (measured). Fewer than 20 (three steps) would mean the flow is not resolved; more
# than 1000, a collapse of the step size.
ODE_NFE_RANGE = (20, 1000)


@pytest.mark.notebook
def test_ode_likelihood_notebook(run_quick_notebook):
    metrics = run_quick_notebook("04_ode_likelihood")
    parameters = metrics["parameters"]

    # Accuracy against tolerance on the oracle.
    sweep = metrics["accuracy"]
    errors, nfe = sweep["max_abs_error"], sweep["mean_nfe"]
    assert errors[-1] < ORACLE_ACCURACY
    assert errors[0] / errors[-1] > MIN_ERROR_REDUCTION
    assert all(a <= b for a, b in zip(nfe[:-1], nfe[1:], strict=True)), nfe

    # Hutchinson: error shrinks with probes; Rademacher never worse than Gaussian.
    hutchinson = metrics["hutchinson"]
    for name, entry in hutchinson.items():
        rms, counts = entry["rms_error"], entry["probe_counts"]
        ideal = math.sqrt(counts[0] / counts[-1])
        assert rms[-1] < HUTCHINSON_SLACK * ideal * rms[0], (name, rms)
    assert (
        hutchinson["rademacher"]["per_probe_variance"]
        <= hutchinson["gaussian"]["per_probe_variance"]
    )

    # ODE against exact: example by example, the difference is the prior's error.
    exact = metrics["ode_vs_elbo"]["exact"]
    assert exact["ode_minus_exact_residual_max"] < ODE_ACCURACY
    expected = exact["expected"]
    # Its mean over draws estimates -KL(q(z_min) || N(0, I)), which the quadrature
    # computes without Monte Carlo error, and which E[prior_kl] bounds.
    deviation = abs(exact["prior_error_mean"] - expected["prior_error"])
    assert deviation < NUM_STANDARD_ERRORS * exact["prior_error_stderr"]
    assert -ODE_ACCURACY < -expected["prior_error"] < expected["prior_kl"]

    # ODE against ELBO for the exact denoiser, by quadrature: the ELBO lies below,
    # by the first-order prediction exp(-logsnr_max) J / 2.
    margin = NUM_QUADRATURE_ERRORS * (expected["quadrature_error"] + ODE_ACCURACY)
    assert expected["ode_minus_elbo"] > margin, expected
    prediction_error = expected["ode_minus_elbo"] - expected["first_order_prediction"]
    assert abs(prediction_error) < margin, expected
    # The mean over draws agrees with the expectation within its standard error.
    deviation = abs(exact["ode_minus_elbo_mean"] - expected["ode_minus_elbo"])
    assert deviation < NUM_STANDARD_ERRORS * exact["ode_minus_elbo_stderr"]
    if parameters["perturbed_denoiser"]:
        perturbed = metrics["ode_vs_elbo"]["perturbed"]
        assert math.isfinite(perturbed["ode_mean"])
        assert math.isfinite(perturbed["elbo_mean"])

    # Samplers: moments and proportions of the mixture, and their evaluation counts.
    samplers = metrics["samplers"]
    assert set(samplers) == {"probability-flow ODE", "DDPM ancestral", "EDM stochastic"}
    num_samples = parameters["num_samples"]
    proportion_tolerance = NUM_STANDARD_ERRORS * math.sqrt(
        RESPONSIBILITY_VARIANCE_BOUND / num_samples
    )
    # The sample mean's error vector has mean squared norm trace(cov) / num_samples.
    mean_tolerance = NUM_STANDARD_ERRORS * math.sqrt(
        metrics["mixture_covariance_trace"] / num_samples
    )
    for name, entry in samplers.items():
        assert entry["proportion_max_error"] < proportion_tolerance, name
        assert entry["mean_error"] < mean_tolerance, name
    assert samplers["DDPM ancestral"]["nfe_mean"] == parameters["ddpm_steps"]
    assert samplers["EDM stochastic"]["nfe_mean"] == 2 * parameters["edm_steps"] - 1
    low, high = ODE_NFE_RANGE
    assert low < samplers["probability-flow ODE"]["nfe_mean"] < high
