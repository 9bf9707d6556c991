"""Tests of `elbo_core.sampling`, driven by the oracle's exact denoiser.

With the exact denoiser every sampler targets the data distribution up to its own
discretisation error, so the moments and mixture proportions of a few thousand
samples must match the oracle's within sampling error.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elbo_core import analytic, process, sampling, schedules

NUM_SAMPLES = 4000
# Each moment must match within four standard errors of its sample estimate.
NUM_STANDARD_ERRORS = 4.0

LOGSNR_MIN, LOGSNR_MAX = -10.0, 10.0
SCHEDULE = schedules.Cosine(logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX)
MIXTURE = analytic.GaussianMixture(
    np.array([[-2.0, 0.5], [1.5, -1.0], [0.5, 2.0]]),
    np.array([0.4, 0.6, 0.3]),
    np.array([0.3, 0.5, 0.2]),
)

# Enough steps that each sampler's bias is far below the sampling error.
SAMPLERS = {
    "ode": (sampling.ode_sample, dict(rtol=1e-5, atol=1e-5)),
    "ddpm": (sampling.ddpm_sample, dict(num_steps=256)),
    "ddpm_forward_variance": (
        sampling.ddpm_sample,
        dict(num_steps=256, variance="forward"),
    ),
    # EDM's ImageNet-64 churn settings, with sigma_max = exp(5) = 148.
    "edm": (
        sampling.edm_sample,
        dict(num_steps=64, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
    ),
}


@pytest.fixture(scope="module", params=list(SAMPLERS))
def samples(request):
    sampler, options = SAMPLERS[request.param]
    x, stats = sampling.batch_sample(
        sampler,
        MIXTURE,
        num_samples=NUM_SAMPLES,
        shape=(2,),
        schedule=SCHEDULE,
        key=jax.random.key(0),
        **options,
    )
    return request.param, np.asarray(x), stats


def _check_mean(values, expected, what):
    values = np.asarray(values)
    mean = values.mean(axis=0)
    standard_error = values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])
    excess = np.abs(mean - np.asarray(expected)) / standard_error
    assert np.all(excess < NUM_STANDARD_ERRORS), (what, mean, expected, excess)


def test_mean_and_covariance_match(samples):
    name, x, _ = samples
    assert np.all(np.isfinite(x)), name
    _check_mean(x, MIXTURE.mean(), f"{name}: mean")
    # Covariance entries are means of centred products (about the exact mean).
    centred = x - np.asarray(MIXTURE.mean())
    products = np.stack(
        [centred[:, 0] ** 2, centred[:, 1] ** 2, centred[:, 0] * centred[:, 1]], axis=1
    )
    covariance = np.asarray(MIXTURE.covariance())
    expected = [covariance[0, 0], covariance[1, 1], covariance[0, 1]]
    _check_mean(products, expected, f"{name}: covariance")


def test_mixture_proportions_match(samples):
    """`E_x[q(k | x)] = pi_k`: the mean responsibility of each component."""
    name, x, _ = samples
    alpha = process.alpha(LOGSNR_MAX)
    responsibilities = jax.jit(
        jax.vmap(lambda row: MIXTURE.posterior_weights(alpha * row, LOGSNR_MAX))
    )(jnp.asarray(x))
    _check_mean(responsibilities, MIXTURE.weights, f"{name}: proportions")


def test_function_evaluations_are_reported(samples):
    name, _, stats = samples
    evaluations = np.asarray(stats["num_function_evaluations"])
    assert evaluations.shape == (NUM_SAMPLES,)
    options = SAMPLERS[name][1]
    if name.startswith("ddpm"):
        assert np.all(evaluations == options["num_steps"])
    elif name == "edm":
        assert np.all(evaluations == 2 * options["num_steps"] - 1)
    else:
        assert np.all(stats["successful"])
        assert np.all(evaluations == 1 + 6 * np.asarray(stats["num_steps"]))
        assert 20 < evaluations.mean() < 1000


def test_edm_churn_only_inside_its_range():
    """Churn outside `[s_tmin, s_tmax]` is no churn: the deterministic sampler."""
    common = dict(shape=(2,), schedule=SCHEDULE, num_steps=8, key=jax.random.key(3))

    @eqx.filter_jit
    def run(model):
        deterministic, _ = sampling.edm_sample(model, **common)
        out_of_range, _ = sampling.edm_sample(
            model, s_churn=40.0, s_tmin=1e3, s_tmax=1e4, **common
        )
        churned, _ = sampling.edm_sample(model, s_churn=40.0, **common)
        return deterministic, out_of_range, churned

    deterministic, out_of_range, churned = run(MIXTURE)
    np.testing.assert_allclose(out_of_range, deterministic, rtol=1e-12)
    assert not np.allclose(churned, deterministic)


def test_ddpm_finite_in_float32_over_wide_range():
    schedule = schedules.Cosine(logsnr_min=-40.0, logsnr_max=40.0)
    mixture32 = jax.tree.map(lambda a: a.astype(jnp.float32), MIXTURE)
    x, _ = sampling.batch_sample(
        sampling.ddpm_sample,
        mixture32,
        num_samples=16,
        shape=(2,),
        schedule=schedule,
        num_steps=64,
        dtype=jnp.float32,
        key=jax.random.key(4),
    )
    assert x.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize(
    ("sampler", "options", "message"),
    [
        (sampling.ddpm_sample, dict(num_steps=0), "num_steps=0"),
        (sampling.ddpm_sample, dict(num_steps=4, variance="big"), "variance='big'"),
        (sampling.edm_sample, dict(s_churn=-1.0), "s_churn=-1.0"),
        (sampling.edm_sample, dict(s_tmin=2.0, s_tmax=1.0), "s_tmin"),
        (sampling.edm_sample, dict(rho=0.0), "rho=0.0"),
        (sampling.ode_sample, dict(rtol=0.0), "rtol=0.0"),
    ],
)
def test_bad_input_raises_clear_error(sampler, options, message):
    with pytest.raises(ValueError, match=message):
        sampler(
            MIXTURE, shape=(2,), schedule=SCHEDULE, key=jax.random.key(0), **options
        )


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match="shape"):
        sampling.ddpm_sample(
            MIXTURE, shape=(0,), schedule=SCHEDULE, num_steps=2, key=jax.random.key(0)
        )
