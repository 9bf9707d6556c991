"""Diffusion objectives as weighted integrals of ELBOs, stated once and checked.

`elbo_core` is the executable companion to Kingma & Gao, *Understanding Diffusion
Objectives as the ELBO with Simple Data Augmentation* (arXiv:2303.00848). Every module
states one concept of the paper; the notebooks in `notebooks/` check each derivation by
numbers and reproduce the tables and figures.

Notation (paper symbol -> code name), kept throughout the package:

| paper | code | meaning |
|---|---|---|
| `t` | `t` | diffusion time in [0, 1]; `t = 0` is data, `t = 1` is noise |
| `lambda` | `logsnr` | log signal-to-noise ratio `log(alpha^2 / sigma^2)` |
| `lambda_min`, `lambda_max` | `logsnr_min`, `logsnr_max` | end points of a schedule |
| `alpha_lambda`, `sigma_lambda` | `alpha`, `sigma` | variance-preserving scales |
| `x` | `x` | data |
| `z_t`, `z_lambda` | `z` | latent, `z = alpha x + sigma eps` |
| `epsilon` | `eps` | standard normal noise |
| `hat epsilon` | `eps_hat` | the model's noise prediction |
| `w(lambda)` | `weight` | weighting function |
| `p(lambda)` | `density` | noise-schedule density, `-dt/dlogsnr` |
| `p_w(lambda)` | `augmentation_density` | noise-augmentation density of a weighting |
| `L(t; x)` | `truncated_loss` | KL of the process truncated at time `t` |
| `sigma_data`, `P_mean`, `P_std` | `sigma_data`, `p_mean`, `p_std` | EDM constants |

Shapes are per example; batching is the caller's `jax.vmap`.
"""

from . import (
    analytic,
    likelihood,
    losses,
    networks,
    parameterization,
    process,
    sampling,
    schedules,
    weighting,
)

__all__ = [
    "analytic",
    "likelihood",
    "losses",
    "networks",
    "parameterization",
    "process",
    "sampling",
    "schedules",
    "weighting",
]
