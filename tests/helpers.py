"""Shared test helpers: a small named model, data, and the numpy reference."""

import keras
import numpy as np
import pytest


def tensorflow_only(reason, *params):
    """Marks a test (or, given values, parameters) as TensorFlow-only."""
    mark = pytest.mark.backend("tensorflow", reason=reason)
    if not params:
        return mark
    return [pytest.param(p, marks=mark) for p in params]


def reference_average(
    initial, trajectory, decay, update_every=1, start_step=0, init="weights"
):
    """The EMA of DESIGN.md in float64 numpy, from the weights after each step.

    `decay` is a float or the per-step decay `d(s)`; the decay over
    `update_every` steps is the product of the per-step decays.
    """
    per_step = decay if callable(decay) else (lambda s: decay)
    shadow = [np.asarray(w, np.float64) for w in initial]
    for t, weights in enumerate(trajectory, start=1):
        s = t - start_step
        weights = [np.asarray(w, np.float64) for w in weights]
        if s <= 0 or (init == "first_step" and t == 1):
            shadow = weights
        elif s % update_every == 0:
            d = np.prod([per_step(j) for j in range(s - update_every + 1, s + 1)])
            shadow = [a - (1.0 - d) * (a - w) for a, w in zip(shadow, weights)]
    return shadow


def sync_state(model):
    """Puts the training state back into the model's variables.

    Keras's JAX trainer carries the state outside the variables between
    epochs; a callback that reads weights mid-epoch asks for it back.
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


class RecordWeights(keras.callbacks.Callback):
    """Records the trainable weights (and, given the optimizer, the shadows
    and the average's step) after every training step."""

    def __init__(self, optimizer=None):
        super().__init__()
        self.optimizer = optimizer
        self.weights = []
        self.shadows = []
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        sync_state(self.model)
        self.weights.append(values(self.model.trainable_variables))
        if self.optimizer is not None:
            averager = self.optimizer.averager
            self.shadows.append(values(averager.shadows))
            self.steps.append(int(averager.step.numpy()))


class RecordFirstBatch(keras.callbacks.Callback):
    """The trainable weights the first step of a fit starts from."""

    def __init__(self):
        super().__init__()
        self.weights = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.weights is None:
            sync_state(self.model)
            self.weights = values(self.model.trainable_variables)


def assert_bit_equal(a, b, what="arrays"):
    """Equal dtypes, shapes and bits, array by array; `what` in the message."""
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, what
        assert x.tobytes() == y.tobytes(), (
            f"{what}: differs by {max_error([x], [y]):.3g}"
        )


def learnable_data(n=32, seed=1):
    """A learnable regression problem (so that validation loss falls)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    w = np.linspace(-1.0, 1.0, 6).reshape(6, 1)
    y = (np.tanh(x @ w) + 0.05 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def fit_quietly(model, callbacks=(), epochs=1, validation=True, data=None, **kwargs):
    """`model.fit` in order, silently, in batches of 8: on `data` (default
    `learnable_data()`), validating on `validation` (True: 16 held-out rows
    of the same problem; False or None: none; or an `(x, y)` pair)."""
    x, y = learnable_data() if data is None else data
    if validation is True:
        validation = learnable_data(n=16, seed=2)
    return model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        validation_data=validation or None,
        callbacks=list(callbacks),
        **kwargs,
    )


def make_model(seed=0, dtype=None):
    """Input(6) -> Dense(8, tanh) "hidden" -> Dense(1) "out", named "net"."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", dtype=dtype, name="hidden"),
            keras.layers.Dense(1, dtype=dtype, name="out"),
        ],
        name="net",
    )


def make_data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def values(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def max_error(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(a, b)
    )


def predict_with(model, weights, x):
    """The predictions of a clone of `model` holding `weights` (from numpy)."""
    clone = keras.models.clone_model(model)
    for variable, value in zip(clone.trainable_variables, weights):
        variable.assign(np.asarray(value, variable.dtype))
    return np.asarray(clone(x, training=False))


def serve(path, x):
    """A SavedModel's `serve(x)` and its `ema_info()` JSON."""
    import json
    import os

    import tensorflow as tf

    served = tf.saved_model.load(os.fspath(path))
    return served.serve(tf.constant(x)).numpy(), json.loads(
        served.ema_info().numpy().decode()
    )


# The start of a script run in a fresh process (`run_python("-c", ...)`)
# with two logical CPUs, for tf.distribute.MirroredStrategy.
TWO_LOGICAL_CPUS = """
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, keras_ema
"""


def last_json_line(result):
    """The JSON a `run_python` script printed last; fails with its stderr."""
    import json

    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_python(*args, timeout=600):
    """Runs `python *args` in a fresh process; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
