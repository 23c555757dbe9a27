"""Saving and loading: nothing lost, not even while the average is swapped in."""

import keras
import numpy as np
import pytest
from helpers import make_data, make_model, values

import keras_ema


def test_save_while_swapped_keeps_raw_weights(tmp_path):
    model = make_model()
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=0.9)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = make_data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    raw = values(model.trainable_variables)
    averages = values(optimizer.averager.shadows)

    with keras_ema.ema_weights(model):
        model.save(tmp_path / "swapped.keras")
    for a, b in zip(values(model.trainable_variables), raw):
        np.testing.assert_array_equal(a, b)

    loaded = keras.models.load_model(tmp_path / "swapped.keras")
    # The file's model weights are the averages; the raw ones came along.
    for a, b in zip(values(loaded.trainable_variables), averages):
        np.testing.assert_array_equal(a, b)
    assert keras_ema.holder.WeightHolder.of(loaded).holds_average
    keras_ema.EMASwap.restore_raw_weights(loaded)
    for a, b in zip(values(loaded.trainable_variables), raw):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(values(loaded.optimizer.averager.shadows), averages):
        np.testing.assert_array_equal(a, b)

    # Training resumes from the raw weights exactly as the original does.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(
        values(loaded.trainable_variables), values(model.trainable_variables)
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_load_mismatched_average_is_an_error(tmp_path):
    model = make_model()
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1)), loss="mse"
    )
    model.fit(*make_data(), batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")

    other = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, name="wide"), keras.layers.Dense(1)]
    )
    other.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1)), loss="mse"
    )
    other.optimizer.build(other.trainable_variables)
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        other.load_weights(tmp_path / "model.weights.h5")


def test_load_weights_saved_without_average_is_an_error(tmp_path):
    plain = make_model()
    plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    plain.fit(*make_data(), batch_size=8, epochs=1, verbose=0)
    plain.save_weights(tmp_path / "plain.weights.h5")

    model = make_model(seed=3)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="saved without a keras_ema average"):
        model.load_weights(tmp_path / "plain.weights.h5")
