"""The average users can trust: BatchNorm statistics recomputed for it, the
initial weights' share of it, and constrained weights.

References are float64 numpy written from the formulas: the recomputed
statistics are the means over batches of the per-batch mean and (biased)
variance of each BatchNorm layer's input, the model holding the averaged
weights with every BatchNorm layer in training mode
(`keras_ema.recompute_batchnorm`'s docstring).
"""

import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import RecordWeights, assert_bit_equal, reference_average, values

import keras_ema
from keras_ema.advice import initial_share
from keras_ema.batchnorm import DEFAULT_BATCH_SIZE

DECAY = 0.8
BATCH = 8
EPS = 1e-3  # BatchNormalization's default epsilon
STATS_TOLERANCE = 2e-5  # float32 sums over a few batches, against float64
# Arrays are cut into batches of this size (the documented default).
ARRAY_BATCH = DEFAULT_BATCH_SIZE


def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="d1"),
            keras.layers.BatchNormalization(momentum=0.9, name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Dense(4, name="d2"),
            keras.layers.BatchNormalization(momentum=0.9, name="bn2"),
            keras.layers.Dense(1, name="out"),
        ],
        name="bn_net",
    )


def data(n=48, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, (np.sin(x[:, :1]) * 2 + x[:, 1:2] + 0.5).astype("float32")


def compiled(seed=0, **optimizer_kwargs):
    model = bn_model(seed)
    model.compile(
        optimizer=keras_ema.EMAOptimizer(
            keras.optimizers.Adam(2e-2), decay=DECAY, **optimizer_kwargs
        ),
        loss="mse",
    )
    return model


def trained(epochs=2, **optimizer_kwargs):
    model = compiled(**optimizer_kwargs)
    model.fit(*data(), batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False)
    return model


def layer_weights(model, source):
    """{layer name: [arrays]} from `source`, arrays aligned with model.weights."""
    arrays = dict(zip([id(v) for v in model.weights], source))
    return {
        layer.name: [arrays[id(v)] for v in layer.weights]
        for layer in model.layers
        if layer.weights
    }


def numpy_forward(w, x, statistics=None):
    """The model in float64. `statistics=None`: BatchNorm in training mode,
    returning `(output, [(mean, var) per BN layer])`; else inference with
    `statistics` = {"bn1": (mean, var), "bn2": (mean, var)}."""
    seen = []

    def bn(name, a):
        gamma, beta, moving_mean, moving_var = w[name]
        if statistics is None:
            mean, var = a.mean(0), a.var(0)
            seen.append((mean, var))
        else:
            mean, var = statistics[name]
        return (a - mean) / np.sqrt(var + EPS) * gamma + beta

    x = np.asarray(x, np.float64)
    h = np.maximum(bn("bn1", x @ w["d1"][0] + w["d1"][1]), 0.0)
    a = bn("bn2", h @ w["d2"][0] + w["d2"][1])
    out = a @ w["out"][0] + w["out"][1]
    return out, seen


def recomputed_statistics(w, x, batch_size, steps):
    """Means over the first `steps` batches of each layer's batch statistics."""
    per_batch = [
        numpy_forward(w, x[i : i + batch_size])[1] for i in range(0, len(x), batch_size)
    ][:steps]
    return {
        name: tuple(np.mean([b[k][j] for b in per_batch], 0) for j in range(2))
        for k, name in enumerate(("bn1", "bn2"))
    }


def averaged_weights(model):
    """model.weights with the trainable ones replaced by their averages."""
    optimizer = model.optimizer
    return [
        optimizer.average(v).numpy() if v.trainable else v.numpy()
        for v in model.weights
    ]


def held_statistics(model):
    return {
        name: (
            model.get_layer(name).moving_mean.numpy(),
            model.get_layer(name).moving_variance.numpy(),
        )
        for name in ("bn1", "bn2")
    }


def assert_statistics_close(actual, expected):
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            np.testing.assert_allclose(a, e, rtol=STATS_TOLERANCE, atol=1e-6)


# ------------------------------------------------- recomputed statistics


@pytest.mark.parametrize(
    "form", ["array", "x_y", "x_y_w", "dataset_x_y", "dataset_x", "generator"]
)
def test_ema_weights_recomputes_statistics_for_the_average(form):
    model = trained()
    x, y = data(n=160, seed=3)  # batches of 64, 64 and 32
    batch_data = {
        "array": x,
        "x_y": (x, y),
        "x_y_w": (x, y, np.ones(len(x), "float32")),
        "dataset_x_y": tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
        "dataset_x": tf.data.Dataset.from_tensor_slices(x).batch(16),
        "generator": [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)],
    }[form]
    batch_size = ARRAY_BATCH if form in ("array", "x_y", "x_y_w") else 16
    steps = 2
    average = layer_weights(model, averaged_weights(model))
    expected = recomputed_statistics(average, x, batch_size, steps)
    before = values(model.weights)
    with keras_ema.ema_weights(model, batchnorm_data=batch_data, batchnorm_steps=steps):
        assert_statistics_close(held_statistics(model), expected)
        predicted = model.predict(x, verbose=0)
    reference, _ = numpy_forward(average, x, expected)
    np.testing.assert_allclose(predicted, reference, rtol=1e-4, atol=1e-5)
    # The raw model's weights and statistics are back, bit for bit.
    assert_bit_equal(values(model.weights), before, "after ema_weights")


def test_recompute_batchnorm_inside_ema_weights_leaves_with_the_average():
    model = trained()
    x, y = data(seed=3)
    before = values(model.weights)
    with keras_ema.ema_weights(model):
        count = keras_ema.recompute_batchnorm(model, (x, y), batch_size=16)
        assert count == 3
        expected = recomputed_statistics(
            layer_weights(model, averaged_weights(model)), x, 16, 3
        )
        assert_statistics_close(held_statistics(model), expected)
    assert_bit_equal(values(model.weights), before, "after the block")


def test_recompute_batchnorm_on_the_raw_model_keeps_its_result():
    model = trained()
    x, _ = data(seed=3)
    keras_ema.recompute_batchnorm(model, x, steps=2, batch_size=16)
    raw = layer_weights(model, values(model.weights))
    assert_statistics_close(
        held_statistics(model), recomputed_statistics(raw, x, 16, 2)
    )


def test_emaswap_validates_the_average_with_recomputed_statistics():
    model = compiled()
    x, y = data()
    x_val, y_val = data(n=16, seed=2)
    bn_x, bn_y = data(n=160, seed=3)
    record = RecordWeights()

    class RecordAll(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.weights = values(self.model.weights)

    everything = RecordAll()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        shuffle=False,
        validation_data=(x_val, y_val),
        callbacks=[
            record,
            everything,
            keras_ema.EMASwap(
                evaluate="both",
                on_train_end="raw",
                batchnorm_data=(bn_x, bn_y),
                batchnorm_steps=3,
            ),
        ],
    )
    raw_final = layer_weights(model, everything.weights)
    # The average itself is checked against the recorded trajectory
    # elsewhere; here, what validation did with it.
    average = layer_weights(model, averaged_weights(model))
    statistics = recomputed_statistics(average, bn_x, ARRAY_BATCH, 3)
    expected_val = float(
        np.mean((numpy_forward(average, x_val, statistics)[0] - y_val) ** 2)
    )
    assert history.history["val_loss"][-1] == pytest.approx(expected_val, rel=1e-4)
    raw_statistics = {
        name: (raw_final[name][2], raw_final[name][3]) for name in ("bn1", "bn2")
    }
    expected_raw = float(
        np.mean((numpy_forward(raw_final, x_val, raw_statistics)[0] - y_val) ** 2)
    )
    assert history.history["val_raw_loss"][-1] == pytest.approx(expected_raw, rel=1e-4)
    # The raw model, its statistics included, is what the last step left.
    assert_bit_equal(values(model.weights), everything.weights, "after fit")
    assert len(record.weights) == 12


def test_evaluate_with_emaswap_recomputes_then_restores():
    model = trained()
    x, y = data(n=160, seed=3)
    before = values(model.weights)
    average = layer_weights(model, averaged_weights(model))
    statistics = recomputed_statistics(average, x, ARRAY_BATCH, 2)
    loss = model.evaluate(
        x,
        y,
        batch_size=16,
        verbose=0,
        callbacks=[keras_ema.EMASwap(batchnorm_data=x, batchnorm_steps=2)],
    )
    expected = float(np.mean((numpy_forward(average, x, statistics)[0] - y) ** 2))
    assert loss == pytest.approx(expected, rel=1e-4)
    assert_bit_equal(values(model.weights), before, "after evaluate")


def test_export_and_checkpoint_carry_statistics_of_the_average(tmp_path):
    model = compiled()
    x, y = data()
    bn_x, _ = data(n=160, seed=3)
    path = str(tmp_path / "ema.keras")
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[
            keras_ema.EMACheckpoint(
                path, monitor="loss", batchnorm_data=bn_x, batchnorm_steps=2
            ),
        ],
    )
    average = layer_weights(model, averaged_weights(model))
    statistics = recomputed_statistics(average, bn_x, ARRAY_BATCH, 2)
    saved = keras.models.load_model(path)
    assert_statistics_close(held_statistics(saved), statistics)
    before = values(model.weights)
    keras_ema.export_saved_model(
        model, tmp_path / "export", batchnorm_data=bn_x, batchnorm_steps=2
    )
    assert_bit_equal(values(model.weights), before, "after export")
    served = tf.saved_model.load(str(tmp_path / "export"))
    reference, _ = numpy_forward(average, x, statistics)
    np.testing.assert_allclose(served.serve(x).numpy(), reference, rtol=1e-4, atol=1e-5)
    info = json.loads(served.ema_info().numpy())
    assert info["batchnorm_statistics"] == "recomputed"


@pytest.mark.parametrize(
    "call",
    ["recompute_batchnorm", "ema_weights", "EMASwap", "EMACheckpoint", "export"],
)
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"data": "images"}, TypeError, "data"),
        ({"data": ("a", "b")}, TypeError, "data"),
        ({"data": 3}, TypeError, "data"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 1.5}, ValueError, "steps"),
        ({"steps": True}, ValueError, "steps"),
        ({"data": None, "steps": 0}, ValueError, "steps"),
    ],
)
def test_bad_batchnorm_arguments(call, kwargs, error, match, tmp_path):
    model = trained(epochs=1)
    before = values(model.weights)
    x, _ = data()
    batch_data = kwargs.get("data", x)
    steps = kwargs.get("steps", 2)
    with pytest.raises(error, match=match):
        if call == "recompute_batchnorm":
            keras_ema.recompute_batchnorm(model, batch_data, steps=steps)
        elif call == "ema_weights":
            with keras_ema.ema_weights(model, batch_data, steps):
                pass
        elif call == "EMASwap":
            keras_ema.EMASwap(batchnorm_data=batch_data, batchnorm_steps=steps)
        elif call == "EMACheckpoint":
            keras_ema.EMACheckpoint(
                str(tmp_path / "c.keras"),
                batchnorm_data=batch_data,
                batchnorm_steps=steps,
            )
        else:
            keras_ema.export_saved_model(
                model, tmp_path / "e", batchnorm_data=batch_data, batchnorm_steps=steps
            )
    assert_bit_equal(values(model.weights), before, "after the refused call")
    assert not os.path.exists(tmp_path / "e")


def test_batchnorm_data_with_raw_export_is_refused(tmp_path):
    model = trained(epochs=1)
    with pytest.raises(ValueError, match="batchnorm_data"):
        keras_ema.export_saved_model(
            model, tmp_path / "e", weights="raw", batchnorm_data=data()[0]
        )


def test_recompute_batchnorm_needs_batchnorm_and_data():
    plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="no BatchNormalization"):
        keras_ema.recompute_batchnorm(plain, data()[0])
    with pytest.raises(ValueError, match="no batch"):
        keras_ema.recompute_batchnorm(bn_model(), np.zeros((0, 6), "float32"))


# --------------------------------------------------- saying what is wrong


def fit_caught(model, **swap_kwargs):
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=3,
            verbose=0,
            validation_data=data(n=16, seed=2),
            callbacks=[keras_ema.EMASwap(**swap_kwargs)],
        )
    return [str(w.message) for w in caught]


def test_batchnorm_model_without_data_is_told_once_what_to_pass():
    messages = [m for m in fit_caught(compiled()) if "BatchNormalization" in m]
    assert len(messages) == 1
    assert "moving statistics of the raw weights" in messages[0]
    assert "batchnorm_data" in messages[0]
    averaged = fit_caught(compiled(non_trainable="average"))
    assert any("averaged moving statistics" in m for m in averaged)
    quiet = fit_caught(compiled(), batchnorm_data=data()[0], batchnorm_steps=2)
    assert not [m for m in quiet if "BatchNormalization" in m]


def test_initial_share_matches_a_numpy_average_of_a_step_signal():
    # The share of w_0 in the average is the average of the signal that is
    # 1 at step 0 and 0 after.
    cases = [
        (0.99, 1, 0, "weights"),
        (
            keras_ema.schedules.PowerWarmup(0.999, inv_gamma=1.0, power=0.75),
            3,
            0,
            "weights",
        ),
        (0.9, 4, 0, "weights"),
        (0.99, 1, 0, "first_step"),
        (0.99, 1, 5, "weights"),
        (keras_ema.schedules.Debiased(0.99), 1, 0, "weights"),
    ]
    for decay, every, start, init in cases:
        ema = keras_ema.ExponentialMovingAverage(
            decay, update_every=every, start_step=start, init=init
        )
        ema.build([keras.Variable(np.ones(1, "float32"))])
        ema.step.assign(41)
        schedule = keras_ema.schedules.get(decay)
        per_step = lambda s, f=schedule: float(f(s))  # noqa: E731
        expected = reference_average(
            [np.ones(1)], [[np.zeros(1)]] * 41, per_step, every, start, init
        )[0][0]
        assert initial_share(ema) == pytest.approx(expected, rel=1e-5, abs=1e-12), (
            decay,
            every,
            start,
            init,
        )


def test_an_average_mostly_of_the_initial_weights_is_called_out():
    def plain(decay, **kwargs):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
        model.compile(
            optimizer=keras_ema.EMAOptimizer(
                keras.optimizers.SGD(0.01), decay=decay, **kwargs
            ),
            loss="mse",
        )
        return model

    # 3 epochs of 6 steps at 0.99: 0.99**18 = 83% of the initial weights.
    messages = [m for m in fit_caught(plain(0.99)) if "started from" in m]
    assert len(messages) == 1
    assert f"{0.99**18:.0%}" in messages[0]
    assert "Debiased" in messages[0] and "first_step" in messages[0]
    for quiet in (
        plain(keras_ema.schedules.Debiased(0.99)),
        plain(0.99, init="first_step"),
        plain(0.5),
    ):
        assert not [m for m in fit_caught(quiet) if "started from" in m]


# ------------------------------------------------------------ constraints


@pytest.mark.parametrize("constraint", ["non_neg", "max_norm", "unit_norm"], ids=str)
def test_the_average_of_constrained_weights_satisfies_the_constraint(constraint):
    make = {
        "non_neg": keras.constraints.NonNeg,
        "max_norm": lambda: keras.constraints.MaxNorm(0.5),
        "unit_norm": keras.constraints.UnitNorm,
    }[constraint]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(
                4,
                name="constrained",
                kernel_constraint=make(),
                kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
            ),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05), decay=DECAY),
        loss="mse",
    )
    kernel = model.get_layer("constrained").kernel
    w0 = values(model.trainable_variables)
    record = RecordWeights()
    x, y = data()
    model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[record]
    )
    # The average starts from the constrained initial kernel, in numpy.
    k0 = w0[0].astype(np.float64)
    norms = np.sqrt((k0**2).sum(0, keepdims=True))
    k0 = {
        "non_neg": k0 * (k0 >= 0),
        "max_norm": k0 * np.clip(norms, 0, 0.5) / (1e-7 + norms),
        "unit_norm": k0 / (1e-7 + norms),
    }[constraint]
    expected = reference_average([k0, *w0[1:]], record.weights, DECAY)
    shadow = model.optimizer.average(kernel).numpy()
    np.testing.assert_allclose(shadow, expected[0], atol=1e-6)
    with keras_ema.ema_weights(model):
        served = kernel.numpy().astype(np.float64)
    column_norms = np.sqrt((served**2).sum(0))
    if constraint == "non_neg":
        assert served.min() >= 0.0
        np.testing.assert_array_equal(served, shadow)  # nothing to project
    elif constraint == "max_norm":
        assert column_norms.max() <= 0.5 + 1e-6
    else:
        np.testing.assert_allclose(column_norms, 1.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_file_saved_holding_recomputed_statistics_resumes_from_raw_ones(
    tmp_path, suffix
):
    model = compiled()
    x, y = data()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[keras_ema.EMASwap(batchnorm_data=x, batchnorm_steps=2)],
    )
    held = values(model.weights)  # the average, with recomputed statistics
    path = str(tmp_path / f"held{suffix}")
    if suffix == ".keras":
        model.save(path)
        loaded = keras.models.load_model(path)
    else:
        model.save_weights(path)
        loaded = compiled(seed=5)
        loaded.load_weights(path)
    assert_bit_equal(values(loaded.weights), held, "loaded")
    keras_ema.EMASwap.restore_raw_weights(model)
    raw = values(model.weights)
    # Training the loaded model starts from the raw weights and the raw
    # model's statistics, bit for bit: the first batch sees them.
    seen = {}

    class FirstBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.setdefault("weights", values(self.model.weights))

    loaded.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[FirstBatch()])
    assert_bit_equal(seen["weights"], raw, "the first step starts from")


def test_early_stopping_keeps_the_best_average_with_its_statistics():
    model = compiled()
    x, y = data()

    class RecordAll(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.weights = values(self.model.weights)

    last = RecordAll()
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=1, restore_best_weights=True, mode="max"
    )  # "max" of a falling loss: the first epoch is the best
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        verbose=0,
        shuffle=False,
        validation_data=data(n=16, seed=2),
        callbacks=[
            last,
            keras_ema.EMASwap(batchnorm_data=x, batchnorm_steps=2),
            stop,
        ],
    )
    assert stop.best_epoch == 0
    # It holds what it validated at its best epoch: that epoch's average and
    # the statistics recomputed for it.
    assert_bit_equal(values(model.weights), stop.best_weights, "held")
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_equal(values(model.weights), last.weights, "raw after")
