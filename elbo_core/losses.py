"""The weighted loss, the continuous-time ELBO and the paper's main result.

A denoiser is any callable `model(z, logsnr) -> eps_hat` on one example: a network or
the oracle `elbo_core.analytic.GaussianMixture`. Everything here holds for every
denoiser, good or bad.

**Weighted loss** (PAPER.md section 2), over a fixed range `[logsnr_min, logsnr_max]`:

    L_w(x) = 1/2 Int w(logsnr) E_eps ||eps_hat(z; logsnr) - eps||^2 dlogsnr
           = E_{logsnr ~ p, eps} [ 1/2 (w / p) ||eps_hat - eps||^2 ],

for any proposal `p` (a `Schedule` on the same range): the schedule is an importance
sampling distribution and changes the variance, never the mean.

**ELBO** (Kingma et al. 2021; PAPER.md section 2, `w = 1`):

    -ELBO(x) = KL(q(z_min | x) || N(0, I))          (prior)
             + E_q [-log p(x | z_max)]              (reconstruction)
             + 1/2 Int E_eps ||eps - eps_hat||^2 dlogsnr    (diffusion)

**Main result** (PAPER.md section 4). With the truncated loss

    L(logsnr; x) = KL(q(z_min | x) || N(0, I)) + 1/2 Int_{min}^{logsnr} E_eps ||eps -
    eps_hat||^2 dlogsnr',

(`L(t; x)` is `L(logsnr(t); x)` for any schedule), integration by parts gives, for any
weighting,

    L_w(x) = Int (-dw/dlogsnr) L(logsnr; x) dlogsnr
             + w(max) L(max; x) - w(min) L(min; x),

where the first term is `Int_0^1 (dw/dt) L(t; x) dt` in time and the last is a
model-independent constant (`L(min; x)` is the prior KL). For a non-increasing `w`,
`L_w(x) = w(min) E_{logsnr ~ p_w} [L(logsnr; x)] - w(min) L(min; x)`.

Both Monte Carlo estimators (with their standard errors) and deterministic quadrature
versions are provided: composite Gauss-Legendre in logsnr, and Gauss-Hermite (or a
fixed set of draws) for the expectation over `eps`.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar, ScalarLike

from . import process
from .schedules import Linear, PiecewiseConstant, Schedule
from .weighting import (
    ELBO,
    MONOTONIC_CHECK_POINTS,
    EDMMonotonic,
    MinSNR,
    Shifted,
    Weighting,
)

__all__ = [
    "DECODERS",
    "SAMPLING_METHODS",
    "ByParts",
    "ELBOTerms",
    "IntegrandMoments",
    "MonteCarloEstimate",
    "PerturbedDenoiser",
    "augmentation_constant",
    "by_parts",
    "check_proposal",
    "data_quadrature",
    "denoising_error",
    "draw_uniforms",
    "dweight_dt",
    "dweight_masses",
    "eps_quadrature",
    "expected_truncated_loss",
    "gaussian_elbo_terms",
    "integrand_moments",
    "logsnr_quadrature",
    "negative_elbo",
    "negative_elbo_quadrature",
    "prior_kl",
    "reconstruction",
    "truncated_loss",
    "weighted_loss",
    "weighted_loss_batch",
    "weighted_loss_quadrature",
    "weighted_loss_term",
    "weighting_breakpoints",
]

Denoiser = Callable[..., Any]

DECODERS = ("gaussian", "discrete")
SAMPLING_METHODS = ("iid", "stratified", "low_discrepancy", "antithetic")

# Nodes per panel of composite Gauss-Legendre quadrature in logsnr: exact for
# polynomials of degree 15 on each panel.
GAUSS_LEGENDRE_ORDER = 8
# Gauss-Hermite nodes per dimension for expectations over eps: the integrands are
# smooth, and 1-D expectations (the discretised decoder) converge long before this.
NUM_HERMITE = 8
DECODER_HERMITE = 64
# A product Gauss-Hermite grid larger than this is refused: pass fixed draws instead.
MAX_HERMITE_POINTS = 2**16
# Relative tolerance when a proposal's range is compared with the loss's range.
RANGE_RTOL = 1e-9
# Distance from the grid of k levels tolerated for discrete data, in bin widths.
GRID_TOLERANCE = 1e-3
# Grid on which the positive and negative parts of dw/dlogsnr are measured.
DWEIGHT_GRID_POINTS = 20001
# Bins narrower than this (in decoder-noise units) use the midpoint expansion.
NARROW_BIN = 1e-3
# Outer nodes processed together in nested quadratures (memory, not accuracy).
OUTER_BATCH = 16
# Below this alpha^2 the prior KL uses its power series (see `prior_kl`).
PRIOR_SERIES_THRESHOLD = 0.05
PRIOR_SERIES_TERMS = 12


def _float_dtype():
    return jnp.result_type(float)


def _as_float(x) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(x, float))


def _check_range(owner: str, logsnr_min: float, logsnr_max: float) -> None:
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)):
        raise ValueError(
            f"{owner}: logsnr_min={logsnr_min} and logsnr_max={logsnr_max} must both "
            "be finite numbers."
        )
    if not logsnr_min < logsnr_max:
        raise ValueError(
            f"{owner}: logsnr_min={logsnr_min} must be below logsnr_max={logsnr_max}."
        )


def _check_positive_int(owner: str, name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{owner}: {name}={value!r} must be an integer.")
    if value < minimum:
        raise ValueError(f"{owner}: {name}={value} must be at least {minimum}.")


# --- results --------------------------------------------------------------------------


class MonteCarloEstimate(eqx.Module):
    """A Monte Carlo estimate with its spread.

    **Fields:**

    - `mean`: the estimate (average of the per-sample terms).
    - `stderr`: its standard error, `sqrt(variance / num_samples)`.
    - `variance`: the unbiased sample variance of one term (the per-sample variance
      of the estimator, the quantity a proposal changes).
    - `variance_stderr`: the standard error of `variance`,
      `sqrt((m4 - variance^2) / num_samples)` with `m4` the fourth central moment.
    - `num_samples`: the number of terms averaged.

    With stratified, low-discrepancy or antithetic draws the terms are not
    independent; the reported variance is then that of one term and `stderr` is
    conservative for stratified and low-discrepancy draws.
    """

    mean: Float[Array, "*batch"]
    stderr: Float[Array, "*batch"]
    variance: Float[Array, "*batch"]
    variance_stderr: Float[Array, "*batch"]
    num_samples: int = eqx.field(static=True)


def _estimate(terms: Float[Array, " n"]) -> MonteCarloEstimate:
    num_samples = terms.shape[0]
    mean = jnp.mean(terms)
    if num_samples > 1:
        variance = jnp.var(terms, ddof=1)
        fourth = jnp.mean((terms - mean) ** 4)
        variance_stderr = jnp.sqrt(jnp.maximum(fourth - variance**2, 0) / num_samples)
    else:
        variance = variance_stderr = jnp.full_like(mean, jnp.nan)
    return MonteCarloEstimate(
        mean, jnp.sqrt(variance / num_samples), variance, variance_stderr, num_samples
    )


class ELBOTerms(eqx.Module):
    """The three terms of the negative continuous-time ELBO, in nats.

    **Fields:**

    - `prior`: `KL(q(z_min | x) || N(0, I))`.
    - `reconstruction`: `E_q [-log p(x | z_max)]`.
    - `diffusion`: `1/2 Int E ||eps - eps_hat||^2 dlogsnr`.
    - `diffusion_stderr`: the Monte Carlo standard error of `diffusion` (zero for
      the quadrature version; the other two terms are computed deterministically).
    - `num_dims`: the number of dimensions of one example, for bits per dimension.

    Scalars for one example; arrays of the batch shape after `jax.vmap`.
    """

    prior: Float[Array, "*batch"]
    reconstruction: Float[Array, "*batch"]
    diffusion: Float[Array, "*batch"]
    diffusion_stderr: Float[Array, "*batch"]
    num_dims: int = eqx.field(static=True)

    @property
    def total(self) -> Float[Array, "*batch"]:
        """`-ELBO`, the sum of the three terms, in nats."""
        return self.prior + self.reconstruction + self.diffusion

    def bits_per_dim(self) -> dict[str, Float[Array, "*batch"]]:
        """The terms in bits per dimension, `nats / (num_dims log 2)`.

        Keys `bpd` (the total), `bpd_prior`, `bpd_recon`, `bpd_diff` and
        `bpd_diff_stderr`. With the discretised decoder these are bits per dimension
        of the discrete data directly. With the Gaussian decoder they are of a
        density; see `reconstruction` for the offset that makes them comparable.
        """
        scale = 1.0 / (self.num_dims * math.log(2.0))
        return {
            "bpd": self.total * scale,
            "bpd_prior": self.prior * scale,
            "bpd_recon": self.reconstruction * scale,
            "bpd_diff": self.diffusion * scale,
            "bpd_diff_stderr": self.diffusion_stderr * scale,
        }


# --- quadrature rules -----------------------------------------------------------------


def _panel_counts(lengths: Sequence[float], num_panels: int) -> list[int]:
    """Split `num_panels` over segments in proportion to length, at least one each.

    The counts add up to `max(num_panels, len(lengths))` (largest remainders get
    the spare panels), so the number of nodes does not depend on where the
    breakpoints fall and compiled code is reused across weightings.
    """
    num_panels = max(num_panels, len(lengths))
    total = sum(lengths)
    shares = [num_panels * length / total for length in lengths]
    counts = [max(1, math.floor(share)) for share in shares]
    spare = num_panels - sum(counts)
    order = sorted(
        range(len(lengths)), key=lambda i: shares[i] - counts[i], reverse=True
    )
    for i in order[:spare] if spare > 0 else ():
        counts[i] += 1
    while sum(counts) > num_panels:  # segments forced up to one panel
        i = max(range(len(counts)), key=lambda j: counts[j])
        counts[i] -= 1
    return counts


def logsnr_quadrature(
    logsnr_min: float,
    logsnr_max: float,
    *,
    num_points: int = 256,
    breakpoints: Sequence[float] = (),
) -> tuple[Float[Array, " num_nodes"], Float[Array, " num_nodes"]]:
    """Composite Gauss-Legendre nodes and weights on `[logsnr_min, logsnr_max]`.

    `Int f dlogsnr ~ sum_i weights_i f(nodes_i)`. The range is cut at `breakpoints`
    (kinks of a weighting, see `weighting_breakpoints`) that fall strictly inside it,
    and each piece into equal panels of `GAUSS_LEGENDRE_ORDER` nodes, about
    `num_points / GAUSS_LEGENDRE_ORDER` panels in all. On every panel where the
    integrand is smooth, the error falls like the panel width to the power 16.

    **Returns:** `(nodes, weights)`, increasing in logsnr.
    """
    _check_range("logsnr_quadrature", logsnr_min, logsnr_max)
    _check_positive_int("logsnr_quadrature", "num_points", num_points)
    cuts = sorted({float(b) for b in breakpoints if logsnr_min < float(b) < logsnr_max})
    edges = [float(logsnr_min), *cuts, float(logsnr_max)]
    lengths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    num_panels = max(1, round(num_points / GAUSS_LEGENDRE_ORDER))
    counts = _panel_counts(lengths, num_panels)

    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_ORDER)
    nodes, weights = [], []
    for (a, b), count in zip(
        zip(edges[:-1], edges[1:], strict=True), counts, strict=True
    ):
        panel_edges = np.linspace(a, b, count + 1)
        for lo, hi in zip(panel_edges[:-1], panel_edges[1:], strict=True):
            half = 0.5 * (hi - lo)
            nodes.append(lo + half * (unit_nodes + 1))
            weights.append(half * unit_weights)
    dtype = _float_dtype()
    return jnp.asarray(np.concatenate(nodes), dtype), jnp.asarray(
        np.concatenate(weights), dtype
    )


def _unit_quadrature(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre on [0, 1] with about `num_points` nodes."""
    num_panels = max(1, round(num_points / GAUSS_LEGENDRE_ORDER))
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_ORDER)
    lo = np.arange(num_panels)[:, None] / num_panels
    half = 0.5 / num_panels
    nodes = (lo + half * (unit_nodes + 1)).ravel()
    weights = np.broadcast_to(half * unit_weights, (num_panels, unit_weights.size))
    return nodes, weights.ravel()


def eps_quadrature(
    shape: tuple[int, ...], *, num_hermite: int = NUM_HERMITE
) -> tuple[Float[Array, " num_eps *shape"], Float[Array, " num_eps"]]:
    """Product Gauss-Hermite rule for expectations over `eps ~ N(0, I)` of `shape`.

    `E_eps f(eps) ~ sum_i prob_i f(eps_i)`, exact for polynomials of degree up to
    `2 num_hermite - 1` in each coordinate. The grid has `num_hermite^D` points, so
    it suits low-dimensional data; beyond `MAX_HERMITE_POINTS` points pass a fixed
    set of draws to the quadrature functions instead.

    **Returns:** `(eps, prob)` with `eps` of shape `(num_hermite^D, *shape)` and
    probabilities summing to one.
    """
    _check_positive_int("eps_quadrature", "num_hermite", num_hermite)
    num_dims = math.prod(shape)
    num_points = num_hermite**num_dims
    if num_points > MAX_HERMITE_POINTS:
        raise ValueError(
            f"eps_quadrature: a product Gauss-Hermite grid of {num_hermite} nodes in "
            f"{num_dims} dimensions has {num_points} points, more than "
            f"MAX_HERMITE_POINTS={MAX_HERMITE_POINTS}; pass a fixed array of eps draws "
            "of shape (num_eps, *x.shape) instead."
        )
    unit_nodes, unit_weights = np.polynomial.hermite_e.hermegauss(num_hermite)
    unit_prob = unit_weights / math.sqrt(2 * math.pi)
    grids = np.meshgrid(*([unit_nodes] * num_dims), indexing="ij")
    probs = np.meshgrid(*([unit_prob] * num_dims), indexing="ij")
    eps = np.stack([g.ravel() for g in grids], axis=-1).reshape(num_points, *shape)
    prob = np.prod(np.stack([p.ravel() for p in probs], axis=-1), axis=-1)
    dtype = _float_dtype()
    return jnp.asarray(eps, dtype), jnp.asarray(prob, dtype)


def _resolve_eps(shape: tuple[int, ...], eps, num_hermite: int) -> tuple[Array, Array]:
    """Gauss-Hermite nodes when `eps` is None, else equal weights on the draws."""
    if eps is None:
        return eps_quadrature(shape, num_hermite=num_hermite)
    eps = _as_float(eps)
    if eps.ndim < 1 or eps.shape[1:] != tuple(shape) or eps.shape[0] < 1:
        raise ValueError(
            f"eps draws must have shape (num_eps, *x.shape) = (num_eps, "
            f"{', '.join(map(str, shape))}); got {eps.shape}."
        )
    prob = jnp.full((eps.shape[0],), 1.0 / eps.shape[0], eps.dtype)
    return eps, prob


# --- the terms of the ELBO ------------------------------------------------------------


def _softplus_minus_sigmoid(logsnr: Array) -> Array:
    """`-log(sigma^2) - alpha^2 = -log(1 - a) - a` with `a = sigmoid(logsnr)`."""
    a = jax.nn.sigmoid(logsnr)
    # NOTE: both terms are about `a` for very negative logsnr and cancel to `a^2/2`;
    # below the threshold the power series `sum_{k>=2} a^k / k` keeps full relative
    # precision (truncation error below a^13 / 13, under 1e-15 relative).
    small = jnp.minimum(a, PRIOR_SERIES_THRESHOLD)
    series = sum(small**k / k for k in range(2, PRIOR_SERIES_TERMS + 2))
    direct = jax.nn.softplus(logsnr) - a
    return jnp.where(a < PRIOR_SERIES_THRESHOLD, series, direct)


def prior_kl(x: Float[ArrayLike, "*shape"], logsnr_min: ScalarLike) -> Scalar:
    """Prior term `KL(q(z_min | x) || N(0, I))` in nats.

    `1/2 sum_i (alpha^2 x_i^2 + sigma^2 - 1 - log sigma^2)
     = 1/2 [alpha^2 ||x||^2 + D (-log sigma^2 - alpha^2)]` at `logsnr_min`,
    computed so that it stays accurate (and non-negative) for `logsnr_min` down to
    -40 and below.
    """
    x = _as_float(x)
    logsnr_min = jnp.asarray(logsnr_min, x.dtype)
    alpha2 = jnp.exp(process.log_alpha2(logsnr_min))
    num_dims = x.size
    return 0.5 * (
        alpha2 * jnp.sum(x**2) + num_dims * _softplus_minus_sigmoid(logsnr_min)
    )


def _log1mexp(x: Array) -> Array:
    """`log(1 - exp(x))` for `x <= 0`, accurate at both ends."""
    return jnp.where(
        x > -math.log(2.0),
        jnp.log(-jnp.expm1(jnp.minimum(x, -1e-300))),
        jnp.log1p(-jnp.exp(jnp.minimum(x, 0.0))),
    )


def _log_bin_probability(lower: Array, upper: Array) -> Array:
    """`log(Phi(upper) - Phi(lower))` for finite `lower < upper`, in log space."""
    # NOTE: the interval is reflected into the lower half-line, where log_ndtr keeps
    # full relative precision; the difference of CDFs is then a log1mexp.
    flip = lower + upper > 0
    lo = jnp.where(flip, -upper, lower)
    hi = jnp.where(flip, -lower, upper)
    log_hi = log_ndtr(hi)
    return log_hi + _log1mexp(log_ndtr(lo) - log_hi)


def _discrete_nll(
    level: Array, eps: Array, half_width: Array, num_levels: int
) -> Array:
    """`-log p(x | z)` of one coordinate on bin `level` (0 .. k-1), `z` from `eps`.

    `half_width` is the bin half-width in units of the decoder scale,
    `h alpha / sigma`; the bin is `[-half_width - eps, half_width - eps]` in standard
    units, open-ended for the first and last levels.
    """
    upper = half_width - eps
    lower = -half_width - eps
    first = level <= 0
    last = level >= num_levels - 1
    # NOTE: for a bin much narrower than the decoder scale (logsnr_max very
    # negative) the two bounds agree to working precision and their CDFs cancel;
    # there the mass is `2 c phi(eps) (1 + (eps^2 - 1) c^2 / 6 + O(c^4))`,
    # `c = half_width`, whose truncation error is below 1e-12 for c < 1e-3.
    narrow = half_width < NARROW_BIN
    c = jnp.minimum(half_width, NARROW_BIN)
    log_narrow = (
        jnp.log(2 * c)
        - 0.5 * eps**2
        - 0.5 * math.log(2 * math.pi)
        + jnp.log1p((eps**2 - 1) * c**2 / 6)
    )
    interior = jnp.where(narrow, log_narrow, _log_bin_probability(lower, upper))
    return -jnp.where(
        first, log_ndtr(upper), jnp.where(last, log_ndtr(-lower), interior)
    )


def _check_on_grid(x: Array, num_levels: int) -> Array:
    """The level index of every coordinate; an error at run time if off the grid."""
    position = (x + 1) * (num_levels - 1) / 2
    level = jnp.round(position)
    off_grid = jnp.abs(position - level) > GRID_TOLERANCE
    outside = (level < 0) | (level > num_levels - 1)
    level = eqx.error_if(
        level,
        jnp.any(outside | off_grid),
        f"discrete decoder: every coordinate of x must be one of the {num_levels} "
        f"levels -1 + 2 i / {num_levels - 1} in [-1, 1]",
    )
    return jnp.clip(level, 0, num_levels - 1)


def _check_decoder(owner: str, decoder: str, num_levels: int) -> None:
    if decoder not in DECODERS:
        raise ValueError(
            f"{owner}: decoder={decoder!r} is not one of {list(DECODERS)}: 'gaussian' "
            "for continuous data, 'discrete' for data on num_levels levels in [-1, 1]."
        )
    if decoder == "discrete":
        _check_positive_int(owner, "num_levels", num_levels, minimum=2)


def reconstruction(
    x: Float[ArrayLike, "*shape"],
    logsnr_max: ScalarLike,
    *,
    decoder: str = "gaussian",
    num_levels: int = 256,
    num_hermite: int = DECODER_HERMITE,
) -> Scalar:
    """Reconstruction term `E_{z ~ q(z_max | x)} [-log p(x | z)]` in nats.

    The decoder has no parameters: it reads `x` off `z / alpha`, whose noise has
    scale `sigma / alpha = exp(-logsnr_max / 2)`.

    - `decoder="gaussian"`: the density `p(x | z) = N(x; z / alpha, sigma^2 / alpha^2
      I)`, so the term is `D/2 (log(2 pi) - logsnr_max + 1)` exactly, for any `x`.
      The ELBO is then a bound on a density: its bits per dimension can be negative.
      For data quantised to `k` levels in [-1, 1] (bin width `2 / (k - 1)`) and
      uniformly dequantised, add `log2((k - 1) / 2)` bits per dimension to compare
      with discrete likelihoods (7 bits for 8-bit images).
    - `decoder="discrete"`: the probability of the bin of `x` among `num_levels`
      levels `-1 + 2 i / (k - 1)`, `Phi((x + h - z/alpha) alpha/sigma) - Phi((x - h -
      z/alpha) alpha/sigma)` with `h = 1 / (k - 1)`, the end bins open to infinity.
      This is a probability mass: its bits per dimension, `nats / (D log 2)`, are
      those of the discrete data and need no dequantisation offset. Each bin is
      formed as a difference of normal CDFs in log space (`log_ndtr`), finite for
      every `logsnr_max` in [-40, 40].

    The expectation over `z` factorises into one-dimensional expectations over each
    coordinate's noise, which are computed by Gauss-Hermite quadrature with
    `num_hermite` nodes (deterministic, no Monte Carlo error).

    **Raises:** `ValueError` for an unknown decoder; at run time (`eqx.error_if`)
    when discrete data are off the grid of levels.
    """
    _check_decoder("reconstruction", decoder, num_levels)
    x = _as_float(x)
    logsnr_max = jnp.asarray(logsnr_max, x.dtype)
    num_dims = x.size
    if decoder == "gaussian":
        return 0.5 * num_dims * (math.log(2 * math.pi) - logsnr_max + 1.0)

    return _discrete_reconstruction(x, logsnr_max, num_levels, num_hermite)


@eqx.filter_jit
def _discrete_reconstruction(x, logsnr_max, num_levels, num_hermite):
    level = _check_on_grid(x.ravel(), num_levels)
    unit_nodes, unit_weights = np.polynomial.hermite_e.hermegauss(num_hermite)
    eps = jnp.asarray(unit_nodes, x.dtype)
    prob = jnp.asarray(unit_weights / math.sqrt(2 * math.pi), x.dtype)
    # h alpha / sigma = exp(log h + logsnr / 2), formed in log space.
    half_width = jnp.exp(-math.log(num_levels - 1) + logsnr_max / 2)
    nll = _discrete_nll(level[:, None], eps[None, :], half_width, num_levels)
    return jnp.sum(nll @ prob)


# --- the weighted loss, Monte Carlo ---------------------------------------------------


def check_proposal(proposal: Schedule, logsnr_min: float, logsnr_max: float) -> None:
    """Raise `ValueError` unless `proposal` spans exactly `[logsnr_min, logsnr_max]`.

    The weighted loss is an integral over a fixed range; a proposal on another range
    would estimate a different integral.
    """
    if not isinstance(proposal, Schedule):
        raise ValueError(
            f"proposal must be a Schedule (see elbo_core.schedules); got "
            f"{type(proposal).__name__}."
        )
    _check_range("weighted loss", logsnr_min, logsnr_max)
    scale = max(abs(logsnr_min), abs(logsnr_max), 1.0)
    for name, have, want in (
        ("logsnr_min", proposal.logsnr_min, logsnr_min),
        ("logsnr_max", proposal.logsnr_max, logsnr_max),
    ):
        if abs(have - want) > RANGE_RTOL * scale:
            raise ValueError(
                f"proposal {type(proposal).__name__} has {name}={have}, but the loss "
                f"is over [{logsnr_min}, {logsnr_max}]; build the proposal on the same "
                "range (it must be a density on exactly that range to be unbiased)."
            )


def draw_uniforms(
    num_samples: int, *, sampling: str = "iid", key: PRNGKeyArray
) -> Float[Array, " num_samples"]:
    """Uniforms in [0, 1) to be mapped through a schedule, one per sample.

    Every draw is marginally `U(0, 1)`, so every term built from it is unbiased;
    the methods differ in how the draws are spread jointly:

    - `"iid"`: independent.
    - `"stratified"`: one draw in each of `num_samples` equal strata, the strata
      randomly assigned to positions (so that position `i` of a batch is not tied to
      stratum `i`).
    - `"low_discrepancy"`: `(u0 + i / num_samples) mod 1` with one shared `u0`
      (Kingma et al. 2021).
    - `"antithetic"`: pairs `u, 1 - u`; `num_samples` must be even.
    """
    _check_positive_int("draw_uniforms", "num_samples", num_samples)
    if sampling not in SAMPLING_METHODS:
        raise ValueError(
            f"draw_uniforms: sampling={sampling!r} is not one of "
            f"{list(SAMPLING_METHODS)}."
        )
    dtype = _float_dtype()
    if sampling == "iid":
        return jax.random.uniform(key, (num_samples,), dtype)
    if sampling == "stratified":
        permutation_key, offset_key = jax.random.split(key)
        strata = jax.random.permutation(permutation_key, num_samples)
        offsets = jax.random.uniform(offset_key, (num_samples,), dtype)
        return (strata + offsets) / num_samples
    if sampling == "low_discrepancy":
        u0 = jax.random.uniform(key, (), dtype)
        return jnp.mod(u0 + jnp.arange(num_samples, dtype=dtype) / num_samples, 1.0)
    if num_samples % 2:
        raise ValueError(
            f"draw_uniforms: antithetic sampling needs an even num_samples; got "
            f"{num_samples}."
        )
    u = jax.random.uniform(key, (num_samples // 2,), dtype)
    return jnp.concatenate([u, 1.0 - u])


def weighted_loss_term(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    logsnr: ScalarLike,
    *,
    weighting: Weighting,
    proposal: Schedule,
    key: PRNGKeyArray,
) -> Scalar:
    """One importance-sampled term of the weighted loss at a drawn `logsnr`.

    `1/2 (w(logsnr) / p(logsnr)) ||eps_hat(z; logsnr) - eps||^2` with
    `z = alpha x + sigma eps`, `eps ~ N(0, I)` drawn here and `logsnr` drawn by the
    caller from `proposal` (`proposal.sample`, or `draw_uniforms` mapped through
    `proposal.logsnr_from_uniform` for stratified draws across a batch). Its
    expectation is `L_w(x)` on the proposal's range for every proposal.

    This is the per-example training loss: `jax.vmap` it over a batch.
    """
    x = _as_float(x)
    logsnr = jnp.asarray(logsnr, x.dtype)
    z, eps = process.sample_q(x, logsnr, key=key)
    eps_hat = model(z, logsnr)
    # NOTE: the importance weight w / p is formed from logs, so it is finite
    # whenever the ratio itself is representable. A proposal with light tails
    # spread over a wide range can make the ratio overflow float32 (~e^88) at
    # the ends, e.g. the EDM schedule on [-40, 40], where p(40) ~ e^-124: use
    # float64 or a range that the proposal covers.
    log_ratio = weighting.log_weight(logsnr) - proposal.log_density(logsnr)
    return 0.5 * jnp.exp(log_ratio) * jnp.sum((eps_hat - eps) ** 2)


# NOTE: the Monte Carlo estimators draw the levels and their importance weights in
# one compiled function (per proposal and weighting) and evaluate the model in
# another (per model), so that trying many proposals compiles the model once.


@eqx.filter_jit
def _importance_levels(weighting, proposal, num_samples, sampling, key):
    """Levels drawn from the proposal and their log importance weights `log(w/p)`."""
    u = draw_uniforms(num_samples, sampling=sampling, key=key)
    logsnr = proposal.logsnr_from_uniform(u)
    log_ratio = jax.vmap(weighting.log_weight)(logsnr)
    return logsnr, log_ratio - jax.vmap(proposal.log_density)(logsnr)


@eqx.filter_jit
def _importance_terms(model, x, logsnr, log_ratio, key, batched):
    """`1/2 exp(log_ratio) ||eps_hat - eps||^2` at each level, as `weighted_loss_term`.

    `x` is one example shared by all levels, or one example per level if `batched`.
    """
    keys = jax.random.split(key, logsnr.shape[0])

    def term(example, level, level_log_ratio, noise_key):
        z, eps = process.sample_q(example, level, key=noise_key)
        error = jnp.sum((model(z, level) - eps) ** 2)
        return 0.5 * jnp.exp(level_log_ratio) * error

    in_axes = (0 if batched else None, 0, 0, 0)
    return jax.vmap(term, in_axes=in_axes)(x, logsnr, log_ratio, keys)


def _weighted_loss_terms(model, x, weighting, proposal, num_samples, sampling, key):
    uniform_key, noise_key = jax.random.split(key)
    logsnr, log_ratio = _importance_levels(
        weighting, proposal, num_samples, sampling, uniform_key
    )
    return _importance_terms(model, x, logsnr, log_ratio, noise_key, False)


def weighted_loss(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    proposal: Schedule,
    logsnr_min: float,
    logsnr_max: float,
    num_samples: int = 1,
    sampling: str = "iid",
    key: PRNGKeyArray,
) -> MonteCarloEstimate:
    """Monte Carlo estimate of the weighted loss `L_w(x)` of one example.

    `L_w(x) = 1/2 Int_{min}^{max} w E_eps ||eps_hat - eps||^2 dlogsnr`
    (PAPER.md section 2) estimated by `num_samples` terms of `weighted_loss_term`,
    noise levels drawn from `proposal` (any schedule on the same range) with the
    given `sampling` method (see `draw_uniforms`). Unbiased for every proposal.

    **Returns:** a `MonteCarloEstimate`; its `variance` is the per-sample variance
    under this proposal.

    **Raises:** `ValueError` when the proposal's range is not
    `[logsnr_min, logsnr_max]` or a count or method is invalid.
    """
    check_proposal(proposal, logsnr_min, logsnr_max)
    _check_positive_int("weighted_loss", "num_samples", num_samples)
    if sampling not in SAMPLING_METHODS:
        raise ValueError(
            f"weighted_loss: sampling={sampling!r} is not one of "
            f"{list(SAMPLING_METHODS)}."
        )
    if sampling == "antithetic" and num_samples % 2:
        raise ValueError(
            f"weighted_loss: antithetic sampling needs an even num_samples; got "
            f"{num_samples}."
        )
    terms = _weighted_loss_terms(
        model, _as_float(x), weighting, proposal, num_samples, sampling, key
    )
    return _estimate(terms)


# --- quadrature over logsnr and eps ---------------------------------------------------


def _eps_mse(model, x, logsnr, eps, prob):
    """`E_eps ||eps - eps_hat(alpha x + sigma eps; logsnr)||^2` over a rule."""
    alpha = process.alpha(logsnr)
    sigma = process.sigma(logsnr)

    def squared_error(eps_i):
        eps_hat = model(alpha * x + sigma * eps_i, logsnr)
        return jnp.sum((eps_hat - eps_i) ** 2)

    return jax.vmap(squared_error)(eps) @ prob


@eqx.filter_jit
def _mse_curve(model, x, logsnr, eps, prob):
    """`_eps_mse` at every node of a 1-D array of logsnr values."""
    return jax.lax.map(
        lambda level: _eps_mse(model, x, level, eps, prob),
        logsnr,
        batch_size=OUTER_BATCH,
    )


def denoising_error(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    logsnr: Float[ArrayLike, "*levels"],
    *,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    num_hermite: int = NUM_HERMITE,
) -> Float[Array, "*levels"]:
    """`E_eps ||eps - eps_hat(alpha x + sigma eps; logsnr)||^2` at each level.

    Twice the slope of the truncated loss, `dL(logsnr; x)/dlogsnr` (PAPER.md
    section 4); the expectation by Gauss-Hermite or over fixed `eps` draws.
    """
    x = _as_float(x)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite)
    levels = _as_float(logsnr)
    values = _mse_curve(model, x, levels.reshape(-1).astype(x.dtype), eps, prob)
    return values.reshape(levels.shape)


def weighting_breakpoints(weighting: Weighting) -> tuple[float, ...]:
    """Where `w` is continuous but not smooth, for splitting quadrature panels.

    `min_snr` has a kink at `log(gamma)`; `edm_monotonic` at its `logsnr_peak`;
    `Shifted` moves those of the weighting it wraps by its shift. The other
    weightings of `WEIGHTINGS` are smooth.
    """
    if isinstance(weighting, MinSNR):
        return (math.log(weighting.gamma),)
    if isinstance(weighting, EDMMonotonic):
        return (float(weighting.logsnr_peak),)
    if isinstance(weighting, Shifted):
        inner = weighting_breakpoints(weighting.weighting)
        return tuple(b + weighting.shift for b in inner)
    return ()


def weighted_loss_quadrature(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    num_hermite: int = NUM_HERMITE,
) -> Scalar:
    """Deterministic weighted loss `L_w(x)` by quadrature.

    `L_w(x) = 1/2 Int_{min}^{max} w(logsnr) E_eps ||eps_hat - eps||^2 dlogsnr`, the
    integral by composite Gauss-Legendre (`logsnr_quadrature`, split at the
    weighting's kinks), the expectation over `eps` by Gauss-Hermite with
    `num_hermite` nodes per dimension or, when `eps` is given, by the average over
    those fixed draws.
    """
    x = _as_float(x)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite)
    nodes, weights = logsnr_quadrature(
        logsnr_min,
        logsnr_max,
        num_points=num_points,
        breakpoints=weighting_breakpoints(weighting),
    )
    mse = _mse_curve(model, x, nodes, eps, prob)
    weight = _weight_values(weighting, nodes)
    return 0.5 * jnp.sum(weights * weight * mse)


# --- the ELBO -------------------------------------------------------------------------


def _elbo_checks(owner, x, logsnr_min, logsnr_max, decoder, num_levels):
    _check_range(owner, logsnr_min, logsnr_max)
    _check_decoder(owner, decoder, num_levels)
    if x.size < 1:
        raise ValueError(f"{owner}: x must have at least one element; got {x.shape}.")


def negative_elbo(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    logsnr_min: float,
    logsnr_max: float,
    num_samples: int = 1,
    proposal: Schedule | None = None,
    sampling: str = "iid",
    decoder: str = "gaussian",
    num_levels: int = 256,
    num_hermite: int = DECODER_HERMITE,
    key: PRNGKeyArray,
) -> ELBOTerms:
    """Monte Carlo negative continuous-time ELBO of one example, with its terms.

    `-ELBO(x) = KL(q(z_min | x) || N(0, I)) + E_q[-log p(x | z_max)]
    + 1/2 Int_{min}^{max} E_eps ||eps - eps_hat||^2 dlogsnr` (Kingma et al. 2021).

    The prior and reconstruction terms are computed deterministically (`prior_kl`,
    `reconstruction` with the chosen `decoder`); the diffusion term is the weighted
    loss with `w = 1`, estimated with `num_samples` noise levels from `proposal`
    (default: uniform in logsnr on the range) and its standard error is reported.

    **Returns:** `ELBOTerms` in nats; `.total` and `.bits_per_dim()`.
    """
    x = _as_float(x)
    _elbo_checks("negative_elbo", x, logsnr_min, logsnr_max, decoder, num_levels)
    if proposal is None:
        proposal = Linear(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    diffusion = weighted_loss(
        model,
        x,
        weighting=ELBO(),
        proposal=proposal,
        logsnr_min=logsnr_min,
        logsnr_max=logsnr_max,
        num_samples=num_samples,
        sampling=sampling,
        key=key,
    )
    return ELBOTerms(
        prior=prior_kl(x, logsnr_min),
        reconstruction=reconstruction(
            x,
            logsnr_max,
            decoder=decoder,
            num_levels=num_levels,
            num_hermite=num_hermite,
        ),
        diffusion=diffusion.mean,
        diffusion_stderr=diffusion.stderr,
        num_dims=x.size,
    )


def negative_elbo_quadrature(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    num_hermite: int = NUM_HERMITE,
    decoder: str = "gaussian",
    num_levels: int = 256,
) -> ELBOTerms:
    """Deterministic negative continuous-time ELBO of one example, with its terms.

    The same three terms as `negative_elbo`; the diffusion term
    `1/2 Int E_eps ||eps - eps_hat||^2 dlogsnr` by composite Gauss-Legendre in
    logsnr and Gauss-Hermite over `eps` (`num_hermite` nodes per dimension) or the
    average over fixed `eps` draws of shape `(num_eps, *x.shape)`.
    `diffusion_stderr` is zero.
    """
    x = _as_float(x)
    _elbo_checks(
        "negative_elbo_quadrature", x, logsnr_min, logsnr_max, decoder, num_levels
    )
    diffusion = weighted_loss_quadrature(
        model,
        x,
        weighting=ELBO(),
        logsnr_min=logsnr_min,
        logsnr_max=logsnr_max,
        num_points=num_points,
        eps=eps,
        num_hermite=num_hermite,
    )
    return ELBOTerms(
        prior=prior_kl(x, logsnr_min),
        reconstruction=reconstruction(
            x, logsnr_max, decoder=decoder, num_levels=num_levels
        ),
        diffusion=diffusion,
        diffusion_stderr=jnp.zeros_like(diffusion),
        num_dims=x.size,
    )


def gaussian_elbo_terms(
    std: float, *, logsnr_min: float, logsnr_max: float, num_dims: int = 1
) -> ELBOTerms:
    """Closed-form expected `-ELBO` terms for data `x ~ N(0, std^2 I)`, optimal model.

    Per dimension, with `a = alpha^2` at `logsnr_min`:

    - prior: `E_x KL = 1/2 (a std^2 + (-log sigma^2 - a))`;
    - reconstruction (Gaussian decoder): `1/2 (log(2 pi) - logsnr_max + 1)`;
    - diffusion: the optimal eps-MSE is `sigmoid(logsnr + log std^2)`, so
      `1/2 Int sigmoid(logsnr + log std^2) dlogsnr
       = 1/2 [softplus(max + log std^2) - softplus(min + log std^2)]`.

    As the range widens the total tends to the exact NLL
    `analytic.gaussian_nll(std)` per dimension (PAPER.md section 4).
    """
    _check_range("gaussian_elbo_terms", logsnr_min, logsnr_max)
    if not std > 0:
        raise ValueError(f"gaussian_elbo_terms: std={std} must be positive.")
    dtype = _float_dtype()
    lo = jnp.asarray(logsnr_min, dtype)
    hi = jnp.asarray(logsnr_max, dtype)
    log_var = 2 * math.log(std)
    alpha2 = jnp.exp(process.log_alpha2(lo))
    prior = 0.5 * (alpha2 * std**2 + _softplus_minus_sigmoid(lo))
    recon = 0.5 * (math.log(2 * math.pi) - hi + 1.0)
    diffusion = 0.5 * (jax.nn.softplus(hi + log_var) - jax.nn.softplus(lo + log_var))
    return ELBOTerms(
        prior=num_dims * prior,
        reconstruction=num_dims * recon,
        diffusion=num_dims * diffusion,
        diffusion_stderr=jnp.zeros_like(diffusion),
        num_dims=num_dims,
    )


# --- the truncated loss and the main result -------------------------------------------


@eqx.filter_jit
def _truncated_losses(
    model, x, levels, logsnr_min, unit_nodes, unit_weights, eps, prob
):
    """`L(logsnr; x)` at each of `levels`, each by its own Gauss-Legendre rule."""
    base = prior_kl(x, logsnr_min)

    def one(level):
        length = level - logsnr_min
        inner = logsnr_min + length * unit_nodes
        mse = jax.vmap(lambda node: _eps_mse(model, x, node, eps, prob))(inner)
        return base + 0.5 * length * jnp.sum(unit_weights * mse)

    return jax.lax.map(one, levels, batch_size=OUTER_BATCH)


def truncated_loss(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    logsnr: Float[ArrayLike, "*levels"],
    *,
    logsnr_min: float,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    num_hermite: int = NUM_HERMITE,
) -> Float[Array, "*levels"]:
    """The loss `L(logsnr; x)` of the process truncated at `logsnr`, by quadrature.

    `L(logsnr; x) = KL(q(z_min | x) || N(0, I))
    + 1/2 Int_{min}^{logsnr} E_eps ||eps - eps_hat(z; logsnr')||^2 dlogsnr'`
    (PAPER.md section 4): the KL from the truncated forward process to the model,
    `-ELBO` of the noisy data `z` up to the entropy of `q(z | x)`. For a schedule,
    `L(t; x)` is `L(schedule.logsnr(t); x)`; `L(min; x)` is the prior KL alone.

    Each level gets its own composite Gauss-Legendre rule of about `num_points`
    nodes on `[logsnr_min, logsnr]`; the expectation over `eps` is Gauss-Hermite
    (`num_hermite` per dimension) or the average over fixed draws `eps`.

    **Returns:** `L` at every given level, in nats.
    """
    x = _as_float(x)
    if not math.isfinite(logsnr_min):
        raise ValueError(f"truncated_loss: logsnr_min={logsnr_min} must be finite.")
    levels = _as_float(logsnr)
    if not isinstance(levels, jax.core.Tracer) and bool(jnp.any(levels < logsnr_min)):
        raise ValueError(
            f"truncated_loss: every level must be at least logsnr_min={logsnr_min}; "
            f"got min(logsnr)={float(jnp.min(levels))}."
        )
    eps, prob = _resolve_eps(x.shape, eps, num_hermite)
    return _truncated_loss_rule(model, x, logsnr, logsnr_min, num_points, eps, prob)


def _truncated_loss_rule(model, x, logsnr, logsnr_min, num_points, eps, prob):
    """`truncated_loss` with the rule over `eps` given as nodes and probabilities."""
    levels = _as_float(logsnr)
    unit_nodes, unit_weights = _unit_quadrature(num_points)
    dtype = x.dtype
    flat = levels.reshape(-1).astype(dtype)
    values = _truncated_losses(
        model,
        x,
        flat,
        jnp.asarray(logsnr_min, dtype),
        jnp.asarray(unit_nodes, dtype),
        jnp.asarray(unit_weights, dtype),
        eps.astype(dtype),
        prob.astype(dtype),
    )
    return values.reshape(levels.shape)


class ByParts(eqx.Module):
    """The weighted loss and the terms of its integration by parts, in nats.

    `weighted_loss = integral + endpoint - constant` (PAPER.md section 4), with

    - `weighted_loss`: `L_w(x) = 1/2 Int w E ||eps - eps_hat||^2 dlogsnr`;
    - `integral`: `Int_0^1 (dw/dt) L(t; x) dt = Int (-dw/dlogsnr) L(logsnr; x)
      dlogsnr`, the ELBOs of every noise level weighted by `dw/dt`;
    - `endpoint`: `w(max) L(max; x)`, the full `-ELBO` (without reconstruction)
      weighted by `w(max)`;
    - `constant`: `w(min) L(min; x) = w(min) KL(q(z_min | x) || N(0, I))`, which
      does not depend on the model.
    """

    weighted_loss: Float[Array, "*batch"]
    integral: Float[Array, "*batch"]
    endpoint: Float[Array, "*batch"]
    constant: Float[Array, "*batch"]

    @property
    def residual(self) -> Float[Array, "*batch"]:
        """`weighted_loss - (integral + endpoint - constant)`."""
        return self.weighted_loss - (self.integral + self.endpoint - self.constant)

    @property
    def relative_residual(self) -> Float[Array, "*batch"]:
        """`|residual| / |weighted_loss|`."""
        return jnp.abs(self.residual) / jnp.abs(self.weighted_loss)


def by_parts(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    num_inner: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    num_hermite: int = NUM_HERMITE,
    breakpoints: Sequence[float] | None = None,
) -> ByParts:
    """Both sides of the paper's main identity, each computed independently.

    `L_w(x) = Int (-dw/dlogsnr) L(logsnr; x) dlogsnr + w(max) L(max; x)
    - w(min) L(min; x)` holds for every weighting and every denoiser: it is
    integration by parts, not a property of good models.

    The outer integrals (of `w E||eps - eps_hat||^2` and of `(-dw/dlogsnr) L`)
    share a composite Gauss-Legendre rule of about `num_points` nodes, cut at
    `breakpoints` (by default `weighting_breakpoints(weighting)`). `dw/dlogsnr` is
    `weighting.dweight` (autodiff). `L` at every outer node, and at `logsnr_max`,
    comes from its own nested rule of about `num_inner` nodes (`truncated_loss`),
    never from rearranging the left-hand side. The expectation over `eps` uses the
    same nodes or draws everywhere, so it contributes no error to the identity.

    **Returns:** a `ByParts` with the four terms and the residual.
    """
    x = _as_float(x)
    _check_range("by_parts", logsnr_min, logsnr_max)
    if breakpoints is None:
        breakpoints = weighting_breakpoints(weighting)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite)
    nodes, weights = logsnr_quadrature(
        logsnr_min, logsnr_max, num_points=num_points, breakpoints=breakpoints
    )

    dtype = x.dtype
    nodes, weights = nodes.astype(dtype), weights.astype(dtype)
    eps, prob = eps.astype(dtype), prob.astype(dtype)
    weight, slope, weight_ends = _weight_curves(
        weighting, nodes, jnp.asarray([logsnr_min, logsnr_max], dtype)
    )

    # Left-hand side: the weighted loss.
    mse = _mse_curve(model, x, nodes, eps, prob)
    weighted = 0.5 * jnp.sum(weights * weight * mse)

    # Right-hand side: L at every outer node and at the top of the range, each by
    # its own nested rule.
    levels = jnp.concatenate([nodes, jnp.asarray([logsnr_max], dtype)])
    losses = _truncated_loss_rule(model, x, levels, logsnr_min, num_inner, eps, prob)
    integral = jnp.sum(weights * (-slope) * losses[:-1])
    endpoint = weight_ends[1] * losses[-1]
    constant = weight_ends[0] * prior_kl(x, logsnr_min)
    return ByParts(weighted, integral, endpoint, constant)


@eqx.filter_jit
def _weight_values(weighting, nodes):
    return jax.vmap(weighting)(nodes)


@eqx.filter_jit
def _weight_curves(weighting, nodes, ends):
    """`w` and `dw/dlogsnr` at the nodes, and `w` at the two ends."""
    return (
        jax.vmap(weighting)(nodes),
        jax.vmap(weighting.dweight)(nodes),
        jax.vmap(weighting)(ends),
    )


def dweight_dt(weighting: Weighting, schedule: Schedule, t: ScalarLike) -> Scalar:
    """`d w(logsnr(t)) / dt = (dw/dlogsnr) (dlogsnr/dt)` for a schedule.

    Non-negative everywhere exactly when `w` is non-increasing in logsnr; its
    negative parts are the noise levels whose ELBO the objective pushes up.
    """
    logsnr = schedule.logsnr(t)
    return weighting.dweight(logsnr) * process.dlogsnr_dt(schedule, t)


def dweight_masses(
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    *,
    num_points: int = DWEIGHT_GRID_POINTS,
) -> dict[str, float]:
    """The masses of the positive and negative parts of `dw/dt` on the range.

    `positive_mass = Int max(0, dw/dt) dt = Int max(0, -dw/dlogsnr) dlogsnr` and
    `negative_mass = Int max(0, -dw/dt) dt`, the same for every schedule. They are
    summed from the increments of `w` over a grid of `num_points` levels, which is
    exact except in the few cells where `dw/dlogsnr` changes sign (an error of the
    order of the squared cell width there).

    **Returns:** a dict with `positive_mass`, `negative_mass`, `negative_fraction`
    (`negative / (positive + negative)`) and the end weights `weight_min`,
    `weight_max`; `positive_mass - negative_mass = weight_min - weight_max`.
    """
    _check_range("dweight_masses", logsnr_min, logsnr_max)
    _check_positive_int("dweight_masses", "num_points", num_points, minimum=2)
    grid = jnp.linspace(logsnr_min, logsnr_max, num_points, dtype=_float_dtype())
    weight = np.asarray(_weight_values(weighting, grid), dtype=float)
    steps = np.diff(weight)  # dw along increasing logsnr, i.e. -dw along t
    negative = float(np.sum(np.maximum(steps, 0.0)))
    positive = float(np.sum(np.maximum(-steps, 0.0)))
    total = positive + negative
    return {
        "positive_mass": positive,
        "negative_mass": negative,
        "negative_fraction": negative / total if total > 0 else 0.0,
        "weight_min": float(weight[0]),
        "weight_max": float(weight[-1]),
    }


def augmentation_constant(
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
) -> Scalar:
    """`w(min) L(min; x) = w(min) KL(q(z_min | x) || N(0, I))`: model-independent.

    For a non-increasing `w`, `L_w(x) = w(min) E_{logsnr ~ p_w} [L(logsnr; x)]`
    minus this constant (PAPER.md section 4).
    """
    return weighting(logsnr_min) * prior_kl(x, logsnr_min)


@eqx.filter_jit
def _augmented_terms(model, x, weighting, logsnr_min, logsnr_max, num_samples, key):
    level_key, inner_key, noise_key = jax.random.split(key, 3)
    levels = _augmentation_levels(
        weighting, logsnr_min, logsnr_max, num_samples, level_key
    )
    fractions = jax.random.uniform(inner_key, (num_samples,), x.dtype)
    base = prior_kl(x, logsnr_min)

    def term(level, fraction, noise_key):
        # One-sample estimate of L(level; x): KL + 1/2 (level - min) ||eps - eps_hat||^2
        # at a level drawn uniformly in [min, level].
        inner = logsnr_min + fraction * (level - logsnr_min)
        z, eps = process.sample_q(x, inner, key=noise_key)
        error = jnp.sum((model(z, inner) - eps) ** 2)
        return base + 0.5 * (level - logsnr_min) * error

    keys = jax.random.split(noise_key, num_samples)
    return jax.vmap(term)(levels, fractions, keys)


def expected_truncated_loss(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_samples: int,
    num_points: int | None = None,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    num_hermite: int = NUM_HERMITE,
    key: PRNGKeyArray,
) -> MonteCarloEstimate:
    """Monte Carlo `E_{logsnr ~ p_w} [L(logsnr; x)]` for a non-increasing weighting.

    The noise levels are drawn from the augmentation distribution `p_w` with its
    point mass at `logsnr_max` (`weighting.sample_augmentation`). By the main
    result, `L_w(x) = w(min) E_{p_w}[L] - augmentation_constant(x, ...)`: the
    weighted loss is the ELBO of data augmented with Gaussian noise of level `p_w`.

    `L(logsnr; x)` at each drawn level is

    - with `num_points=None`, a one-draw unbiased estimate, `KL + 1/2 (logsnr -
      min) ||eps - eps_hat(z; l)||^2` at `l` uniform in `[min, logsnr]` (cheap, for
      any model; its distribution is skewed, with rare large values);
    - with `num_points` given, `truncated_loss` by quadrature (Gauss-Legendre with
      about `num_points` nodes, Gauss-Hermite or fixed `eps` draws), so that the
      only randomness is the level.

    **Raises:** `ValueError` when the weighting is not monotonic on the range.
    """
    x = _as_float(x)
    _check_range("expected_truncated_loss", logsnr_min, logsnr_max)
    _check_positive_int("expected_truncated_loss", "num_samples", num_samples)
    if not _is_monotonic(weighting, logsnr_min, logsnr_max):
        raise ValueError(
            f"expected_truncated_loss: {type(weighting).__name__} is not "
            f"non-increasing on [{logsnr_min}, {logsnr_max}], so p_w has negative "
            "parts and the weighted loss is not an expected ELBO; use by_parts."
        )
    if num_points is None:
        terms = _augmented_terms(
            model, x, weighting, float(logsnr_min), float(logsnr_max), num_samples, key
        )
        return _estimate(terms)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite)
    levels = _augmentation_levels(
        weighting, float(logsnr_min), float(logsnr_max), num_samples, key
    )
    panel_nodes, panel_weights = logsnr_quadrature(
        logsnr_min, logsnr_max, num_points=num_points
    )
    dtype = x.dtype
    terms = _panel_truncated_losses(
        model,
        x,
        levels.astype(dtype),
        jnp.asarray(logsnr_min, dtype),
        jnp.asarray(logsnr_max, dtype),
        panel_nodes.astype(dtype),
        panel_weights.astype(dtype),
        eps.astype(dtype),
        prob.astype(dtype),
    )
    return _estimate(terms)


@eqx.filter_jit
def _panel_truncated_losses(
    model, x, levels, logsnr_min, logsnr_max, panel_nodes, panel_weights, eps, prob
):
    """`L(logsnr; x)` at many levels from one composite rule on the whole range.

    The integral up to each level is the sum of the full panels below it plus its
    own Gauss-Legendre rule on the partial panel, so many levels cost
    `GAUSS_LEGENDRE_ORDER` evaluations each instead of a whole rule each.
    """
    num_panels = panel_nodes.shape[0] // GAUSS_LEGENDRE_ORDER
    width = (logsnr_max - logsnr_min) / num_panels
    mse = _mse_curve(model, x, panel_nodes, eps, prob)
    panel_integrals = jnp.sum(
        (panel_weights * mse).reshape(num_panels, GAUSS_LEGENDRE_ORDER), axis=1
    )
    below = jnp.concatenate([jnp.zeros(1, x.dtype), jnp.cumsum(panel_integrals)])
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_ORDER)
    unit_nodes = jnp.asarray((unit_nodes + 1) / 2, x.dtype)
    unit_weights = jnp.asarray(unit_weights / 2, x.dtype)
    base = prior_kl(x, logsnr_min)

    def one(level):
        j = jnp.clip(jnp.floor((level - logsnr_min) / width), 0, num_panels - 1)
        start = logsnr_min + j * width
        length = level - start
        inner = start + length * unit_nodes
        partial = jax.vmap(lambda node: _eps_mse(model, x, node, eps, prob))(inner)
        integral = below[j.astype(int)] + length * jnp.sum(unit_weights * partial)
        return base + 0.5 * integral

    return jax.lax.map(one, levels, batch_size=256)


def _is_monotonic(weighting: Weighting, logsnr_min: float, logsnr_max: float) -> bool:
    """`weighting.is_monotonic` on the same grid and tolerance, compiled once."""
    grid = jnp.linspace(logsnr_min, logsnr_max, MONOTONIC_CHECK_POINTS)
    slopes = _log_slopes(weighting, grid.astype(_float_dtype()))
    tolerance = 100 * float(jnp.finfo(_float_dtype()).eps)
    return float(jnp.max(slopes)) <= tolerance


@eqx.filter_jit
def _log_slopes(weighting, grid):
    return jax.vmap(weighting.dlog_weight)(grid)


@eqx.filter_jit
def _augmentation_levels(weighting, logsnr_min, logsnr_max, num_samples, key):
    return jax.vmap(
        lambda k: weighting.sample_augmentation(logsnr_min, logsnr_max, key=k)
    )(jax.random.split(key, num_samples))


# --- proposals and the variance of the estimator --------------------------------------


def _weighted_loss_batch_terms(model, x, weighting, proposal, sampling, key):
    uniform_key, noise_key = jax.random.split(key)
    logsnr, log_ratio = _importance_levels(
        weighting, proposal, x.shape[0], sampling, uniform_key
    )
    return _importance_terms(model, x, logsnr, log_ratio, noise_key, True)


def weighted_loss_batch(
    model: Denoiser,
    x: Float[ArrayLike, " num_examples *shape"],
    *,
    weighting: Weighting,
    proposal: Schedule,
    logsnr_min: float,
    logsnr_max: float,
    sampling: str = "iid",
    key: PRNGKeyArray,
) -> MonteCarloEstimate:
    """Weighted loss of a batch, one noise level per example, drawn across the batch.

    Estimates the batch average of `L_w(x_i)` (or, for examples drawn from the data,
    `E_x L_w(x)`) with one `weighted_loss_term` per example; the levels come from
    `draw_uniforms(num_examples, sampling=...)` mapped through the proposal, so
    stratified, low-discrepancy and antithetic draws spread the levels over the
    batch while every term stays unbiased.
    """
    x = _as_float(x)
    check_proposal(proposal, logsnr_min, logsnr_max)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            "weighted_loss_batch: x must have shape (num_examples, ...); got "
            f"{x.shape}."
        )
    if sampling not in SAMPLING_METHODS:
        raise ValueError(
            f"weighted_loss_batch: sampling={sampling!r} is not one of "
            f"{list(SAMPLING_METHODS)}."
        )
    if sampling == "antithetic" and x.shape[0] % 2:
        raise ValueError(
            f"weighted_loss_batch: antithetic sampling needs an even batch; got "
            f"{x.shape[0]} examples."
        )
    terms = _weighted_loss_batch_terms(model, x, weighting, proposal, sampling, key)
    return _estimate(terms)


class IntegrandMoments(eqx.Module):
    """Moments of the weighted integrand `g = 1/2 w ||eps_hat - eps||^2` per level.

    `mean(logsnr) = E_{x, eps}[g]` and `mean_square(logsnr) = E_{x, eps}[g^2]` at the
    nodes of a Gauss-Legendre rule with `GAUSS_LEGENDRE_ORDER` nodes in each of
    `num_bins` equal bins of the range. The importance-sampling estimator
    `g / p` with `logsnr ~ p` (and `x`, `eps` drawn as in the expectation) has mean
    `L_w = Int mean` for every proposal and per-sample variance

        Var_p = Int mean_square / p dlogsnr - L_w^2,

    which is smallest, `(Int sqrt(mean_square))^2 - L_w^2`, for `p*` proportional
    to the root mean square `sqrt(mean_square)`.
    """

    logsnr: Float[Array, " num_nodes"]
    quad_weights: Float[Array, " num_nodes"]
    mean: Float[Array, " num_nodes"]
    mean_square: Float[Array, " num_nodes"]
    logsnr_min: float = eqx.field(static=True)
    logsnr_max: float = eqx.field(static=True)
    num_bins: int = eqx.field(static=True)

    def loss(self) -> Scalar:
        """`L_w = Int E[g] dlogsnr`."""
        return jnp.sum(self.quad_weights * self.mean)

    def variance(self, proposal: Schedule) -> Scalar:
        """Per-sample variance `Int E[g^2] / p dlogsnr - L_w^2` under `proposal`."""
        check_proposal(proposal, self.logsnr_min, self.logsnr_max)
        return _proposal_variance(self, proposal)

    def optimal_variance(self) -> Scalar:
        """The smallest variance over all proposals, `(Int sqrt(E[g^2]))^2 - L_w^2`."""
        rms_integral = jnp.sum(self.quad_weights * jnp.sqrt(self.mean_square))
        return rms_integral**2 - self.loss() ** 2

    def _per_bin(self, values: Array) -> Array:
        return jnp.sum((self.quad_weights * values).reshape(self.num_bins, -1), axis=1)

    def _proposal(self, bin_weights: Array) -> PiecewiseConstant:
        # NOTE: a bin with (numerically) zero integrand still needs a positive
        # density, or its importance weight is infinite; it gets 1e-12 of the largest.
        floor = 1e-12 * jnp.max(bin_weights)
        return PiecewiseConstant(
            jnp.maximum(bin_weights, floor),
            logsnr_min=self.logsnr_min,
            logsnr_max=self.logsnr_max,
        )

    def optimal_proposal(self) -> PiecewiseConstant:
        """The variance-optimal piecewise-constant proposal on the bins.

        Bin masses proportional to `sqrt(Int_bin E[g^2])`, the root mean square of
        the integrand over each bin: the exact minimiser of `Var_p` among densities
        constant on the bins, and `p*` in the limit of narrow bins.
        """
        return self._proposal(jnp.sqrt(self._per_bin(self.mean_square)))

    def adaptive_proposal(self) -> PiecewiseConstant:
        """The paper's adaptive schedule: bin masses proportional to `Int_bin E[g]`.

        Kingma & Gao (section 5 of PAPER.md) track the mean weighted loss per bin; it
        equals the optimum only where `E[g^2]` is proportional to `E[g]^2`.
        """
        return self._proposal(self._per_bin(self.mean))


@eqx.filter_jit
def _proposal_variance(moments, proposal):
    density = jax.vmap(proposal.density)(moments.logsnr)
    second = jnp.sum(moments.quad_weights * moments.mean_square / density)
    return second - moments.loss() ** 2


@eqx.filter_jit
def _moments(model, weighting, nodes, x, x_prob, eps, eps_prob):
    def at_level(logsnr):
        alpha = process.alpha(logsnr)
        sigma = process.sigma(logsnr)
        half_weight = 0.5 * weighting(logsnr)

        def per_example(example):
            def per_noise(eps_i):
                eps_hat = model(alpha * example + sigma * eps_i, logsnr)
                return half_weight * jnp.sum((eps_hat - eps_i) ** 2)

            g = jax.vmap(per_noise)(eps)
            return jnp.stack([g @ eps_prob, (g**2) @ eps_prob])

        return x_prob @ jax.vmap(per_example)(x)

    return jax.lax.map(at_level, nodes, batch_size=OUTER_BATCH)


def integrand_moments(
    model: Denoiser,
    x: Float[ArrayLike, " num_examples *shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    x_prob: Float[ArrayLike, " num_examples"] | None = None,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    num_hermite: int = NUM_HERMITE,
    num_bins: int = 100,
) -> IntegrandMoments:
    """`E[g]` and `E[g^2]` of `g = 1/2 w(logsnr) ||eps_hat - eps||^2` over levels.

    The expectation is over the examples `x` (with probabilities `x_prob`, equal by
    default: data draws, or the nodes of `data_quadrature`) times the noise `eps`
    (Gauss-Hermite, or fixed draws). Levels are `GAUSS_LEGENDRE_ORDER` Gauss-Legendre
    nodes in each of `num_bins` equal bins (100 in the paper's adaptive schedule).
    """
    x = _as_float(x)
    _check_range("integrand_moments", logsnr_min, logsnr_max)
    _check_positive_int("integrand_moments", "num_bins", num_bins)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            f"integrand_moments: x must have shape (num_examples, ...); got {x.shape}."
        )
    shape = x.shape[1:]
    if x_prob is None:
        x_prob = jnp.full((x.shape[0],), 1.0 / x.shape[0], x.dtype)
    x_prob = _as_float(x_prob)
    eps, eps_prob = _resolve_eps(shape, eps, num_hermite)
    nodes, weights = logsnr_quadrature(
        logsnr_min, logsnr_max, num_points=num_bins * GAUSS_LEGENDRE_ORDER
    )
    moments = _moments(model, weighting, nodes, x, x_prob, eps, eps_prob)
    return IntegrandMoments(
        nodes,
        weights,
        moments[:, 0],
        moments[:, 1],
        float(logsnr_min),
        float(logsnr_max),
        num_bins,
    )


def data_quadrature(
    mixture: Any, *, num_hermite: int = NUM_HERMITE
) -> tuple[Float[Array, "num_nodes dim"], Float[Array, " num_nodes"]]:
    """Nodes and probabilities for `E_{x ~ mixture}`: Gauss-Hermite per component.

    For `x ~ sum_k pi_k N(mu_k, s_k^2 I)`, `x = mu_k + s_k xi` with `xi` on the
    product Gauss-Hermite grid of `eps_quadrature`; probabilities `pi_k prob(xi)`.
    """
    xi, prob = eps_quadrature((mixture.dim,), num_hermite=num_hermite)
    x = mixture.means[:, None, :] + mixture.stds[:, None, None] * xi[None]
    probs = mixture.weights[:, None] * prob[None]
    return x.reshape(-1, mixture.dim), probs.reshape(-1)


# --- a deliberately wrong denoiser ----------------------------------------------------


class PerturbedDenoiser(eqx.Module):
    """A denoiser made wrong on purpose, for checks that must hold for any model.

    `eps_hat = scale base(z, logsnr) + amplitude alpha sin(frequency z + phase)`.
    The perturbation acts like an error `-amplitude sin(...) / sigma` of a data
    prediction; the factor `alpha` keeps it small at low logsnr, where predicting
    `eps` from `z` is easy, as for a partly trained network.
    """

    base: Denoiser
    scale: float = eqx.field(default=1.0, converter=float)
    amplitude: float = eqx.field(default=0.3, converter=float)
    frequency: float = eqx.field(default=2.0, converter=float)
    phase: float = eqx.field(default=0.5, converter=float)

    def __call__(
        self, z: Float[ArrayLike, "*shape"], logsnr: ScalarLike
    ) -> Float[Array, "*shape"]:
        z = _as_float(z)
        wobble = jnp.sin(self.frequency * z + self.phase)
        return self.scale * self.base(z, logsnr) + (
            self.amplitude * process.alpha(logsnr) * wobble
        )
