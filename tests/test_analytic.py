"""The Gaussian-mixture oracle against scipy, autodiff and closed forms.

Everything else in the repository leans on this oracle, so each of its outputs is
checked by an independent route: densities against scipy, the score and the optimal
denoiser against autodiff of the exact noisy marginal, Tweedie's identity between the
two optimal predictions, the limits of the marginal at extreme noise levels, and the
optimal eps-MSE of Gaussian data against its closed form both exactly (Gauss-Hermite)
and by Monte Carlo.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from elbo_core import analytic

# Log densities: logsumexp of a few float64 terms of size <= ~100, a few ulps
# (1.4e-14) of that. Measured 5.3e-15.
LOG_PROB_ATOL = 1e-13
# Score and optimal predictions against autodiff of the log density, relative to
# their largest coordinate: both are sums of a few float64 terms per component of
# size up to ~1e3 (narrow components), agreeing to rounding. Measured 2.7e-14.
AUTODIFF_RTOL = 1e-12
# Tweedie's `alpha x_opt + sigma eps_opt = z` with |z| <= ~10: a few ulps (1.8e-15)
# of it. Measured 1.3e-15.
TWEEDIE_ATOL = 1e-14
# Responsibilities from a softmax of at most four terms sum to one to an ulp or two.
SOFTMAX_SUM_ATOL = 1e-15
# The library's closed forms (a sigmoid and a log, a Gaussian log density) against
# scipy's in float64: a few ulps. Measured 4.4e-16.
CLOSED_FORM_RTOL = 2e-15
# PAPER.md section 4 quotes the Gaussian NLL to six decimals (1.062264): half a unit
# of the last one.
PAPER_DECIMALS_ATOL = 5e-7
# The noisy marginal at logsnr = 30 differs from the rescaled data density through
# the variances, by sigma^2 / (alpha^2 s^2) ~ e^-30 / 0.04 ~ 2e-12 times
# |x - mu|^2 / s^2 <= ~1e2; at logsnr = -60 from N(0, I) through the means, by
# alpha |mu| |z| ~ e^-30 * 30 ~ 3e-12.
LIMIT_ATOL = 1e-9
# Gauss-Hermite with 20 nodes per axis integrates the (quadratic) squared error of
# the linear Gaussian denoiser exactly; what is left is float64 rounding.
GAUSS_HERMITE_RTOL = 1e-12
# Monte Carlo checks pass within this many standard errors (two-sided false-alarm
# probability 6e-7 per check).
NUM_STANDARD_ERRORS = 5.0
NUM_SAMPLES = 20_000
# Significance of the chi-square test of component counts: a correct sampler fails
# with this probability over keys (the key is fixed, so the outcome is
# deterministic).
CHI2_ALPHA = 1e-3
# Each coordinate of a draw lies within this many stds of its component's mean but
# with probability 2 Phi(-6) = 2e-9, so 8e-5 over the 40_000 coordinates drawn.
NUM_COMPONENT_STDS = 6.0

MIXTURES = {
    "1d": dict(
        means=[[-2.0], [0.5], [3.0]], stds=[0.5, 1.0, 0.3], weights=[0.3, 0.5, 0.2]
    ),
    "2d": dict(
        means=[[-1.0, 2.0], [2.0, -1.0], [0.0, 0.0], [3.0, 3.0]],
        stds=[0.4, 0.8, 1.5, 0.2],
        weights=[0.1, 0.4, 0.3, 0.2],
    ),
    "10d": dict(
        means=np.linspace(-1.0, 1.0, 30).reshape(3, 10)
        * np.array([[1.0], [-2.0], [0.5]]),
        stds=[0.7, 1.3, 0.2],
        weights=[0.25, 0.25, 0.5],
    ),
}


def _mixture(name):
    spec = MIXTURES[name]
    return analytic.GaussianMixture(
        np.asarray(spec["means"], float),
        np.asarray(spec["stds"], float),
        np.asarray(spec["weights"], float),
    )


def _scipy_log_prob(spec, x):
    """log p(x) of the mixture, component by component with scipy."""
    means = np.asarray(spec["means"], float)
    terms = []
    for mean, std, weight in zip(means, spec["stds"], spec["weights"], strict=True):
        normal = scipy.stats.multivariate_normal(mean, std**2 * np.eye(len(mean)))
        terms.append(np.log(weight) + normal.logpdf(x))
    return scipy.special.logsumexp(np.stack(terms), axis=0)


@eqx.filter_jit
def _sample(mixture, keys):
    return jax.vmap(lambda key: mixture.sample(key=key))(keys)


def _numpy_sample(name, num, seed):
    """Draws from a mixture by numpy, for inputs (the library's sampler is tested
    separately, and compiling jax.random.normal is slow on CPU)."""
    spec = MIXTURES[name]
    rng = np.random.default_rng(seed)
    means = np.asarray(spec["means"], float)
    k = rng.choice(len(spec["weights"]), size=num, p=spec["weights"])
    noise = rng.standard_normal((num, means.shape[1]))
    return means[k] + np.asarray(spec["stds"])[k, None] * noise


@eqx.filter_jit
def _evaluate(mixture, z, logsnr):
    """Every oracle output, and its autodiff counterpart, for a batch."""

    def one(z, logsnr):
        grad = jax.grad(mixture.marginal_log_prob)(z, logsnr)
        sigma = jnp.exp(0.5 * jax.nn.log_sigmoid(-logsnr))
        alpha = jnp.exp(0.5 * jax.nn.log_sigmoid(logsnr))
        return dict(
            marginal_log_prob=mixture.marginal_log_prob(z, logsnr),
            log_prob=mixture.log_prob(z),
            score=mixture.score(z, logsnr),
            autodiff_score=grad,
            eps_optimal=mixture.eps_optimal(z, logsnr),
            autodiff_eps=-sigma * grad,
            x_optimal=mixture.x_optimal(z, logsnr),
            denoiser=mixture(z, logsnr),
            posterior_weights=mixture.posterior_weights(z, logsnr),
            alpha=alpha,
            sigma=sigma,
        )

    return jax.vmap(one)(z, logsnr)


@pytest.fixture(params=sorted(MIXTURES), scope="module")
def case(request):
    mixture = _mixture(request.param)
    num = 300
    rng = np.random.default_rng(3)
    x = _numpy_sample(request.param, num, seed=4)
    eps = rng.standard_normal(x.shape)
    logsnr = rng.uniform(-12.0, 12.0, num)
    alpha = np.sqrt(scipy.special.expit(logsnr))[:, None]
    sigma = np.sqrt(scipy.special.expit(-logsnr))[:, None]
    z = alpha * x + sigma * eps
    values = _evaluate(mixture, jnp.asarray(z), jnp.asarray(logsnr))
    values = {k: np.asarray(v) for k, v in values.items()}
    return request.param, mixture, z, logsnr, values


def test_log_prob_matches_scipy(case):
    name, _, z, _, values = case
    np.testing.assert_allclose(
        values["log_prob"],
        _scipy_log_prob(MIXTURES[name], z),
        rtol=0,
        atol=LOG_PROB_ATOL,
    )


def test_marginal_log_prob_matches_scipy(case):
    # q(z) = sum_k pi_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), by scipy.
    name, _, z, logsnr, values = case
    spec = MIXTURES[name]
    means = np.asarray(spec["means"], float)
    alpha2, sigma2 = scipy.special.expit(logsnr), scipy.special.expit(-logsnr)
    for i in range(0, len(z), 37):
        noisy = dict(
            means=np.sqrt(alpha2[i]) * means,
            stds=np.sqrt(alpha2[i] * np.asarray(spec["stds"]) ** 2 + sigma2[i]),
            weights=spec["weights"],
        )
        expected = _scipy_log_prob(noisy, z[i])
        assert abs(values["marginal_log_prob"][i] - expected) < LOG_PROB_ATOL


def test_perturbed_log_prob_is_the_mixture_with_wider_components(case):
    # x + exp(-logsnr / 2) eps has components N(mu_k, (s_k^2 + exp(-logsnr)) I).
    name, mixture, z, logsnr, _ = case
    spec = MIXTURES[name]
    for i in range(0, len(z), 37):
        widened = dict(
            means=spec["means"],
            stds=np.sqrt(np.asarray(spec["stds"]) ** 2 + np.exp(-logsnr[i])),
            weights=spec["weights"],
        )
        value = float(mixture.perturbed_log_prob(z[i], logsnr[i]))
        assert abs(value - _scipy_log_prob(widened, z[i])) < LOG_PROB_ATOL


def test_score_is_gradient_of_marginal(case):
    *_, values = case
    scale = np.max(np.abs(values["autodiff_score"]), axis=-1, keepdims=True)
    np.testing.assert_allclose(
        values["score"] / scale,
        values["autodiff_score"] / scale,
        rtol=0,
        atol=AUTODIFF_RTOL,
    )


def test_eps_optimal_is_minus_sigma_gradient(case):
    *_, values = case
    scale = np.max(np.abs(values["autodiff_eps"]), axis=-1, keepdims=True)
    np.testing.assert_allclose(
        values["eps_optimal"] / scale,
        values["autodiff_eps"] / scale,
        rtol=0,
        atol=AUTODIFF_RTOL,
    )
    np.testing.assert_array_equal(values["denoiser"], values["eps_optimal"])


def test_x_optimal_satisfies_tweedie(case):
    # E[z | z] = alpha E[x | z] + sigma E[eps | z].
    _, _, z, _, values = case
    reconstructed = (
        values["alpha"][:, None] * values["x_optimal"]
        + values["sigma"][:, None] * values["eps_optimal"]
    )
    np.testing.assert_allclose(reconstructed, z, rtol=0, atol=TWEEDIE_ATOL)
    np.testing.assert_allclose(
        values["posterior_weights"].sum(axis=-1), 1, rtol=0, atol=SOFTMAX_SUM_ATOL
    )


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_marginal_limits(name):
    # logsnr -> +inf: q(z) -> p(z / alpha) / alpha^D (the alpha change of variables);
    # logsnr -> -inf: q(z) -> N(z; 0, I).
    mixture = _mixture(name)
    num = 300  # the fixture's batch, so that nothing is compiled again
    x = jnp.asarray(_numpy_sample(name, num, seed=5))
    dim = x.shape[1]
    high = jnp.full(num, 30.0)
    alpha = float(jnp.sqrt(jax.nn.sigmoid(30.0)))
    values = _evaluate(mixture, alpha * x, high)
    change_of_variables = values["marginal_log_prob"] + dim * np.log(alpha)
    np.testing.assert_allclose(
        change_of_variables, _evaluate(mixture, x, high)["log_prob"], atol=LIMIT_ATOL
    )
    low = jnp.full(num, -60.0)
    standard_normal = scipy.stats.multivariate_normal(np.zeros(dim), np.eye(dim))
    np.testing.assert_allclose(
        _evaluate(mixture, x, low)["marginal_log_prob"],
        standard_normal.logpdf(np.asarray(x)),
        atol=LIMIT_ATOL,
    )


# --- Gaussian data: the optimal eps-MSE is sigmoid(logsnr + log s^2) ------------------


STDS = [0.3, 0.7, 2.0]
GAUSS_HERMITE_NODES = 20


@eqx.filter_jit
def _eps_mse(mixture, logsnr, x, eps, pair_weights):
    """Weighted mean over (x, eps) pairs of ||eps - eps_optimal(z)||^2 / D, for each
    logsnr; the mixture is an argument, so every std shares one compilation."""

    def one(logsnr):
        alpha = jnp.sqrt(jax.nn.sigmoid(logsnr))
        sigma = jnp.sqrt(jax.nn.sigmoid(-logsnr))
        eps_hat = jax.vmap(mixture, (0, None))(alpha * x + sigma * eps, logsnr)
        return jnp.sum(pair_weights * jnp.mean((eps - eps_hat) ** 2, axis=-1))

    return jax.vmap(one)(logsnr)


@pytest.mark.parametrize("std", STDS)
def test_gaussian_eps_mse_exact(std):
    # E (eps - eps_opt(alpha x + sigma eps))^2 over x ~ N(0, s^2), eps ~ N(0, 1), by
    # tensor Gauss-Hermite quadrature with the library's eps_optimal as integrand.
    mixture = analytic.GaussianMixture.gaussian(1, std)
    nodes, weights = np.polynomial.hermite_e.hermegauss(GAUSS_HERMITE_NODES)
    weights = weights / weights.sum()  # probabilists' rule for N(0, 1)
    x = std * np.repeat(nodes, len(nodes))[:, None]
    eps = np.tile(nodes, len(nodes))[:, None]
    pair_weights = np.repeat(weights, len(nodes)) * np.tile(weights, len(nodes))
    logsnr = np.linspace(-15.0, 15.0, 31)
    exact = _eps_mse(mixture, *map(jnp.asarray, (logsnr, x, eps, pair_weights)))
    closed = scipy.special.expit(logsnr + np.log(std**2))
    np.testing.assert_allclose(exact, closed, rtol=GAUSS_HERMITE_RTOL)
    np.testing.assert_allclose(
        jax.vmap(analytic.gaussian_eps_mse, (None, 0))(std, jnp.asarray(logsnr)),
        closed,
        rtol=CLOSED_FORM_RTOL,
    )


@pytest.mark.parametrize("std", STDS)
def test_gaussian_eps_mse_monte_carlo(std):
    # Per-dimension squared error eps - E[eps | z] ~ N(0, v): the mean of D N such
    # squares has standard error v sqrt(2 / (D N)).
    dim, num = 4, NUM_SAMPLES // 4
    mixture = analytic.GaussianMixture.gaussian(dim, std)
    logsnr = np.linspace(-10.0, 10.0, 9)
    rng = np.random.default_rng(11)
    x = std * rng.standard_normal((num, dim))
    eps = rng.standard_normal((num, dim))
    estimate = _eps_mse(
        mixture, *map(jnp.asarray, (logsnr, x, eps, np.full(num, 1 / num)))
    )
    closed = scipy.special.expit(logsnr + np.log(std**2))
    standard_error = closed * np.sqrt(2 / (dim * num))
    assert np.all(np.abs(estimate - closed) < NUM_STANDARD_ERRORS * standard_error)


def test_gaussian_nll():
    # 1/2 log(2 pi s^2) + 1/2 (PAPER.md section 4: 1.062264 at s = 0.7).
    nll = float(analytic.gaussian_nll(0.7))
    assert nll == pytest.approx(1.062264, abs=PAPER_DECIMALS_ATOL)
    x = np.linspace(-3, 3, 7)[:, None]
    mixture = analytic.GaussianMixture.gaussian(1, 0.7)
    np.testing.assert_allclose(
        jax.vmap(mixture.log_prob)(jnp.asarray(x)),
        scipy.stats.norm(0, 0.7).logpdf(x[:, 0]),
        rtol=CLOSED_FORM_RTOL,
    )


# --- sampling -------------------------------------------------------------------------


def _check_moments(mixture, x):
    """Sample mean and covariance against `mean()` and `covariance()`, within
    standard errors estimated from the samples (the mixture is not Gaussian)."""
    mean_error = np.abs(x.mean(axis=0) - np.asarray(mixture.mean()))
    assert np.all(mean_error < NUM_STANDARD_ERRORS * x.std(axis=0) / np.sqrt(len(x)))
    centred = x - np.asarray(mixture.mean())
    products = centred[:, :, None] * centred[:, None, :]
    covariance_error = np.abs(products.mean(axis=0) - np.asarray(mixture.covariance()))
    covariance_se = products.std(axis=0) / np.sqrt(len(x))
    assert np.all(covariance_error < NUM_STANDARD_ERRORS * covariance_se)


def test_sample_moments():
    mixture = _mixture("10d")
    keys = jax.random.split(jax.random.key(17), NUM_SAMPLES)
    _check_moments(mixture, np.asarray(_sample(mixture, keys)))


def test_sample_with_component_matches_weights():
    mixture = _mixture("2d")
    keys = jax.random.split(jax.random.key(19), NUM_SAMPLES)
    x, k = jax.jit(jax.vmap(lambda key: mixture.sample_with_component(key=key)))(keys)
    x, k = np.asarray(x), np.asarray(k)
    _check_moments(mixture, x)
    counts = np.bincount(k, minlength=mixture.num_components)
    result = scipy.stats.chisquare(counts, NUM_SAMPLES * np.asarray(mixture.weights))
    assert result.pvalue > CHI2_ALPHA
    # Each draw sits near its own component, in every coordinate.
    stds = np.asarray(mixture.stds)[k, None]
    distance = np.abs(x - np.asarray(mixture.means)[k])
    assert np.all(distance < NUM_COMPONENT_STDS * stds)


# --- float32 on the widest range ------------------------------------------------------


FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal, 1.2e-38
# float32 against float64 on the same float32 inputs and parameters, in ulps (2^-23)
# of a condition factor. Each component's log density `c_k` is a sum of terms no
# larger than `1 + |c_k|` (D squares summed: a few ulps of that); a logsumexp is a
# responsibility-weighted mean of them. A responsibility `r_k = softmax(c)_k` errs
# by `r_k` times the errors of `c_k` and of the mean, so every optimal prediction,
# a responsibility-weighted sum of per-component terms `(z - alpha mu_k) g_k`, errs
# by `sum_k r_k (1 + |c_k| + mean size) (|z| + alpha |mu_k|) |g_k|` ulps at most.
# Responsibilities below float32's normal range lose precision gracefully (an
# absolute floor of `FLOAT32_TINY`). Measured: at most 6.4 ulps (the data log density
# in 10-D, where the sum of squares has ten terms).
FLOAT32_ULPS = 16


def _float32_scales(mixture, z, logsnr):
    """Condition factors of every oracle output (see FLOAT32_ULPS), in float64."""
    means, stds, weights = (
        np.asarray(a, np.float64)
        for a in (mixture.means, mixture.stds, mixture.weights)
    )
    dim = means.shape[1]

    def components(scale, var):
        # c_k at z, its size, the responsibilities and the condition of each.
        spread = np.abs(z)[:, None, :] + scale[:, :, None] * np.abs(means)
        diff = z[:, None, :] - scale[:, :, None] * means
        c = (
            np.log(weights)
            - 0.5 * dim * np.log(2 * np.pi * var)
            - 0.5 * np.sum(diff**2, axis=-1) / var
        )
        r = np.exp(c - scipy.special.logsumexp(c, axis=-1, keepdims=True))
        size = 1 + np.abs(c)
        mean_size = np.sum(r * size, axis=-1)
        return spread, r, mean_size, r * (size + mean_size[:, None])

    ones = np.ones((len(z), 1))
    _, _, data_size, _ = components(ones, ones * stds**2)
    alpha2 = scipy.special.expit(logsnr)[:, None]
    sigma2 = scipy.special.expit(-logsnr)[:, None]
    alpha = np.sqrt(alpha2)
    var = alpha2 * stds**2 + sigma2
    spread, _, mean_size, condition = components(alpha, var)

    def weighted(gain):
        return np.sum(condition[:, :, None] * gain, axis=1)

    eps_terms = weighted(spread * (np.sqrt(sigma2) / var)[:, :, None])
    return dict(
        log_prob=data_size,
        marginal_log_prob=mean_size,
        posterior_weights=condition,
        score=weighted(spread / var[:, :, None]),
        eps_optimal=eps_terms,
        denoiser=eps_terms,
        x_optimal=weighted(
            np.abs(means) + (alpha * stds**2 / var)[:, :, None] * spread
        ),
    )


@pytest.mark.parametrize("name", ["1d", "10d"])
def test_float32_agrees_with_float64_on_widest_range(name):
    # A float32 oracle (the module's arrays cast, as for any Equinox module) against
    # float64 with the same, float32-rounded, parameters and inputs. (The fixture's
    # batch size, so float64 is not compiled again.)
    num = 300
    logsnr = np.linspace(-40.0, 40.0, num)
    x = _numpy_sample(name, num, seed=23)
    eps = np.random.default_rng(29).standard_normal(x.shape)
    z = np.sqrt(scipy.special.expit(logsnr))[:, None] * x
    z = z + np.sqrt(scipy.special.expit(-logsnr))[:, None] * eps
    z, logsnr = (np.asarray(a, np.float32).astype(np.float64) for a in (z, logsnr))
    single = jax.tree.map(lambda a: a.astype(jnp.float32), _mixture(name))
    double = jax.tree.map(lambda a: a.astype(jnp.float64), single)
    values = {}
    for dtype, mixture in ((jnp.float64, double), (jnp.float32, single)):
        values[dtype] = _evaluate(
            mixture, jnp.asarray(z, dtype), jnp.asarray(logsnr, dtype)
        )
        for key, value in values[dtype].items():
            assert value.dtype == dtype, (key, value.dtype)
            assert bool(jnp.all(jnp.isfinite(value))), (key, dtype)
    errors = {}
    for key, scale in _float32_scales(double, z, logsnr).items():
        reference = np.asarray(values[jnp.float64][key])
        error = np.abs(np.asarray(values[jnp.float32][key], np.float64) - reference)
        allowed = FLOAT32_EPS * scale + (
            FLOAT32_TINY if key == "posterior_weights" else 0
        )
        errors[key] = float(np.max(error / allowed))
    assert max(errors.values()) <= FLOAT32_ULPS, errors


# --- errors ---------------------------------------------------------------------------


GOOD = dict(means=np.zeros((2, 3)), stds=np.ones(2), weights=np.array([0.5, 0.5]))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(stds=np.array([1.0, 0.0])), r"stds=\[1\. 0\.\]"),
        (dict(stds=np.array([1.0, -2.0])), r"stds=\[ 1\. -2\.\]"),
        (dict(weights=np.array([0.5, 0.6])), r"weights=\[0\.5 0\.6\].*sum 1\.1"),
        (dict(weights=np.array([1.5, -0.5])), r"weights=\[ 1\.5 -0\.5\]"),
        (dict(means=np.array([[0.0, np.nan, 0.0], [0, 0, 0]])), "means must be finite"),
        (dict(stds=np.array([1.0, np.nan])), r"stds=\[ 1\. nan\]"),
        (dict(stds=np.array([1.0, np.inf])), r"stds=\[ 1\. inf\]"),
        (dict(weights=np.array([0.5, np.nan])), r"weights=\[0\.5 nan\]"),
    ],
)
def test_bad_parameters_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        analytic.GaussianMixture(**(GOOD | change))


@pytest.mark.parametrize(
    "change",
    [
        dict(stds=np.ones(3)),
        dict(weights=np.array([0.25, 0.25, 0.5])),
        dict(means=np.zeros(3)),
    ],
)
def test_mismatched_shapes_are_named(change):
    # Under runtime type checking jaxtyping rejects the shapes first (a TypeError
    # naming the argument and its shape); without it the constructor's own check
    # raises ValueError naming both shapes.
    with pytest.raises((ValueError, TypeError)) as info:
        analytic.GaussianMixture(**(GOOD | change))
    name = next(iter(change))
    assert name in str(info.value)
    assert str(change[name].shape[0]) in str(info.value)


def test_zero_weight_component_is_harmless():
    mixture = analytic.GaussianMixture(
        np.array([[0.0], [5.0]]), np.array([1.0, 1.0]), np.array([1.0, 0.0])
    )
    z = jnp.linspace(-3.0, 8.0, 12)[:, None]
    values = _evaluate(mixture, z, jnp.zeros(12))
    for key, value in values.items():
        assert bool(jnp.all(jnp.isfinite(value))), key
    np.testing.assert_allclose(
        values["marginal_log_prob"],
        scipy.stats.norm.logpdf(np.asarray(z[:, 0])),
        rtol=CLOSED_FORM_RTOL,
    )


@pytest.mark.parametrize("std", [-1.0, 0.0, np.nan, np.inf])
def test_gaussian_closed_forms_reject_bad_std(std):
    # Not a NaN (eps-MSE) or a plausible number (NLL of std=-1): an error naming it.
    with pytest.raises(ValueError, match=f"std={std}"):
        analytic.gaussian_eps_mse(std, 0.0)
    with pytest.raises(ValueError, match=f"std={std}"):
        analytic.gaussian_nll(std)
    # Traced, it is checked at run time.
    with pytest.raises(eqx.EquinoxRuntimeError, match="std must be a positive"):
        eqx.filter_jit(analytic.gaussian_nll)(jnp.asarray(std))


def test_weights_are_renormalised_after_the_check():
    # Within WEIGHT_SUM_TOLERANCE of one (a float32 rounding), accepted and divided by
    # their sum, so that the mixture is normalised in float64.
    weights = np.array([0.5, 0.5 + 5e-7])
    mixture = analytic.GaussianMixture(GOOD["means"], GOOD["stds"], weights)
    assert float(jnp.sum(mixture.weights)) == pytest.approx(1.0, abs=SOFTMAX_SUM_ATOL)
    np.testing.assert_allclose(
        mixture.weights, weights / weights.sum(), rtol=CLOSED_FORM_RTOL
    )
    with pytest.raises(ValueError, match=r"sum 1\.00001"):
        analytic.GaussianMixture(GOOD["means"], GOOD["stds"], np.array([0.5, 0.50001]))
