"""LAWA: the mean of the latest k epoch-end weights, served by the holder.

The reference is numpy: the mean, in float64, of the weights recorded after
the last step of each of the latest k epochs.
"""

import keras
import numpy as np
import pytest
from helpers import (
    RecordWeights,
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

STEPS_PER_EPOCH = 4  # 32 rows in batches of 8 (fit_quietly)


def compiled(optimizer=None):
    model = make_model()
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.05), loss="mse")
    return model


def epoch_ends(record):
    return record.weights[STEPS_PER_EPOCH - 1 :: STEPS_PER_EPOCH]


def mean_of(weights):
    return [
        np.mean(np.stack(v).astype(np.float64), axis=0).astype(v[0].dtype)
        for v in zip(*weights)
    ]


def batchnorm_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )


def mse(prediction, y):
    return float(np.mean((np.asarray(prediction, np.float64) - y) ** 2))


@pytest.mark.parametrize("k", [1, 3])
def test_validation_is_the_mean_of_the_latest_epochs(k):
    model = compiled()
    record = RecordWeights()
    x_val, y_val = learnable_data(n=16, seed=2)
    history = fit_quietly(
        model, [keras_ema.LAWA(k=k, evaluate="both"), record], epochs=5
    )
    ends = epoch_ends(record)
    for epoch in range(5):
        window = ends[max(0, epoch + 1 - k) : epoch + 1]
        expected = mse(predict_with(model, mean_of(window), x_val), y_val)
        assert history.history["val_loss"][epoch] == pytest.approx(expected, rel=1e-5)
        raw = mse(predict_with(model, ends[epoch], x_val), y_val)
        assert history.history["val_raw_loss"][epoch] == pytest.approx(raw, rel=1e-5)
    # After fit the model holds the mean; the raw weights come back exactly.
    holder = WeightHolder.of(model)
    assert holder.holds_average and holder.held_by == "LAWA"
    assert max_error(values(model.trainable_variables), mean_of(ends[-k:])) < 1e-6
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_equal(values(model.trainable_variables), ends[-1])


def test_refit_continues_the_window_and_trains_the_raw_weights():
    model = compiled()
    record = RecordWeights()
    lawa = keras_ema.LAWA(k=3, on_train_end="raw")
    fit_quietly(model, [lawa, record], epochs=2, validation=False)
    assert not WeightHolder.of(model).holds_average
    fit_quietly(model, [lawa, record], epochs=2, validation=False)
    ends = epoch_ends(record)
    with keras_ema.ema_weights(model, average="lawa"):
        held = values(model.trainable_variables)
    assert max_error(held, mean_of(ends[-3:])) < 1e-6

    plain = compiled()
    fit_quietly(plain, epochs=4, validation=False)
    assert_bit_equal(
        values(plain.trainable_variables), values(model.trainable_variables)
    )


def test_next_to_an_ema_and_in_files(tmp_path):
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(0.05), decay=0.9)
    model = compiled(optimizer)
    record = RecordWeights()
    path = tmp_path / "lawa.weights.h5"
    checkpoint = keras_ema.EMACheckpoint(
        str(path), save_weights_only=True, average="lawa"
    )
    lawa = keras_ema.LAWA(k=2, on_train_end="raw")
    fit_quietly(model, [lawa, record, checkpoint], epochs=3)
    ends = epoch_ends(record)
    with keras_ema.ema_weights(model):  # the EMA, the optimizer's average
        ema = values(model.trainable_variables)
    assert_bit_equal(ema, values(optimizer.averager.shadows))
    clone = make_model(seed=4)
    clone.load_weights(path)
    assert max_error(values(clone.trainable_variables), mean_of(ends[-2:])) < 1e-6
    assert_bit_equal(values(model.trainable_variables), ends[-1])


@tensorflow_only("a TensorFlow SavedModel")
def test_export_serves_the_mean(tmp_path):
    model = compiled()
    record = RecordWeights()
    fit_quietly(model, [keras_ema.LAWA(k=2, on_train_end="raw"), record], epochs=3)
    x, _ = learnable_data()
    keras_ema.export_saved_model(model, tmp_path / "served")  # the only average
    outputs, info = serve(tmp_path / "served", x)
    expected = predict_with(model, mean_of(epoch_ends(record)[-2:]), x)
    np.testing.assert_allclose(outputs, expected, atol=1e-6)
    assert info["average"]["source"] == "keras_ema.LAWA"
    assert info["average"]["epochs"] == [2, 3]


def test_batchnorm_statistics_are_averaged_too():
    model = batchnorm_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")

    class RecordAll(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(values(model.weights))

    record = RecordAll()
    # Listed first: it reads the weights before LAWA's epoch end.
    fit_quietly(
        model,
        [record, keras_ema.LAWA(k=2, on_train_end="raw")],
        epochs=3,
        validation=False,
    )
    with keras_ema.ema_weights(model):
        assert WeightHolder.of(model).statistics == "averaged"
        held = values(model.weights)
    assert max_error(held, mean_of(record.ends[-2:])) < 1e-6


def test_one_fit_refuses_lawa_and_emaswap():
    model = compiled(keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=0.9))
    with pytest.raises(ValueError, match="both LAWA and EMASwap"):
        fit_quietly(model, [keras_ema.LAWA(), keras_ema.EMASwap()])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="`k`"):
        keras_ema.LAWA(k=0)
    with pytest.raises(TypeError, match="`k`"):
        keras_ema.LAWA(k=2.5)
    with pytest.raises(ValueError, match="`evaluate`"):
        keras_ema.LAWA(evaluate="ema")
    with pytest.raises(ValueError, match="`on_train_end`"):
        keras_ema.LAWA(on_train_end="ema")
    model = compiled()
    fit_quietly(model, validation=False)
    with pytest.raises(ValueError, match="keeps no LAWA average"):
        with keras_ema.ema_weights(model, average="lawa"):
            pass
    with pytest.raises(TypeError, match="`average`"):
        with keras_ema.ema_weights(model, average="LAWA"):
            pass


def test_an_ema_goes_in_over_the_held_mean_and_back():
    model = batchnorm_model()
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(0.05), decay=0.9)
    model.compile(optimizer=optimizer, loss="mse")
    fit_quietly(model, [keras_ema.LAWA(k=2)], epochs=2, validation=False)
    holder = WeightHolder.of(model)
    assert holder.holds_average and holder.held_by == "LAWA"
    mean = values(model.weights)
    keras_ema.EMASwap.restore_raw_weights(model)
    raw = values(model.weights)
    holder.swap_in("LAWA", average="lawa")
    with keras_ema.ema_weights(model, average=0):
        inside = dict(zip([v.path for v in model.weights], values(model.weights)))
    # The EMA's weights, and the raw model's statistics (the EMA does not
    # average them), not LAWA's.
    for variable, shadow in zip(
        optimizer.averager.averaged_variables, optimizer.averager.shadows
    ):
        assert_bit_equal([inside[variable.path]], [shadow.numpy()])
    for variable, value in zip(model.weights, raw):
        if not variable.trainable:
            assert_bit_equal([inside[variable.path]], [value])
    assert_bit_equal(values(model.weights), mean)  # the mean back, exactly
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_equal(values(model.weights), raw)
