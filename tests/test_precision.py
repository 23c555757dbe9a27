"""Mixed precision and low-precision weights; XLA compilation of the update."""

import re

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from helpers import sync_state, tensorflow_only

import keras_ema


@pytest.fixture
def policy():
    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)

    yield set_policy
    keras.mixed_precision.set_global_policy("float32")


@tensorflow_only("tf.function around the stateful update (JAX: test_jax.py)")
def test_bfloat16_weights_get_float32_shadows_that_track_float64():
    """A bfloat16 weight trajectory averaged with decay 0.999: the float32
    shadow follows the float64 reference to float32 precision, while a
    bfloat16 shadow (numpy emulation) would barely move at all."""
    decay, steps = 0.999, 1500
    rng = np.random.default_rng(0)
    start = rng.normal(size=64)
    target = start + 1.0
    # The weights move from `start` to `target` and stay there, in bfloat16.
    trajectory = [
        (start + (target - start) * min(1.0, t / 300)).astype(ml_dtypes.bfloat16)
        for t in range(1, steps + 1)
    ]
    variable = keras.Variable(start.astype(ml_dtypes.bfloat16), dtype="bfloat16")
    ema = keras_ema.ExponentialMovingAverage(decay)
    ema.build([variable])
    assert ema.shadows[0].dtype == "float32"

    @tf.function
    def step(value):
        variable.assign(value)
        ema.update()

    reference = np.asarray(variable.numpy(), np.float64)
    emulated_bfloat16 = variable.numpy()
    for weights in trajectory:
        step(tf.constant(weights))
        w = np.asarray(weights, np.float64)
        reference = reference - (1 - decay) * (reference - w)
        emulated_bfloat16 = (
            np.asarray(emulated_bfloat16, np.float32)
            - np.float32(1 - decay) * (np.asarray(emulated_bfloat16, np.float32) - w)
        ).astype(ml_dtypes.bfloat16)
    shadow = ema.shadows[0].numpy().astype(np.float64)
    moved = np.abs(reference - np.asarray(start.astype(ml_dtypes.bfloat16), np.float64))
    ours = np.abs(shadow - reference)
    bfloat16 = np.abs(np.asarray(emulated_bfloat16, np.float64) - reference)
    assert moved.min() > 0.6  # the average travelled most of the way
    assert ours.max() < 1e-5 * np.abs(reference).max()
    # Each increment (1 - d) * (shadow - w) is below bfloat16's resolution
    # next to the shadow, so a bfloat16 shadow stays stuck near its start.
    assert bfloat16.min() > 0.2 and bfloat16.mean() > 0.5


@pytest.mark.parametrize("name", ["mixed_bfloat16", "bfloat16", "float16"])
def test_low_precision_policies_in_fit(policy, name):
    policy(name)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05), decay=0.9)
    model.compile(optimizer=optimizer, loss="mse")
    initial = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    recorded = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            sync_state(model)
            recorded.append(
                [v.numpy().astype(np.float64) for v in model.trainable_variables]
            )

    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Record()])
    assert all(s.dtype == "float32" for s in optimizer.averager.shadows)
    expected = initial
    for weights in recorded:
        expected = [e - 0.1 * (e - w) for e, w in zip(expected, weights)]
    for shadow, reference in zip(optimizer.averager.shadows, expected):
        np.testing.assert_allclose(shadow.numpy(), reference, rtol=1e-5, atol=1e-6)


@tensorflow_only("the TF train step's XLA graph")
def test_xla_train_step_contains_the_update():
    """Under jit_compile=True the average's update is part of the one
    compiled train step: the HLO module updates the shadows (they are among
    its outputs) and compiling it needs no other function."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    x = tf.random.normal((8, 6))
    y = tf.random.normal((8, 4))

    def hlo_for(optimizer):
        optimizer.build(model.trainable_variables)

        @tf.function(jit_compile=True)
        def train_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(xb, training=True) - yb) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        train_step(x, y)
        graph = train_step.get_concrete_function(x, y).graph
        calls = [
            op.type
            for op in graph.get_operations()
            if op.type in ("PartitionedCall", "StatefulPartitionedCall")
        ]
        return train_step.experimental_get_compiler_ir(x, y)(stage="hlo"), calls

    plain, _ = hlo_for(keras.optimizers.SGD(0.1))
    ema = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1), decay=0.9)
    averaged, calls = hlo_for(ema)
    assert calls == []

    def outputs(hlo):
        """The shapes the entry computation writes back, e.g. f32[6,4]."""
        root = [line for line in hlo.splitlines() if "ROOT" in line][-1]
        written = root.split(" = (", 1)[1].split(") tuple(", 1)[0]
        return sorted(re.findall(r"[a-z]+\d+\[[\d,]*\]", written))

    # The weights and the optimizer's step, and in the same module the two
    # shadows (kernel, bias) and the average's step counter.
    assert outputs(plain) == ["f32[4]", "f32[6,4]", "s64[]"]
    assert outputs(averaged) == sorted(outputs(plain) * 2)
