"""Tests of `elbo_core.networks`: shapes, heads, precision, convolution, learning.

Random initialisation compiles one kernel per parameter shape (seconds each on two
cores), so the tests share a few networks built once per module.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elbo_core import analytic, likelihood, networks, parameterization, process

# A small MLP trained for a few hundred steps must bring its eps-MSE within this
# factor of the oracle's optimum (measured: about 1.1 after 400 steps).
TRAINED_MSE_FACTOR = 1.5
# Width and depth shared by every MLP of the tests (shared initialisation kernels).
WIDTH, DEPTH = 32, 2


def _float32(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, tree
    )


@pytest.fixture(scope="module")
def mlp():
    return networks.MLPDenoiser(
        (2,), width_size=WIDTH, depth=DEPTH, key=jax.random.key(0)
    )


@pytest.fixture(scope="module")
def conv():
    return networks.ConvDenoiser((4, 4, 1), channels=4, depth=1, key=jax.random.key(1))


def test_shapes(mlp, conv):
    batch = eqx.filter_jit(lambda m, z, logsnr: jax.vmap(m)(z, logsnr))(
        mlp, jnp.ones((5, 2)), jnp.linspace(-3, 3, 5)
    )
    assert batch.shape == (5, 2)
    assert eqx.filter_jit(conv)(jnp.ones((4, 4, 1)), 1.0).shape == (4, 4, 1)
    image_mlp = networks.MLPDenoiser(
        (28, 28, 1), width_size=WIDTH, depth=1, key=jax.random.key(2)
    )
    assert eqx.filter_jit(image_mlp)(jnp.ones((28, 28, 1)), 0.0).shape == (28, 28, 1)


def test_wrong_shape_is_named(mlp):
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\)"):
        mlp(jnp.ones(3), 0.0)
    with pytest.raises(ValueError, match="width_size=0"):
        networks.MLPDenoiser((2,), width_size=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="height, width, channels"):
        networks.ConvDenoiser((8, 8), key=jax.random.key(0))


def test_output_head_is_the_parameterization(mlp):
    """The same weights with an x-prediction head give `eps = (z - alpha x) / sigma`."""
    x_network = eqx.tree_at(lambda n: n.parameterization, mlp, parameterization.X())
    z, logsnr = jnp.array([0.3, -1.2]), 0.8

    @eqx.filter_jit
    def compute(eps_network, x_network):
        raw = eps_network(z, logsnr)
        expected = (z - process.alpha(logsnr) * raw) / process.sigma(logsnr)
        return x_network(z, logsnr), expected

    np.testing.assert_allclose(*compute(mlp, x_network), rtol=1e-12)


def test_finite_in_float32_over_wide_range(mlp, conv):
    logsnr = jnp.array([-40.0, 0.0, 40.0])

    @eqx.filter_jit
    def outputs(network, z):
        return jax.vmap(lambda level: network(z, level.astype(z.dtype)))(logsnr)

    for network, shape in ((mlp, (2,)), (conv, (4, 4, 1))):
        z = jnp.ones(shape, jnp.float32)
        out = outputs(_float32(network), z)
        assert out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out)))
        # A float64 input promotes the computation, not the other way round.
        assert outputs(_float32(network), z.astype(jnp.float64)).dtype == jnp.float64


def test_fourier_features_distinguish_levels(mlp):
    levels = jnp.linspace(-40, 40, 161)
    features = jax.jit(jax.vmap(mlp.embedding))(levels)
    assert features.shape == (161, mlp.embedding.size)
    distances = jnp.linalg.norm(features[1:] - features[:-1], axis=1)
    assert float(jnp.min(distances)) > 1e-3


def test_conv2d_matches_channels_first_reference(conv):
    layer = conv.blocks[0].conv1
    reference = eqx.nn.Conv2d(4, 4, 3, padding=1, use_bias=False, key=jax.random.key(3))
    reference = eqx.tree_at(
        lambda c: c.weight, reference, jnp.transpose(layer.weight, (3, 2, 0, 1))
    )
    image = jax.random.normal(jax.random.key(4), (4, 4, 4))

    @eqx.filter_jit
    def compute(layer, reference, image):
        channels_first = reference(jnp.transpose(image, (2, 0, 1)))
        return layer(image), jnp.transpose(channels_first, (1, 2, 0)) + layer.bias

    np.testing.assert_allclose(*compute(layer, reference, image), rtol=1e-10)


def test_conv_divergence_is_the_jacobian_trace(conv):
    z = jax.random.normal(jax.random.key(5), (4, 4, 1))

    @eqx.filter_jit
    def compute(model, z):
        _, trace = likelihood.eps_divergence(model, z, 1.5, chunk_size=5)
        jacobian = jax.jacfwd(lambda v: model(v.reshape(z.shape), 1.5).ravel())
        return trace, jnp.trace(jacobian(z.ravel()))

    np.testing.assert_allclose(*compute(conv, z), rtol=1e-10)


def test_mlp_learns_the_optimal_denoiser(mlp):
    """A few hundred Adam steps approach the oracle's eps-MSE on a 2-D mixture."""
    mixture = analytic.GaussianMixture(
        np.array([[-1.0, 0.0], [1.0, 0.5]]), np.array([0.3, 0.4]), np.array([0.5, 0.5])
    )
    optimizer = optax.adam(3e-3)
    num_steps, batch_size = 400, 256

    def sample_batch(key):
        data_key, level_key, noise_key = jax.random.split(key, 3)
        x = jax.vmap(lambda k: mixture.sample(key=k))(
            jax.random.split(data_key, batch_size)
        )
        logsnr = jax.random.uniform(level_key, (batch_size,), minval=-6, maxval=6)
        z, eps = jax.vmap(lambda row, level, k: process.sample_q(row, level, key=k))(
            x, logsnr, jax.random.split(noise_key, batch_size)
        )
        return z, logsnr, eps

    def mse(model, z, logsnr, eps):
        return jnp.mean(jnp.sum((jax.vmap(model)(z, logsnr) - eps) ** 2, axis=1))

    @eqx.filter_jit
    def train(network, key):
        params, static = eqx.partition(network, eqx.is_inexact_array)
        state = optimizer.init(params)

        def step(carry, key):
            params, state = carry
            grads = jax.grad(lambda p: mse(eqx.combine(p, static), *sample_batch(key)))(
                params
            )
            updates, state = optimizer.update(grads, state)
            return (optax.apply_updates(params, updates), state), None

        keys = jax.random.split(key, num_steps)
        (params, _), _ = jax.lax.scan(step, (params, state), keys)
        network = eqx.combine(params, static)
        test = sample_batch(jax.random.key(99))
        return mse(network, *test), mse(mixture, *test)

    trained, optimal = train(mlp, jax.random.key(6))
    assert math.isfinite(float(trained))
    assert float(trained) < TRAINED_MSE_FACTOR * float(optimal), (trained, optimal)
