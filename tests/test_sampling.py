"""Tests of `elbo_core.sampling`, driven by the oracle's exact denoiser.

With the exact denoiser every sampler targets the data distribution up to its own
discretisation error, so the moments and mixture proportions of a few thousand
samples must match the oracle's within sampling error, on a moderate log-SNR range
and on the widest one the library supports, [-40, 40].
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
# The widest range: sigma = exp(-logsnr / 2) from 2e-9 to 5e8 in EDM's coordinates.
WIDE_SCHEDULE = schedules.Cosine(logsnr_min=-40.0, logsnr_max=40.0)
# Tsit5 at rtol = atol = 1e-5 takes about 120 evaluations on [-10, 10] and 200 on
# [-40, 40] here (measured). Fewer than 20 (three steps) would mean the controller
# does not resolve the flow; more than 1000, a collapse of the step size.
ODE_NFE_RANGE = (20, 1000)
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
    # EDM's ImageNet-64 churn settings; levels from sigma_max = 80 (inside the
    # schedule's exp(5) = 148) down to sigma_min = exp(-5) (above EDM's 0.002).
    "edm": (
        sampling.edm_sample,
        dict(num_steps=64, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
    ),
    # The deterministic Heun sampler (EDM's Algorithm 1) with few steps: on [-40, 40]
    # levels taken from the schedule's end points gave 8 times the variance.
    "edm_heun32": (sampling.edm_sample, dict(num_steps=32)),
}
# Each sampler on the moderate range, and the ones at risk on the widest range.
CASES = [(name, "moderate") for name in SAMPLERS] + [
    (name, "wide") for name in ("ode", "ddpm", "edm", "edm_heun32")
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def samples(request):
    name, width = request.param
    sampler, options = SAMPLERS[name]
    x, stats = sampling.batch_sample(
        sampler,
        MIXTURE,
        num_samples=NUM_SAMPLES,
        shape=(2,),
        schedule=SCHEDULE if width == "moderate" else WIDE_SCHEDULE,
        key=jax.random.key(0),
        **options,
    )
    return f"{name} on the {width} range", name, np.asarray(x), stats


def _check_mean(values, expected, what):
    values = np.asarray(values)
    mean = values.mean(axis=0)
    standard_error = values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])
    excess = np.abs(mean - np.asarray(expected)) / standard_error
    assert np.all(excess < NUM_STANDARD_ERRORS), (what, mean, expected, excess)


def test_mean_and_covariance_match(samples):
    name, _, x, _ = samples
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
    name, _, x, _ = samples
    alpha = process.alpha(LOGSNR_MAX)
    responsibilities = jax.jit(
        jax.vmap(lambda row: MIXTURE.posterior_weights(alpha * row, LOGSNR_MAX))
    )(jnp.asarray(x))
    _check_mean(responsibilities, MIXTURE.weights, f"{name}: proportions")


def test_function_evaluations_are_reported(samples):
    _, name, _, stats = samples
    evaluations = np.asarray(stats["num_function_evaluations"])
    assert evaluations.shape == (NUM_SAMPLES,)
    options = SAMPLERS[name][1]
    if name.startswith("ddpm"):
        assert np.all(evaluations == options["num_steps"])
    elif name.startswith("edm"):
        assert np.all(evaluations == 2 * options["num_steps"] - 1)
    else:
        assert np.all(stats["successful"])
        assert np.all(evaluations == 1 + 6 * np.asarray(stats["num_steps"]))
        low, high = ODE_NFE_RANGE
        assert low < evaluations.mean() < high


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


def test_edm_levels_are_edm_defaults_clipped_to_the_schedule():
    """Levels run from 80 down to 0.002 unless the schedule's range is narrower."""
    common = dict(shape=(2,), num_steps=8, key=jax.random.key(5))
    edm_range = schedules.Cosine(
        logsnr_min=-2 * math.log(sampling.EDM_SIGMA_MAX),
        logsnr_max=-2 * math.log(sampling.EDM_SIGMA_MIN),
    )

    @eqx.filter_jit
    def run(model):
        wide, _ = sampling.edm_sample(model, schedule=WIDE_SCHEDULE, **common)
        exact_range, _ = sampling.edm_sample(model, schedule=edm_range, **common)
        # On [-10, 10], sigma_max = 1e3 is clipped to exp(5) and 0.002 to exp(-5).
        clipped, _ = sampling.edm_sample(
            model, schedule=SCHEDULE, sigma_min=1e-4, sigma_max=1e3, **common
        )
        ends, _ = sampling.edm_sample(
            model,
            schedule=SCHEDULE,
            sigma_min=math.exp(-LOGSNR_MAX / 2),
            sigma_max=math.exp(-LOGSNR_MIN / 2),
            **common,
        )
        return wide, exact_range, clipped, ends

    wide, exact_range, clipped, ends = run(MIXTURE)
    np.testing.assert_allclose(wide, exact_range, rtol=1e-12)
    np.testing.assert_allclose(clipped, ends, rtol=1e-12)


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
        (sampling.edm_sample, dict(sigma_min=0.0), "sigma_min=0.0"),
        (sampling.edm_sample, dict(sigma_min=1e3, sigma_max=1e4), "no range"),
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
