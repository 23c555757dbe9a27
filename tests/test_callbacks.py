"""EMASwap, EMACheckpoint and ema_weights in real Keras loops.

Every number is checked against an independent reference: the EMA of
DESIGN.md computed in float64 numpy from the weights recorded after each
training step, put into a fresh clone of the model (`clone_model` +
`set_weights`) and judged by Keras's own `evaluate`/`predict`.
"""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    RecordFirstBatch,
    RecordWeights,
    assert_bit_equal,
    fit_quietly,
    learnable_data,
    make_model,
    max_error,
    values,
)

import keras_ema

DECAY = 0.9
BATCH = 8
N_TRAIN = 32
STEPS = N_TRAIN // BATCH  # steps per epoch
SOURCES = ("ema_optimizer", "keras_use_ema", "installed", "loss_scale")


# ---------------------------------------------------------------- helpers


def reference_average(initial, trajectory, decay=lambda s: DECAY, init="weights"):
    """The EMA of DESIGN.md in float64: shadow -= (1 - d) * (shadow - w)."""
    shadow = [np.asarray(w, np.float64) for w in initial]
    for t, weights in enumerate(trajectory, start=1):
        weights = [np.asarray(w, np.float64) for w in weights]
        if init == "first_step" and t == 1:
            shadow = weights
        else:
            d = decay(t)
            shadow = [a - (1.0 - d) * (a - w) for a, w in zip(shadow, weights)]
    return shadow


class RecordEpochEnd(keras.callbacks.Callback):
    """Records what the model holds, and the logs, at `on_epoch_end`."""

    def __init__(self):
        super().__init__()
        self.weights = []
        self.logs = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(values(self.model.trainable_variables))
        self.logs.append(dict(logs))


def raw_bytes(variables):
    return [v.numpy().tobytes() for v in variables]


def validation_data():
    return learnable_data(n=16, seed=2)


def clone_holding(model, weights):
    """A fresh clone of `model` holding `weights`, compiled to be judged."""
    clone = keras.models.clone_model(model)
    clone.compile(loss="mse", metrics=["mae"])
    clone.set_weights([np.asarray(w, np.float32) for w in weights])
    return clone


def evaluate_holding(clone, weights, x, y):
    """Keras's own metrics of `weights`, in a clone made by `clone_holding`."""
    clone.set_weights([np.asarray(w, np.float32) for w in weights])
    return clone.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)


def compile_with(model, source, learning_rate=0.05, momentum=0.0):
    """Compiles `model` with one of the average's sources.

    Returns the `EMASwap` keyword arguments the source needs and the
    reference's `init`.
    """
    sgd = keras.optimizers.SGD(learning_rate, momentum=momentum)
    swap_kwargs, init = {}, "weights"
    if source == "ema_optimizer":
        optimizer = keras_ema.EMAOptimizer(sgd, decay=DECAY)
    elif source == "keras_use_ema":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=momentum, use_ema=True, ema_momentum=DECAY
        )
        init = "first_step"  # Keras's first EMA update copies the weights
    elif source == "installed":
        optimizer = sgd
        swap_kwargs = {"decay": DECAY}
    elif source == "loss_scale":
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras_ema.EMAOptimizer(sgd, decay=DECAY)
        )
    else:
        raise AssertionError(source)
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    return swap_kwargs, init


def optimizer_average(model, source):
    """The average as the optimizer of `source` keeps it (after fit)."""
    optimizer = model.optimizer
    if source == "keras_use_ema":
        return values(optimizer._model_variables_moving_average)
    if source == "loss_scale":
        optimizer = optimizer.inner_optimizer
    assert isinstance(optimizer, keras_ema.EMAOptimizer)
    return [optimizer.average(v).numpy() for v in model.trainable_variables]


def fit(model, callbacks, epochs=2, validation=True, **kwargs):
    return fit_quietly(model, callbacks, epochs, validation, **kwargs)


@pytest.fixture
def restore_policy():
    previous = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(previous)


# ------------------------------------------- 1. exact swap, 1,000 calls


# About two units in the last place of each dtype, relative.
ULP = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}


def check_calls_leave_raw_weights_bit_exact(model, calls):
    """Trains `model`, then runs `calls` evaluate/predict calls with EMASwap:
    each sees the average, and the raw weights come back bit for bit."""
    w0 = values(model.trainable_variables)
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.2), decay=DECAY),
        loss="mse",
    )
    record = RecordWeights()
    fit(model, [record], epochs=2, validation=False)
    raw = values(model.trainable_variables)
    shadows = raw_bytes(model.optimizer.averager.shadows)
    dtypes = [w.dtype for w in raw]
    expected = [
        np.asarray(w, np.float32).astype(dtype)
        for w, dtype in zip(reference_average(w0, record.weights), dtypes)
    ]
    ulps = [ULP[str(dtype)] for dtype in dtypes]
    for want, have, ulp in zip(expected, raw, ulps):
        want, have = want.astype(np.float64), have.astype(np.float64)
        relative = np.abs(want - have) / np.maximum(np.abs(have), 1e-2)
        assert np.max(relative) > 5 * ulp  # the average is not the raw weights

    x, y = learnable_data(n=4)
    averaged_prediction = clone_holding(model, expected).predict(x[:1], verbose=0)
    # tf.data inputs keep a call at a few milliseconds (numpy inputs build a
    # new input pipeline at each call, ~60 ms).
    eval_data = tf.data.Dataset.from_tensors((x, y))
    predict_data = tf.data.Dataset.from_tensors(x[:1])
    swap = keras_ema.EMASwap()
    # Listed after EMASwap: sees the weights swapped in.
    seen = SeeJudgedWeights(record_calls=(0, 1, calls - 2, calls - 1))
    predictions = []
    for i in range(calls // 2):
        model.evaluate(eval_data, verbose=0, callbacks=[swap, seen])
        prediction = model.predict(predict_data, verbose=0, callbacks=[swap, seen])
        if i in (0, calls // 2 - 1):
            predictions.append(prediction)
    assert seen.calls == calls
    assert_bit_equal(values(model.trainable_variables), raw)
    assert raw_bytes(model.optimizer.averager.shadows) == shadows
    assert len(seen.weights) == 4
    for weights in seen.weights:
        assert [w.dtype for w in weights] == dtypes
        for got, want, ulp in zip(weights, expected, ulps):
            np.testing.assert_allclose(
                got.astype(np.float64), want.astype(np.float64), rtol=ulp, atol=1e-6
            )
    assert predictions[0].tobytes() == predictions[1].tobytes()
    np.testing.assert_allclose(
        predictions[0].astype(np.float64),
        averaged_prediction.astype(np.float64),
        atol=10 * max(ulps),
    )
    keras_ema.EMASwap.restore_raw_weights(model)  # nothing swapped: a no-op
    assert_bit_equal(values(model.trainable_variables), raw)


def test_thousand_calls_leave_raw_weights_bit_exact():
    """1,000 calls on float32, float16 and bfloat16 weights at once: one
    model with a layer of each dtype policy (a call costs ~6 ms of CPU, so
    one model keeps the 1,000 calls near 6 s rather than three times it)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="tanh", dtype="float32"),
            keras.layers.Dense(4, activation="tanh", dtype="float16"),
            keras.layers.Dense(1, dtype="bfloat16"),
        ]
    )
    dtypes = [v.dtype for v in model.trainable_variables]
    assert dtypes == ["float32"] * 2 + ["float16"] * 2 + ["bfloat16"] * 2
    check_calls_leave_raw_weights_bit_exact(model, calls=1000)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_global_dtype_policy_calls_leave_raw_weights_bit_exact(dtype, restore_policy):
    """The same with the policy set globally; 100 calls each (the 1,000-call
    run above already covers these dtypes)."""
    keras.config.set_dtype_policy(dtype)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    assert all(v.dtype == dtype for v in model.trainable_variables)
    check_calls_leave_raw_weights_bit_exact(model, calls=100)
    assert all(s.dtype == "float32" for s in model.optimizer.averager.shadows)


class SeeJudgedWeights(keras.callbacks.Callback):
    """Counts evaluate/predict calls; records the weights at some of them."""

    def __init__(self, record_calls):
        super().__init__()
        self.record_calls = record_calls
        self.calls = 0
        self.weights = []

    def _begin(self):
        if self.calls in self.record_calls:
            self.weights.append(values(self.model.trainable_variables))
        self.calls += 1

    def on_test_begin(self, logs=None):
        self._begin()

    def on_predict_begin(self, logs=None):
        self._begin()


# ----------------------- 2, 3, 4. validation metrics and the three sources


@pytest.mark.parametrize("source", SOURCES)
def test_validation_metrics_are_the_averaged_models(source):
    model = make_model()
    w0 = values(model.trainable_variables)
    swap_kwargs, init = compile_with(model, source)
    at_epoch_end = RecordEpochEnd()
    record = RecordWeights()
    epochs = 2
    history = fit(
        model,
        # Listed before EMASwap, which runs first all the same: this callback
        # sees its logs, and the average in the model.
        [at_epoch_end, record, keras_ema.EMASwap(evaluate="both", **swap_kwargs)],
        epochs=epochs,
    )
    assert len(record.weights) == epochs * STEPS
    xv, yv = validation_data()
    judge = clone_holding(model, w0)
    for epoch in range(epochs):
        steps_run = record.weights[: (epoch + 1) * STEPS]
        expected = reference_average(w0, steps_run, init=init)
        averaged = evaluate_holding(judge, expected, xv, yv)
        assert history.history["val_loss"][epoch] == pytest.approx(
            averaged["loss"], rel=1e-5
        )
        assert history.history["val_mae"][epoch] == pytest.approx(
            averaged["mae"], rel=1e-5
        )
        # At epoch end the model holds the average; `val_raw_*` are the
        # metrics of the raw weights, the last step's.
        assert max_error(at_epoch_end.weights[epoch], expected) < 1e-6
        assert {"val_raw_loss", "ema_decay"} <= set(at_epoch_end.logs[epoch])
        raw = evaluate_holding(judge, steps_run[-1], xv, yv)
        assert history.history["val_raw_loss"][epoch] == pytest.approx(
            raw["loss"], rel=1e-5
        )
        assert history.history["val_raw_mae"][epoch] == pytest.approx(
            raw["mae"], rel=1e-5
        )
        assert history.history["val_loss"][epoch] != pytest.approx(
            history.history["val_raw_loss"][epoch], rel=1e-4
        )
    # ema_decay in every epoch's logs: the constant decay.
    assert history.history["ema_decay"] == pytest.approx([DECAY] * epochs, rel=1e-6)

    expected = reference_average(w0, record.weights, init=init)
    assert max_error(optimizer_average(model, source), expected) < 1e-6
    # on_train_end="ema" (the default): the model holds the average...
    assert max_error(values(model.trainable_variables), expected) < 1e-6
    # ...and the raw weights are kept, bit for bit (for use_ema, Keras alone
    # would have overwritten them with its average).
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])
    if source == "installed":
        assert isinstance(model.optimizer, keras_ema.EMAOptimizer)
    if source == "loss_scale":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.optimizer.inner_optimizer, keras_ema.EMAOptimizer)


@pytest.mark.parametrize("source", SOURCES)
def test_on_train_end_raw_and_evaluate_after_fit(source):
    model = make_model()
    w0 = values(model.trainable_variables)
    swap_kwargs, init = compile_with(model, source)
    record = RecordWeights()
    fit(
        model,
        [record, keras_ema.EMASwap(on_train_end="raw", **swap_kwargs)],
        epochs=1,
        validation=False,
    )
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])
    expected = reference_average(w0, record.weights, init=init)
    assert max_error(optimizer_average(model, source), expected) < 1e-6

    xv, yv = validation_data()
    got = model.evaluate(
        xv,
        yv,
        batch_size=BATCH,
        verbose=0,
        return_dict=True,
        callbacks=[keras_ema.EMASwap()],
    )
    averaged = evaluate_holding(clone_holding(model, w0), expected, xv, yv)
    assert got["loss"] == pytest.approx(averaged["loss"], rel=1e-5)
    assert got["mae"] == pytest.approx(averaged["mae"], rel=1e-5)
    got = model.predict(xv, verbose=0, callbacks=[keras_ema.EMASwap()])
    np.testing.assert_allclose(
        got, clone_holding(model, expected).predict(xv, verbose=0), atol=1e-6
    )
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])


class RecordShadows(keras.callbacks.Callback):
    """Records the installed EMAOptimizer's shadows at on_train_batch_end."""

    def __init__(self):
        super().__init__()
        self.shadows = []

    def on_train_batch_end(self, batch, logs=None):
        averager = self.model.optimizer.averager
        self.shadows.append(values(averager.shadows))


def test_installed_average_updates_inside_the_train_step():
    model = make_model()
    w0 = values(model.trainable_variables)
    plain = keras.optimizers.SGD(0.05)
    model.compile(optimizer=plain, loss="mse")
    record, shadows = RecordWeights(), RecordShadows()
    # Both recorders run before EMASwap's batch hooks: the shadows they see
    # were moved by the compiled train step itself.
    fit(model, [record, shadows, keras_ema.EMASwap(decay=DECAY)], epochs=1)
    assert isinstance(model.optimizer, keras_ema.EMAOptimizer)
    assert model.optimizer.inner_optimizer is plain
    for step in range(1, STEPS + 1):
        expected = reference_average(w0, record.weights[:step])
        assert max_error(shadows.shadows[step - 1], expected) < 1e-6


def seeded_layers():
    """Layers whose initial weights do not depend on when they are built."""
    return [
        keras.layers.Dense(
            8,
            activation="tanh",
            kernel_initializer=keras.initializers.GlorotUniform(seed=11),
            bias_initializer=keras.initializers.RandomNormal(seed=12),
        ),
        keras.layers.Dense(
            1,
            kernel_initializer=keras.initializers.GlorotUniform(seed=13),
            bias_initializer=keras.initializers.RandomNormal(seed=14),
        ),
    ]


@pytest.mark.parametrize("source", ["ema_optimizer", "keras_use_ema", "installed"])
def test_model_built_by_fit(source):
    """A model without an Input is built by fit's first step, after
    on_train_begin. EMASwap must still work, and the average starts from the
    initial weights as for any model (Keras's use_ema copies the weights at
    its first step, as always)."""
    twin = keras.Sequential([keras.Input((6,)), *seeded_layers()])
    w0 = values(twin.trainable_variables)
    model = keras.Sequential(seeded_layers())
    assert not model.built
    swap_kwargs, init = compile_with(model, source)
    record = RecordWeights()
    history = fit(model, [record, keras_ema.EMASwap(**swap_kwargs)], epochs=2)
    xv, yv = validation_data()
    judge = clone_holding(twin, w0)
    for epoch in range(2):
        expected = reference_average(
            w0, record.weights[: (epoch + 1) * STEPS], init=init
        )
        averaged = evaluate_holding(judge, expected, xv, yv)
        assert history.history["val_loss"][epoch] == pytest.approx(
            averaged["loss"], rel=1e-5
        )
    assert max_error(values(model.trainable_variables), expected) < 1e-6


def test_ema_decay_log_follows_power_function_schedule():
    gamma = 6.94
    schedule = keras_ema.schedules.PowerFunction(gamma=gamma)
    model = make_model()
    w0 = values(model.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    record = RecordWeights()
    epochs = 3
    history = fit(model, [record, keras_ema.EMASwap(decay=schedule)], epochs=epochs)
    expected_decays = [
        (1.0 - 1.0 / t) ** (gamma + 1) for t in range(STEPS, STEPS * epochs + 1, STEPS)
    ]
    assert history.history["ema_decay"] == pytest.approx(expected_decays, rel=1e-6)
    expected = reference_average(
        w0, record.weights, decay=lambda t: (1.0 - 1.0 / t) ** (gamma + 1)
    )
    assert max_error(optimizer_average(model, "installed"), expected) < 1e-6


# ---------------------------------------- 5. on_train_end and resuming


def test_resumed_fit_equals_uninterrupted_fit():
    def run(epoch_splits):
        model = make_model(seed=4)
        model.compile(
            optimizer=keras_ema.EMAOptimizer(
                keras.optimizers.SGD(0.05, momentum=0.5), decay=DECAY
            ),
            loss="mse",
        )
        for epochs in epoch_splits:
            fit(model, [keras_ema.EMASwap()], epochs=epochs)
        held = values(model.trainable_variables)
        keras_ema.EMASwap.restore_raw_weights(model)
        optimizer = model.optimizer
        return (
            held,
            values(model.trainable_variables),
            values(optimizer.averager.shadows),
            values(optimizer.inner_optimizer.variables),
        )

    uninterrupted = run([2])
    resumed = run([1, 1])
    for a, b in zip(uninterrupted, resumed):
        assert_bit_equal(a, b)
    held, raw, shadows, _ = uninterrupted
    assert_bit_equal(held, shadows)  # float32 weights: the average itself
    assert max_error(raw, shadows) > 1e-3


def test_training_a_model_holding_its_average_resumes_from_raw():
    model = make_model()
    w0 = values(model.trainable_variables)
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05), decay=DECAY),
        loss="mse",
    )
    record = RecordWeights()
    fit(model, [record, keras_ema.EMASwap()], epochs=1)
    expected = reference_average(w0, record.weights)
    held = values(model.trainable_variables)
    assert max_error(held, expected) < 1e-6

    # Inside ema_weights, training is refused and nothing moves.
    x, y = learnable_data()
    with keras_ema.ema_weights(model):
        with pytest.raises(RuntimeError, match="ema_weights"):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        with pytest.raises(RuntimeError, match="ema_weights"):
            model.train_on_batch(x[:BATCH], y[:BATCH])
    assert_bit_equal(values(model.trainable_variables), held)
    assert int(model.optimizer.iterations.numpy()) == STEPS

    # A plain fit starts from the raw weights, the average continuing.
    first = RecordFirstBatch()
    fit(model, [first, record], epochs=1)
    assert_bit_equal(first.weights, record.weights[STEPS - 1])
    assert len(record.weights) == 2 * STEPS
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])
    expected = reference_average(w0, record.weights)
    assert max_error(optimizer_average(model, "ema_optimizer"), expected) < 1e-6

    # So does train_on_batch on a model left holding its average: it moves
    # the raw weights as a twin without keras_ema moves them.
    fit(model, [record, keras_ema.EMASwap()], epochs=1)
    twin = keras.models.clone_model(model)
    twin.set_weights(record.weights[-1])
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.train_on_batch(x[:BATCH], y[:BATCH])
    twin.train_on_batch(x[:BATCH], y[:BATCH])
    assert max_error(values(model.trainable_variables), values(twin.weights)) < 1e-6
    assert max_error(values(model.trainable_variables), record.weights[-1]) > 1e-4


@pytest.mark.parametrize("source", ["ema_optimizer", "keras_use_ema", "installed"])
@pytest.mark.parametrize("with_emaswap", [False, True])
def test_recompiled_model_holding_its_average_resumes_from_raw(source, with_emaswap):
    """Recompiling (e.g. to lower the learning rate) while the model holds its
    average, then training: training starts from the raw weights."""
    model = make_model()
    swap_kwargs, _ = compile_with(model, source)
    record = RecordWeights()
    fit(model, [record, keras_ema.EMASwap(**swap_kwargs)], epochs=1)
    assert max_error(values(model.trainable_variables), record.weights[-1]) > 1e-4
    model.compile(optimizer=model.optimizer, loss="mse")
    first = RecordFirstBatch()
    callbacks = [first] + ([keras_ema.EMASwap()] if with_emaswap else [])
    fit(model, callbacks, epochs=1)
    assert_bit_equal(first.weights, record.weights[-1])


# ------------------------------------------------------ 6. early stopping


def test_early_stopping_keeps_the_average_and_the_raw_weights():
    model = make_model()
    w0 = values(model.trainable_variables)
    compile_with(model, "ema_optimizer")
    record = RecordWeights()
    # "max" on a falling loss: no improvement at epoch 2, stop there.
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=0)
    history = fit(model, [record, keras_ema.EMASwap(), stop], epochs=10)
    assert history.epoch == [0, 1]
    assert history.history["val_loss"][1] < history.history["val_loss"][0]
    assert len(record.weights) == 2 * STEPS
    expected = reference_average(w0, record.weights)
    assert max_error(optimizer_average(model, "ema_optimizer"), expected) < 1e-6
    assert max_error(values(model.trainable_variables), expected) < 1e-6

    first = RecordFirstBatch()
    fit(model, [first, keras_ema.EMASwap()], epochs=1)
    assert_bit_equal(first.weights, record.weights[-1])


def test_early_stopping_restore_best_weights_with_swap_on_epoch():
    model = make_model()
    w0 = values(model.trainable_variables)
    compile_with(model, "ema_optimizer")
    record = RecordWeights()
    # "max" on a falling loss: epoch 1 is the best; patience 1 stops at 2...
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", mode="max", patience=1, restore_best_weights=True
    )
    history = fit(
        model,
        [record, keras_ema.EMASwap(swap_on_epoch=True), stop],
        epochs=10,
    )
    assert history.epoch == [0, 1]
    assert stop.best_epoch == 0
    # ...and the model holds the average at the end of epoch 1.
    best = reference_average(w0, record.weights[:STEPS])
    assert max_error(values(model.trainable_variables), best) < 1e-6
    # The shadows are intact: the average over both epochs.
    expected = reference_average(w0, record.weights)
    assert max_error(optimizer_average(model, "ema_optimizer"), expected) < 1e-6
    assert max_error(best, expected) > 1e-4
    # The raw weights are back for the next fit.
    first = RecordFirstBatch()
    fit(model, [first, keras_ema.EMASwap()], epochs=1)
    assert_bit_equal(first.weights, record.weights[-1])


@pytest.mark.parametrize("swap", ["keras", "keras_ema"])
def test_early_stopping_contrast_with_keras_swap_ema_weights(swap):
    """Keras's SwapEMAWeights(swap_on_epoch=True) recovers its average only
    at the last scheduled epoch: stopped early, fit's finalize copies the
    swapped-out raw weights over the model, and the average is gone.
    EMASwap on the same optimizer keeps it."""
    model = make_model()
    w0 = values(model.trainable_variables)
    compile_with(model, "keras_use_ema")
    record = RecordWeights()
    if swap == "keras":
        callback = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
    else:
        callback = keras_ema.EMASwap(swap_on_epoch=True)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=0)
    history = fit(model, [record, callback, stop], epochs=10)
    assert history.epoch == [0, 1]
    expected = reference_average(w0, record.weights, init="first_step")
    keras_average = values(model.optimizer._model_variables_moving_average)
    if swap == "keras":
        assert max_error(keras_average, record.weights[-1]) < 1e-5
        assert max_error(keras_average, expected) > 1e-3
    else:
        assert max_error(keras_average, expected) < 1e-6
        keras_ema.EMASwap.restore_raw_weights(model)
        assert_bit_equal(values(model.trainable_variables), record.weights[-1])


# ------------------------------------------------------- 7. swap_on_epoch


class SeeBatchesAndEpochEnds(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batch_begin = []
        self.epoch_end = []

    def on_train_batch_begin(self, batch, logs=None):
        self.batch_begin.append(values(self.model.trainable_variables))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_end.append(values(self.model.trainable_variables))


def test_swap_on_epoch_callbacks_after_see_average_batches_see_raw():
    model = make_model()
    w0 = values(model.trainable_variables)
    compile_with(model, "ema_optimizer")
    record = RecordWeights()
    before = SeeBatchesAndEpochEnds()
    after = SeeBatchesAndEpochEnds()
    epochs = 3
    history = fit(
        model,
        [
            before,
            record,
            keras_ema.EMASwap(swap_on_epoch=True, evaluate="both"),
            after,
        ],
        epochs=epochs,
    )
    raw_trajectory = [w0] + record.weights[:-1]
    for seen in (before, after):
        assert len(seen.batch_begin) == epochs * STEPS
        for got, raw in zip(seen.batch_begin, raw_trajectory):
            assert_bit_equal(got, raw)
    xv, yv = validation_data()
    judge = clone_holding(model, w0)
    for epoch in range(epochs):
        steps_run = record.weights[: (epoch + 1) * STEPS]
        expected = reference_average(w0, steps_run)
        assert max_error(after.epoch_end[epoch], expected) < 1e-6
        assert max_error(after.epoch_end[epoch], steps_run[-1]) > 1e-4
        # Holding the average through on_epoch_end changes no number.
        averaged = evaluate_holding(judge, expected, xv, yv)
        raw = evaluate_holding(judge, steps_run[-1], xv, yv)
        assert history.history["val_loss"][epoch] == pytest.approx(
            averaged["loss"], rel=1e-5
        )
        assert history.history["val_raw_loss"][epoch] == pytest.approx(
            raw["loss"], rel=1e-5
        )
    # The end of fit keeps the average in, the raw weights aside.
    assert max_error(values(model.trainable_variables), expected) < 1e-6
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])


# --------------------------------------------------------- 8. ema_weights


def trained_model(source, epochs=2):
    """A model trained by `source`, holding its raw weights, with the
    numpy reference of its average."""
    model = make_model()
    w0 = values(model.trainable_variables)
    swap_kwargs, init = compile_with(model, source)
    record = RecordWeights()
    fit(
        model,
        [record, keras_ema.EMASwap(on_train_end="raw", **swap_kwargs)],
        epochs=epochs,
        validation=False,
    )
    expected = reference_average(w0, record.weights, init=init)
    return model, record.weights[-1], expected


@pytest.mark.parametrize("source", ["ema_optimizer", "keras_use_ema", "installed"])
def test_ema_weights_evaluate_predict_save(source, tmp_path):
    model, raw, expected = trained_model(source)
    xv, yv = validation_data()
    reference = clone_holding(model, expected)
    averaged_prediction = reference.predict(xv, verbose=0)
    averaged_metrics = reference.evaluate(
        xv, yv, batch_size=BATCH, verbose=0, return_dict=True
    )
    raw_prediction = model.predict(xv, verbose=0)
    assert np.max(np.abs(raw_prediction - averaged_prediction)) > 1e-3

    path = str(tmp_path / "averaged.keras")
    with keras_ema.ema_weights(model) as held:
        assert held is model
        assert max_error(values(model.trainable_variables), expected) < 1e-6
        got = model.evaluate(xv, yv, batch_size=BATCH, verbose=0, return_dict=True)
        assert got["loss"] == pytest.approx(averaged_metrics["loss"], rel=1e-5)
        assert got["mae"] == pytest.approx(averaged_metrics["mae"], rel=1e-5)
        np.testing.assert_allclose(
            model.predict(xv, verbose=0), averaged_prediction, atol=1e-6
        )
        # EMASwap inside the block leaves the average in place.
        np.testing.assert_allclose(
            model.predict(xv, verbose=0, callbacks=[keras_ema.EMASwap()]),
            averaged_prediction,
            atol=1e-6,
        )
        model.save(path)
        with pytest.raises(RuntimeError, match="averaged"):
            model.fit(xv, yv, epochs=1, verbose=0)
    assert_bit_equal(values(model.trainable_variables), raw)

    loaded = keras.models.load_model(path)
    loaded_prediction = loaded.predict(xv, verbose=0)
    np.testing.assert_allclose(loaded_prediction, averaged_prediction, atol=1e-6)
    assert np.max(np.abs(loaded_prediction - raw_prediction)) > 1e-3

    # Training after the block trains the raw weights.
    record = RecordFirstBatch()
    model.fit(xv, yv, epochs=1, verbose=0, callbacks=[record])
    assert_bit_equal(record.weights, raw)


def test_ema_weights_export_saved_model(tmp_path):
    model, raw, expected = trained_model("ema_optimizer", epochs=1)
    xv, _ = validation_data()
    averaged_prediction = clone_holding(model, expected).predict(xv, verbose=0)
    path = str(tmp_path / "export")
    with keras_ema.ema_weights(model):
        model.export(path, verbose=False)
    assert_bit_equal(values(model.trainable_variables), raw)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(
        served.serve(tf.constant(xv)).numpy(), averaged_prediction, atol=1e-6
    )


def test_ema_weights_exception_nesting_and_bad_models():
    model, raw, expected = trained_model("ema_optimizer", epochs=1)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with keras_ema.ema_weights(model):
            assert max_error(values(model.trainable_variables), expected) < 1e-6
            raise Boom()
    assert_bit_equal(values(model.trainable_variables), raw)

    with keras_ema.ema_weights(model):
        with pytest.raises(ValueError, match="already active"):
            with keras_ema.ema_weights(model):
                pass
        # The failed nested call changed nothing: still the average.
        assert max_error(values(model.trainable_variables), expected) < 1e-6
    assert_bit_equal(values(model.trainable_variables), raw)
    # Usable again after the nesting error.
    with keras_ema.ema_weights(model):
        pass
    assert_bit_equal(values(model.trainable_variables), raw)

    plain = make_model()
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    fit(plain, [], epochs=1, validation=False)
    plain_weights = values(plain.trainable_variables)
    with pytest.raises(ValueError, match="no moving average"):
        with keras_ema.ema_weights(plain):
            pass
    assert_bit_equal(values(plain.trainable_variables), plain_weights)
    uncompiled = make_model()
    with pytest.raises(ValueError, match="no moving average"):
        with keras_ema.ema_weights(uncompiled):
            pass
    for not_a_model in (None, "model", model.layers[0]):
        with pytest.raises(TypeError, match="keras.Model"):
            with keras_ema.ema_weights(not_a_model):
                pass


def test_ema_weights_on_a_model_left_holding_its_average():
    model = make_model()
    compile_with(model, "ema_optimizer")
    record = RecordWeights()
    fit(model, [record, keras_ema.EMASwap()], epochs=1, validation=False)
    held = values(model.trainable_variables)
    with keras_ema.ema_weights(model):
        assert_bit_equal(values(model.trainable_variables), held)
    # It keeps holding the average, with the raw weights still kept aside.
    assert_bit_equal(values(model.trainable_variables), held)
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])


# ------------------------------------------------------- 9. EMACheckpoint


def test_checkpoint_best_files_hold_the_average(tmp_path):
    xv, yv = validation_data()
    model = make_model()
    w0 = values(model.trainable_variables)
    compile_with(model, "ema_optimizer")
    record = RecordWeights()
    checkpoint = keras_ema.EMACheckpoint(
        str(tmp_path / "ema-{epoch:02d}.keras"), monitor="val_loss", save_best_only=True
    )
    epochs = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no EMASwap" warning
        history = fit(
            model,
            [record, keras_ema.EMASwap(on_train_end="raw"), checkpoint],
            epochs=epochs,
        )
    losses = history.history["val_loss"]
    improved = [e for e in range(epochs) if losses[e] < min(losses[:e], default=np.inf)]
    files = sorted(os.listdir(tmp_path))
    assert files == [f"ema-{e + 1:02d}.keras" for e in improved]
    best = int(np.argmin(losses))
    assert files[-1] == f"ema-{best + 1:02d}.keras"
    for epoch in improved:
        expected = reference_average(w0, record.weights[: (epoch + 1) * STEPS])
        loaded = keras.models.load_model(tmp_path / f"ema-{epoch + 1:02d}.keras")
        assert max_error(values(loaded.trainable_variables), expected) < 1e-6
        np.testing.assert_allclose(
            loaded.predict(xv, verbose=0),
            clone_holding(model, expected).predict(xv, verbose=0),
            atol=1e-6,
        )
        got = loaded.evaluate(xv, yv, batch_size=BATCH, verbose=0, return_dict=True)
        assert got["loss"] == pytest.approx(losses[epoch], rel=1e-5)

    # The in-memory raw weights were untouched: the same run without the
    # checkpoint ends bit for bit where this one did.
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])
    plain = make_model()
    compile_with(plain, "ema_optimizer")
    fit(plain, [keras_ema.EMASwap(on_train_end="raw")], epochs=epochs)
    assert_bit_equal(values(plain.trainable_variables), record.weights[-1])
    assert_bit_equal(
        values(plain.optimizer.averager.shadows),
        values(model.optimizer.averager.shadows),
    )


def test_checkpoint_weights_only(tmp_path):
    model = make_model()
    w0 = values(model.trainable_variables)
    compile_with(model, "ema_optimizer")
    record = RecordWeights()
    checkpoint = keras_ema.EMACheckpoint(
        str(tmp_path / "ema-{epoch:02d}.weights.h5"), save_weights_only=True
    )
    fit(model, [record, keras_ema.EMASwap(on_train_end="raw"), checkpoint], epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["ema-01.weights.h5", "ema-02.weights.h5"]
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])
    for epoch in (1, 2):
        fresh = make_model(seed=7)
        fresh.load_weights(tmp_path / f"ema-{epoch:02d}.weights.h5")
        expected = reference_average(w0, record.weights[: epoch * STEPS])
        assert max_error(values(fresh.trainable_variables), expected) < 1e-6


def test_checkpoint_integer_save_freq(tmp_path):
    model = make_model()
    w0 = values(model.trainable_variables)
    compile_with(model, "installed")
    record = RecordWeights()
    checkpoint = keras_ema.EMACheckpoint(
        str(tmp_path / "ema-{epoch:02d}-{batch:02d}.keras"), save_freq=2
    )
    fit(
        model,
        [record, keras_ema.EMASwap(decay=DECAY, on_train_end="raw"), checkpoint],
        epochs=2,
        validation=False,
    )
    expected_files = [
        f"ema-{e:02d}-{b:02d}.keras" for e in (1, 2) for b in range(2, STEPS + 1, 2)
    ]
    assert sorted(os.listdir(tmp_path)) == expected_files
    for name in expected_files:
        epoch, batch = int(name[4:6]), int(name[7:9])
        step = (epoch - 1) * STEPS + batch
        expected = reference_average(w0, record.weights[:step])
        loaded = keras.models.load_model(tmp_path / name)
        assert max_error(values(loaded.trainable_variables), expected) < 1e-6
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])


def test_checkpoint_warns_without_ema_swap(tmp_path):
    model = make_model()
    compile_with(model, "ema_optimizer")
    checkpoint = keras_ema.EMACheckpoint(
        str(tmp_path / "ema.keras"), monitor="val_loss", save_best_only=True
    )
    with pytest.warns(UserWarning, match="EMASwap"):
        fit(model, [checkpoint], epochs=1)
    assert os.listdir(tmp_path) == ["ema.keras"]


@pytest.mark.parametrize("source", ["ema_optimizer", "keras_use_ema"])
def test_checkpoint_file_resumes_from_the_raw_weights(source, tmp_path):
    """EMACheckpoint's docstring: the .keras file "also keeps the raw weights
    and the optimizer state, so training can resume from it (pass EMASwap()
    to that fit)". The resumed fit must start from the raw weights. With
    Keras's use_ema as the source the file holds the averaged weights only
    (documented: Keras's optimizer state has no copy of the raw ones)."""
    model = make_model()
    swap_kwargs, _ = compile_with(model, source)
    record = RecordWeights()
    path = str(tmp_path / "ema.keras")
    fit(
        model,
        [record, keras_ema.EMASwap(**swap_kwargs), keras_ema.EMACheckpoint(path)],
        epochs=2,
        validation=False,
    )
    keras_ema.EMASwap.restore_raw_weights(model)
    raw = record.weights[-1]
    with keras_ema.ema_weights(model):
        averaged_prediction = model.predict(validation_data()[0], verbose=0)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(validation_data()[0], verbose=0),
        averaged_prediction,
        atol=1e-6,
    )
    first = RecordFirstBatch()
    fit(loaded, [first, keras_ema.EMASwap()], epochs=1)
    if source == "keras_use_ema":
        assert max_error(first.weights, raw) > 1e-4
        return
    assert max_error(first.weights, raw) == 0, "resumed from the averaged weights"
    assert_bit_equal(first.weights, raw)


# -------------------------------------------------------- 10. bad inputs


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"evaluate": "x"}, ValueError, "evaluate"),
        ({"on_train_end": "x"}, ValueError, "on_train_end"),
        ({"swap_on_epoch": "yes"}, TypeError, "swap_on_epoch"),
        ({"decay": 2.0}, ValueError, "decay"),
        ({"decay": "a"}, TypeError, "decay"),
        ({"update_every": 3}, ValueError, "update_every"),
        ({"start_step": 3}, ValueError, "start_step"),
        ({"update_every": 0, "decay": 0.9}, ValueError, "update_every"),
    ],
)
def test_ema_swap_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_ema.EMASwap(**kwargs)


def test_ema_swap_without_an_average():
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    w0 = values(model.trainable_variables)
    with pytest.raises(ValueError, match="decay"):
        fit(model, [keras_ema.EMASwap()], epochs=1)
    assert_bit_equal(values(model.trainable_variables), w0)
    xv, yv = validation_data()
    with pytest.raises(ValueError, match="no moving average"):
        model.evaluate(xv, yv, verbose=0, callbacks=[keras_ema.EMASwap()])
    with pytest.raises(ValueError, match="no moving average"):
        model.predict(xv, verbose=0, callbacks=[keras_ema.EMASwap()])
    assert_bit_equal(values(model.trainable_variables), w0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filepath": "ema.txt"},
        {"filepath": "ema.keras", "save_weights_only": True},
        {"filepath": "ema.keras", "save_freq": "batch"},
    ],
)
def test_ema_checkpoint_bad_inputs(kwargs, tmp_path):
    kwargs["filepath"] = str(tmp_path / kwargs["filepath"])
    with pytest.raises(ValueError):
        keras_ema.EMACheckpoint(**kwargs)
