"""Noise schedules: strictly decreasing maps `t -> logsnr` on [0, 1].

A schedule is an importance-sampling distribution over noise levels (PAPER.md
section 2): drawing `t ~ U(0, 1)` and mapping it through `logsnr(t)` draws `logsnr`
from the density `p(logsnr) = -dt/dlogsnr`. Every schedule here is truncated to
`[logsnr_min, logsnr_max]` and renormalised there, so that `logsnr(0) = logsnr_max`,
`logsnr(1) = logsnr_min` and the density integrates to one on the range.

Closed forms (PAPER.md section 1, with the truncation constant):

| name | `logsnr(t)` | `p(logsnr)` before truncation |
|---|---|---|
| `cosine` | `-2 log tan(pi t / 2)` | `sech(logsnr / 2) / (2 pi)` |
| `shifted_cosine` | `logsnr_cosine(t) + shift` | `p_cosine(logsnr - shift)` |
| `edm` | `-2 p_mean - 2 p_std Phi^-1(t)` | `N(logsnr; -2 p_mean, 4 p_std^2)` |
| `fm_ot` | `2 log((1 - t) / t)` | `sech^2(logsnr / 4) / 8` |
| `linear` | `max + t (min - max)` | `1 / (max - min)` |

(`shift = 2 log(base / resolution)`; `min`, `max` are the end points.)

Each closed form is evaluated from whichever end of the range keeps it accurate, so
that float32 stays finite for end points as far out as +-40.
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar, ScalarLike


def check_logsnr_range(owner: str, logsnr_min: float, logsnr_max: float) -> None:
    """Raise `ValueError` unless `logsnr_min < logsnr_max`, both finite.

    **Arguments:**

    - `owner`: the name the message starts with (a class or function).
    - `logsnr_min`, `logsnr_max`: the end points of a log-SNR range, Python floats.

    **Raises:** `ValueError` naming both values.
    """
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)):
        raise ValueError(
            f"{owner}: logsnr_min={logsnr_min} and logsnr_max={logsnr_max} must both "
            "be finite numbers."
        )
    if not logsnr_min < logsnr_max:
        raise ValueError(
            f"{owner}: logsnr_min={logsnr_min} must be below "
            f"logsnr_max={logsnr_max}; a schedule runs from logsnr_max at t=0 down "
            "to logsnr_min at t=1."
        )


def check_finite(owner: str, **values: float) -> None:
    """Raise `ValueError` unless every named hyper-parameter is a finite number.

    **Arguments:**

    - `owner`: the name the message starts with (a class or function).
    - `**values`: the hyper-parameters by name, Python floats.

    **Raises:** `ValueError` naming the first non-finite value, e.g. `p_mean=nan`.
    """
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{owner}: {name}={value} must be a finite number.")


def check_positive(owner: str, **values: float) -> None:
    """Raise `ValueError` unless every named hyper-parameter is positive and finite.

    **Arguments:**

    - `owner`: the name the message starts with (a class or function).
    - `**values`: the hyper-parameters by name, Python floats.

    **Raises:** `ValueError` naming the first value that is not, e.g. `k=0.0`.
    """
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(
                f"{owner}: {name}={value} must be a positive finite number."
            )


def _as_float(t: ScalarLike) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(t, float))


def _clip(x: Array, lo: float, hi: float) -> Array:
    """Clip to `[lo, hi]`, keeping the one-sided derivative at the bounds."""
    # NOTE: `jnp.clip` halves the gradient at a bound, so `dlogsnr/dt` and
    # `-dt/dlogsnr` by autodiff would be half the density at the end points.
    return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


def _round_into(x: Array, lo: float, hi: float) -> Array:
    """Move rounding excursions outside `[lo, hi]` back in; gradient unchanged."""
    # `x - stop_gradient(x)` is exactly zero and carries the derivative of `x`.
    carrier = jnp.where(jnp.isfinite(x), x - jax.lax.stop_gradient(x), 0.0)
    return jax.lax.stop_gradient(jnp.clip(x, lo, hi)) + carrier


class Schedule(eqx.Module):
    """A strictly decreasing noise schedule truncated to `[logsnr_min, logsnr_max]`.

    Subclasses implement `logsnr`, `t_of_logsnr` and `_log_density` on the range;
    `density` is zero outside it. Every method takes and returns one scalar; batch
    with `jax.vmap`.
    """

    logsnr_min: eqx.AbstractVar[float]
    logsnr_max: eqx.AbstractVar[float]

    @property
    def density_formula(self) -> str:
        """`p(logsnr)` in words, for tables; untruncated, up to renormalisation."""
        return f"-dt/dλ of {type(self).__name__}"

    def __check_init__(self):
        check_logsnr_range(type(self).__name__, self.logsnr_min, self.logsnr_max)

    @abc.abstractmethod
    def logsnr(self, t: ScalarLike) -> Scalar:
        """Log-SNR `logsnr(t)` at time `t` (PAPER.md section 1, table of schedules).

        **Arguments:**

        - `t`: time, a scalar; clipped to [0, 1] (one-sided, so the derivative at
          the end points is the schedule's own).

        **Returns:** a scalar in `[logsnr_min, logsnr_max]`, `logsnr_max` at `t = 0`.
        """

    @abc.abstractmethod
    def t_of_logsnr(self, logsnr: ScalarLike) -> Scalar:
        """Inverse of the schedule, `t(logsnr)`, the mass of `p` above `logsnr`.

        **Arguments:**

        - `logsnr`: a scalar; clipped to the range, so `t` is 1 below it and 0
          above it.

        **Returns:** a scalar in [0, 1].
        """

    @abc.abstractmethod
    def _log_density(self, logsnr: Array) -> Array:
        """Log of `-dt/dlogsnr` on the range (no masking)."""

    def log_density(self, logsnr: ScalarLike) -> Scalar:
        """`log p(logsnr)` with `p = -dt/dlogsnr`; `-inf` outside the range.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** a scalar, finite on `[logsnr_min, logsnr_max]`.
        """
        logsnr = _as_float(logsnr)
        inside = (logsnr >= self.logsnr_min) & (logsnr <= self.logsnr_max)
        safe = _clip(logsnr, self.logsnr_min, self.logsnr_max)
        return jnp.where(inside, self._log_density(safe), -jnp.inf)

    def density(self, logsnr: ScalarLike) -> Scalar:
        """`p(logsnr) = -dt/dlogsnr` (PAPER.md section 1); zero outside the range.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** a non-negative scalar integrating to one over the range.
        """
        return jnp.exp(self.log_density(logsnr))

    def sample(self, *, key: PRNGKeyArray) -> Scalar:
        """Draw `logsnr ~ p` by mapping `t ~ U(0, 1)` through `logsnr(t)`.

        **Arguments:**

        - `key`: a PRNG key.

        **Returns:** one scalar draw in `[logsnr_min, logsnr_max]`.
        """
        return self.logsnr(jax.random.uniform(key))

    def logsnr_from_uniform(self, u: Float[ArrayLike, "*n"]) -> Float[Array, "*n"]:
        """Map uniforms through the schedule elementwise, `logsnr(u)`.

        For stratified or low-discrepancy draws of `logsnr ~ p`.

        **Arguments:**

        - `u`: uniforms in [0, 1], any shape.

        **Returns:** `logsnr(u)` of the same shape.
        """
        return jnp.vectorize(self.logsnr)(u)


# --- cosine ---------------------------------------------------------------------------


def _cosine_angles(logsnr_min: float, logsnr_max: float) -> tuple[float, float, float]:
    # NOTE: `a` is the angle at t=0 and `b` is pi/2 minus the angle at t=1, both
    # computed directly (atan(x) + atan(1/x) = pi/2) so neither end loses precision.
    a = math.atan(math.exp(-logsnr_max / 2))
    b = math.atan(math.exp(logsnr_min / 2))
    return a, b, math.pi / 2 - a - b


def _cosine_logsnr(t, logsnr_min, logsnr_max):
    a, b, width = _cosine_angles(logsnr_min, logsnr_max)
    t = _clip(_as_float(t), 0.0, 1.0)
    u = a + t * width  # angle from 0, accurate when small
    v = b + (1 - t) * width  # angle from pi/2, accurate when small
    quarter = math.pi / 4
    from_u = -2 * jnp.log(jnp.tan(jnp.where(u <= quarter, u, quarter)))
    from_v = 2 * jnp.log(jnp.tan(jnp.where(v <= quarter, v, quarter)))
    logsnr = jnp.where(u <= v, from_u, from_v)
    return _round_into(logsnr, logsnr_min, logsnr_max)


def _cosine_t(logsnr, logsnr_min, logsnr_max):
    a, b, width = _cosine_angles(logsnr_min, logsnr_max)
    logsnr = _as_float(logsnr)  # the caller clips it to the range
    positive = logsnr >= 0
    logsnr_pos = jnp.where(positive, logsnr, 0.0)
    logsnr_neg = jnp.where(positive, 0.0, logsnr)
    t_high = (jnp.arctan(jnp.exp(-logsnr_pos / 2)) - a) / width
    t_low = 1 - (jnp.arctan(jnp.exp(logsnr_neg / 2)) - b) / width
    return _round_into(jnp.where(positive, t_high, t_low), 0.0, 1.0)


def _log_sech(x):
    return math.log(2.0) - jnp.logaddexp(x, -x)


def _cosine_log_density(logsnr, logsnr_min, logsnr_max):
    # -dt/dlogsnr = sech(logsnr / 2) / (4 width) on the truncated range.
    _, _, width = _cosine_angles(logsnr_min, logsnr_max)
    return _log_sech(logsnr / 2) - math.log(4 * width)


class Cosine(Schedule):
    """Cosine schedule `alpha = cos(pi t / 2)`, truncated: `logsnr = -2 log tan(angle)`.

    The angle runs linearly from `atan(exp(-logsnr_max / 2))` at t=0 to
    `atan(exp(-logsnr_min / 2))` at t=1; `p(logsnr)` is proportional to
    `sech(logsnr / 2)`.
    """

    logsnr_min: float = eqx.field(default=-15.0, converter=float)
    logsnr_max: float = eqx.field(default=15.0, converter=float)

    def logsnr(self, t: ScalarLike) -> Scalar:
        return _cosine_logsnr(t, self.logsnr_min, self.logsnr_max)

    def t_of_logsnr(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _clip(_as_float(logsnr), self.logsnr_min, self.logsnr_max)
        return _cosine_t(logsnr, self.logsnr_min, self.logsnr_max)

    def _log_density(self, logsnr):
        return _cosine_log_density(logsnr, self.logsnr_min, self.logsnr_max)

    @property
    def density_formula(self) -> str:
        """`p(logsnr)` in words, for tables; untruncated, up to renormalisation."""
        return "sech(λ/2) / (2π)"


class ShiftedCosine(Schedule):
    """Cosine schedule shifted for resolution `d`: `logsnr = logsnr_cosine(t) + shift`.

    `shift = 2 log(base_resolution / resolution)` (negative above the base), so that a
    `d x d` image sees the noise levels a `base x base` image sees under `cosine`. The
    underlying cosine is truncated to `[logsnr_min - shift, logsnr_max - shift]`, so
    this schedule still spans `[logsnr_min, logsnr_max]`.
    """

    resolution: float = eqx.field(default=128.0, converter=float)
    base_resolution: float = eqx.field(default=64.0, converter=float)
    logsnr_min: float = eqx.field(default=-15.0, converter=float)
    logsnr_max: float = eqx.field(default=15.0, converter=float)

    def __check_init__(self):
        check_positive(
            "ShiftedCosine",
            resolution=self.resolution,
            base_resolution=self.base_resolution,
        )

    @property
    def shift(self) -> float:
        """`2 log(base_resolution / resolution)`."""
        return 2 * math.log(self.base_resolution / self.resolution)

    def logsnr(self, t: ScalarLike) -> Scalar:
        lo, hi = self.logsnr_min - self.shift, self.logsnr_max - self.shift
        logsnr = _cosine_logsnr(t, lo, hi) + self.shift
        return _round_into(logsnr, self.logsnr_min, self.logsnr_max)

    def t_of_logsnr(self, logsnr: ScalarLike) -> Scalar:
        lo, hi = self.logsnr_min - self.shift, self.logsnr_max - self.shift
        logsnr = _clip(_as_float(logsnr), self.logsnr_min, self.logsnr_max)
        return _cosine_t(logsnr - self.shift, lo, hi)

    def _log_density(self, logsnr):
        lo, hi = self.logsnr_min - self.shift, self.logsnr_max - self.shift
        return _cosine_log_density(logsnr - self.shift, lo, hi)

    @property
    def density_formula(self) -> str:
        """`p(logsnr)` in words, for tables; untruncated, up to renormalisation."""
        return f"sech((λ - s)/2) / (2π), s = {self.shift:.3f}"


# --- EDM ------------------------------------------------------------------------------


def _phi(x: float) -> float:
    """Standard normal CDF of a Python float, in double precision."""
    return 0.5 * math.erfc(-x / math.sqrt(2))


class EDM(Schedule):
    """EDM training distribution `ln sigma_VE ~ N(p_mean, p_std^2)`, in log-SNR.

    With `sigma_VE^2 = exp(-logsnr)`, `logsnr ~ N(-2 p_mean, (2 p_std)^2)`, i.e.
    `N(2.4, 2.4^2)` for Karras et al.'s `p_mean = -1.2`, `p_std = 1.2`; truncated to
    the range. `logsnr(t)` is the inverse normal CDF, decreasing in `t`.
    """

    p_mean: float = eqx.field(default=-1.2, converter=float)
    p_std: float = eqx.field(default=1.2, converter=float)
    logsnr_min: float = eqx.field(default=-15.0, converter=float)
    logsnr_max: float = eqx.field(default=15.0, converter=float)

    def __check_init__(self):
        check_finite("EDM", p_mean=self.p_mean)
        check_positive("EDM", p_std=self.p_std)

    @property
    def mean(self) -> float:
        """Mean of `logsnr` before truncation, `-2 p_mean`."""
        return -2 * self.p_mean

    @property
    def std(self) -> float:
        """Standard deviation of `logsnr` before truncation, `2 p_std`."""
        return 2 * self.p_std

    def _standard_ends(self):
        return (
            (self.logsnr_min - self.mean) / self.std,
            (self.logsnr_max - self.mean) / self.std,
        )

    def logsnr(self, t: ScalarLike) -> Scalar:
        t = _clip(_as_float(t), 0.0, 1.0)
        a, b = self._standard_ends()
        # NOTE: the lower tail mass `p` and the upper tail mass `q = 1 - p` are both
        # formed from the tails themselves; ndtri is applied to the smaller one. The
        # barrier stops XLA from folding `Phi(a) + (1 - t)` into `(Phi(a) + 1) - t`
        # when the mass rounds to one, which loses `Phi(a)` and makes `p(1) = 0`.
        p = _phi(a) + jax.lax.optimization_barrier(1 - t) * (_phi(b) - _phi(a))
        q = _phi(-b) + t * (_phi(-a) - _phi(-b))
        lower = p <= 0.5
        u = jnp.where(
            lower, ndtri(jnp.where(lower, p, 0.5)), -ndtri(jnp.where(lower, 0.5, q))
        )
        return _round_into(self.mean + self.std * u, self.logsnr_min, self.logsnr_max)

    def t_of_logsnr(self, logsnr: ScalarLike) -> Scalar:
        a, b = self._standard_ends()
        logsnr = _clip(_as_float(logsnr), self.logsnr_min, self.logsnr_max)
        u = (logsnr - self.mean) / self.std
        # t = (Phi(b) - Phi(u)) / (Phi(b) - Phi(a)), written with upper tails.
        t = (ndtr(-u) - _phi(-b)) / (_phi(-a) - _phi(-b))
        return _round_into(t, 0.0, 1.0)

    def _log_density(self, logsnr):
        a, b = self._standard_ends()
        u = (logsnr - self.mean) / self.std
        mass = _phi(-a) - _phi(-b) if abs(a) < abs(b) else _phi(b) - _phi(a)
        return -0.5 * u**2 - 0.5 * math.log(2 * math.pi) - math.log(self.std * mass)

    @property
    def density_formula(self) -> str:
        """`p(logsnr)` in words, for tables; untruncated, up to renormalisation."""
        return f"N(λ; {self.mean:g}, {self.std:g}²)"


# --- flow matching, optimal-transport path -------------------------------------------


class FlowMatchingOT(Schedule):
    """The linear interpolation path `z = (1 - t) x + t eps` of flow matching.

    Its log-SNR is `2 log((1 - t) / t)`; uniform `t` makes `logsnr` logistic with
    scale 2, `p(logsnr) = sech^2(logsnr / 4) / 8`. The truncated version maps `t`
    linearly onto `[sigmoid(-logsnr_max / 2), sigmoid(-logsnr_min / 2)]`.
    """

    logsnr_min: float = eqx.field(default=-15.0, converter=float)
    logsnr_max: float = eqx.field(default=15.0, converter=float)

    def _ends(self):
        a = 1 / (1 + math.exp(self.logsnr_max / 2))  # sigmoid(-logsnr_max / 2)
        b = 1 / (1 + math.exp(-self.logsnr_min / 2))  # sigmoid(logsnr_min / 2)
        return a, b, 1 - a - b

    def logsnr(self, t: ScalarLike) -> Scalar:
        a, b, width = self._ends()
        t = _clip(_as_float(t), 0.0, 1.0)
        path_sigma = a + t * width
        # NOTE: the barrier keeps XLA from folding `b + (1 - t)` into `(b + 1) - t`.
        path_alpha = b + jax.lax.optimization_barrier(1 - t) * width
        logsnr = 2 * (jnp.log(path_alpha) - jnp.log(path_sigma))
        return _round_into(logsnr, self.logsnr_min, self.logsnr_max)

    def t_of_logsnr(self, logsnr: ScalarLike) -> Scalar:
        a, b, width = self._ends()
        logsnr = _clip(_as_float(logsnr), self.logsnr_min, self.logsnr_max)
        t_high = (jax.nn.sigmoid(-logsnr / 2) - a) / width
        t_low = 1 - (jax.nn.sigmoid(logsnr / 2) - b) / width
        return _round_into(jnp.where(logsnr >= 0, t_high, t_low), 0.0, 1.0)

    def _log_density(self, logsnr):
        _, _, width = self._ends()
        log_sig = jax.nn.log_sigmoid(logsnr / 2) + jax.nn.log_sigmoid(-logsnr / 2)
        return log_sig - math.log(2 * width)

    @property
    def density_formula(self) -> str:
        """`p(logsnr)` in words, for tables; untruncated, up to renormalisation."""
        return "sech²(λ/4) / 8 (logistic, scale 2)"


# --- linear in log-SNR ----------------------------------------------------------------


class Linear(Schedule):
    """Log-SNR linear in `t`: uniform density `1 / (logsnr_max - logsnr_min)`."""

    logsnr_min: float = eqx.field(default=-15.0, converter=float)
    logsnr_max: float = eqx.field(default=15.0, converter=float)

    def logsnr(self, t: ScalarLike) -> Scalar:
        t = _clip(_as_float(t), 0.0, 1.0)
        logsnr = self.logsnr_max + t * (self.logsnr_min - self.logsnr_max)
        return _round_into(logsnr, self.logsnr_min, self.logsnr_max)

    def t_of_logsnr(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _clip(_as_float(logsnr), self.logsnr_min, self.logsnr_max)
        t = (self.logsnr_max - logsnr) / (self.logsnr_max - self.logsnr_min)
        return _round_into(t, 0.0, 1.0)

    def _log_density(self, logsnr):
        return jnp.full_like(logsnr, -math.log(self.logsnr_max - self.logsnr_min))

    @property
    def density_formula(self) -> str:
        """`p(logsnr)` in words, for tables; untruncated, up to renormalisation."""
        return "1 / (λ_max - λ_min)"


# --- piecewise constant (the adaptive schedule's proposal) --------------------------


class PiecewiseConstant(Schedule):
    """A density constant on `num_bins` equal-width bins of `[logsnr_min, logsnr_max]`.

    The paper's adaptive noise schedule (PAPER.md section 5) is of this form: bin
    masses proportional to a running estimate of the weighted loss per bin. Drawing
    `t ~ U(0, 1)` picks a bin with probability equal to its mass, then a level
    uniformly inside it. `bin_weights` need not be normalised but must be positive,
    so that every level keeps a non-zero proposal density and importance weights stay
    finite. They are an array field: updating them inside `jit` does not recompile.
    """

    bin_weights: Float[Array, " num_bins"]
    logsnr_min: float = eqx.field(default=-15.0, converter=float)
    logsnr_max: float = eqx.field(default=15.0, converter=float)

    def __check_init__(self):
        weights = self.bin_weights
        if isinstance(weights, jax.core.Tracer):
            return
        if weights.ndim != 1 or weights.shape[0] < 1:
            raise ValueError(
                "PiecewiseConstant: bin_weights must be a non-empty vector; got shape "
                f"{weights.shape}."
            )
        if not bool(jnp.all(jnp.isfinite(weights) & (weights > 0))):
            raise ValueError(
                "PiecewiseConstant: every bin weight must be positive and finite; got "
                f"bin_weights={weights}."
            )

    @property
    def num_bins(self) -> int:
        """Number of bins, the length of `bin_weights`."""
        return self.bin_weights.shape[0]

    @property
    def bin_width(self) -> float:
        """Width of every bin, `(logsnr_max - logsnr_min) / num_bins`."""
        return (self.logsnr_max - self.logsnr_min) / self.num_bins

    def bin_edges(self) -> Float[Array, " num_edges"]:
        """Edges of the bins, increasing in logsnr.

        **Returns:** `num_bins + 1` edges from `logsnr_min` to `logsnr_max`.
        """
        return jnp.linspace(self.logsnr_min, self.logsnr_max, self.num_bins + 1)

    def probabilities(self) -> Float[Array, " num_bins"]:
        """Bin masses `bin_weights / sum(bin_weights)`, by increasing logsnr.

        **Returns:** `num_bins` masses summing to one.
        """
        return self.bin_weights / jnp.sum(self.bin_weights)

    def _mass_above(self):
        # Mass of the bins above each bin's upper edge, i.e. t at that edge.
        probs = self.probabilities()
        return jnp.cumsum(probs[::-1])[::-1] - probs

    def logsnr(self, t: ScalarLike) -> Scalar:
        t = _clip(_as_float(t), 0.0, 1.0)
        probs = self.probabilities()
        above = self._mass_above()
        # Bin j holds t in [above_j, above_j + probs_j); `above` decreases in j.
        j = jnp.clip(jnp.sum(above > t), 0, self.num_bins - 1)
        upper = self.logsnr_min + (j + 1) * self.bin_width
        logsnr = upper - (t - above[j]) / probs[j] * self.bin_width
        return _round_into(logsnr, self.logsnr_min, self.logsnr_max)

    def t_of_logsnr(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _clip(_as_float(logsnr), self.logsnr_min, self.logsnr_max)
        j = jnp.floor((logsnr - self.logsnr_min) / self.bin_width).astype(int)
        j = jnp.clip(j, 0, self.num_bins - 1)
        upper = self.logsnr_min + (j + 1) * self.bin_width
        t = (
            self._mass_above()[j]
            + (upper - logsnr) / self.bin_width * (self.probabilities()[j])
        )
        return _round_into(t, 0.0, 1.0)

    def _log_density(self, logsnr):
        j = jnp.floor((logsnr - self.logsnr_min) / self.bin_width).astype(int)
        j = jnp.clip(j, 0, self.num_bins - 1)
        return jnp.log(self.probabilities()[j]) - math.log(self.bin_width)

    @property
    def density_formula(self) -> str:
        """`p(logsnr)` in words, for tables; untruncated, up to renormalisation."""
        return f"piecewise constant on {self.num_bins} bins"


SCHEDULES: dict[str, type[Schedule]] = {
    "cosine": Cosine,
    "shifted_cosine": ShiftedCosine,
    "edm": EDM,
    "fm_ot": FlowMatchingOT,
    "linear": Linear,
    "piecewise_constant": PiecewiseConstant,
}


def get_schedule(name: str, **kwargs) -> Schedule:
    """Build the schedule `SCHEDULES[name](**kwargs)`, naming valid names on error.

    **Arguments:**

    - `name`: a key of `SCHEDULES`, e.g. `"cosine"`.
    - `**kwargs`: the schedule's fields, e.g. `logsnr_min`, `logsnr_max`.

    **Returns:** the schedule.

    **Raises:** `ValueError` for an unknown name, listing the valid ones.
    """
    if name not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule {name!r}; valid names are {sorted(SCHEDULES)}."
        )
    return SCHEDULES[name](**kwargs)
