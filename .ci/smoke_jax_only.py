"""Smoke test of `pip install "keras_ema[jax]"`: no TensorFlow installed.

keras_ema imports on the JAX backend without TensorFlow, trains with
EMASwap and a keras.distribution mesh, saves the averaged `.keras` file, and
export_saved_model says that a SavedModel needs TensorFlow. Run by .ci/run
in a fresh venv; exits non-zero on any failure.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import importlib.util  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

assert "tensorflow" not in sys.modules

keras.distribution.set_distribution(keras.distribution.DataParallel())
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6)).astype("float32")
y = (x[:, :1] * 2 + 0.5).astype("float32")
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
)
optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=0.9)
model.compile(optimizer=optimizer, loss="mse")
history = model.fit(
    x,
    y,
    batch_size=16,
    epochs=2,
    verbose=0,
    validation_data=(x, y),
    callbacks=[keras_ema.EMASwap(evaluate="both", on_train_end="raw")],
)
assert {"val_loss", "val_raw_loss", "ema_decay"} <= set(history.history)
assert int(optimizer.averager.step.numpy()) == 8
for weight in model.trainable_variables:
    assert optimizer.average(weight).value.sharding == weight.value.sharding
with tempfile.TemporaryDirectory() as directory:
    try:
        keras_ema.export_saved_model(model, os.path.join(directory, "export"))
    except ImportError as error:
        assert "needs TensorFlow" in str(error), error
    else:
        raise AssertionError("export_saved_model worked without TensorFlow")
    path = os.path.join(directory, "model.keras")
    with keras_ema.ema_weights(model):
        averaged = model.predict(x, verbose=0)
        model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), averaged, atol=1e-6)
assert "tensorflow" not in sys.modules
print(f"keras_ema {keras_ema.__version__} on JAX without TensorFlow: ok")
