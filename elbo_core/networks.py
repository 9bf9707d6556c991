"""Equinox denoisers `model(z, logsnr) -> eps_hat`, conditioned on log-SNR.

Every network here maps one example `z` (any shape) and a scalar `logsnr` to a raw
output of the same shape, which its `parameterization` (`elbo_core.parameterization`,
`Eps()` by default) turns into the noise prediction `eps_hat`. So a network trained
for x-, v- or EDM-F-prediction is still a denoiser that the losses, the likelihood
and the samplers accept unchanged.

- `FourierFeatures`: a fixed embedding of `logsnr` by sines and cosines at
  geometrically spaced frequencies, plus `logsnr` itself, scaled.
- `MLPDenoiser`: residual MLP on the flattened example, the embedding added into
  every block; for low-dimensional data, and usable on 28x28 images flattened.
- `ConvDenoiser`: a small residual convolutional network, channels-last (`H W C`),
  the embedding added as a per-channel bias in every block. Convolutions use
  `lax.conv_general_dilated` with `NHWC`/`HWIO` layouts, which XLA:CPU runs 10 to 16
  times faster than channels-first inside the `while_loop` of an ODE solve.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, ScalarLike

from .parameterization import Eps, Parameterization

__all__ = ["Conv2d", "ConvDenoiser", "FourierFeatures", "MLPDenoiser"]


def _check_positive(owner: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name}={value!r} must be a positive integer.")


class FourierFeatures(eqx.Module):
    """Embedding `[logsnr / scale, sin(f_k logsnr), cos(f_k logsnr)]` of log-SNR.

    `num_frequencies` frequencies `f_k` spaced geometrically from `min_frequency` to
    `max_frequency` (radians per unit of logsnr): the slowest varies once over the
    whole range [-40, 40], the fastest within about three units. The frequencies are
    fixed, not trained.
    """

    # NOTE: the probability-flow ODE is integrated in logsnr, so every wiggle of the
    # network in logsnr costs adaptive steps: raising `max_frequency` from 2 to 8
    # more than doubled the evaluations of a likelihood solve of a 2-D MLP.

    frequencies: Float[Array, " num_frequencies"]
    scale: float = eqx.field(static=True)

    def __init__(
        self,
        num_frequencies: int = 16,
        *,
        min_frequency: float = 1 / 32,
        max_frequency: float = 2.0,
        scale: float = 10.0,
    ):
        _check_positive("FourierFeatures", num_frequencies=num_frequencies)
        if not 0 < min_frequency <= max_frequency:
            raise ValueError(
                f"FourierFeatures: need 0 < min_frequency <= max_frequency; got "
                f"{min_frequency} and {max_frequency}."
            )
        self.frequencies = jnp.geomspace(min_frequency, max_frequency, num_frequencies)
        self.scale = float(scale)

    @property
    def size(self) -> int:
        """Length of the embedding, `2 num_frequencies + 1`."""
        return 2 * self.frequencies.shape[0] + 1

    def __call__(self, logsnr: ScalarLike) -> Float[Array, " size"]:
        logsnr = jnp.asarray(logsnr)
        angles = jax.lax.stop_gradient(self.frequencies).astype(logsnr.dtype) * logsnr
        return jnp.concatenate(
            [(logsnr / self.scale)[None], jnp.sin(angles), jnp.cos(angles)]
        )


def _cast_like(tree, dtype):
    """The floating arrays of `tree` in `dtype` (a float32 model in a float64 solve)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree
    )


class _ResidualBlock(eqx.Module):
    """`h + W2 silu(W1 silu(h) + U embedding)`."""

    hidden: eqx.nn.Linear
    condition: eqx.nn.Linear
    output: eqx.nn.Linear

    def __init__(self, width_size: int, embedding_size: int, *, key: PRNGKeyArray):
        hidden_key, condition_key, output_key = jax.random.split(key, 3)
        self.hidden = eqx.nn.Linear(width_size, width_size, key=hidden_key)
        self.condition = eqx.nn.Linear(embedding_size, width_size, key=condition_key)
        self.output = eqx.nn.Linear(width_size, width_size, key=output_key)

    def __call__(self, h, embedding):
        inner = self.hidden(jax.nn.silu(h)) + self.condition(embedding)
        return h + self.output(jax.nn.silu(inner))


class MLPDenoiser(eqx.Module):
    """Residual MLP denoiser for examples of any fixed `shape`, flattened.

    `output = W_out silu(blocks(W_in [z, embedding]))`, reshaped to `shape`; each of
    `depth` residual blocks adds a linear map of the log-SNR embedding. The output
    head is `parameterization.to_eps(output, z, logsnr)`.

    **Arguments:**

    - `shape`: the shape of one example, e.g. `(2,)` or `(28, 28, 1)`.
    - `width_size`, `depth`: hidden width and number of residual blocks.
    - `num_frequencies`: of the `FourierFeatures` embedding.
    - `parameterization`: what the network predicts (`Eps()` by default).
    - `key`: initialisation.
    """

    embedding: FourierFeatures
    input_layer: eqx.nn.Linear
    blocks: tuple[_ResidualBlock, ...]
    output_layer: eqx.nn.Linear
    parameterization: Parameterization
    shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        width_size: int = 128,
        depth: int = 3,
        num_frequencies: int = 16,
        parameterization: Parameterization | None = None,
        key: PRNGKeyArray,
    ):
        shape = tuple(shape)
        _check_positive("MLPDenoiser", width_size=width_size, depth=depth)
        if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
            raise ValueError(
                f"MLPDenoiser: shape={shape!r} must be a non-empty tuple of positive "
                "integers."
            )
        input_key, output_key, *block_keys = jax.random.split(key, depth + 2)
        num_dims = math.prod(shape)
        self.embedding = FourierFeatures(num_frequencies)
        size = self.embedding.size
        self.input_layer = eqx.nn.Linear(num_dims + size, width_size, key=input_key)
        self.blocks = tuple(_ResidualBlock(width_size, size, key=k) for k in block_keys)
        self.output_layer = eqx.nn.Linear(width_size, num_dims, key=output_key)
        self.parameterization = Eps() if parameterization is None else parameterization
        self.shape = shape

    def __call__(
        self, z: Float[Array, "*shape"], logsnr: ScalarLike
    ) -> Float[Array, "*shape"]:
        """`eps_hat(z; logsnr)` for one example."""
        z = jnp.asarray(z)
        if z.shape != self.shape:
            raise ValueError(
                f"MLPDenoiser: z has shape {z.shape}; this network takes {self.shape}."
            )
        logsnr = jnp.asarray(logsnr, z.dtype)
        network = _cast_like(self, z.dtype)
        embedding = network.embedding(logsnr)
        h = network.input_layer(jnp.concatenate([z.reshape(-1), embedding]))
        for block in network.blocks:
            h = block(h, embedding)
        output = network.output_layer(jax.nn.silu(h)).reshape(self.shape)
        return network.parameterization.to_eps(output, z, logsnr).astype(z.dtype)


class Conv2d(eqx.Module):
    """A 2-D convolution on one channels-last image `(H, W, C_in) -> (H, W, C_out)`.

    Same padding, stride one; weights in `HWIO` layout, initialised as
    `eqx.nn.Conv2d` does (uniform with bound `1 / sqrt(fan_in)`).
    """

    weight: Float[Array, "kernel kernel in_channels out_channels"]
    bias: Float[Array, " out_channels"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        key: PRNGKeyArray,
    ):
        _check_positive(
            "Conv2d",
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
        )
        weight_key, bias_key = jax.random.split(key)
        bound = 1 / math.sqrt(in_channels * kernel_size**2)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        # NOTE: drawn flat and reshaped: XLA:CPU compiles a 4-D threefry draw up to
        # ten times more slowly than the same draw flat.
        weight = jax.random.uniform(
            weight_key, (math.prod(shape),), minval=-bound, maxval=bound
        )
        self.weight = weight.reshape(shape)
        self.bias = jax.random.uniform(
            bias_key, (out_channels,), minval=-bound, maxval=bound
        )

    def __call__(
        self, image: Float[Array, "height width in_channels"]
    ) -> Float[Array, "height width out_channels"]:
        out = jax.lax.conv_general_dilated(
            image[None],
            self.weight.astype(image.dtype),
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return out[0] + self.bias.astype(image.dtype)


class _ConvBlock(eqx.Module):
    """`h + conv2(silu(conv1(silu(h)) + U embedding))`, the embedding per channel."""

    conv1: Conv2d
    condition: eqx.nn.Linear
    conv2: Conv2d

    def __init__(self, channels: int, embedding_size: int, *, key: PRNGKeyArray):
        conv1_key, condition_key, conv2_key = jax.random.split(key, 3)
        self.conv1 = Conv2d(channels, channels, key=conv1_key)
        self.condition = eqx.nn.Linear(embedding_size, channels, key=condition_key)
        self.conv2 = Conv2d(channels, channels, key=conv2_key)

    def __call__(self, h, embedding):
        inner = self.conv1(jax.nn.silu(h)) + self.condition(embedding)
        return h + self.conv2(jax.nn.silu(inner))


class ConvDenoiser(eqx.Module):
    """Small residual convolutional denoiser for one image `(H, W, C)`, channels-last.

    A 3x3 convolution to `channels` features, `depth` residual blocks at full
    resolution conditioned on the log-SNR embedding, and a 3x3 convolution back to
    `C`; the output head is `parameterization.to_eps`. Sized for MNIST-like images
    on a CPU; a U-Net with down- and up-sampling extends it.
    """

    embedding: FourierFeatures
    input_conv: Conv2d
    blocks: tuple[_ConvBlock, ...]
    output_conv: Conv2d
    parameterization: Parameterization
    shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        channels: int = 32,
        depth: int = 2,
        num_frequencies: int = 16,
        parameterization: Parameterization | None = None,
        key: PRNGKeyArray,
    ):
        shape = tuple(shape)
        if len(shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in shape):
            raise ValueError(
                f"ConvDenoiser: shape={shape!r} must be (height, width, channels)."
            )
        _check_positive("ConvDenoiser", channels=channels, depth=depth)
        input_key, output_key, *block_keys = jax.random.split(key, depth + 2)
        self.embedding = FourierFeatures(num_frequencies)
        size = self.embedding.size
        self.input_conv = Conv2d(shape[-1], channels, key=input_key)
        self.blocks = tuple(_ConvBlock(channels, size, key=k) for k in block_keys)
        self.output_conv = Conv2d(channels, shape[-1], key=output_key)
        self.parameterization = Eps() if parameterization is None else parameterization
        self.shape = shape

    def __call__(
        self, z: Float[Array, "height width channels"], logsnr: ScalarLike
    ) -> Float[Array, "height width channels"]:
        """`eps_hat(z; logsnr)` for one image."""
        z = jnp.asarray(z)
        if z.shape != self.shape:
            raise ValueError(
                f"ConvDenoiser: z has shape {z.shape}; this network takes {self.shape}."
            )
        logsnr = jnp.asarray(logsnr, z.dtype)
        network = _cast_like(self, z.dtype)
        embedding = network.embedding(logsnr)
        h = network.input_conv(z)
        for block in network.blocks:
            h = block(h, embedding)
        output = network.output_conv(jax.nn.silu(h))
        return network.parameterization.to_eps(output, z, logsnr).astype(z.dtype)
