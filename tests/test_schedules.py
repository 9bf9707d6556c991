"""Noise schedules against autodiff, quadrature, closed forms and their own samples.

Every schedule is checked on several truncation ranges, including the widest one the
library promises, `[-40, 40]`, and the shifted cosine at resolutions 128 and 512.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from elbo_core import schedules

# Autodiff of `logsnr` and `t_of_logsnr` against the closed-form density: both sides
# are a handful of elementary functions evaluated in float64, so they agree to a few
# hundred ulps wherever the density is itself well conditioned.
DENSITY_AUTODIFF_RTOL = 1e-11
# Composite Gauss-Legendre, 100 equal panels of 20 nodes: exact for polynomials of
# degree 39 per panel. The densities are analytic in a strip around the real axis
# (nearest poles of sech(l/2) at +-i pi, of sech^2(l/4) at +-2 i pi; the Gaussian
# and the constants are entire), at least ~4 panel half-widths away for the widest
# range (panels of 0.8 on [-40, 40]), so the rule's error is below ~1e-40 of the
# integral and the sum's rounding (~2000 * 1e-16) is what remains.
QUADRATURE_TOL = 1e-12
NUM_PANELS, NUM_NODES = 100, 20
# Round trip `t -> logsnr -> t`: `t` is stored to ~1e-16 absolute, and the composed
# closed forms lose at most a few hundred ulps.
ROUNDTRIP_T_TOL = 1e-13
# Round trip `logsnr -> t -> logsnr`: an absolute error `ROUNDTRIP_T_TOL` in `t` moves
# `logsnr` by `ROUNDTRIP_T_TOL / p(logsnr)` (the inverse is that ill-conditioned
# where `p` is tiny), plus relative rounding of `logsnr` itself.
ROUNDTRIP_LOGSNR_RTOL = 1e-12
# Closed forms of PAPER.md section 1 evaluated with numpy/scipy in float64.
CLOSED_FORM_RTOL = 1e-10
# End points are produced exactly up to a few ulps of the range.
END_POINT_ATOL = 1e-12
# KS significance: a correct sampler fails with this probability over keys (the key
# is fixed, so the outcome is deterministic).
KS_ALPHA = 1e-3
# Outside the range `t` saturates: exactly 0 or 1 for the closed forms; for
# PiecewiseConstant a cumulative sum of bin masses, a few ulps of 1 (2.2e-16) off
# (measured 1.5e-16). The same bound holds for its `t` at and between bin edges.
SATURATION_ATOL = 1e-15
# `shift = 2 log(base / resolution)`, |shift| <= 5.6: an ulp or two (8.9e-16 each).
SHIFT_ATOL = 1e-15
# PiecewiseConstant's edges, masses and densities are one linspace step or one
# division of float64 numbers: an ulp or two relative (measured 3.3e-16).
PIECEWISE_RTOL = 1e-15
# Its `logsnr(t)` at a bin edge: the rounding of the cumulative mass in `t`
# (~1.5e-16) times `dlogsnr/dt = bin_width / mass` (<= 4.4 / 0.048 ~ 92 here).
PIECEWISE_LOGSNR_ATOL = 2e-14
NUM_SAMPLES = 2000
NUM_GRID = NUM_PANELS * NUM_NODES


SCHEDULE_CASES = {
    "cosine": lambda: schedules.Cosine(),
    "cosine_40": lambda: schedules.Cosine(logsnr_min=-40.0, logsnr_max=40.0),
    "cosine_asymmetric": lambda: schedules.Cosine(logsnr_min=-5.0, logsnr_max=20.0),
    "shifted_cosine_128": lambda: schedules.ShiftedCosine(resolution=128),
    "shifted_cosine_512_40": lambda: schedules.ShiftedCosine(
        resolution=512, logsnr_min=-40.0, logsnr_max=40.0
    ),
    "edm": lambda: schedules.EDM(),
    "edm_40": lambda: schedules.EDM(logsnr_min=-40.0, logsnr_max=40.0),
    "fm_ot_40": lambda: schedules.FlowMatchingOT(logsnr_min=-40.0, logsnr_max=40.0),
    "fm_ot_narrow": lambda: schedules.FlowMatchingOT(logsnr_min=-3.0, logsnr_max=7.0),
    "linear_40": lambda: schedules.Linear(logsnr_min=-40.0, logsnr_max=40.0),
    "piecewise_constant": lambda: schedules.PiecewiseConstant(
        jnp.array([1.0, 2.0, 3.0, 0.5, 4.0]), logsnr_min=-10.0, logsnr_max=12.0
    ),
}


def _logsnr_grid(schedule, num, dtype=jnp.float64):
    """`num` points over the range, end points included, off the bin edges."""
    grid = np.linspace(schedule.logsnr_min, schedule.logsnr_max, num)
    if isinstance(schedule, schedules.PiecewiseConstant):
        # The density jumps at interior edges; move grid points off them.
        edges = np.asarray(schedule.bin_edges())[1:-1]
        near = np.min(np.abs(grid[:, None] - edges[None, :]), axis=1)
        grid = np.where(near < 1e-3 * schedule.bin_width, grid + 1e-2, grid)
    return jnp.asarray(grid, dtype)


@eqx.filter_jit
def _evaluate(schedule, t, logsnr, keys=None):
    """Every quantity the tests need, for one schedule, in one compiled call."""

    def value_and_slope(fn, x):
        return jax.jvp(fn, (x,), (jnp.ones_like(x),))

    logsnr_of_t, dlogsnr_dt = jax.vmap(lambda t: value_and_slope(schedule.logsnr, t))(t)
    t_of_logsnr, dt_dlogsnr = jax.vmap(
        lambda logsnr: value_and_slope(schedule.t_of_logsnr, logsnr)
    )(logsnr)
    return dict(
        logsnr_of_t=logsnr_of_t,
        dlogsnr_dt=dlogsnr_dt,
        t_of_logsnr=t_of_logsnr,
        dt_dlogsnr=dt_dlogsnr,
        density=jax.vmap(schedule.density)(logsnr),
        log_density=jax.vmap(schedule.log_density)(logsnr),
        **({} if keys is None else _sample_values(schedule, keys)),
    )


def _sample_values(schedule, keys):
    samples = jax.vmap(lambda key: schedule.sample(key=key))(keys)
    return dict(
        samples=samples,
        # The CDF at the draws, P(logsnr' <= logsnr) = 1 - t(logsnr): uniform if
        # the draws follow the schedule (the probability integral transform).
        cdf_at_samples=1 - jax.vmap(schedule.t_of_logsnr)(samples),
    )


def _evaluate_twice(schedule, t, logsnr, keys=None):
    """`_evaluate` on the grids, then on its own outputs: the round trips."""
    first = _evaluate(schedule, t, logsnr, keys)
    second = _evaluate(schedule, first["t_of_logsnr"], first["logsnr_of_t"], keys)
    return first, second


@pytest.fixture(params=sorted(SCHEDULE_CASES), scope="module")
def case(request):
    schedule = SCHEDULE_CASES[request.param]()
    t = jnp.linspace(0.0, 1.0, NUM_GRID)
    logsnr = _logsnr_grid(schedule, NUM_GRID)
    keys = jax.random.split(jax.random.key(1234), NUM_SAMPLES)
    first, second = _evaluate_twice(schedule, t, logsnr, keys)
    first = {k: np.asarray(v) for k, v in first.items()}
    second = {k: np.asarray(v) for k, v in second.items()}
    # The density at Gauss-Legendre nodes, through the same compiled call.
    nodes, weights = _gauss_legendre(schedule)
    first["quadrature"] = np.sum(
        weights
        * np.asarray(_evaluate(schedule, t, jnp.asarray(nodes), keys)["density"])
    )
    return request.param, schedule, np.asarray(t), np.asarray(logsnr), first, second


def _gauss_legendre(schedule):
    """Composite Gauss-Legendre nodes and weights on the schedule's range; with
    PiecewiseConstant's 5 bins, panel edges fall on the bin edges."""
    nodes, weights = np.polynomial.legendre.leggauss(NUM_NODES)
    edges = np.linspace(schedule.logsnr_min, schedule.logsnr_max, NUM_PANELS + 1)
    half = np.diff(edges)[:, None] / 2
    middle = (edges[:-1, None] + edges[1:, None]) / 2
    return (middle + half * nodes).ravel(), (half * weights).ravel()


def test_density_is_minus_dt_dlogsnr(case):
    *_, first, _ = case
    np.testing.assert_allclose(
        -first["dt_dlogsnr"], first["density"], rtol=DENSITY_AUTODIFF_RTOL, atol=0
    )


def test_density_is_inverse_of_dlogsnr_dt(case):
    # On the t grid, end points included: p(logsnr(t)) (-dlogsnr/dt) = 1.
    *_, first, second = case
    np.testing.assert_allclose(
        -second["density"] * first["dlogsnr_dt"], 1.0, rtol=DENSITY_AUTODIFF_RTOL
    )


def test_density_integrates_to_one(case):
    *_, first, _ = case
    assert abs(first["quadrature"] - 1) < QUADRATURE_TOL, first["quadrature"]


def test_round_trips(case):
    _, _, t, logsnr, first, second = case
    np.testing.assert_allclose(second["t_of_logsnr"], t, rtol=0, atol=ROUNDTRIP_T_TOL)
    bound = ROUNDTRIP_T_TOL / first["density"]
    bound = bound + ROUNDTRIP_LOGSNR_RTOL * np.maximum(1, np.abs(logsnr))
    error = np.abs(second["logsnr_of_t"] - logsnr)
    assert np.all(error <= bound), float(np.max(error / bound))


def test_end_points_and_strict_decrease(case):
    _, schedule, t, logsnr, first, _ = case
    assert t[0] == 0 and t[-1] == 1
    assert logsnr[0] == schedule.logsnr_min and logsnr[-1] == schedule.logsnr_max
    assert abs(first["logsnr_of_t"][0] - schedule.logsnr_max) < END_POINT_ATOL
    assert abs(first["logsnr_of_t"][-1] - schedule.logsnr_min) < END_POINT_ATOL
    assert abs(first["t_of_logsnr"][0] - 1) < END_POINT_ATOL
    assert abs(first["t_of_logsnr"][-1]) < END_POINT_ATOL
    assert np.all(np.diff(first["logsnr_of_t"]) < 0)
    assert np.all(first["dlogsnr_dt"] < 0)
    assert np.all(first["density"] > 0)


def test_density_zero_outside_range(case):
    _, schedule, t, *_ = case
    lo, hi = schedule.logsnr_min, schedule.logsnr_max
    # Same shapes as the fixture's grids, so `_evaluate` is not compiled again.
    below = -np.geomspace(1e-6, 1e3, NUM_GRID // 2) + lo
    above = np.geomspace(1e-6, 1e3, NUM_GRID - NUM_GRID // 2) + hi
    outside = np.concatenate([below, above])
    keys = jax.random.split(jax.random.key(0), NUM_SAMPLES)
    values = _evaluate(schedule, jnp.asarray(t), jnp.asarray(outside), keys)
    values = {k: np.asarray(v) for k, v in values.items()}
    assert np.all(values["density"] == 0)
    assert np.all(values["log_density"] == -np.inf)
    # The inverse saturates, flat: t = 1 below the range, 0 above it.
    saturated = values["t_of_logsnr"]
    np.testing.assert_allclose(saturated[: len(below)], 1, atol=SATURATION_ATOL)
    np.testing.assert_allclose(saturated[len(below) :], 0, atol=SATURATION_ATOL)
    assert np.all(values["dt_dlogsnr"] == 0)


def test_sample_matches_cdf(case):
    # KS test of `sample` against the CDF `1 - t(logsnr)`, as the test of the CDF
    # values at the draws against U(0, 1).
    _, schedule, *_, first, _ = case
    draws = first["samples"]
    assert np.all((draws >= schedule.logsnr_min) & (draws <= schedule.logsnr_max))
    result = scipy.stats.kstest(first["cdf_at_samples"], "uniform")
    assert result.pvalue > KS_ALPHA, result


# --- closed forms of PAPER.md section 1 --------------------------------------------


def _cosine_mass(lo, hi):
    # Integral of sech(l/2) / (2 pi) over [lo, hi] is (2/pi)(atan e^(hi/2) - ...).
    return 2 / np.pi * (np.arctan(np.exp(hi / 2)) - np.arctan(np.exp(lo / 2)))


def _closed_forms(name, lo, hi, resolution=None):
    """Untruncated `logsnr(t)` truncated as in PAPER.md, and `p(logsnr)` with mass."""
    if name == "cosine":
        t_lo, t_hi = np.arctan(np.exp(-hi / 2)), np.arctan(np.exp(-lo / 2))

        def logsnr(t):
            return -2 * np.log(np.tan(t_lo + t * (t_hi - t_lo)))

        def density(x):
            return 1 / np.cosh(x / 2) / (2 * np.pi) / _cosine_mass(lo, hi)

        return logsnr, density
    if name == "shifted_cosine":
        shift = 2 * np.log(64 / resolution)
        base_logsnr, base_density = _closed_forms("cosine", lo - shift, hi - shift)
        return (lambda t: base_logsnr(t) + shift), (lambda x: base_density(x - shift))
    if name == "edm":
        mean, std = 2.4, 2.4
        cdf_lo = scipy.stats.norm.cdf((lo - mean) / std)
        cdf_hi = scipy.stats.norm.cdf((hi - mean) / std)

        def logsnr(t):
            return mean + std * scipy.stats.norm.ppf(cdf_hi - t * (cdf_hi - cdf_lo))

        def density(x):
            return scipy.stats.norm.pdf(x, mean, std) / (cdf_hi - cdf_lo)

        return logsnr, density
    if name == "fm_ot":
        # Path sigma_p = t untruncated; truncated, it runs over [sigmoid(-hi/2),
        # sigmoid(-lo/2)]. Logistic density of scale 2: sech^2(l/4)/8.
        s_lo, s_hi = scipy.special.expit(-hi / 2), scipy.special.expit(-lo / 2)
        mass = scipy.special.expit(hi / 2) - scipy.special.expit(lo / 2)

        def logsnr(t):
            path_sigma = s_lo + t * (s_hi - s_lo)
            return 2 * np.log((1 - path_sigma) / path_sigma)

        def density(x):
            return 1 / np.cosh(x / 4) ** 2 / 8 / mass

        return logsnr, density
    if name == "linear":
        return (lambda t: hi + t * (lo - hi)), (
            lambda x: np.full_like(x, 1 / (hi - lo))
        )
    raise AssertionError(name)


# Each case's family, range and resolution, for the closed forms.
CLOSED_FORM_SPECS = {
    "cosine": ("cosine", -15.0, 15.0, None),
    "cosine_40": ("cosine", -40.0, 40.0, None),
    "cosine_asymmetric": ("cosine", -5.0, 20.0, None),
    "shifted_cosine_128": ("shifted_cosine", -15.0, 15.0, 128),
    "shifted_cosine_512_40": ("shifted_cosine", -40.0, 40.0, 512),
    "edm": ("edm", -15.0, 15.0, None),
    "edm_40": ("edm", -40.0, 40.0, None),
    "fm_ot_40": ("fm_ot", -40.0, 40.0, None),
    "fm_ot_narrow": ("fm_ot", -3.0, 7.0, None),
    "linear_40": ("linear", -40.0, 40.0, None),
}


# (PiecewiseConstant has its own closed-form test below.)
@pytest.mark.parametrize("case", sorted(CLOSED_FORM_SPECS), indirect=True)
def test_closed_forms(case):
    name, schedule, t, logsnr, first, _ = case
    family, lo, hi, resolution = CLOSED_FORM_SPECS[name]
    assert (schedule.logsnr_min, schedule.logsnr_max) == (lo, hi)
    logsnr_ref, density_ref = _closed_forms(family, lo, hi, resolution)
    # Away from t = 0, 1, where the closed forms in t lose precision in the tails.
    interior = (t >= 0.02) & (t <= 0.98)
    np.testing.assert_allclose(
        first["logsnr_of_t"][interior],
        logsnr_ref(t[interior]),
        rtol=CLOSED_FORM_RTOL,
        atol=CLOSED_FORM_RTOL,
    )
    np.testing.assert_allclose(
        first["density"], density_ref(logsnr), rtol=CLOSED_FORM_RTOL, atol=0
    )


@pytest.mark.parametrize(
    "case", sorted(set(CLOSED_FORM_SPECS) - {"linear_40"}), indirect=True
)
def test_untruncated_closed_forms_up_to_a_constant(case):
    # PAPER.md's untruncated densities: the truncated density is each of them times
    # one constant, the inverse of the mass the truncation keeps (at least one).
    # (The linear schedule has no untruncated density.)
    name, schedule, _, logsnr, first, _ = case
    family, _, _, resolution = CLOSED_FORM_SPECS[name]
    if family == "cosine":
        untruncated = 1 / np.cosh(logsnr / 2) / (2 * np.pi)
    elif family == "shifted_cosine":
        untruncated = (
            1 / np.cosh((logsnr - 2 * np.log(64 / resolution)) / 2) / (2 * np.pi)
        )
    elif family == "edm":
        untruncated = scipy.stats.norm.pdf(logsnr, 2.4, 2.4)
    else:
        untruncated = 1 / np.cosh(logsnr / 4) ** 2 / 8
    ratio = first["density"] / untruncated
    assert ratio.max() / ratio.min() - 1 < CLOSED_FORM_RTOL, name
    assert ratio.min() >= 1 - CLOSED_FORM_RTOL, name


@pytest.mark.parametrize("resolution", [32, 64, 128, 256, 512])
def test_shifted_cosine_shift(resolution):
    # The maps themselves are checked against the shifted closed forms above.
    shifted = schedules.ShiftedCosine(resolution=resolution)
    expected = 2 * math.log(64 / resolution)
    assert shifted.shift == pytest.approx(expected, abs=SHIFT_ATOL)
    rebased = schedules.ShiftedCosine(resolution=resolution, base_resolution=32)
    expected = 2 * math.log(32 / resolution)
    assert rebased.shift == pytest.approx(expected, abs=SHIFT_ATOL)


def test_every_schedule_names_its_own_density():
    # Notebook 01 prints this label in its Table 1 column "training density".
    cases = {
        "cosine": "cosine",
        "shifted_cosine": "shifted_cosine_128",
        "edm": "edm",
        "fm_ot": "fm_ot_40",
        "linear": "linear_40",
        "piecewise_constant": "piecewise_constant",
    }
    assert set(cases) == set(schedules.SCHEDULES)
    labels = {}
    for name, case in cases.items():
        schedule = SCHEDULE_CASES[case]()
        assert type(schedule) is schedules.SCHEDULES[name]
        assert type(schedule).density_formula is not schedules.Schedule.density_formula
        labels[name] = schedule.density_formula
    assert len(set(labels.values())) == len(labels), labels
    # PAPER.md section 1: EDM's ln sigma_VE ~ N(-1.2, 1.2^2) is N(2.4, 2.4^2) in λ.
    assert schedules.EDM().density_formula == "N(λ; 2.4, 2.4²)"
    assert "s = -1.386" in schedules.ShiftedCosine(resolution=128).density_formula


# --- float32 ------------------------------------------------------------------------


# One of each implementation (the shifted cosine is the cosine's code with other
# angles); a float32 and a float64 compilation each.
FLOAT32_CASES = {
    "cosine": schedules.Cosine,
    "shifted_cosine_512": lambda **k: schedules.ShiftedCosine(resolution=512, **k),
    "edm": schedules.EDM,
    "fm_ot": schedules.FlowMatchingOT,
    "linear": schedules.Linear,
    "piecewise_constant": lambda **k: schedules.PiecewiseConstant(
        jnp.array([0.5, 1.0, 3.0, 2.0], dtype=jnp.float32), **k
    ),
}
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal, 1.2e-38
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Largest `-dlogsnr/dt = 1 / p` that float32 holds; beyond it (EDM's far tails,
# p ~ 1e-69) the true slope is not representable and is allowed to be infinite.
FLOAT32_DENSITY_FLOOR = 1e-37
# float32 against float64 on the same float32 inputs, in ulps (2^-23) of a
# condition factor. Log-space values (`logsnr(t)`, `log p`) are sums of a few terms
# no larger than `max(1, |value|)`, each to an ulp; `t` lies in [0, 1], where float32
# holds it to an ulp absolute; `p = exp(log p)` and the slopes `+-1/p` turn the
# absolute error of `log p`, ~eps max(1, |log p|), into a relative one. Each is a
# few roundings of such terms. Measured: at most 6.9 ulps (EDM's `logsnr(t)`).
FLOAT32_ULPS = 16


def _float32_errors(first64, first32, absolute_t):
    """float32 errors of the first pass over their condition factors, in ulps."""
    errors = {}
    for key, reference in first64.items():
        value = np.asarray(first32[key], np.float64)
        error = np.abs(value - reference)
        if key == "log_density":
            scale = np.maximum(1, np.abs(reference))
        elif key == "logsnr_of_t":
            scale = np.maximum(1, np.abs(reference))
            if absolute_t:
                scale = scale + np.abs(first64["dlogsnr_dt"])
        elif key == "t_of_logsnr":
            scale = np.ones_like(reference)
        else:  # density and the slopes: exp of a log-space value
            magnitude = np.abs(reference)
            representable = (magnitude > FLOAT32_TINY) & (magnitude < FLOAT32_MAX)
            # Beyond float32's range the value underflows to (sub)normal zero or
            # overflows to infinity; `log p` is compared above on the same levels.
            if key in ("density", "dt_dlogsnr"):
                assert np.all(np.abs(value[~representable]) <= FLOAT32_TINY), key
            error, magnitude = error[representable], magnitude[representable]
            scale = magnitude * np.maximum(1, np.abs(np.log(magnitude)))
        errors[key] = float(np.max(error / scale)) / FLOAT32_EPS
    return errors


@pytest.mark.parametrize("name", sorted(FLOAT32_CASES))
def test_float32_agrees_with_float64_on_widest_range(name):
    schedule = FLOAT32_CASES[name](logsnr_min=-40.0, logsnr_max=40.0)
    t = jnp.linspace(0, 1, 401, dtype=jnp.float32)
    logsnr = _logsnr_grid(schedule, 401, jnp.float32)
    first, second = _evaluate_twice(schedule, t, logsnr)
    # `second` is evaluated at `t(logsnr)` and `logsnr(t)`: the density at the
    # level each slope `dlogsnr/dt` belongs to is the other pass's.
    for values, density in ((first, second["density"]), (second, first["density"])):
        for key, value in values.items():
            assert value.dtype == jnp.float32, (key, value.dtype)
            if key == "log_density":
                assert bool(jnp.all(value > -jnp.inf)), key
                continue
            if key == "dlogsnr_dt":
                # Finite wherever 1 / p(logsnr(t)) is representable.
                representable = density > FLOAT32_DENSITY_FLOOR
                value = value[representable]
            assert bool(jnp.all(jnp.isfinite(value))), key
    assert bool(jnp.all((first["logsnr_of_t"] >= -40) & (first["logsnr_of_t"] <= 40)))
    assert bool(jnp.all((first["t_of_logsnr"] >= 0) & (first["t_of_logsnr"] <= 1)))

    # The same inputs and parameters in float64 (PiecewiseConstant's float32 bin
    # weights are cast exactly).
    schedule64 = jax.tree.map(
        lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, schedule
    )
    first64 = _evaluate(
        schedule64, jnp.asarray(t, jnp.float64), jnp.asarray(logsnr, jnp.float64)
    )
    first64 = {k: np.asarray(v) for k, v in first64.items()}
    # NOTE: PiecewiseConstant subtracts cumulative bin masses near 1 from `t`, so its
    # `logsnr(t)` carries float32's absolute resolution of `t` (an ulp of 1) times
    # the slope `dlogsnr/dt = bin_width / mass` (up to ~260 here); the closed forms
    # are evaluated from the nearer end of [0, 1] and keep `t`'s relative precision.
    absolute_t = isinstance(schedule, schedules.PiecewiseConstant)
    errors = _float32_errors(first64, first, absolute_t)
    assert max(errors.values()) <= FLOAT32_ULPS, errors

    # logsnr_from_uniform is the vectorised map.
    from_uniform = schedule.logsnr_from_uniform(t)
    assert from_uniform.dtype == jnp.float32
    error = np.abs(np.asarray(from_uniform, np.float64) - first64["logsnr_of_t"])
    scale = np.maximum(1, np.abs(first64["logsnr_of_t"]))
    if absolute_t:
        scale = scale + np.abs(first64["dlogsnr_dt"])
    assert np.max(error / scale) <= FLOAT32_ULPS * FLOAT32_EPS


@pytest.mark.parametrize("name", sorted(SCHEDULE_CASES))
def test_logsnr_clips_t_outside_unit_interval(name):
    # Every schedule saturates at its end points, flat, outside [0, 1].
    schedule = SCHEDULE_CASES[name]()
    t = jnp.array([-0.5, -1e-3, 0.0, 1.0, 1.0 + 1e-3, 1.5])
    logsnr, slope = jax.jit(
        jax.vmap(lambda t: jax.jvp(schedule.logsnr, (t,), (jnp.ones_like(t),)))
    )(t)
    logsnr, slope = np.asarray(logsnr), np.asarray(slope)
    np.testing.assert_array_equal(logsnr[:2], logsnr[2])
    np.testing.assert_array_equal(logsnr[-2:], logsnr[3])
    assert abs(logsnr[2] - schedule.logsnr_max) < END_POINT_ATOL
    assert abs(logsnr[3] - schedule.logsnr_min) < END_POINT_ATOL
    np.testing.assert_array_equal(slope[[0, 1, 4, 5]], 0.0)


# --- PiecewiseConstant: the adaptive schedule's proposal ----------------------------


PIECEWISE_WEIGHTS = np.array([1.0, 2.0, 3.0, 0.5, 4.0])


def test_piecewise_constant_density_and_inverse():
    schedule = SCHEDULE_CASES["piecewise_constant"]()
    edges = np.linspace(-10.0, 12.0, 6)
    np.testing.assert_allclose(schedule.bin_edges(), edges, rtol=PIECEWISE_RTOL)
    probs = PIECEWISE_WEIGHTS / PIECEWISE_WEIGHTS.sum()
    np.testing.assert_allclose(schedule.probabilities(), probs, rtol=PIECEWISE_RTOL)

    # t at each edge is the mass above it; logsnr(t) inverts that. Padded to the
    # fixture's shapes, so nothing is compiled again.
    mids = (edges[:-1] + edges[1:]) / 2
    mass_above = np.concatenate([np.cumsum(probs[::-1])[::-1], [0.0]])
    t = np.pad(mass_above, (0, NUM_GRID - 6))
    logsnr = np.pad(np.concatenate([edges, mids]), (0, NUM_GRID - 11))
    keys = jax.random.split(jax.random.key(1234), NUM_SAMPLES)
    values = _evaluate(schedule, jnp.asarray(t), jnp.asarray(logsnr), keys)
    np.testing.assert_allclose(
        values["logsnr_of_t"][:6], edges, rtol=0, atol=PIECEWISE_LOGSNR_ATOL
    )
    np.testing.assert_allclose(
        values["t_of_logsnr"][:6], mass_above, rtol=0, atol=SATURATION_ATOL
    )
    # Inside a bin: density is its mass over the bin width, t is linear.
    width = edges[1] - edges[0]
    np.testing.assert_allclose(
        values["density"][6:11], probs / width, rtol=PIECEWISE_RTOL
    )
    np.testing.assert_allclose(
        values["t_of_logsnr"][6:11],
        (mass_above[:-1] + mass_above[1:]) / 2,
        rtol=0,
        atol=SATURATION_ATOL,
    )


def test_piecewise_constant_sampling_bin_counts():
    # Chi-square of bin counts against the bin masses, beside the KS test above;
    # the same call as the fixture's, so nothing is compiled again.
    schedule = SCHEDULE_CASES["piecewise_constant"]()
    keys = jax.random.split(jax.random.key(1234), NUM_SAMPLES)
    t = jnp.linspace(0.0, 1.0, NUM_GRID)
    values = _evaluate(schedule, t, _logsnr_grid(schedule, NUM_GRID), keys)
    counts, _ = np.histogram(values["samples"], bins=np.asarray(schedule.bin_edges()))
    expected = NUM_SAMPLES * PIECEWISE_WEIGHTS / PIECEWISE_WEIGHTS.sum()
    result = scipy.stats.chisquare(counts, expected)
    assert result.pvalue > KS_ALPHA, result


@pytest.mark.parametrize(
    "bin_weights",
    [
        [1.0, 0.0, 2.0],
        [1.0, -0.5, 2.0],
        [1.0, np.nan, 2.0],
        [1.0, np.inf, 2.0],
    ],
)
def test_piecewise_constant_rejects_non_positive_weights(bin_weights):
    with pytest.raises(ValueError, match="bin_weights"):
        schedules.PiecewiseConstant(jnp.asarray(bin_weights))


def test_piecewise_constant_rejects_bad_shape():
    # Under runtime type checking jaxtyping rejects a matrix first (a TypeError
    # naming the shape); without it the module's own check raises ValueError.
    with pytest.raises((ValueError, TypeError), match=r"2, ?2"):
        schedules.PiecewiseConstant(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"shape \(0,\)"):
        schedules.PiecewiseConstant(jnp.ones((0,)))


def test_piecewise_constant_does_not_retrace_when_weights_change():
    num_traces = 0

    @jax.jit
    def draw_from_weights(bin_weights, key):
        nonlocal num_traces
        num_traces += 1
        schedule = schedules.PiecewiseConstant(bin_weights)
        return schedule.sample(key=key), schedule.density(0.3)

    @eqx.filter_jit
    def draw_from_schedule(schedule, key):
        nonlocal num_traces
        num_traces += 1
        return schedule.sample(key=key), schedule.density(0.3)

    key = jax.random.key(0)
    for fn in (draw_from_weights, draw_from_schedule):
        num_traces = 0
        densities = []
        for scale in (1.0, 2.0, 5.0):
            bin_weights = jnp.asarray(PIECEWISE_WEIGHTS**scale)
            argument = (
                bin_weights
                if fn is draw_from_weights
                else schedules.PiecewiseConstant(bin_weights)
            )
            _, density = fn(argument, key)
            densities.append(float(density))
        assert num_traces == 1, fn
        # The values did change: logsnr = 0.3 lies in bin 2 (weight 3) of the five
        # bins of width 6 on [-15, 15].
        expected = [
            3.0**scale / np.sum(PIECEWISE_WEIGHTS**scale) / 6.0
            for scale in (1.0, 2.0, 5.0)
        ]
        np.testing.assert_allclose(densities, expected, rtol=PIECEWISE_RTOL)


# --- errors -------------------------------------------------------------------------


def test_registry():
    assert set(schedules.SCHEDULES) == {
        "cosine",
        "shifted_cosine",
        "edm",
        "fm_ot",
        "linear",
        "piecewise_constant",
    }
    for name, cls in schedules.SCHEDULES.items():
        kwargs = dict(bin_weights=jnp.ones(3)) if name == "piecewise_constant" else {}
        schedule = schedules.get_schedule(name, **kwargs)
        assert type(schedule) is cls
        assert (schedule.logsnr_min, schedule.logsnr_max) == (-15.0, 15.0)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="valid names") as info:
        schedules.get_schedule("cosin")
    for name in schedules.SCHEDULES:
        assert name in str(info.value)
    assert "'cosin'" in str(info.value)


@pytest.mark.parametrize("name", ["cosine", "shifted_cosine", "edm", "fm_ot", "linear"])
@pytest.mark.parametrize("lo, hi", [(5.0, -5.0), (3.0, 3.0), (-np.inf, 3.0)])
def test_bad_range_names_both_values(name, lo, hi):
    with pytest.raises(ValueError) as info:
        schedules.get_schedule(name, logsnr_min=lo, logsnr_max=hi)
    assert f"logsnr_min={lo}" in str(info.value)
    assert f"logsnr_max={hi}" in str(info.value)


def test_bad_range_piecewise_constant():
    with pytest.raises(ValueError, match=r"logsnr_min=2\.0.*logsnr_max=1\.0"):
        schedules.PiecewiseConstant(jnp.ones(3), logsnr_min=2.0, logsnr_max=1.0)


@pytest.mark.parametrize("resolution", [0, -64])
def test_shifted_cosine_rejects_non_positive_resolution(resolution):
    with pytest.raises(ValueError, match=f"resolution={float(resolution)}"):
        schedules.ShiftedCosine(resolution=resolution)
    with pytest.raises(ValueError, match="base_resolution=0.0"):
        schedules.ShiftedCosine(base_resolution=0)


def test_edm_rejects_non_positive_std():
    with pytest.raises(ValueError, match="p_std=0.0"):
        schedules.EDM(p_std=0.0)
    with pytest.raises(ValueError, match="p_std=-1.0"):
        schedules.EDM(p_std=-1.0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: schedules.EDM(p_mean=np.nan), "p_mean=nan"),
        (lambda: schedules.EDM(p_mean=np.inf), "p_mean=inf"),
        (lambda: schedules.EDM(p_std=np.nan), "p_std=nan"),
        (lambda: schedules.ShiftedCosine(resolution=np.nan), "resolution=nan"),
        (lambda: schedules.ShiftedCosine(resolution=np.inf), "resolution=inf"),
    ],
)
def test_non_finite_constants_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()
