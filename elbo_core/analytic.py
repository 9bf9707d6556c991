"""Gaussian-mixture data: exact density, noisy marginals, score and optimal denoiser.

For `x ~ sum_k pi_k N(mu_k, s_k^2 I)` the noisy latent `z = alpha x + sigma eps` is
again a mixture, `sum_k pi_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)`, so the
score of `q(z)` and the optimal noise prediction `E[eps | z] = -sigma grad log q(z)`
(Tweedie) are exact. This is the oracle every check of the repository leans on; a
`GaussianMixture` is itself a denoiser, `mixture(z, logsnr) -> eps_hat`.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Scalar, ScalarLike

from .process import log_alpha2, log_sigma2

# Tolerance on `sum(weights) == 1`: weights normalised in float32 sum to one only
# within a few float32 ulps (2^-23 ~ 1.2e-7) per component; 1e-6 allows ~8 of them.
# Accepted weights are then divided by their sum, so the mixture is normalised in
# the working precision whatever precision they were given in.
WEIGHT_SUM_TOLERANCE = 1e-6


class GaussianMixture(eqx.Module):
    """A mixture of isotropic Gaussians in `D` dimensions.

    **Arguments:**

    - `means`: component means, shape `(K, D)`.
    - `stds`: component standard deviations, shape `(K,)`, all positive.
    - `weights`: mixture proportions, shape `(K,)`, non-negative, summing to one.
    """

    means: Float[Array, "K D"]
    stds: Float[Array, " K"]
    weights: Float[Array, " K"]

    def __init__(
        self,
        means: Float[ArrayLike, "K D"],
        stds: Float[ArrayLike, " K"],
        weights: Float[ArrayLike, " K"] | None = None,
    ):
        means_np = np.asarray(means, dtype=float)
        stds_np = np.asarray(stds, dtype=float)
        if means_np.ndim != 2:
            raise ValueError(
                f"GaussianMixture: means must have shape (K, D); got {means_np.shape}."
            )
        num_components = means_np.shape[0]
        if weights is None:
            weights = np.full(num_components, 1.0 / num_components)
        weights_np = np.asarray(weights, dtype=float)
        if stds_np.shape != (num_components,) or weights_np.shape != (num_components,):
            raise ValueError(
                f"GaussianMixture: stds {stds_np.shape} and weights "
                f"{weights_np.shape} must both have shape ({num_components},), one "
                "entry per row of means."
            )
        if not np.all(np.isfinite(means_np)):
            raise ValueError(f"GaussianMixture: means must be finite; got {means_np}.")
        if not np.all((stds_np > 0) & np.isfinite(stds_np)):
            raise ValueError(
                "GaussianMixture: every std must be positive and finite; got "
                f"stds={stds_np}."
            )
        if not np.all(np.isfinite(weights_np)) or np.any(weights_np < 0):
            raise ValueError(
                "GaussianMixture: weights must be non-negative and finite; got "
                f"weights={weights_np}."
            )
        if abs(weights_np.sum() - 1) > WEIGHT_SUM_TOLERANCE:
            raise ValueError(
                f"GaussianMixture: weights must sum to one (within "
                f"WEIGHT_SUM_TOLERANCE={WEIGHT_SUM_TOLERANCE}); got "
                f"weights={weights_np} (sum {weights_np.sum()})."
            )
        weights_np = weights_np / weights_np.sum()
        dtype = jnp.result_type(float)
        self.means = jnp.asarray(means_np, dtype)
        self.stds = jnp.asarray(stds_np, dtype)
        self.weights = jnp.asarray(weights_np, dtype)

    @classmethod
    def gaussian(cls, dim: int, std: float = 1.0, mean: float = 0.0):
        """One isotropic Gaussian `N(mean, std^2 I)` in `dim` dimensions.

        **Arguments:**

        - `dim`: the dimension `D`.
        - `std`: the standard deviation, positive.
        - `mean`: every coordinate of the mean.

        **Returns:** a one-component `GaussianMixture`.
        """
        return cls(np.full((1, dim), mean), np.array([std]), np.array([1.0]))

    @property
    def dim(self) -> int:
        """The data dimension `D`."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """The number of components `K`."""
        return self.means.shape[0]

    def mean(self) -> Float[Array, " D"]:
        """The mixture mean `sum_k pi_k mu_k`.

        **Returns:** a vector of shape `(D,)`.
        """
        return self.weights @ self.means

    def covariance(self) -> Float[Array, "D D"]:
        """The mixture covariance `sum_k pi_k (s_k^2 I + (mu_k - m)(mu_k - m)^T)`.

        With `m` the mixture mean. **Returns:** a matrix of shape `(D, D)`.
        """
        centred = self.means - self.mean()
        between = (self.weights[:, None] * centred).T @ centred
        within = jnp.sum(self.weights * self.stds**2) * jnp.eye(self.dim)
        return between + within

    def sample(self, *, key: PRNGKeyArray) -> Float[Array, " D"]:
        """Draw one example `x ~ sum_k pi_k N(mu_k, s_k^2 I)`.

        **Arguments:**

        - `key`: a PRNG key.

        **Returns:** a vector of shape `(D,)`.
        """
        component_key, noise_key = jax.random.split(key)
        k = jax.random.choice(component_key, self.num_components, p=self.weights)
        noise = jax.random.normal(noise_key, (self.dim,), self.means.dtype)
        return self.means[k] + self.stds[k] * noise

    def sample_with_component(
        self, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, " D"], Int[Array, ""]]:
        """Draw one example and the index of the component it came from.

        **Arguments:**

        - `key`: a PRNG key.

        **Returns:** `(x, k)`: `x` of shape `(D,)` drawn from component `k`.
        """
        component_key, noise_key = jax.random.split(key)
        k = jax.random.choice(component_key, self.num_components, p=self.weights)
        noise = jax.random.normal(noise_key, (self.dim,), self.means.dtype)
        return self.means[k] + self.stds[k] * noise, k

    def _component_log_probs(self, z, log_scale, log_var):
        # log pi_k + log N(z; exp(log_scale) mu_k, exp(log_var_k) I) for every k.
        z = jnp.asarray(z)
        diff = z - jnp.exp(log_scale) * self.means
        sq = jnp.sum(diff**2, axis=-1)
        log_norm = -0.5 * self.dim * (math.log(2 * math.pi) + log_var)
        return jnp.log(self.weights) + log_norm - 0.5 * sq * jnp.exp(-log_var)

    def _marginal_terms(self, logsnr):
        # Scale alpha and per-component variance alpha^2 s_k^2 + sigma^2, in logs.
        logsnr = jnp.asarray(logsnr, self.means.dtype)
        log_scale = 0.5 * log_alpha2(logsnr)
        log_var = jnp.logaddexp(
            log_alpha2(logsnr) + 2 * jnp.log(self.stds), log_sigma2(logsnr)
        )
        return log_scale, log_var

    def log_prob(self, x: Float[ArrayLike, " D"]) -> Scalar:
        """Exact `log p(x) = log sum_k pi_k N(x; mu_k, s_k^2 I)`.

        **Arguments:**

        - `x`: a point of shape `(D,)`.

        **Returns:** a scalar.
        """
        log_var = 2 * jnp.log(self.stds)
        return jax.nn.logsumexp(self._component_log_probs(x, 0.0, log_var))

    def marginal_log_prob(
        self, z: Float[ArrayLike, " D"], logsnr: ScalarLike
    ) -> Scalar:
        """Exact `log q(z)` of the noisy latent at `logsnr` (module docstring).

        `q(z) = sum_k pi_k N(z; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)`.

        **Arguments:**

        - `z`: a latent of shape `(D,)`.
        - `logsnr`: the noise level, a scalar.

        **Returns:** a scalar.
        """
        log_scale, log_var = self._marginal_terms(logsnr)
        return jax.nn.logsumexp(self._component_log_probs(z, log_scale, log_var))

    def perturbed_log_prob(
        self, x: Float[ArrayLike, " D"], logsnr: ScalarLike
    ) -> Scalar:
        """Exact log-density of `x + exp(-logsnr / 2) eps`: the data with noise added.

        The noisy latent rescaled to data space, `z / alpha`, so that
        `log q(alpha x) + D log alpha`; it is what `likelihood.ode_log_likelihood`
        of data `x` (entering the ODE at `logsnr`) estimates for this mixture's
        exact denoiser with the exact prior, and the density of the paper's
        Gaussian-noise-augmented data at one noise level.

        **Arguments:**

        - `x`: a point of shape `(D,)`.
        - `logsnr`: the noise level, a scalar.

        **Returns:** a scalar.
        """
        x = jnp.asarray(x)
        log_alpha = 0.5 * log_alpha2(logsnr)
        z = jnp.exp(log_alpha) * x
        return self.marginal_log_prob(z, logsnr) + x.size * log_alpha

    def posterior_weights(
        self, z: Float[ArrayLike, " D"], logsnr: ScalarLike
    ) -> Float[Array, " K"]:
        """Component responsibilities `q(k | z)` at `logsnr`.

        **Arguments:**

        - `z`: a latent of shape `(D,)`.
        - `logsnr`: the noise level, a scalar.

        **Returns:** a vector of shape `(K,)` summing to one.
        """
        log_scale, log_var = self._marginal_terms(logsnr)
        return jax.nn.softmax(self._component_log_probs(z, log_scale, log_var))

    def score(
        self, z: Float[ArrayLike, " D"], logsnr: ScalarLike
    ) -> Float[Array, " D"]:
        """Exact score `grad_z log q(z)` at `logsnr`, in closed form.

        `sum_k q(k | z) (alpha mu_k - z) / (alpha^2 s_k^2 + sigma^2)`.

        **Arguments:**

        - `z`: a latent of shape `(D,)`.
        - `logsnr`: the noise level, a scalar.

        **Returns:** a vector of shape `(D,)`.
        """
        log_scale, log_var = self._marginal_terms(logsnr)
        z = jnp.asarray(z, self.means.dtype)
        responsibility = jax.nn.softmax(
            self._component_log_probs(z, log_scale, log_var)
        )
        pull = (jnp.exp(log_scale) * self.means - z) * jnp.exp(-log_var)[:, None]
        return responsibility @ pull

    def eps_optimal(
        self, z: Float[ArrayLike, " D"], logsnr: ScalarLike
    ) -> Float[Array, " D"]:
        """The optimal noise prediction `E[eps | z] = -sigma grad log q(z)` (Tweedie).

        **Arguments:**

        - `z`: a latent of shape `(D,)`.
        - `logsnr`: the noise level, a scalar.

        **Returns:** a vector of shape `(D,)`.
        """
        log_scale, log_var = self._marginal_terms(logsnr)
        z = jnp.asarray(z, self.means.dtype)
        responsibility = jax.nn.softmax(
            self._component_log_probs(z, log_scale, log_var)
        )
        # NOTE: sigma / (alpha^2 s_k^2 + sigma^2) is formed in log space, so the
        # prediction stays finite where sigma or the variance underflows.
        ratio = jnp.exp(0.5 * log_sigma2(logsnr) - log_var)
        return responsibility @ ((z - jnp.exp(log_scale) * self.means) * ratio[:, None])

    def x_optimal(
        self, z: Float[ArrayLike, " D"], logsnr: ScalarLike
    ) -> Float[Array, " D"]:
        """The optimal data prediction `E[x | z] = (z - sigma E[eps | z]) / alpha`.

        Formed per component, `mu_k + alpha s_k^2 (z - alpha mu_k) / var_k`, so it
        stays accurate where `alpha` is tiny.

        **Arguments:**

        - `z`: a latent of shape `(D,)`.
        - `logsnr`: the noise level, a scalar.

        **Returns:** a vector of shape `(D,)`.
        """
        log_scale, log_var = self._marginal_terms(logsnr)
        z = jnp.asarray(z, self.means.dtype)
        responsibility = jax.nn.softmax(
            self._component_log_probs(z, log_scale, log_var)
        )
        # E[x | z, k] = mu_k + alpha s_k^2 (z - alpha mu_k) / var_k
        gain = jnp.exp(log_scale + 2 * jnp.log(self.stds) - log_var)
        posterior_means = self.means + gain[:, None] * (
            z - jnp.exp(log_scale) * self.means
        )
        return responsibility @ posterior_means

    def __call__(
        self, z: Float[ArrayLike, " D"], logsnr: ScalarLike
    ) -> Float[Array, " D"]:
        """Act as a denoiser: `eps_optimal(z, logsnr)`.

        **Arguments:**

        - `z`: a latent of shape `(D,)`.
        - `logsnr`: the noise level, a scalar.

        **Returns:** `eps_hat` of shape `(D,)`.
        """
        return self.eps_optimal(z, logsnr)


def _checked_std(owner: str, std: ScalarLike) -> Array:
    """`std` as an array: `ValueError` unless positive and finite when concrete, a
    run-time error (`eqx.error_if`) when traced."""
    if not isinstance(std, jax.core.Tracer):
        value = float(std)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(
                f"{owner}: std={value} must be a positive finite standard deviation."
            )
        return jnp.asarray(std)
    std = jnp.asarray(std)
    bad = ~((std > 0) & jnp.isfinite(std))
    return eqx.error_if(
        std, bad, f"{owner}: std must be a positive finite standard deviation."
    )


def gaussian_eps_mse(std: ScalarLike, logsnr: ScalarLike) -> Scalar:
    """Optimal eps-MSE per dimension of `N(0, s^2)` data: `sigmoid(logsnr + log s^2)`.

    It is the posterior variance of `eps` given `z`, `alpha^2 s^2 / (alpha^2 s^2 +
    sigma^2)` (PAPER.md section 4).

    **Arguments:**

    - `std`: the data's standard deviation `s`, a positive scalar.
    - `logsnr`: the noise level, a scalar.

    **Returns:** a scalar in (0, 1).

    **Raises:** `ValueError` naming `std` when it is concrete and not positive and
    finite; a run-time error (`eqx.error_if`) when it is traced.
    """
    std = _checked_std("gaussian_eps_mse", std)
    return jax.nn.sigmoid(jnp.asarray(logsnr) + 2 * jnp.log(std))


def gaussian_nll(std: ScalarLike) -> Scalar:
    """Expected negative log-likelihood per dimension of `N(0, std^2)`, in nats.

    `1/2 log(2 pi std^2) + 1/2` (PAPER.md section 4), the entropy of the data.

    **Arguments:**

    - `std`: the data's standard deviation, a positive scalar.

    **Returns:** a scalar.

    **Raises:** `ValueError` naming `std` when it is concrete and not positive and
    finite; a run-time error (`eqx.error_if`) when it is traced.
    """
    std = _checked_std("gaussian_nll", std)
    return 0.5 * jnp.log(2 * math.pi * std**2) + 0.5
