"""Models trained with Keras's ScheduleFreeAdamW: the averaged point x goes in.

References are numpy, from the schedule-free formulas: x from the state
(y, z), and Keras's update recursion on each backend, simulated on a linear
model whose MSE gradient is written out by hand.
"""

import os

import keras
import numpy as np
import pytest
from helpers import (
    assert_bit_equal,
    fit_quietly,
    learnable_data,
    make_model,
    max_error,
    predict_with,
    serve,
    tensorflow_only,
    values,
)

import keras_ema
from keras_ema.holder import WeightHolder

BETA_1 = 0.9
# x is computed in float32 from y and z: a few float32 ulps of |x| ~ 1.
X_TOLERANCE = 1e-6

pytestmark = pytest.mark.skipif(
    not hasattr(keras.optimizers, "ScheduleFreeAdamW"),
    reason="keras.optimizers.ScheduleFreeAdamW is new in Keras 3.12",
)


def schedule_free_model(seed=0):
    model = make_model(seed)
    optimizer = keras.optimizers.ScheduleFreeAdamW(0.05, beta_1=BETA_1)
    model.compile(optimizer, "mse")
    return model, optimizer


def reference_x(model, optimizer):
    """x = (y - (1 - beta_1) z) / beta_1 in float64, from Keras's state."""
    y = [np.asarray(v.numpy(), np.float64) for v in model.trainable_variables]
    z = [np.asarray(m.numpy(), np.float64) for m in optimizer._momentums]
    return [(a - (1 - BETA_1) * b) / BETA_1 for a, b in zip(y, z)]


def mse(model, weights, data):
    x, y = data
    return float(np.mean((predict_with(model, weights, x) - y) ** 2))


def test_x_is_swapped_in_and_y_restored_exactly():
    model, optimizer = schedule_free_model()
    validation = learnable_data(n=16, seed=2)
    history = fit_quietly(
        model,
        [keras_ema.EMASwap(evaluate="both", on_train_end="raw")],
        epochs=3,
        validation=validation,
    )
    y = values(model.trainable_variables)
    z = values(optimizer._momentums)
    x = reference_x(model, optimizer)
    assert max_error(x, y) > 100 * X_TOLERANCE, "x and y should differ here"
    # The last validation ran on x, the raw one on y.
    assert history.history["val_loss"][-1] == pytest.approx(
        mse(model, x, validation), rel=1e-5
    )
    assert history.history["val_raw_loss"][-1] == pytest.approx(
        mse(model, y, validation), rel=1e-5
    )
    with keras_ema.ema_weights(model):
        assert max_error(values(model.trainable_variables), x) < X_TOLERANCE
        assert WeightHolder.of(model).holds_average
    assert_bit_equal(values(model.trainable_variables), y, "y after the block")
    assert_bit_equal(values(optimizer._momentums), z, "z after the block")
    fit_quietly(model, epochs=1, validation=False)


def test_a_file_saved_holding_x_serves_x_after_loading(tmp_path):
    """The file holds x in the weights and in z, so the loaded model's state
    defines x as its average: x is never taken for y, nor served wrongly."""
    model, optimizer = schedule_free_model()
    path = os.fspath(tmp_path / "x.keras")
    fit_quietly(model, [keras_ema.EMACheckpoint(path, monitor="loss")], epochs=2)
    x = reference_x(model, optimizer)
    loaded = keras.models.load_model(path)
    assert max_error(values(loaded.trainable_variables), x) < X_TOLERANCE
    with keras_ema.ema_weights(loaded):
        assert max_error(values(loaded.trainable_variables), x) < X_TOLERANCE
    fit_quietly(loaded, epochs=1, validation=False)  # resumes, from x


@tensorflow_only("SavedModel export")
def test_export_serves_x(tmp_path):
    model, optimizer = schedule_free_model()
    fit_quietly(model, epochs=2)
    y = values(model.trainable_variables)
    x = reference_x(model, optimizer)
    keras_ema.export_saved_model(model, tmp_path / "served")
    inputs = learnable_data(n=8, seed=3)[0]
    served, info = serve(tmp_path / "served", inputs)
    assert np.abs(served - predict_with(model, x, inputs)).max() < 1e-5
    assert info["average"]["source"] == "keras ScheduleFreeAdamW"
    assert_bit_equal(values(model.trainable_variables), y, "y after export")


def test_emaswap_with_a_decay_is_refused_before_training():
    model, _ = schedule_free_model()
    before = values(model.trainable_variables)
    with pytest.raises(ValueError, match="ScheduleFreeAdamW keeps its own average"):
        fit_quietly(model, [keras_ema.EMASwap(decay=0.99)])
    assert_bit_equal(values(model.trainable_variables), before, "refused fit")


def simulate(x, y, w, b, steps, tensorflow_variant, lr=0.05, beta_2=0.999, eps=1e-8):
    """Keras's ScheduleFreeAdamW on a Dense(1) layer with MSE, full batches.

    The paper (and Keras on JAX): z starts at the initial weights, and
    x_{t-1} is recovered with the previous z. Keras 3.15's TensorFlow path
    in `fit`: z starts at zero (the copy of the weights its `build` makes is
    lost), and x_{t-1} is recovered with the z just updated.
    """
    params = [np.asarray(w, np.float64), np.asarray(b, np.float64)]
    z = [np.zeros_like(p) if tensorflow_variant else p.copy() for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        error = x @ params[0] + params[1] - y
        grads = [2 * x.T @ error / error.size, 2 * error.sum(0) / error.size]
        for i, g in enumerate(grads):
            v[i] += (g**2 - v[i]) * (1 - beta_2)
            denom = np.sqrt(v[i] / (1 - beta_2**t)) + eps
            z_old = z[i].copy()
            z[i] = z[i] - lr * g / denom
            z_seen = z[i] if tensorflow_variant else z_old
            x_old = (params[i] - (1 - BETA_1) * z_seen) / BETA_1
            x_new = (1 - 1 / t) * x_old + z[i] / t
            params[i] = (1 - BETA_1) * z[i] + BETA_1 * x_new
    return params


def test_what_keras_computes_on_each_backend():
    """Keras 3.15's ScheduleFreeAdamW follows the paper on JAX, and the
    variant `simulate` describes on TensorFlow (documented in
    docs/guides/schedule-free.md; this test says when that changes). Either
    way x = (y - (1 - beta_1) z) / beta_1 holds, which is what is swapped in."""
    data_x, data_y = learnable_data(n=16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.ScheduleFreeAdamW(0.05, beta_1=BETA_1)
    model.compile(optimizer, "mse")
    w, b = values(model.trainable_variables)
    model.fit(data_x, data_y, batch_size=16, epochs=4, verbose=0, shuffle=False)
    got = values(model.trainable_variables)
    x64, y64 = data_x.astype(np.float64), data_y.astype(np.float64)
    on_tensorflow = keras.backend.backend() == "tensorflow"
    expected = simulate(x64, y64, w, b, 4, tensorflow_variant=on_tensorflow)
    other = simulate(x64, y64, w, b, 4, tensorflow_variant=not on_tensorflow)
    # float32 steps against float64: 1e-7 measured.
    assert max_error(got, expected) < 1e-5
    assert max_error(got, other) > 1e-3


def test_early_stopping_set_weights_and_refit():
    """Everyday flows around x: EarlyStopping's restore keeps an x, weights
    the user writes win over it, and training resumes from y."""
    model, optimizer = schedule_free_model()
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=1, restore_best_weights=True
    )
    fit_quietly(model, [stop, keras_ema.EMASwap()], epochs=4)
    holder = WeightHolder.of(model)
    assert holder.holds_average
    mine = [np.full(v.shape, 0.25, v.dtype) for v in model.trainable_variables]
    model.set_weights(mine + values(model.non_trainable_variables))
    assert not holder.holds_average
    fit_quietly(model, epochs=1, validation=False)
    y = values(model.trainable_variables)
    x = reference_x(model, optimizer)
    with keras_ema.ema_weights(model):
        assert max_error(values(model.trainable_variables), x) < X_TOLERANCE
    assert_bit_equal(values(model.trainable_variables), y, "y after the block")


def test_swaps_during_fit_leave_training_bit_exact():
    """EMASwap puts x into y and z at every validation and epoch end; the
    training itself must not see it (both backends carry z differently)."""
    runs = []
    for callbacks in ([], [keras_ema.EMASwap(evaluate="both", on_train_end="raw")]):
        model, optimizer = schedule_free_model(seed=3)
        fit_quietly(model, callbacks, epochs=3)
        runs.append(values(model.trainable_variables) + values(optimizer._momentums))
    assert_bit_equal(runs[1], runs[0], "y and z with and without EMASwap")


def test_checkpoints_with_swap_on_epoch_false_hold_y_and_z(tmp_path):
    model, optimizer = schedule_free_model()
    path = os.fspath(tmp_path / "raw.keras")
    callbacks = [
        keras_ema.EMASwap(swap_on_epoch=False, on_train_end="raw"),
        keras.callbacks.ModelCheckpoint(path),
    ]
    fit_quietly(model, callbacks, epochs=2)
    loaded = keras.models.load_model(path)
    assert_bit_equal(
        values(loaded.trainable_variables),
        values(model.trainable_variables),
        "y in the file",
    )
    assert_bit_equal(
        values(loaded.optimizer._momentums), values(optimizer._momentums), "z"
    )
