"""Weightings: closed forms, monotonicity, and the noise augmentation they imply.

The monotonicity column of PAPER.md Table 1 is recovered by computation, the
EDM-monotonic peak is checked against an independent root of the closed-form
derivative, and `p_w` is checked by quadrature, against its closed forms (logistic
for the sigmoid, exponential for `exp(-logsnr/2)`) and against its own sampler.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from elbo_core import weighting

# Closed forms evaluated in log space with numpy: agreement to four ulps (2.8e-14
# each) of the largest log-weight on the grid (|log w| <= ~160 on [-40, 40]);
# measured one ulp. `w = exp(log w)` turns that into the same relative error.
LOG_WEIGHT_ATOL = 1e-13
WEIGHT_RTOL = LOG_WEIGHT_ATOL
# `Shifted` subtracts the shift (|logsnr - shift| <= 11, an ulp of 1.8e-15) before
# the same log-weight, whose slope is below ~3 on [-10, 10].
SHIFTED_LOG_WEIGHT_ATOL = 1e-14
# `shift = 2 log(64 / resolution)`, |shift| <= 4.2: an ulp or two (8.9e-16 each).
SHIFT_ATOL = 1e-15
# The peak is a root of the slope of log w. Brent's method stops within
# xtol + 4 eps |peak| of it: 4e-15 + 3e-15 in the library (`PEAK_XTOL`), 1e-15 +
# 3e-15 for the reference root here; the slope's rounding (~1e-16 over its
# derivative ~0.35 at the root) places the root to ~1e-15. Measured 2.7e-15.
REFERENCE_XTOL = 1e-15
PEAK_ATOL = 2e-14
# PAPER.md section 5 quotes the peak to three decimals, -3.308: half a unit of the
# last digit.
PAPER_PEAK = -3.308
PAPER_PEAK_ATOL = 5e-4
# A derivative-free minimiser locates a smooth maximum of f only to about
# sqrt(eps |f| / |f''|) ~ sqrt(2.2e-16 * 1 / 0.35) ~ 3e-8 (measured 4.6e-8).
MINIMISER_XATOL = 1e-10
MINIMISER_PEAK_ATOL = 5e-7
# The non-monotonic weightings of Table 1 rise clearly somewhere: the smallest
# largest slope of log w among them is above this (a verdict not set by rounding).
RISING_SLOPE_MIN = 0.1
# Composite Gauss-Legendre, 6 panels of 67 nodes (3 each side of p_w's kink, if
# any): every p_w here is analytic on each panel and in a strip around it (the
# nearest poles, of the logistic density, lie pi off the real axis; panels are at
# most 5 wide), so the rule's error is below 2^-130 of the integral and the sum's
# rounding (~400 * 1e-16) is what remains.
QUADRATURE_TOL = 1e-12
NUM_PANELS, NUM_NODES = 6, 67
# Central difference with step h: truncation h^2 |w'''| / 6 ~ 7e-11 for h = 1e-5
# and |w'''| <= ~4 relative to the largest w on the grid (which errors are divided
# by; EDM's is the largest), rounding eps |w| / h ~ 2e-11. Measured 6.5e-11.
FINITE_DIFFERENCE_STEP = 1e-5
FINITE_DIFFERENCE_ATOL = 3e-10
# `dweight` is `w` times `dlog_weight`: the same float64 factors, one product.
DWEIGHT_RTOL = 1e-15
# p_w against its closed forms on narrow ranges: exp of log-weights of size <= ~10
# (an ulp of 1.8e-15) times a slope, against scipy's logistic and exponential
# densities to a few ulps. Measured 1.3e-15.
P_W_CLOSED_FORM_RTOL = 1e-14
# Significance of the sampler tests: a correct sampler fails with this probability
# over keys (the keys are fixed, so the outcome is deterministic).
SAMPLER_ALPHA = 1e-3
NUM_SAMPLES = 4000

# PAPER.md Table 1 and section 5: is the weighting non-increasing in logsnr?
PAPER_MONOTONIC = {
    "elbo": True,
    "eps_cosine": False,
    "edm": False,
    "v_cosine": True,
    "fm_ot": True,
    "indi": True,
    "p2": False,
    "min_snr": False,
    "sigmoid": True,
    "edm_monotonic": True,
}


def _log_sech(x):
    return np.log(2.0) - np.logaddexp(x, -x)


def _log_edm(logsnr):
    log_normal = scipy.stats.norm.logpdf(logsnr, 2.4, 2.4)
    return log_normal + np.logaddexp(-logsnr, 2 * np.log(0.5)) - 2 * np.log(0.5)


# Closed forms of the module docstring (PAPER.md Table 1), default constants.
CLOSED_FORMS = {
    "elbo": lambda x: np.zeros_like(x),
    "eps_cosine": lambda x: _log_sech(x / 2),
    "edm": _log_edm,
    "v_cosine": lambda x: -x / 2,
    "fm_ot": lambda x: -x / 2,
    "indi": lambda x: -x + 2 * _log_sech(x / 4),
    "p2": lambda x: _log_sech(x / 2) - np.logaddexp(0.0, x),
    "min_snr": lambda x: _log_sech(x / 2) + np.minimum(0.0, np.log(5.0) - x),
    "sigmoid": lambda x: -np.logaddexp(0.0, x - 2.0),
}


ALL_CASES = {
    **{name: weighting.get_weighting(name) for name in sorted(weighting.WEIGHTINGS)},
    "shifted_edm_monotonic_512": weighting.Shifted(
        weighting.EDMMonotonic(), resolution=512
    ),
    "shifted_sigmoid_128": weighting.Shifted(weighting.Sigmoid(), resolution=128),
}


def _edm_log_slope(logsnr):
    """d log w_edm / dlogsnr, written out by hand."""
    return -(logsnr - 2.4) / 2.4**2 - 1 / (1 + 0.25 * np.exp(logsnr))


# One grid shape for every evaluation, so each weighting is compiled once per dtype.
NUM_GRID = 402
GRID = np.linspace(-40.0, 40.0, NUM_GRID)


@eqx.filter_jit
def _evaluate(weighting, logsnr, bounds, keys=None):
    """Every pointwise quantity of a weighting on a grid, in one compiled call.

    `bounds = (logsnr_min, logsnr_max)` of `p_w` are traced, so changing them does
    not recompile. With `keys`, also `sample_augmentation` draws on [-40, 40] in the
    grid's dtype.
    """
    lo, hi = bounds[0], bounds[1]
    draws = None
    if keys is not None:
        with jax.ensure_compile_time_eval():  # concrete end points, as required
            lo_40 = jnp.asarray(-40.0, logsnr.dtype)
            hi_40 = jnp.asarray(40.0, logsnr.dtype)
        draws = jax.vmap(
            lambda key: weighting.sample_augmentation(lo_40, hi_40, key=key)
        )(keys)
    return dict(
        draws=draws,
        weight=jax.vmap(weighting)(logsnr),
        log_weight=jax.vmap(weighting.log_weight)(logsnr),
        dlog_weight=jax.vmap(weighting.dlog_weight)(logsnr),
        dweight=jax.vmap(weighting.dweight)(logsnr),
        augmentation_density=jax.vmap(
            lambda x: weighting.augmentation_density(x, lo, hi)
        )(logsnr),
        augmentation_point_mass=weighting.augmentation_point_mass(lo, hi),
    )


def _values(w, logsnr=GRID, lo=-40.0, hi=40.0, dtype=jnp.float64, keys=None):
    """`_evaluate` as numpy arrays, with the end points in the grid's dtype."""
    bounds = jnp.asarray([lo, hi], dtype)
    values = _evaluate(w, jnp.asarray(logsnr, dtype), bounds, keys)
    return {k: np.asarray(v) for k, v in values.items() if v is not None}


# --- closed forms and monotonicity --------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_closed_forms(name):
    values = _values(ALL_CASES[name])
    np.testing.assert_allclose(
        values["log_weight"], CLOSED_FORMS[name](GRID), rtol=0, atol=LOG_WEIGHT_ATOL
    )
    np.testing.assert_allclose(
        values["weight"], np.exp(CLOSED_FORMS[name](GRID)), rtol=WEIGHT_RTOL
    )


@pytest.mark.parametrize("name", sorted(PAPER_MONOTONIC))
def test_monotonicity_matches_table_1(name):
    w = weighting.get_weighting(name)
    assert w.is_monotonic() == PAPER_MONOTONIC[name]
    # Not a rounding verdict: the non-monotonic ones rise clearly somewhere.
    if PAPER_MONOTONIC[name]:
        assert w.max_log_slope() <= 0
    else:
        assert w.max_log_slope() > RISING_SLOPE_MIN


@pytest.mark.parametrize("bias", [1, 2, 3, 4, 5])
def test_sigmoid_monotonic_for_every_bias(bias):
    assert weighting.Sigmoid(bias=bias).is_monotonic()
    assert weighting.Sigmoid(bias=bias).is_monotonic(-40.0, 40.0)


@pytest.mark.parametrize("resolution", [128, 512])
@pytest.mark.parametrize("name", sorted(PAPER_MONOTONIC))
def test_shifted_keeps_monotonicity_and_shifts(name, resolution):
    base = weighting.get_weighting(name)
    shifted = weighting.Shifted(base, resolution=resolution)
    shift = 2 * math.log(64 / resolution)
    assert shifted.shift == pytest.approx(shift, abs=SHIFT_ATOL)
    assert shifted.is_monotonic() == PAPER_MONOTONIC[name]
    logsnr = jnp.linspace(-10.0, 10.0, 5)
    np.testing.assert_allclose(
        jax.vmap(shifted.log_weight)(logsnr),
        jax.vmap(base.log_weight)(logsnr - shift),
        rtol=0,
        atol=SHIFTED_LOG_WEIGHT_ATOL,
    )


def test_edm_monotonic_peak_and_shape():
    w = weighting.EDMMonotonic()
    # The peak is the root of the closed-form derivative, found independently.
    peak = scipy.optimize.brentq(_edm_log_slope, -10.0, 0.0, xtol=REFERENCE_XTOL)
    assert abs(w.logsnr_peak - peak) < PEAK_ATOL
    assert abs(w.logsnr_peak - PAPER_PEAK) < PAPER_PEAK_ATOL
    # Equal to w_edm above the peak, flat at w_edm(peak) below it.
    logsnr = GRID
    values = _values(ALL_CASES["edm_monotonic"])
    edm = _log_edm(logsnr)
    above = logsnr >= peak
    np.testing.assert_allclose(
        values["log_weight"][above], edm[above], rtol=0, atol=LOG_WEIGHT_ATOL
    )
    np.testing.assert_allclose(
        values["log_weight"][~above], _log_edm(peak), rtol=0, atol=LOG_WEIGHT_ATOL
    )
    assert np.all(values["dlog_weight"][~above] == 0)
    # It dominates w_edm everywhere.
    assert np.all(values["log_weight"] >= edm - LOG_WEIGHT_ATOL)


# --- the implied noise augmentation p_w ---------------------------------------------


MONOTONIC_CASES = {
    "elbo": weighting.ELBO(),
    "v_cosine": weighting.VCosine(),
    "fm_ot": weighting.FlowMatchingOT(),
    "indi": weighting.InDI(),
    **{f"sigmoid_{b}": weighting.Sigmoid(bias=b) for b in range(1, 6)},
    "edm_monotonic": weighting.EDMMonotonic(),
    # The same shifted variants as ALL_CASES, so their compilations are shared.
    "shifted_sigmoid_128": weighting.Shifted(weighting.Sigmoid(), resolution=128),
    "shifted_edm_monotonic_512": weighting.Shifted(
        weighting.EDMMonotonic(), resolution=512
    ),
}


def _kink(w):
    """Where `p_w` jumps (EDM-monotonic's peak, shifted with the weighting), if any."""
    if isinstance(w, weighting.EDMMonotonic):
        return w.logsnr_peak
    if isinstance(w, weighting.Shifted):
        inner = _kink(w.weighting)
        return None if inner is None else inner + w.shift
    return None


INTEGRATION_CASES = [(name, -15.0, 15.0) for name in sorted(MONOTONIC_CASES)] + [
    ("v_cosine", -6.0, 3.0),
    ("sigmoid_2", -6.0, 3.0),
    ("edm_monotonic", -6.0, 3.0),
]


def _gauss_legendre(logsnr_min, logsnr_max, kink):
    """Composite Gauss-Legendre nodes and weights, with a panel edge at the kink."""
    split = kink if kink is not None and logsnr_min < kink < logsnr_max else None
    if split is None:
        split = (logsnr_min + logsnr_max) / 2
    edges = np.concatenate(
        [
            np.linspace(logsnr_min, split, NUM_PANELS // 2 + 1),
            np.linspace(split, logsnr_max, NUM_PANELS // 2 + 1)[1:],
        ]
    )
    nodes, weights = np.polynomial.legendre.leggauss(NUM_NODES)
    half = np.diff(edges)[:, None] / 2
    middle = (edges[:-1, None] + edges[1:, None]) / 2
    return (middle + half * nodes).ravel(), (half * weights).ravel()


@pytest.mark.parametrize("name, logsnr_min, logsnr_max", INTEGRATION_CASES)
def test_augmentation_density_integrates_to_one(name, logsnr_min, logsnr_max):
    w = MONOTONIC_CASES[name]
    nodes, weights = _gauss_legendre(logsnr_min, logsnr_max, _kink(w))
    values = _values(w, nodes, logsnr_min, logsnr_max)
    total = np.sum(weights * values["augmentation_density"])
    point_mass = float(values["augmentation_point_mass"])
    assert abs(total + point_mass - 1) < QUADRATURE_TOL, (total, point_mass)
    assert 0 <= point_mass <= 1


@pytest.mark.parametrize("bias", [1, 2, 3, 4, 5])
def test_sigmoid_augmentation_is_logistic(bias):
    # p_w of sigmoid(b - logsnr) is the Logistic(b, 1) density, renormalised by the
    # truncation at logsnr_min: divided by its survival function there.
    lo, hi = -3.0, 6.0  # narrow, so that the truncation normalisation matters
    logsnr = np.linspace(lo, hi, NUM_GRID)
    values = _values(weighting.Sigmoid(bias=bias), logsnr, lo, hi)
    logistic = scipy.stats.logistic(loc=bias)
    np.testing.assert_allclose(
        values["augmentation_density"],
        logistic.pdf(logsnr) / logistic.sf(lo),
        rtol=P_W_CLOSED_FORM_RTOL,
    )
    np.testing.assert_allclose(
        values["augmentation_point_mass"],
        logistic.sf(hi) / logistic.sf(lo),
        rtol=P_W_CLOSED_FORM_RTOL,
    )


@pytest.mark.parametrize("name", ["v_cosine", "fm_ot"])
def test_exp_half_augmentation_is_exponential(name):
    # p_w of exp(-logsnr/2) is exponential in logsnr with rate 1/2, from logsnr_min;
    # the tail beyond logsnr_max is the point mass.
    lo, hi = -6.0, 3.0
    logsnr = np.linspace(lo, hi, NUM_GRID)
    values = _values(ALL_CASES[name], logsnr, lo, hi)
    exponential = scipy.stats.expon(loc=lo, scale=2.0)
    np.testing.assert_allclose(
        values["augmentation_density"],
        exponential.pdf(logsnr),
        rtol=P_W_CLOSED_FORM_RTOL,
    )
    np.testing.assert_allclose(
        values["augmentation_point_mass"],
        exponential.sf(hi),
        rtol=P_W_CLOSED_FORM_RTOL,
    )


def test_augmentation_density_zero_outside_range():
    lo, hi = -6.0, 3.0
    outside = (GRID < lo) | (GRID > hi)
    assert outside.sum() > 300
    for name in ("sigmoid", "edm_monotonic", "eps_cosine"):
        values = _values(ALL_CASES[name], GRID, lo, hi)
        assert np.all(values["augmentation_density"][outside] == 0), name


def test_non_monotonic_augmentation_has_negative_part():
    # The signed p_w of the by-parts decomposition: some ELBOs get negative weight.
    for name in ("eps_cosine", "edm", "p2", "min_snr"):
        values = _values(ALL_CASES[name], GRID, -15.0, 15.0)
        assert values["augmentation_density"].min() < 0, name


# Ranges where the point mass at logsnr_max is substantial, to test it too.
SAMPLER_CASES = {
    "elbo": (weighting.ELBO(), -5.0, 5.0),
    "v_cosine": (weighting.VCosine(), -6.0, 2.0),
    "sigmoid_2_40": (weighting.Sigmoid(bias=2.0), -40.0, 40.0),
    "edm_monotonic": (weighting.EDMMonotonic(), -10.0, 6.0),
    "shifted_sigmoid_256": (
        weighting.Shifted(weighting.Sigmoid(bias=2.0), resolution=256),
        -10.0,
        3.0,
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLER_CASES))
def test_sample_augmentation_matches_p_w(name):
    w, lo, hi = SAMPLER_CASES[name]
    keys = jax.random.split(jax.random.key(2024), NUM_SAMPLES)
    draws = jax.jit(jax.vmap(lambda key: w.sample_augmentation(lo, hi, key=key)))(keys)
    draws = np.asarray(draws)
    assert np.all((draws >= lo) & (draws <= hi))

    # The fraction of draws in the point mass at logsnr_max: a binomial test.
    point_mass = float(w.augmentation_point_mass(lo, hi))
    in_mass = draws == hi
    if point_mass == 1:
        assert np.all(in_mass)
        return
    binomial = scipy.stats.binomtest(int(in_mass.sum()), NUM_SAMPLES, point_mass)
    assert binomial.pvalue > SAMPLER_ALPHA, (in_mass.mean(), point_mass)

    # The rest against the continuous part of the CDF, 1 - w(logsnr) / w(lo),
    # conditioned on missing the point mass: a KS test.
    log_w = jax.jit(jax.vmap(w.log_weight))
    log_w_lo = float(w.log_weight(lo))

    def conditional_cdf(x):
        cdf = 1 - np.exp(np.asarray(log_w(jnp.asarray(x))) - log_w_lo)
        return cdf / (1 - point_mass)

    result = scipy.stats.kstest(draws[~in_mass], conditional_cdf)
    assert result.pvalue > SAMPLER_ALPHA, result


@pytest.mark.parametrize("name", ["eps_cosine", "edm", "p2", "min_snr"])
def test_sample_augmentation_rejects_non_monotonic(name):
    w = weighting.get_weighting(name)
    with pytest.raises(ValueError, match="not monotonic"):
        w.sample_augmentation(-15.0, 15.0, key=jax.random.key(0))


def test_sample_augmentation_accepts_monotonic_restriction():
    # eps_cosine is monotonic on [0, 15]; there it is a valid augmentation.
    w = weighting.EpsCosine()
    draw = w.sample_augmentation(0.0, 15.0, key=jax.random.key(0))
    assert 0.0 <= float(draw) <= 15.0


# --- derivatives and float32 ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_MONOTONIC))
def test_dweight_is_finite_difference(name):
    # Off the kinks of min_snr (log 5) and edm_monotonic (its peak).
    logsnr = np.linspace(-8.0, 8.0, NUM_GRID // 3) + 0.0123
    h = FINITE_DIFFERENCE_STEP
    values = _values(ALL_CASES[name], np.concatenate([logsnr, logsnr + h, logsnr - h]))
    weight = values["weight"].reshape(3, -1)
    scale = np.max(weight[0])
    central = (weight[1] - weight[2]) / (2 * h)
    dweight = values["dweight"].reshape(3, -1)[0]
    np.testing.assert_allclose(
        dweight / scale, central / scale, rtol=0, atol=FINITE_DIFFERENCE_ATOL
    )
    dlog_weight = values["dlog_weight"].reshape(3, -1)[0]
    np.testing.assert_allclose(dweight, dlog_weight * weight[0], rtol=DWEIGHT_RTOL)


FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal, 1.2e-38
FLOAT32_MAX = float(np.finfo(np.float32).max)
# float32 against float64 on the same float32 grid, in ulps (2^-23) of a condition
# factor. Every log-weight is a sum of terms (logsnr / 2, log sech, log sigmoid,
# EDM's quadratic) each no larger than `1 + |logsnr| + |log w|`, rounded to an ulp
# of that: `size`. `w = exp(log w)` turns it into a relative error; the slope of
# `log w` is a few terms of size `max(1, |dlog w|)`; p_w and its point mass are
# exps of differences of two log-weights times a slope. Below float32's normal
# range a value loses relative precision gracefully (absolute error under
# `FLOAT32_TINY` times its factor). Measured: at most 4.2 ulps (EDM's slope).
FLOAT32_ULPS = 16
# Monotonic weightings whose float32 draws on [-40, 40] are checked (one of each
# shape; the sampler is compiled afresh for each, which is the slow part).
FLOAT32_SAMPLER_CASES = ("sigmoid", "edm_monotonic", "shifted_edm_monotonic_512")
FLOAT32_GRID = np.asarray(GRID, np.float32).astype(np.float64)


def _float32_scales(w, values):
    """(relative scale, absolute floor) of each output's float32 error, from the
    float64 values on `FLOAT32_GRID` with p_w on [-40, 40]."""
    log_w = values["log_weight"]
    log_w_min, log_w_max = float(w.log_weight(-40.0)), float(w.log_weight(40.0))
    size = 1 + np.abs(FLOAT32_GRID) + np.abs(log_w)
    slope = np.maximum(1, np.abs(values["dlog_weight"]))
    relative = np.exp(log_w - log_w_min)
    return dict(
        log_weight=(size, 0.0),
        weight=(values["weight"] * size, FLOAT32_TINY),
        dlog_weight=(slope, 0.0),
        dweight=(values["weight"] * size * slope, FLOAT32_TINY * slope),
        augmentation_density=(
            relative * slope * (size + 41 + abs(log_w_min)),
            FLOAT32_TINY * slope,
        ),
        augmentation_point_mass=(
            values["augmentation_point_mass"] * (82 + abs(log_w_min) + abs(log_w_max)),
            FLOAT32_TINY,
        ),
    )


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_float32_agrees_with_float64_on_widest_range(name):
    w = ALL_CASES[name]
    monotonic = w.is_monotonic(-40.0, 40.0)
    values = {}
    for dtype in (jnp.float64, jnp.float32):
        # Draws in float32 here; float64 draws on [-40, 40] are in the sampler test
        # (the two precisions draw different uniforms, so they are not compared).
        keys = None
        if name in FLOAT32_SAMPLER_CASES and dtype == jnp.float32:
            keys = jax.random.split(jax.random.key(0), 64)
        grid = jnp.asarray(FLOAT32_GRID, dtype)
        values[dtype] = _evaluate(w, grid, jnp.asarray([-40.0, 40.0], dtype), keys)
        if keys is None:
            del values[dtype]["draws"]
        else:
            draws = values[dtype].pop("draws")
            assert draws.dtype == dtype
            assert bool(jnp.all(jnp.isfinite(draws)))
            assert bool(jnp.all((draws >= -40) & (draws <= 40)))
        for key, value in values[dtype].items():
            assert value.dtype == dtype, (key, value.dtype)
    reference = {k: np.asarray(v) for k, v in values[jnp.float64].items()}
    for key, value in reference.items():
        assert np.all(np.isfinite(value)), key

    errors = {}
    for key, (scale, floor) in _float32_scales(w, reference).items():
        value = np.asarray(values[jnp.float32][key], np.float64)
        # NOTE: the signed p_w of EDM is w(logsnr) / w(-40) ~ e^119 at high logsnr,
        # beyond float32's range: there float32 overflows (to the largest floats or
        # infinity) with the right sign, and the same levels are compared in log
        # space through `log_weight`. Every other value is representable in float32.
        overflow = np.abs(reference[key]) >= FLOAT32_MAX
        if monotonic or key != "augmentation_density":
            assert not np.any(overflow), key
        assert np.all(np.sign(value[overflow]) == np.sign(reference[key][overflow]))
        error = np.abs(value - reference[key])[~overflow]
        allowed = FLOAT32_EPS * np.broadcast_to(scale, overflow.shape)[~overflow]
        allowed = allowed + np.broadcast_to(floor, overflow.shape)[~overflow]
        errors[key] = float(np.max(error / allowed))
    assert max(errors.values()) <= FLOAT32_ULPS, errors
    if monotonic:
        assert bool(jnp.all(values[jnp.float32]["augmentation_density"] >= 0))


# --- errors ---------------------------------------------------------------------------


def test_registry():
    assert set(weighting.WEIGHTINGS) == set(PAPER_MONOTONIC)
    for name, cls in weighting.WEIGHTINGS.items():
        assert type(weighting.get_weighting(name)) is cls


def test_unknown_weighting_lists_valid_names():
    with pytest.raises(ValueError, match="valid names") as info:
        weighting.get_weighting("sigmoidal")
    assert "'sigmoidal'" in str(info.value)
    for name in weighting.WEIGHTINGS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: weighting.EDM(p_std=0.0), "p_std=0.0"),
        (lambda: weighting.EDM(sigma_data=-0.5), "sigma_data=-0.5"),
        (lambda: weighting.EDMMonotonic(p_std=-1.0), "p_std=-1.0"),
        (lambda: weighting.EDM(p_mean=np.nan), "p_mean=nan"),
        (lambda: weighting.EDMMonotonic(p_mean=np.nan), "p_mean=nan"),
        (lambda: weighting.EDM(sigma_data=np.inf), "sigma_data=inf"),
        (lambda: weighting.P2(k=0.0), "k=0.0"),
        (lambda: weighting.P2(gamma=np.nan), "gamma=nan"),
        (lambda: weighting.P2(gamma=-np.inf), "gamma=-inf"),
        (lambda: weighting.MinSNR(gamma=-5.0), "gamma=-5.0"),
        (lambda: weighting.MinSNR(gamma=np.nan), "gamma=nan"),
        (lambda: weighting.Sigmoid(bias=np.nan), "bias=nan"),
        (lambda: weighting.Sigmoid(bias=np.inf), "bias=inf"),
        (lambda: weighting.Shifted(weighting.ELBO(), resolution=0), "resolution=0.0"),
        (
            lambda: weighting.Shifted(weighting.ELBO(), resolution=-128),
            "resolution=-128.0",
        ),
    ],
)
def test_bad_constants_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("lo, hi", [(3.0, -3.0), (2.0, 2.0)])
def test_bad_range_names_both_values(lo, hi):
    w = weighting.Sigmoid()
    for call in (
        lambda: w.is_monotonic(lo, hi),
        lambda: w.sample_augmentation(lo, hi, key=jax.random.key(0)),
        lambda: w.augmentation_point_mass(lo, hi),
        lambda: w.augmentation_density(0.0, lo, hi),
        # Concrete end points are checked when traced with a traced level.
        lambda: jax.jit(lambda x: w.augmentation_density(x, lo, hi))(0.0),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert f"logsnr_min={lo}" in str(info.value)
        assert f"logsnr_max={hi}" in str(info.value)


@pytest.mark.parametrize("lo, hi", [(5.0, -5.0), (np.nan, 5.0)])
def test_traced_bad_range_is_a_runtime_error(lo, hi):
    # Under jit the end points may be traced: the range is checked at run time.
    w = weighting.Sigmoid()
    density = eqx.filter_jit(w.augmentation_density)
    point_mass = eqx.filter_jit(w.augmentation_point_mass)
    message = "logsnr_min must be below logsnr_max"
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        density(0.0, jnp.asarray(lo), jnp.asarray(hi))
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        point_mass(jnp.asarray(lo), jnp.asarray(hi))
    # A good traced range passes through the check unchanged.
    assert float(point_mass(jnp.asarray(-5.0), jnp.asarray(5.0))) == pytest.approx(
        float(w.augmentation_point_mass(-5.0, 5.0)), rel=DWEIGHT_RTOL
    )


@pytest.mark.parametrize("num_points", [1, 0, -3])
def test_monotonicity_grid_needs_two_points(num_points):
    # One point would check no slope between two levels at all.
    w = weighting.Sigmoid()
    for call in (w.is_monotonic, w.max_log_slope):
        with pytest.raises(ValueError, match=f"num_points={num_points}"):
            call(-5.0, 5.0, num_points)
    assert w.is_monotonic(-5.0, 5.0, 2)


def test_normalized_peaks_at_one():
    logsnr = jnp.asarray(GRID)
    for name in ("eps_cosine", "edm", "sigmoid"):
        values = weighting.normalized(ALL_CASES[name], logsnr)
        # The largest point is exp(0): exactly one.
        assert float(jnp.max(values)) == 1.0
        assert bool(jnp.all((values >= 0) & (values <= 1)))


def test_edm_monotonic_peak_from_logsnr_closed_form():
    # The same peak located on the numpy formula by a bounded minimiser, a check
    # that uses no derivative at all.
    result = scipy.optimize.minimize_scalar(
        lambda x: -_log_edm(x),
        bounds=(-10, 0),
        method="bounded",
        options={"xatol": MINIMISER_XATOL},
    )
    peak = weighting.EDMMonotonic().logsnr_peak
    assert abs(peak - result.x) < MINIMISER_PEAK_ATOL
