"""export_saved_model: real SavedModels, reloaded with tf.saved_model.load and
checked against the averaged model's predictions from a numpy reference."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    RecordWeights,
    make_data,
    make_model,
    max_error,
    predict_with,
    reference_average,
    serve,
    values,
)

import keras_ema

DECAY = 0.9
BATCH = 8
EPOCHS = 2
N = 32
STEPS = EPOCHS * N // BATCH

# Runs in a fresh process that imports neither keras nor keras_ema: loads each
# SavedModel, serves x, writes the outputs to out<i>.npy and prints the
# `ema_info` endpoints as JSON.
LOADER = """
import json, sys
import numpy as np
import tensorflow as tf
x = np.load(sys.argv[1])
info = []
for i, path in enumerate(sys.argv[3:]):
    served = tf.saved_model.load(path)
    np.save(f"{sys.argv[2]}/out{i}.npy", served.serve(tf.constant(x)).numpy())
    info.append(json.loads(served.ema_info().numpy().decode()))
print(json.dumps(info))
"""


def assert_bit_identical(a, b):
    assert len(a) == len(b)
    for u, w in zip(a, b):
        assert u.dtype == w.dtype
        np.testing.assert_array_equal(u, w)


def trained(optimizer, callbacks=(), seed=0, dtype=None):
    """A model fit for STEPS steps; returns (model, x, initial, trajectory)."""
    model = make_model(seed, dtype)
    initial = values(model.trainable_variables)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = make_data(N)
    record = RecordWeights()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        verbose=0,
        shuffle=False,
        callbacks=[record, *callbacks],
    )
    assert len(record.weights) == STEPS
    return model, x, initial, record.weights


def listing(directory):
    return sorted(os.listdir(directory))


def saved_arrays(path):
    """The values of every variable in a SavedModel's checkpoint."""
    prefix = os.path.join(os.fspath(path), "variables", "variables")
    return [
        tf.train.load_variable(prefix, name)
        for name, _ in tf.train.list_variables(prefix)
        if name.endswith("VARIABLE_VALUE")
    ]


def assert_holds_only(path, weights):
    """The SavedModel's variables are exactly `weights`, bit for bit (no
    optimizer state, no other copy of the weights)."""
    saved = saved_arrays(path)
    assert saved
    for array in saved:
        assert any(
            array.dtype == w.dtype
            and array.shape == w.shape
            and np.array_equal(array, w)
            for w in weights
        ), array
    for w in weights:
        assert any(
            array.shape == w.shape and np.array_equal(array, w) for array in saved
        )


# ------------------------------------------------------------- fresh process


def test_export_serves_average_in_fresh_process(tmp_path):
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(1e-2), decay=DECAY, update_every=2, start_step=3
    )
    model, x, initial, trajectory = trained(optimizer)
    raw = values(model.trainable_variables)
    expected = reference_average(
        initial, trajectory, DECAY, update_every=2, start_step=3
    )
    shadows = [optimizer.average(v).numpy() for v in model.trainable_variables]
    assert max_error(shadows, expected) < 1e-6

    ema_path = keras_ema.export_saved_model(model, tmp_path / "ema")
    raw_path = keras_ema.export_saved_model(model, tmp_path / "raw", weights="raw")
    assert ema_path == str(tmp_path / "ema")
    assert raw_path == str(tmp_path / "raw")
    assert_bit_identical(values(model.trainable_variables), raw)
    assert_holds_only(ema_path, shadows)
    assert_holds_only(raw_path, raw)

    np.save(tmp_path / "x.npy", x)
    (tmp_path / "load.py").write_text(LOADER)
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "load.py"),
            str(tmp_path / "x.npy"),
            str(tmp_path),
            ema_path,
            raw_path,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    served_ema = np.load(tmp_path / "out0.npy")
    served_raw = np.load(tmp_path / "out1.npy")

    averaged = predict_with(model, shadows, x)
    raw_predictions = np.asarray(model(x, training=False))
    assert served_ema.shape == (N, 1)
    assert max_error([served_ema], [averaged]) < 1e-6
    assert max_error([served_ema], [predict_with(model, expected, x)]) < 1e-5
    assert max_error([served_raw], [raw_predictions]) < 1e-6
    assert max_error([served_ema], [raw_predictions]) > 1e-3

    average = {
        "source": "keras_ema.EMAOptimizer",
        "decay": {
            "class_name": "Constant",
            "config": {"decay": DECAY},
            "module": "keras_ema.schedules",
            "registered_name": "keras_ema>Constant",
        },
        "update_every": 2,
        "start_step": 3,
        "init": "weights",
        "shadow_dtype": "float32",
        "step": STEPS,
    }
    for got, weights, path in [(info[0], "ema", ema_path), (info[1], "raw", raw_path)]:
        assert got["weights"] == weights
        assert got["average"]["current_decay"] == pytest.approx(DECAY, rel=1e-6)
        assert {k: got["average"][k] for k in average} == average
        with open(os.path.join(path, "assets.extra", "keras_ema.json")) as file:
            assert json.load(file) == got


# ------------------------------------------------ raw weights after export


def test_export_keeps_raw_weights_bit_identical(tmp_path):
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    model, x, _, _ = trained(optimizer)
    before = values(model.variables)
    shadows_before = values(optimizer.averager.shadows)
    keras_ema.export_saved_model(model, tmp_path / "ema")
    assert_bit_identical(values(model.variables), before)
    keras_ema.export_saved_model(model, tmp_path / "raw", weights="raw")
    assert_bit_identical(values(model.variables), before)
    assert_bit_identical(values(optimizer.averager.shadows), shadows_before)
    # Training still runs on the raw weights (not blocked, not the average).
    model.train_on_batch(x[:BATCH], np.zeros((BATCH, 1), "float32"))


def test_export_while_model_holds_average(tmp_path):
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    model, x, initial, trajectory = trained(optimizer, [keras_ema.EMASwap()])
    raw = trajectory[-1]
    expected = reference_average(initial, trajectory, DECAY)
    averaged = predict_with(model, expected, x)
    raw_predictions = predict_with(model, raw, x)
    # fit left the average in the model.
    holding = values(model.trainable_variables)
    assert max_error(holding, expected) < 1e-6
    assert max_error([np.asarray(model(x))], [averaged]) < 1e-5

    keras_ema.export_saved_model(model, tmp_path / "raw", weights="raw")
    assert_bit_identical(values(model.trainable_variables), holding)
    keras_ema.export_saved_model(model, tmp_path / "ema")
    assert_bit_identical(values(model.trainable_variables), holding)

    served_raw, info_raw = serve(tmp_path / "raw", x)
    served_ema, info_ema = serve(tmp_path / "ema", x)
    assert max_error([served_raw], [raw_predictions]) < 1e-6
    assert max_error([served_ema], [averaged]) < 1e-5
    assert max_error([served_raw], [served_ema]) > 1e-3
    assert info_raw["weights"] == "raw" and info_ema["weights"] == "ema"
    assert info_raw["average"]["step"] == STEPS

    # The model still holds the average, and the raw weights kept aside are
    # the ones training left, bit for bit.
    assert max_error([np.asarray(model(x))], [averaged]) < 1e-5
    assert keras_ema.holder.WeightHolder.of(model).holds_average
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_identical(values(model.trainable_variables), raw)


# -------------------------------------------------------------- atomicity


@pytest.fixture(scope="module")
def ema_model():
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    model, x, _, _ = trained(optimizer)
    return model, x


def test_existing_path_refused_and_untouched(tmp_path, ema_model):
    model, _ = ema_model
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        keras_ema.export_saved_model(model, target)
    assert listing(target) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert listing(tmp_path) == ["m"]
    # A file is refused as well.
    (tmp_path / "f").write_text("file")
    with pytest.raises(FileExistsError):
        keras_ema.export_saved_model(model, tmp_path / "f", weights="raw")
    assert (tmp_path / "f").read_text() == "file"


def test_overwrite_replaces(tmp_path, ema_model):
    model, x = ema_model
    target = tmp_path / "m"
    keras_ema.export_saved_model(model, target, weights="raw")
    (target / "keep.txt").write_text("stale")
    keras_ema.export_saved_model(model, target, overwrite=True)
    assert "keep.txt" not in listing(target)
    assert "saved_model.pb" in listing(target)
    assert listing(tmp_path) == ["m"]
    served, info = serve(target, x)
    assert info["weights"] == "ema"
    with keras_ema.ema_weights(model):
        averaged = np.asarray(model(x))
    assert max_error([served], [averaged]) < 1e-6


def test_overwrite_replaces_a_file(tmp_path, ema_model):
    model, x = ema_model
    (tmp_path / "m").write_text("not an export")
    keras_ema.export_saved_model(model, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "saved_model.pb").is_file()
    # Nothing left beside it: no staging directory, no retired old file.
    assert listing(tmp_path) == ["m"]


def test_export_inside_ema_weights_block(tmp_path, ema_model):
    model, x = ema_model
    raw = values(model.trainable_variables)
    with keras_ema.ema_weights(model):
        averaged = np.asarray(model(x))
        holding = values(model.trainable_variables)
        keras_ema.export_saved_model(model, tmp_path / "ema")
        keras_ema.export_saved_model(model, tmp_path / "raw", weights="raw")
        assert_bit_identical(values(model.trainable_variables), holding)
    assert_bit_identical(values(model.trainable_variables), raw)
    assert listing(tmp_path) == ["ema", "raw"]
    served_ema, _ = serve(tmp_path / "ema", x)
    served_raw, _ = serve(tmp_path / "raw", x)
    assert max_error([served_ema], [averaged]) < 1e-6
    assert max_error([served_raw], [predict_with(model, raw, x)]) < 1e-6


@pytest.mark.parametrize(
    "signature",
    [
        [keras.InputSpec(shape=(None, 99), dtype="float32")],
        [tf.TensorSpec(shape=(None, 6, 5), dtype=tf.float32)],
        "bogus",
        [object()],
    ],
    ids=["wrong_width", "wrong_rank", "string", "object"],
)
@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_failed_export_leaves_nothing(tmp_path, ema_model, signature, weights):
    model, x = ema_model
    before = values(model.variables)
    shadows = values(model.optimizer.averager.shadows)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("previous export")
    with pytest.raises(Exception):  # noqa: B017 (whatever tracing raises)
        keras_ema.export_saved_model(
            model, tmp_path / "m", weights=weights, input_signature=signature
        )
    assert listing(tmp_path) == ["old"]
    # A failed overwrite keeps the previous export.
    with pytest.raises(Exception):  # noqa: B017
        keras_ema.export_saved_model(
            model,
            tmp_path / "old",
            weights=weights,
            overwrite=True,
            input_signature=signature,
        )
    assert listing(tmp_path) == ["old"]
    assert listing(tmp_path / "old") == ["keep.txt"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "previous export"
    assert_bit_identical(values(model.variables), before)
    assert_bit_identical(values(model.optimizer.averager.shadows), shadows)
    assert not keras_ema.holder.WeightHolder.of(model).holds_average
    state = values(model.optimizer.variables)
    model.train_on_batch(x[:BATCH], np.zeros((BATCH, 1), "float32"))
    # Training moved the weights and the average; restore them for the other
    # tests.
    for variable, value in zip(
        model.variables + model.optimizer.variables, before + state
    ):
        variable.assign(value)


class Interrupt(keras.InputSpec):
    """An input signature whose tracing is interrupted (Ctrl-C)."""

    def __init__(self):
        pass  # every attribute read interrupts

    @property
    def shape(self):
        raise KeyboardInterrupt

    def __getattr__(self, name):
        raise KeyboardInterrupt


def test_interrupted_export_leaves_nothing(tmp_path, ema_model):
    model, _ = ema_model
    before = values(model.variables)
    with pytest.raises(KeyboardInterrupt):
        keras_ema.export_saved_model(
            model, tmp_path / "m", input_signature=[Interrupt()]
        )
    assert listing(tmp_path) == []
    assert_bit_identical(values(model.variables), before)
    assert not keras_ema.holder.WeightHolder.of(model).holds_average


def test_failed_export_of_swapped_model_keeps_average_in(tmp_path):
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    model, x, _, trajectory = trained(optimizer, [keras_ema.EMASwap()])
    holding = values(model.trainable_variables)
    bad = [keras.InputSpec(shape=(None, 99), dtype="float32")]
    for weights in ("raw", "ema"):
        with pytest.raises(Exception):  # noqa: B017
            keras_ema.export_saved_model(
                model, tmp_path / "m", weights=weights, input_signature=bad
            )
        assert listing(tmp_path) == []
        assert_bit_identical(values(model.trainable_variables), holding)
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_identical(values(model.trainable_variables), trajectory[-1])


# ---------------------------------------------------------- average sources


def test_keras_use_ema_source(tmp_path):
    optimizer = keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=DECAY)
    # on_train_end="raw": the model holds the raw weights (Keras's own
    # end-of-fit overwrite is suspended).
    model, x, initial, trajectory = trained(
        optimizer, [keras_ema.EMASwap(on_train_end="raw")]
    )
    raw = values(model.trainable_variables)
    assert_bit_identical(raw, trajectory[-1])
    expected = reference_average(initial, trajectory, DECAY, init="first_step")
    keras_ema.export_saved_model(model, tmp_path / "ema")
    keras_ema.export_saved_model(model, tmp_path / "raw", weights="raw")
    assert_bit_identical(values(model.trainable_variables), raw)

    served_ema, info = serve(tmp_path / "ema", x)
    served_raw, _ = serve(tmp_path / "raw", x)
    assert max_error([served_ema], [predict_with(model, expected, x)]) < 1e-5
    assert max_error([served_raw], [predict_with(model, raw, x)]) < 1e-6
    assert max_error([served_ema], [served_raw]) > 1e-3
    assert info["weights"] == "ema"
    assert info["average"]["source"] == "keras use_ema"
    assert info["average"]["decay"] == pytest.approx(DECAY)
    assert info["average"]["step"] == STEPS


def test_keras_use_ema_after_plain_fit(tmp_path):
    # Without EMASwap, Keras copies its average into the model at the end of
    # fit; the export of either kind is then the average.
    optimizer = keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=DECAY)
    model, x, initial, trajectory = trained(optimizer)
    expected = reference_average(initial, trajectory, DECAY, init="first_step")
    keras_ema.export_saved_model(model, tmp_path / "ema")
    served_ema, _ = serve(tmp_path / "ema", x)
    assert max_error([served_ema], [predict_with(model, expected, x)]) < 1e-5


def test_emaswap_installed_source(tmp_path):
    model, x, initial, trajectory = trained(
        keras.optimizers.Adam(1e-2), [keras_ema.EMASwap(decay=DECAY)]
    )
    expected = reference_average(initial, trajectory, DECAY)
    holding = values(model.trainable_variables)
    assert max_error(holding, expected) < 1e-6
    keras_ema.export_saved_model(model, tmp_path / "ema")
    keras_ema.export_saved_model(model, tmp_path / "raw", weights="raw")
    assert_bit_identical(values(model.trainable_variables), holding)

    served_ema, info = serve(tmp_path / "ema", x)
    served_raw, _ = serve(tmp_path / "raw", x)
    assert max_error([served_ema], [predict_with(model, expected, x)]) < 1e-5
    assert max_error([served_raw], [predict_with(model, trajectory[-1], x)]) < 1e-6
    assert max_error([served_ema], [served_raw]) > 1e-3
    assert info["average"]["source"] == "keras_ema.EMAOptimizer"
    assert info["average"]["decay"]["config"] == {"decay": DECAY}
    assert info["average"]["step"] == STEPS


def test_mixed_precision_layers(tmp_path):
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    )
    model, x, initial, trajectory = trained(optimizer, dtype="mixed_float16")
    raw = values(model.trainable_variables)
    assert all(v.dtype == "float32" for v in raw)
    expected = reference_average(initial, trajectory, DECAY)
    keras_ema.export_saved_model(model, tmp_path / "ema")
    keras_ema.export_saved_model(model, tmp_path / "raw", weights="raw")
    assert_bit_identical(values(model.trainable_variables), raw)
    served_ema, info = serve(tmp_path / "ema", x)
    served_raw, _ = serve(tmp_path / "raw", x)
    assert max_error([served_ema], [predict_with(model, expected, x)]) < 1e-2
    # The stored weights are exact (above); the forward pass computes in
    # float16, where the SavedModel and eager Keras may take different
    # kernels (oneDNN uses native float16 on CPUs that have it): allow a few
    # units of float16 resolution at the outputs' scale.
    reference_raw = predict_with(model, raw, x)
    ulp = np.finfo(np.float16).eps * max(1.0, float(np.max(np.abs(reference_raw))))
    assert max_error([served_raw], [reference_raw]) <= 4 * ulp
    assert max_error([served_ema], [served_raw]) > 2e-2
    assert info["average"]["step"] == STEPS


# ------------------------------------------------------------- bad inputs


def test_bad_arguments(tmp_path, ema_model):
    model, _ = ema_model
    with pytest.raises(TypeError, match="keras.Model"):
        keras_ema.export_saved_model("model", tmp_path / "m")
    with pytest.raises(TypeError, match="path"):
        keras_ema.export_saved_model(model, 123)
    with pytest.raises(ValueError, match="weights"):
        keras_ema.export_saved_model(model, tmp_path / "m", weights="x")
    with pytest.raises(TypeError, match="overwrite"):
        keras_ema.export_saved_model(model, tmp_path / "m", overwrite="yes")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("trained_first", [True, False])
def test_model_without_average(tmp_path, trained_first):
    x, y = make_data(N)
    model = make_model()
    if trained_first:
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    else:
        # An EMAOptimizer that never trained keeps no average yet.
        optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
        model.compile(optimizer=optimizer, loss="mse")
    before = values(model.variables)
    with pytest.raises(ValueError, match="no moving average"):
        keras_ema.export_saved_model(model, tmp_path / "m")
    assert listing(tmp_path) == []

    path = keras_ema.export_saved_model(model, tmp_path / "m", weights="raw")
    assert_bit_identical(values(model.variables), before)
    served, info = serve(path, x)
    assert max_error([served], [predict_with(model, before, x)]) < 1e-6
    assert info == {
        "weights": "raw",
        "average": {},
        "held_by": None,
        "batchnorm_statistics": None,
    }
    assert listing(tmp_path) == ["m"]
