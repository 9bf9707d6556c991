"""Network parameterisations and the weightings they imply.

Given `z`, every network output used in the literature is an affine function of the
noise prediction `eps_hat`, so an MSE on that output is the eps-MSE times a factor
`c(logsnr)` (PAPER.md section 2):

| name | output | `c(logsnr)` |
|---|---|---|
| `eps` | `eps_hat` | `1` |
| `x` | `x_hat = (z - sigma eps_hat) / alpha` | `exp(-logsnr)` |
| `v` | `v_hat = alpha eps_hat - sigma x_hat` | `1 + exp(-logsnr)` |
| `score` | `s = -eps_hat / sigma` | `1 / sigma^2` |
| `velocity` | `u = dz_path/dt` (see `Velocity`) | `sigma_p^2 (dlogsnr/dt)^2 / 4` |
| `edm_f` | `F`, `x_hat = c_skip z / alpha + c_out F` | `1 + exp(-logsnr) / sd^2` |

(`sd` is EDM's `sigma_data`; `sigma_p` the noise scale of the velocity's path.)

Training on output `y` with explicit loss weight `a(logsnr)` and noise levels drawn
from a schedule with density `p(logsnr)` is the weighted loss with
`w(logsnr) = p(logsnr) a(logsnr) c_y(logsnr)`; `implied_weighting` returns that `w`.
`table_1` lists the ingredients of every row of the paper's Table 1 beside its
closed form, so the table can be recovered by computation.

Latents `z` are always in variance-preserving coordinates, `z = alpha x + sigma eps`.
"""

import abc
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Scalar, ScalarLike

from . import schedules as schedules_lib
from . import weighting as weighting_lib
from .process import log_alpha2, log_sigma2
from .schedules import Schedule, check_finite, check_positive
from .weighting import Weighting


def _as_float(x: ScalarLike) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(x, float))


class Parameterization(eqx.Module):
    """What the network outputs, as an affine function of `eps_hat` given `z`.

    Subclasses implement `to_eps`, `from_eps` (its inverse) and `log_mse_factor`,
    per example; batch with `jax.vmap`.
    """

    @abc.abstractmethod
    def to_eps(
        self,
        output: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        """Convert a network output to the noise prediction `eps_hat`.

        The inverse of `from_eps` at fixed `z` (the module docstring's table).

        **Arguments:**

        - `output`: the network output for one example.
        - `z`: the latent it was computed from, the same shape.
        - `logsnr`: the noise level, a scalar.

        **Returns:** `eps_hat`, the shape of `z`.
        """

    @abc.abstractmethod
    def from_eps(
        self,
        eps: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        """The output that corresponds to noise `eps` at `z`: the regression target.

        **Arguments:**

        - `eps`: a noise (or noise prediction) for one example.
        - `z`: the latent, the same shape.
        - `logsnr`: the noise level, a scalar.

        **Returns:** the output, the shape of `z`.
        """

    @abc.abstractmethod
    def log_mse_factor(self, logsnr: ScalarLike) -> Scalar:
        """`log c(logsnr)` with `||output - target||^2 = c ||eps_hat - eps||^2`.

        PAPER.md section 2, the table of factors.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** a scalar.
        """

    def mse_factor(self, logsnr: ScalarLike) -> Scalar:
        """`c(logsnr)` relating this output's squared error to the eps one.

        **Arguments:**

        - `logsnr`: a scalar.

        **Returns:** `exp(log_mse_factor(logsnr))`, a positive scalar.
        """
        return jnp.exp(self.log_mse_factor(logsnr))

    def target(
        self,
        x: Float[ArrayLike, "*shape"],
        eps: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        """The regression target for data `x` noised with `eps` at `logsnr`.

        `from_eps(eps, z, logsnr)` at `z = alpha x + sigma eps` (PAPER.md section 1).

        **Arguments:**

        - `x`: one example.
        - `eps`: its noise, the same shape.
        - `logsnr`: the noise level, a scalar.

        **Returns:** the target, the shape of `x`.
        """
        z = jnp.exp(0.5 * log_alpha2(logsnr)) * jnp.asarray(x)
        z = z + jnp.exp(0.5 * log_sigma2(logsnr)) * jnp.asarray(eps)
        return self.from_eps(eps, z, logsnr)

    def implied_weighting(
        self, schedule: Schedule, explicit_weight: Weighting | None = None
    ) -> "ImpliedWeighting":
        """`w = p a c`: the weighting of MSE on this output under `schedule`.

        PAPER.md section 2: MSE on this output, times `explicit_weight` `a`, with
        noise levels drawn from `schedule`'s density `p`.

        **Arguments:**

        - `schedule`: the training noise schedule.
        - `explicit_weight`: a loss weight `a(logsnr)` on this output's MSE, or
          `None` for `a = 1`.

        **Returns:** an `ImpliedWeighting`.
        """
        return ImpliedWeighting(self, schedule, explicit_weight)


class ImpliedWeighting(Weighting):
    """The weighting `w = p(logsnr) a(logsnr) c(logsnr)` implied by a training recipe.

    Zero outside the schedule's range, where no noise level is ever drawn.
    """

    parameterization: Parameterization
    schedule: Schedule
    explicit_weight: Weighting | None = None

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _as_float(logsnr)
        log_w = self.schedule.log_density(logsnr)
        log_w = log_w + self.parameterization.log_mse_factor(logsnr)
        if self.explicit_weight is not None:
            log_w = log_w + self.explicit_weight.log_weight(logsnr)
        return log_w


class Eps(Parameterization):
    """The network predicts the noise, `eps_hat`."""

    def to_eps(
        self,
        output: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        return jnp.asarray(output)

    def from_eps(
        self,
        eps: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        return jnp.asarray(eps)

    def log_mse_factor(self, logsnr: ScalarLike) -> Scalar:
        return jnp.zeros_like(_as_float(logsnr))


class X(Parameterization):
    """The network predicts the data, `x_hat = (z - sigma eps_hat) / alpha`."""

    def to_eps(
        self,
        output: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        alpha = jnp.exp(0.5 * log_alpha2(logsnr))
        sigma = jnp.exp(0.5 * log_sigma2(logsnr))
        return (jnp.asarray(z) - alpha * jnp.asarray(output)) / sigma

    def from_eps(
        self,
        eps: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        alpha = jnp.exp(0.5 * log_alpha2(logsnr))
        sigma = jnp.exp(0.5 * log_sigma2(logsnr))
        return (jnp.asarray(z) - sigma * jnp.asarray(eps)) / alpha

    def log_mse_factor(self, logsnr: ScalarLike) -> Scalar:
        return -_as_float(logsnr)


class V(Parameterization):
    """The network predicts `v = alpha eps - sigma x`, so `eps = sigma z + alpha v`.

    (VP only: `alpha^2 + sigma^2 = 1`.)
    """

    def to_eps(
        self,
        output: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        alpha = jnp.exp(0.5 * log_alpha2(logsnr))
        sigma = jnp.exp(0.5 * log_sigma2(logsnr))
        return sigma * jnp.asarray(z) + alpha * jnp.asarray(output)

    def from_eps(
        self,
        eps: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        alpha = jnp.exp(0.5 * log_alpha2(logsnr))
        sigma = jnp.exp(0.5 * log_sigma2(logsnr))
        return (jnp.asarray(eps) - sigma * jnp.asarray(z)) / alpha

    def log_mse_factor(self, logsnr: ScalarLike) -> Scalar:
        # 1 / alpha^2 = 1 + exp(-logsnr)
        return -log_alpha2(logsnr)


class Score(Parameterization):
    """The network predicts the score of `q(z)`, `s = -eps_hat / sigma`."""

    def to_eps(
        self,
        output: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        return -jnp.exp(0.5 * log_sigma2(logsnr)) * jnp.asarray(output)

    def from_eps(
        self,
        eps: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        return -jnp.asarray(eps) / jnp.exp(0.5 * log_sigma2(logsnr))

    def log_mse_factor(self, logsnr: ScalarLike) -> Scalar:
        return -log_sigma2(logsnr)


class EDMF(Parameterization):
    """EDM's preconditioned network output `F` (Karras et al. 2022, Table 1).

    In variance-exploding coordinates `x_ve = z / alpha`, `sigma_ve^2 =
    exp(-logsnr)`, the denoiser is `x_hat = c_skip x_ve + c_out F` with
    `c_skip = sigma_data^2 / (sigma_ve^2 + sigma_data^2)` and
    `c_out = sigma_ve sigma_data / sqrt(sigma_ve^2 + sigma_data^2)`. A network built
    for this output takes `c_in x_ve` and `c_noise` as inputs.
    """

    sigma_data: float = eqx.field(default=0.5, converter=float)

    def __check_init__(self):
        check_positive("EDMF", sigma_data=self.sigma_data)

    def _log_total(self, logsnr):
        # log(sigma_ve^2 + sigma_data^2)
        return jnp.logaddexp(-_as_float(logsnr), 2 * math.log(self.sigma_data))

    def c_skip(self, logsnr: ScalarLike) -> Scalar:
        """Skip scaling of EDM's preconditioning (Karras et al. 2022, Table 1).

        `c_skip = sigma_data^2 / (sigma_ve^2 + sigma_data^2)` with
        `sigma_ve^2 = exp(-logsnr)`. **Returns:** a scalar in (0, 1).
        """
        return jnp.exp(2 * math.log(self.sigma_data) - self._log_total(logsnr))

    def c_out(self, logsnr: ScalarLike) -> Scalar:
        """Output scaling of EDM's preconditioning (Karras et al. 2022, Table 1).

        `c_out = sigma_ve sigma_data / sqrt(sigma_ve^2 + sigma_data^2)` with
        `sigma_ve^2 = exp(-logsnr)`. **Returns:** a positive scalar.
        """
        log_c = -_as_float(logsnr) / 2 + math.log(self.sigma_data)
        return jnp.exp(log_c - 0.5 * self._log_total(logsnr))

    def c_in(self, logsnr: ScalarLike) -> Scalar:
        """Input scaling of EDM's preconditioning (Karras et al. 2022, Table 1).

        `c_in = 1 / sqrt(sigma_ve^2 + sigma_data^2)` with `sigma_ve^2 =
        exp(-logsnr)`, applied to `x_ve = z / alpha`. **Returns:** a positive scalar.
        """
        return jnp.exp(-0.5 * self._log_total(logsnr))

    def c_noise(self, logsnr: ScalarLike) -> Scalar:
        """Noise conditioning of EDM's preconditioning (Karras et al. 2022, Table 1).

        `c_noise = ln(sigma_ve) / 4 = -logsnr / 8`. **Returns:** a scalar.
        """
        return -_as_float(logsnr) / 8

    def _coefficients(self, logsnr):
        # eps_hat = z_coef z - f_coef F, from eps_hat = (z - alpha x_hat) / sigma.
        logsnr = _as_float(logsnr)
        log_total = self._log_total(logsnr)
        z_coef = jnp.exp(-logsnr / 2 - 0.5 * log_alpha2(logsnr) - log_total)
        f_coef = self.sigma_data * jnp.exp(-0.5 * log_total)
        return z_coef, f_coef

    def to_eps(
        self,
        output: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        z_coef, f_coef = self._coefficients(logsnr)
        return z_coef * jnp.asarray(z) - f_coef * jnp.asarray(output)

    def from_eps(
        self,
        eps: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        z_coef, f_coef = self._coefficients(logsnr)
        return (z_coef * jnp.asarray(z) - jnp.asarray(eps)) / f_coef

    def log_mse_factor(self, logsnr: ScalarLike) -> Scalar:
        return self._log_total(logsnr) - 2 * math.log(self.sigma_data)


class Velocity(Parameterization):
    """The flow velocity `u = dz_path/dt` of a path in time `t` of a schedule.

    The path scales data and noise as `z_path = alpha_p x + sigma_p eps` with
    `alpha_p / sigma_p = exp(logsnr / 2)`: `path="linear"` is flow matching's
    `alpha_p + sigma_p = 1` (with the `fm_ot` schedule, `z = (1 - t) x + t eps`),
    `path="vp"` the variance-preserving one. Then
    `u = (dlogsnr/dt) ((alpha_p' / alpha) z - (sigma_p / 2) eps)` with `alpha_p'` the
    derivative in logsnr, so `c = (sigma_p^2 / 4) (dlogsnr/dt)^2`.
    """

    schedule: Schedule
    path: Literal["linear", "vp"] = "linear"

    def __check_init__(self):
        if self.path not in ("linear", "vp"):
            raise ValueError(
                f"Velocity: path={self.path!r} is not one of ['linear', 'vp']."
            )

    def _log_path_sigma(self, logsnr):
        if self.path == "linear":
            return jax.nn.log_sigmoid(-logsnr / 2)
        return 0.5 * log_sigma2(logsnr)

    def _coefficients(self, logsnr):
        # u = slope (z_coef z - eps_coef eps), slope = dlogsnr/dt = -1 / p(logsnr).
        logsnr = _as_float(logsnr)
        slope = -jnp.exp(-self.schedule.log_density(logsnr))
        if self.path == "linear":
            log_alpha_p = jax.nn.log_sigmoid(logsnr / 2)
            log_sigma_p = jax.nn.log_sigmoid(-logsnr / 2)
            log_z = log_alpha_p + log_sigma_p - 0.5 * log_alpha2(logsnr)
        else:
            log_z = log_sigma2(logsnr)
        z_coef = 0.5 * jnp.exp(log_z)
        eps_coef = 0.5 * jnp.exp(self._log_path_sigma(logsnr))
        return slope, z_coef, eps_coef

    def to_eps(
        self,
        output: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        slope, z_coef, eps_coef = self._coefficients(logsnr)
        return (z_coef * jnp.asarray(z) - jnp.asarray(output) / slope) / eps_coef

    def from_eps(
        self,
        eps: Float[ArrayLike, "*shape"],
        z: Float[ArrayLike, "*shape"],
        logsnr: ScalarLike,
    ) -> Float[Array, "*shape"]:
        slope, z_coef, eps_coef = self._coefficients(logsnr)
        return slope * (z_coef * jnp.asarray(z) - eps_coef * jnp.asarray(eps))

    def log_mse_factor(self, logsnr: ScalarLike) -> Scalar:
        logsnr = _as_float(logsnr)
        log_slope2 = -2 * self.schedule.log_density(logsnr)
        return 2 * self._log_path_sigma(logsnr) - 2 * math.log(2) + log_slope2


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    "eps": Eps,
    "x": X,
    "v": V,
    "edm_f": EDMF,
    "score": Score,
    "velocity": Velocity,
}


def get_parameterization(name: str, **kwargs) -> Parameterization:
    """Build `PARAMETERIZATIONS[name](**kwargs)`, naming the valid names on error.

    **Arguments:**

    - `name`: a key of `PARAMETERIZATIONS`, e.g. `"v"`.
    - `**kwargs`: the parameterisation's fields, e.g. `schedule` for `"velocity"`.

    **Returns:** the parameterisation.

    **Raises:** `ValueError` for an unknown name, listing the valid ones.
    """
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"Unknown parameterization {name!r}; valid names are "
            f"{sorted(PARAMETERIZATIONS)}."
        )
    return PARAMETERIZATIONS[name](**kwargs)


# --- Table 1 --------------------------------------------------------------------------


class P2LossWeight(Weighting):
    """P2's explicit loss weight `1 / (k + exp(logsnr))^gamma` (Choi et al. 2022)."""

    gamma: float = eqx.field(default=1.0, converter=float)
    k: float = eqx.field(default=1.0, converter=float)

    def __check_init__(self):
        check_finite("P2LossWeight", gamma=self.gamma)
        check_positive("P2LossWeight", k=self.k)

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return -self.gamma * jnp.logaddexp(math.log(self.k), _as_float(logsnr))


class MinSNRLossWeight(Weighting):
    """Min-SNR-gamma's explicit weight on the eps-MSE, `min(1, gamma / SNR)`."""

    gamma: float = eqx.field(default=5.0, converter=float)

    def __check_init__(self):
        check_positive("MinSNRLossWeight", gamma=self.gamma)

    def log_weight(self, logsnr: ScalarLike) -> Scalar:
        return jnp.minimum(0.0, math.log(self.gamma) - _as_float(logsnr))


class Table1Row(eqx.Module):
    """One objective of Table 1: its training recipe and the closed form of its `w`.

    `paper_monotonic` is the claim of PAPER.md's Table 1, kept to be checked against
    the computed `weighting.is_monotonic()`.
    """

    objective: str
    recipe: str
    parameterization: Parameterization
    schedule: Schedule
    explicit_weight: Weighting | None
    weighting: Weighting
    formula: str
    paper_monotonic: bool

    def implied(self) -> ImpliedWeighting:
        """The weighting computed from the recipe, `w = p a c` (PAPER.md section 2).

        **Returns:** `parameterization.implied_weighting(schedule, explicit_weight)`.
        """
        return self.parameterization.implied_weighting(
            self.schedule, self.explicit_weight
        )


def table_1(logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> list[Table1Row]:
    """The rows of Table 1 with schedules truncated to `[logsnr_min, logsnr_max]`.

    PAPER.md section 3: each row's training recipe beside the closed form of its
    implied weighting and the paper's monotonicity claim.

    **Arguments:**

    - `logsnr_min`, `logsnr_max`: the range every schedule is truncated to.

    **Returns:** the eight `Table1Row`s, in the paper's order.
    """
    bounds = dict(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    cosine = schedules_lib.Cosine(**bounds)
    fm_ot = schedules_lib.FlowMatchingOT(**bounds)
    w = weighting_lib
    return [
        Table1Row(
            "ELBO (VDM; Song et al. 2021)",
            "eps-MSE, linear schedule",
            Eps(),
            schedules_lib.Linear(**bounds),
            None,
            w.ELBO(),
            "1",
            True,
        ),
        Table1Row(
            "IDDPM (Nichol & Dhariwal 2021)",
            "eps-MSE, cosine schedule",
            Eps(),
            cosine,
            None,
            w.EpsCosine(),
            "sech(λ/2)",
            False,
        ),
        Table1Row(
            "EDM (Karras et al. 2022)",
            "F-MSE (EDM preconditioning), EDM schedule",
            EDMF(sigma_data=0.5),
            schedules_lib.EDM(**bounds),
            None,
            w.EDM(),
            "N(λ; 2.4, 2.4²) (e^-λ + 0.5²) / 0.5²",
            False,
        ),
        Table1Row(
            "v-MSE, cosine (Salimans & Ho 2022)",
            "v-MSE, cosine schedule",
            V(),
            cosine,
            None,
            w.VCosine(),
            "e^(-λ/2)",
            True,
        ),
        Table1Row(
            "Flow matching, OT path (Lipman et al. 2023)",
            "velocity-MSE on the linear path, uniform t",
            Velocity(fm_ot, path="linear"),
            fm_ot,
            None,
            w.FlowMatchingOT(),
            "e^(-λ/2)",
            True,
        ),
        Table1Row(
            "InDI (Delbracio & Milanfar 2023)",
            "x-MSE on the linear path, uniform t",
            X(),
            fm_ot,
            None,
            w.InDI(),
            "e^-λ sech²(λ/4)",
            True,
        ),
        Table1Row(
            "P2, k=1, γ=1 (Choi et al. 2022)",
            "eps-MSE × 1/(1+SNR)^γ, cosine schedule",
            Eps(),
            cosine,
            P2LossWeight(gamma=1.0, k=1.0),
            w.P2(gamma=1.0, k=1.0),
            "sech(λ/2) / (1 + e^λ)^γ",
            False,
        ),
        Table1Row(
            "Min-SNR-5 (Hang et al. 2023)",
            "eps-MSE × min(1, γ/SNR), cosine schedule",
            Eps(),
            cosine,
            MinSNRLossWeight(gamma=5.0),
            w.MinSNR(gamma=5.0),
            "sech(λ/2) min(1, γ e^-λ)",
            False,
        ),
    ]
