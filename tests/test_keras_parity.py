"""Keras's own EMA tests (keras/src/optimizers/optimizer_test.py, `test_ema`
and `test_ema_with_model_fit`), ported to EMAOptimizer with
`init="first_step"`: the same numbers on every backend, except that the
model keeps its raw weights (Keras overwrites them with the average)."""

import keras
import numpy as np
import pytest

import keras_ema


def test_ema():
    v = keras.Variable([[3.0, 4.0], [5.0, 6.0]])
    grads = keras.ops.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.SGD(learning_rate=1.0), decay=0.9, init="first_step"
    )
    optimizer.apply([grads], [v])
    np.testing.assert_allclose(v.numpy(), [[2.0, 3.0], [4.0, 5.0]])
    # Initialized after the first step.
    np.testing.assert_allclose(optimizer.average(v).numpy(), [[2.0, 3.0], [4.0, 5.0]])
    optimizer.apply([grads], [v])
    np.testing.assert_allclose(v.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(
        optimizer.average(v).numpy(), [[1.9, 2.9], [3.9, 4.9]], rtol=1e-6
    )
    optimizer.apply([grads], [v])
    # Keras (ema_overwrite_frequency=3) would now overwrite v with the
    # average; EMAOptimizer keeps the raw weights and swaps on request.
    np.testing.assert_allclose(v.numpy(), [[0.0, 1.0], [2.0, 3.0]])
    average = [[1.71, 2.71], [3.71, 4.71]]
    np.testing.assert_allclose(optimizer.average(v).numpy(), average, rtol=1e-6)
    with optimizer.averager.swapped():
        np.testing.assert_allclose(v.numpy(), average, rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), [[0.0, 1.0], [2.0, 3.0]])


@pytest.mark.parametrize("run_eagerly", [True, False])
def test_ema_with_model_fit(run_eagerly):
    x_train = np.ones((1, 1)).astype("float32")
    y_train = np.zeros((1, 1)).astype("float32")
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.SGD(learning_rate=0.1), decay=0.9, init="first_step"
    )
    model = keras.Sequential(
        [keras.layers.Dense(2, kernel_initializer="ones", use_bias=False)]
    )
    model.compile(loss="mse", optimizer=optimizer, run_eagerly=run_eagerly)
    model.fit(x_train, y_train, batch_size=1, epochs=2, verbose=0)
    np.testing.assert_allclose(
        optimizer.averager.shadows[0].numpy(), [[0.891, 0.891]], atol=1e-5
    )
    # The raw weights after two SGD steps (1 -> 0.9 -> 0.81), not Keras's
    # overwritten average.
    np.testing.assert_allclose(
        model.trainable_variables[0].numpy(), [[0.81, 0.81]], atol=1e-5
    )
    with keras_ema.ema_weights(model):
        np.testing.assert_allclose(
            model.trainable_variables[0].numpy(), [[0.891, 0.891]], atol=1e-5
        )
