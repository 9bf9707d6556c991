"""Weighting functions `w(logsnr)` and the noise augmentation they imply.

The weighted loss (PAPER.md section 2) is
`L_w(x) = 1/2 Int w(logsnr) E_eps ||eps_hat - eps||^2 dlogsnr`. By the paper's main
result (section 4), a weighting that is non-increasing in `logsnr` makes `L_w` the
ELBO of data augmented with Gaussian noise whose level has density

    p_w(logsnr) = -(dw/dlogsnr) / w(logsnr_min)   on [logsnr_min, logsnr_max],

plus a point mass `w(logsnr_max) / w(logsnr_min)` at `logsnr_max`. Whether a weighting
is monotonic is computed here from its derivative, never declared.

Closed forms of Table 1 (up to a constant) and the proposed weightings:

| name | `w(logsnr)` |
|---|---|
| `elbo` | `1` |
| `eps_cosine` | `sech(logsnr / 2)` |
| `edm` | `N(logsnr; 2.4, 2.4^2) (exp(-logsnr) + sigma_data^2) / sigma_data^2` |
| `v_cosine` | `exp(-logsnr / 2)` |
| `fm_ot` | `exp(-logsnr / 2)` |
| `indi` | `exp(-logsnr) sech^2(logsnr / 4)` |
| `p2` | `sech(logsnr / 2) / (k + exp(logsnr))^gamma` |
| `min_snr` | `sech(logsnr / 2) min(1, gamma exp(-logsnr))` |
| `sigmoid` | `sigmoid(bias - logsnr)` |
| `edm_monotonic` | `max over logsnr' >= logsnr of w_edm(logsnr')` |

`Shifted(weighting, resolution)` evaluates any of them at `logsnr - shift` with
`shift = 2 log(64 / resolution)`, the "-shifted" variants of section 5.
"""

import abc
import math
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar, ScalarLike

from .schedules import check_finite, check_logsnr_range, check_positive

# Grid on which monotonicity is computed unless the caller gives a range.
MONOTONIC_CHECK_RANGE = (-20.0, 20.0)
MONOTONIC_CHECK_POINTS = 4001
# A slope of `log w` counts as rising only above this many eps of the working
# precision: autodiff slopes are sums of a few terms of size <= ~10 on the check
# ranges, so rounding moves a flat or falling slope above zero by at most ~10 eps,
# while every genuinely rising weighting of Table 1 rises at a slope above 0.1.
MONOTONIC_SLOPE_ULPS = 100
# Bisection steps when inverting a monotonic weighting: 2^-64 of the range is below
# float64 resolution for any range used here.
INVERSE_BISECTION_STEPS = 64
# Grid on which the peak of a unimodal weighting is bracketed before Brent's method:
# the widest range the library supports, at spacing 0.01, so that a second sign
# change of the slope further than 0.01 from the first is caught as non-unimodal.
PEAK_SEARCH_RANGE = (-40.0, 40.0)
PEAK_SEARCH_POINTS = 8001
# Brent's stopping tolerance on the peak: the slope's float64 rounding (~1e-16 on
# terms of size ~1) over its derivative at the EDM peak (~0.35) places the root to
# ~1e-15, so iterating below ~4 times that gains nothing.
PEAK_XTOL = 4e-15


def _as_float(x: ScalarLike) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(x, float))


def _is_traced(*values) -> bool:
    return any(isinstance(value, jax.core.Tracer) for value in values)


def _check_bounds(owner: str, logsnr_min: ScalarLike, logsnr_max: ScalarLike) -> None:
    """`check_logsnr_range` on concrete end points; traced ones are left to
    `_error_if_bad_bounds`."""
    if not _is_traced(logsnr_min, logsnr_max):
        check_logsnr_range(owner, float(logsnr_min), float(logsnr_max))


def _error_if_bad_bounds(value: Array, logsnr_min, logsnr_max) -> Array:
    """`value`, with a run-time error under `jit` unless `min < max`, both finite."""
    if not _is_traced(logsnr_min, logsnr_max):
        return value
    logsnr_min, logsnr_max = jnp.asarray(logsnr_min), jnp.asarray(logsnr_max)
    good = jnp.isfinite(logsnr_min) & jnp.isfinite(logsnr_max)
    good = good & (logsnr_min < logsnr_max)
    return eqx.error_if(
        value,
        ~good,
        "logsnr_min must be below logsnr_max, both finite: a range runs from "
        "logsnr_min up to logsnr_max.",
    )


def _log_sech(x):
    return math.log(2.0) - jnp.logaddexp(x, -x)


class Weighting(eqx.Module):
    """A weighting function `w(logsnr) > 0`, evaluated in log space.

    Subclasses implement `log_weight`; every method takes and returns one scalar
    (batch with `jax.vmap`).
    """

    @abc.abstractmethod
    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        """`log w(logsnr)`, the log of the weighting of PAPER.md section 2.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** a scalar (`-inf` where `w` is zero).
        """

    def __call__(self, logsnr: ScalarLike) -> Scalar:
        """`w(logsnr) = exp(log_weight(logsnr))`.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** a non-negative scalar.
        """
        return jnp.exp(self.log_weight(logsnr))

    def dlog_weight(self, logsnr: ScalarLike) -> Scalar:
        """`d log w / dlogsnr` by autodiff.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** a scalar; non-positive everywhere exactly when `w` is monotonic.
        """
        return jax.grad(self.log_weight)(_as_float(logsnr))

    def dweight(self, logsnr: ScalarLike) -> Scalar:
        """`dw / dlogsnr` by autodiff, formed as `w d(log w)/dlogsnr`.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** a scalar.
        """
        return self(logsnr) * self.dlog_weight(logsnr)

    def max_log_slope(
        self,
        logsnr_min: float = MONOTONIC_CHECK_RANGE[0],
        logsnr_max: float = MONOTONIC_CHECK_RANGE[1],
        num_points: int = MONOTONIC_CHECK_POINTS,
    ) -> float:
        """Largest `d log w / dlogsnr` on a uniform grid over the range.

        **Arguments:**

        - `logsnr_min`, `logsnr_max`: the range, finite, `logsnr_min < logsnr_max`.
        - `num_points`: grid points, end points included; at least 2.

        **Returns:** the largest slope, a Python float.

        **Raises:** `ValueError` for a bad range or `num_points`.
        """
        owner = type(self).__name__
        check_logsnr_range(owner, logsnr_min, logsnr_max)
        if not (isinstance(num_points, numbers.Integral) and num_points >= 2):
            raise ValueError(
                f"{owner}: num_points={num_points!r} must be an integer of at least "
                "2, so that the grid holds both end points of the range."
            )
        with jax.ensure_compile_time_eval():
            grid = jnp.linspace(logsnr_min, logsnr_max, num_points)
            slopes = jax.vmap(self.dlog_weight)(grid)
            return float(jnp.max(slopes))

    def is_monotonic(
        self,
        logsnr_min: float = MONOTONIC_CHECK_RANGE[0],
        logsnr_max: float = MONOTONIC_CHECK_RANGE[1],
        num_points: int = MONOTONIC_CHECK_POINTS,
    ) -> bool:
        """Whether `w` is non-increasing in `logsnr`, computed from its derivative.

        The slope of `log w` is evaluated by autodiff on `num_points` points; a
        weighting counts as monotonic when no slope exceeds rounding level
        (`MONOTONIC_SLOPE_ULPS` eps of the working precision). Weightings with flat
        stretches, such as `edm_monotonic`, have slope exactly zero there.

        **Arguments:**

        - `logsnr_min`, `logsnr_max`: the range, finite, `logsnr_min < logsnr_max`.
        - `num_points`: grid points, end points included; at least 2.

        **Returns:** a Python bool.

        **Raises:** `ValueError` for a bad range or `num_points`.
        """
        dtype = jnp.result_type(float)
        tolerance = MONOTONIC_SLOPE_ULPS * float(jnp.finfo(dtype).eps)
        return self.max_log_slope(logsnr_min, logsnr_max, num_points) <= tolerance

    def augmentation_density(
        self, logsnr: ScalarLike, logsnr_min: ScalarLike, logsnr_max: ScalarLike
    ) -> Scalar:
        """`p_w(logsnr) = -(dw/dlogsnr) / w(logsnr_min)` on the range, else 0.

        The density of noise levels of the augmentation that makes `L_w` an ELBO
        (PAPER.md section 4). For a non-monotonic weighting this is the signed
        density of the by-parts decomposition; its negative parts are the ELBOs the
        objective pushes up.

        **Arguments:**

        - `logsnr`: a scalar.
        - `logsnr_min`, `logsnr_max`: the range, `logsnr_min < logsnr_max`, both
          finite.

        **Returns:** a scalar, zero outside the range.

        **Raises:** `ValueError` for a bad range given as concrete values; under
        `jit` with traced end points, a run-time error (`eqx.error_if`).
        """
        _check_bounds("augmentation_density", logsnr_min, logsnr_max)
        logsnr = _as_float(logsnr)
        logsnr_min = jnp.asarray(logsnr_min, logsnr.dtype)
        logsnr_max = jnp.asarray(logsnr_max, logsnr.dtype)
        inside = (logsnr >= logsnr_min) & (logsnr <= logsnr_max)
        safe = jnp.clip(logsnr, logsnr_min, logsnr_max)
        relative = jnp.exp(self.log_weight(safe) - self.log_weight(logsnr_min))
        density = jnp.where(inside, -self.dlog_weight(safe) * relative, 0.0)
        return _error_if_bad_bounds(density, logsnr_min, logsnr_max)

    def augmentation_point_mass(
        self, logsnr_min: ScalarLike, logsnr_max: ScalarLike
    ) -> Scalar:
        """Mass `w(logsnr_max) / w(logsnr_min)` that `p_w` leaves at `logsnr_max`.

        **Arguments:**

        - `logsnr_min`, `logsnr_max`: the range, `logsnr_min < logsnr_max`, both
          finite.

        **Returns:** a scalar, in [0, 1] for a monotonic weighting.

        **Raises:** `ValueError` for a bad range given as concrete values; under
        `jit` with traced end points, a run-time error (`eqx.error_if`).
        """
        _check_bounds("augmentation_point_mass", logsnr_min, logsnr_max)
        log_mass = self.log_weight(logsnr_max) - self.log_weight(logsnr_min)
        return _error_if_bad_bounds(jnp.exp(log_mass), logsnr_min, logsnr_max)

    def sample_augmentation(
        self, logsnr_min: ScalarLike, logsnr_max: ScalarLike, *, key: PRNGKeyArray
    ) -> Scalar:
        """Draw a noise level from `p_w` and its point mass, by inverting the CDF.

        The CDF is `1 - w(logsnr) / w(logsnr_min)` below `logsnr_max`; it is inverted
        by bisection on `log w`, so any monotonic weighting can be sampled. The end
        points must be concrete (they are checked); the draw has their precision, so
        float32 arrays give a float32 draw.

        **Arguments:**

        - `logsnr_min`, `logsnr_max`: the range, concrete, `logsnr_min < logsnr_max`.
        - `key`: a PRNG key.

        **Returns:** one scalar draw in `[logsnr_min, logsnr_max]`, equal to
        `logsnr_max` with probability `augmentation_point_mass`.

        **Raises:** `ValueError` for a bad range, or when `w` is not monotonic on it.
        """
        # Work in the precision of the end points (float64 for Python floats when
        # x64 is enabled, float32 for float32 arrays).
        dtype = jnp.result_type(logsnr_min, logsnr_max, float)
        logsnr_min, logsnr_max = float(logsnr_min), float(logsnr_max)
        check_logsnr_range(type(self).__name__, logsnr_min, logsnr_max)
        try:
            with jax.ensure_compile_time_eval():
                monotonic = self.is_monotonic(logsnr_min, logsnr_max)
        except jax.errors.ConcretizationTypeError:
            monotonic = True  # fields are traced; the caller vouches for them
        if not monotonic:
            raise ValueError(
                f"{type(self).__name__} is not monotonic on [{logsnr_min}, "
                f"{logsnr_max}], so its p_w has negative parts and cannot be sampled."
            )

        u = jax.random.uniform(key, dtype=dtype)
        return self.augmentation_logsnr(
            u, jnp.asarray(logsnr_min, dtype), jnp.asarray(logsnr_max, dtype)
        )

    def augmentation_logsnr(
        self, u: ScalarLike, logsnr_min: ScalarLike, logsnr_max: ScalarLike
    ) -> Scalar:
        """The noise level of `p_w` and its point mass at CDF value `u`.

        Inverts `CDF(logsnr) = 1 - w(logsnr) / w(logsnr_min)` below `logsnr_max` by
        bisection on `log w` (`INVERSE_BISECTION_STEPS` halvings); `u` above
        `1 - w(logsnr_max) / w(logsnr_min)` falls in the point mass. Taking `u` as
        input lets a caller stratify the uniforms; `sample_augmentation` draws one.
        Nothing is checked here, so this runs on traced arguments: the weighting
        must be monotonic on the range.

        **Arguments:**

        - `u`: a uniform in [0, 1).
        - `logsnr_min`, `logsnr_max`: the range, `logsnr_min < logsnr_max`.

        **Returns:** a scalar in `[logsnr_min, logsnr_max]`.
        """
        log_w_min = self.log_weight(logsnr_min)
        target = log_w_min + jnp.log1p(-u)

        def bisect(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = self.log_weight(mid) >= target
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(
            0, INVERSE_BISECTION_STEPS, bisect, (logsnr_min, logsnr_max)
        )
        in_point_mass = self.log_weight(logsnr_max) >= target
        return jnp.where(in_point_mass, logsnr_max, 0.5 * (lo + hi))


class ELBO(Weighting):
    """`w = 1`: the continuous-time ELBO of VDM."""

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return jnp.zeros_like(_as_float(logsnr))


class EpsCosine(Weighting):
    """`w = sech(logsnr / 2)`: eps-MSE under the cosine schedule (IDDPM)."""

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return _log_sech(_as_float(logsnr) / 2)


class EDM(Weighting):
    """EDM's implied weighting, `N(logsnr; -2 p_mean, (2 p_std)^2) / c_out^2`.

    `1 / c_out^2` on the eps-MSE is `(exp(-logsnr) + sigma_data^2) / sigma_data^2`
    (PAPER.md section 2).
    """

    p_mean: float = eqx.field(default=-1.2, converter=float)
    p_std: float = eqx.field(default=1.2, converter=float)
    sigma_data: float = eqx.field(default=0.5, converter=float)

    def __check_init__(self):
        check_finite("EDM", p_mean=self.p_mean)
        check_positive("EDM", p_std=self.p_std, sigma_data=self.sigma_data)

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _as_float(logsnr)
        mean, std = -2 * self.p_mean, 2 * self.p_std
        log_normal = -0.5 * ((logsnr - mean) / std) ** 2 - 0.5 * math.log(
            2 * math.pi * std**2
        )
        log_sd2 = 2 * math.log(self.sigma_data)
        return log_normal + jnp.logaddexp(-logsnr, log_sd2) - log_sd2


class VCosine(Weighting):
    """`w = exp(-logsnr / 2)`: v-MSE under the cosine schedule."""

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return -_as_float(logsnr) / 2


class FlowMatchingOT(Weighting):
    """`w = exp(-logsnr / 2)`: velocity MSE on the linear path with uniform `t`."""

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return -_as_float(logsnr) / 2


class InDI(Weighting):
    """`w = exp(-logsnr) sech^2(logsnr / 4)`: x-MSE on the linear path (InDI)."""

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _as_float(logsnr)
        return -logsnr + 2 * _log_sech(logsnr / 4)


class P2(Weighting):
    """`w = sech(logsnr / 2) / (k + exp(logsnr))^gamma`: P2 weighting, cosine."""

    gamma: float = eqx.field(default=1.0, converter=float)
    k: float = eqx.field(default=1.0, converter=float)

    def __check_init__(self):
        check_finite("P2", gamma=self.gamma)
        check_positive("P2", k=self.k)

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _as_float(logsnr)
        return _log_sech(logsnr / 2) - self.gamma * jnp.logaddexp(
            math.log(self.k), logsnr
        )


class MinSNR(Weighting):
    """`w = sech(logsnr / 2) min(1, gamma exp(-logsnr))`: Min-SNR-gamma, eps form."""

    gamma: float = eqx.field(default=5.0, converter=float)

    def __check_init__(self):
        check_positive("MinSNR", gamma=self.gamma)

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _as_float(logsnr)
        return _log_sech(logsnr / 2) + jnp.minimum(0.0, math.log(self.gamma) - logsnr)


class Sigmoid(Weighting):
    """`w = sigmoid(bias - logsnr)`; its `p_w` is Logistic(bias, 1). Section 5."""

    bias: float = eqx.field(default=2.0, converter=float)

    def __check_init__(self):
        check_finite("Sigmoid", bias=self.bias)

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return jax.nn.log_sigmoid(self.bias - _as_float(logsnr))


def _single_peak(weighting: Weighting, lo: float, hi: float, num_points: int) -> float:
    """Location of the maximum of a unimodal `log w`, refined by Brent's method."""
    grid = np.linspace(lo, hi, num_points)
    with jax.ensure_compile_time_eval():
        slopes = np.asarray(jax.vmap(weighting.dlog_weight)(jnp.asarray(grid)))
    crossings = np.nonzero((slopes[:-1] > 0) & (slopes[1:] <= 0))[0]
    rises = np.nonzero((slopes[:-1] <= 0) & (slopes[1:] > 0))[0]
    if len(crossings) != 1 or len(rises) != 0:
        raise ValueError(
            f"{type(weighting).__name__} is not unimodal on [{lo}, {hi}]: its log "
            f"slope changes sign {len(crossings) + len(rises)} times."
        )
    i = int(crossings[0])

    def slope(value):
        with jax.ensure_compile_time_eval():
            return float(weighting.dlog_weight(value))

    return float(scipy.optimize.brentq(slope, grid[i], grid[i + 1], xtol=PEAK_XTOL))


class EDMMonotonic(Weighting):
    """`w(logsnr) = max over logsnr' >= logsnr of w_edm(logsnr')`. Section 5.

    Equal to the EDM weighting above its peak and flat at the peak value below it.
    The peak (about -3.308 for the default constants) is located numerically when
    the weighting is built.
    """

    edm: EDM
    logsnr_peak: float

    def __init__(
        self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5
    ):
        self.edm = EDM(p_mean=p_mean, p_std=p_std, sigma_data=sigma_data)
        self.logsnr_peak = _single_peak(
            self.edm, *PEAK_SEARCH_RANGE, PEAK_SEARCH_POINTS
        )

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return self.edm.log_weight(jnp.maximum(_as_float(logsnr), self.logsnr_peak))


class Shifted(Weighting):
    """Any weighting evaluated at `logsnr - shift`, `shift = 2 log(base / resolution)`.

    At resolution 128 the shift is `-2 log 2`, moving the weighting toward noisier
    levels, as the shifted cosine schedule moves its density.
    """

    weighting: Weighting
    resolution: float = eqx.field(default=128.0, converter=float)
    base_resolution: float = eqx.field(default=64.0, converter=float)

    def __check_init__(self):
        check_positive(
            "Shifted", resolution=self.resolution, base_resolution=self.base_resolution
        )

    @property
    def shift(self) -> float:
        """`2 log(base_resolution / resolution)`."""
        return 2 * math.log(self.base_resolution / self.resolution)

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return self.weighting.log_weight(_as_float(logsnr) - self.shift)


WEIGHTINGS: dict[str, type[Weighting]] = {
    "elbo": ELBO,
    "eps_cosine": EpsCosine,
    "edm": EDM,
    "v_cosine": VCosine,
    "fm_ot": FlowMatchingOT,
    "indi": InDI,
    "p2": P2,
    "min_snr": MinSNR,
    "sigmoid": Sigmoid,
    "edm_monotonic": EDMMonotonic,
}


def get_weighting(name: str, **kwargs) -> Weighting:
    """Build `WEIGHTINGS[name](**kwargs)`, naming the valid names on error.

    **Arguments:**

    - `name`: a key of `WEIGHTINGS`, e.g. `"sigmoid"`.
    - `**kwargs`: the weighting's constants, e.g. `bias`.

    **Returns:** the weighting.

    **Raises:** `ValueError` for an unknown name, listing the valid ones.
    """
    if name not in WEIGHTINGS:
        raise ValueError(
            f"Unknown weighting {name!r}; valid names are {sorted(WEIGHTINGS)}."
        )
    return WEIGHTINGS[name](**kwargs)


def normalized(
    weighting: Weighting, logsnr: Float[ArrayLike, " n"]
) -> Float[Array, " n"]:
    """`w / max w` over the given points, for plotting on one axis.

    **Arguments:**

    - `weighting`: any weighting.
    - `logsnr`: a vector of levels.

    **Returns:** `w(logsnr) / max w(logsnr)`, formed in log space, of the same
    shape.
    """
    logsnr = jnp.asarray(logsnr, dtype=jnp.result_type(logsnr, float))
    log_w = jax.vmap(weighting.log_weight)(logsnr)
    return jnp.exp(log_w - jnp.max(log_w))
