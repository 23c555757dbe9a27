"""Smoke test of keras_ema as installed from its wheel, outside the source
tree: the package files are there, and fit + EMASwap + save/load + export
work. Run by .ci/run in a fresh venv; exits non-zero on any failure."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from importlib import metadata  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ema  # noqa: E402

package = pathlib.Path(keras_ema.__file__).parent
assert "site-packages" in str(package), f"not the installed package: {package}"
assert (package / "py.typed").is_file(), "py.typed missing from the wheel"
assert keras_ema.__version__ == metadata.version("keras_ema")
assert "Apache" in (metadata.metadata("keras_ema")["License-Expression"] or "")

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6)).astype("float32")
y = (x[:, :1] * 2 + 0.5).astype("float32")
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
)
model.compile(
    optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=0.9),
    loss="mse",
)
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
with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with keras_ema.ema_weights(model):
        averaged = model.predict(x, verbose=0)
    export = keras_ema.export_saved_model(model, os.path.join(directory, "export"))
    served_model = tf.saved_model.load(export)  # alive while serving
    served = served_model.serve(x).numpy()
    np.testing.assert_allclose(served, averaged, atol=1e-6)
print(f"installed keras_ema {keras_ema.__version__} from {package}: ok")
sys.exit(0)
