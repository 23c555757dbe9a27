"""Several averages in one fit: `EMAOptimizer(decay=[...])`, `average=`,
`EMASwap(evaluate="all", select=...)`.

References are numpy: each average from the weights recorded after every
step (`helpers.reference_average`, written from the formula), and each
logged validation loss from the averaged weights' predictions.
"""

import os

import keras
import numpy as np
import pytest
from helpers import (
    TWO_LOGICAL_CPUS,
    RecordFirstBatch,
    RecordWeights,
    assert_bit_equal,
    fit_quietly,
    last_json_line,
    learnable_data,
    make_model,
    max_error,
    predict_with,
    reference_average,
    run_python,
    serve,
    tensorflow_only,
    values,
)

import keras_ema
from keras_ema.holder import WeightHolder

GAMMA = 7.0
DECAYS = [0.5, 0.9, keras_ema.schedules.PowerFunction(gamma=GAMMA)]
LABELS = ["ema0.5", "ema0.9", "emaPowerFunction_gamma7.0"]
# The shadows are float32 sums of float32 weights: a few float32 ulps of
# |w| ~ 1 apart from the float64 reference after tens of steps.
TOLERANCE = 1e-6


def per_step_decays():
    """The per-step decay d(s) of each entry of DECAYS, from its formula."""
    return [0.5, 0.9, lambda s: (1.0 - 1.0 / s) ** (GAMMA + 1)]


def compiled(decay=DECAYS, jit_compile=False, **options):
    model = make_model()
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(0.05), decay=decay, **options
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model, optimizer


def served(optimizer, index):
    """The averaged weights of `averages[index]`, as the model takes them."""
    averager = optimizer.averages[index]
    return [
        np.asarray(s.numpy()).astype(v.dtype)
        for s, v in zip(averager.shadows, averager.averaged_variables)
    ]


def mse(prediction, y):
    return float(np.mean((np.asarray(prediction, np.float64) - y) ** 2))


# ----------------------------------------------------------------- the update


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize(
    "options",
    [{}, {"update_every": 3, "start_step": 2}],
    ids=["every_step", "every_3_from_2"],
)
def test_every_average_follows_its_own_decay(jit_compile, options):
    model, optimizer = compiled(jit_compile=jit_compile, **options)
    first, record = RecordFirstBatch(), RecordWeights()
    fit_quietly(model, [first, record], epochs=3, validation=False)
    assert optimizer.average_labels == LABELS
    for index, decay in enumerate(per_step_decays()):
        expected = reference_average(first.weights, record.weights, decay, **options)
        got = values(optimizer.averages[index].shadows)
        assert max_error(expected, got) < TOLERANCE, LABELS[index]
        assert int(optimizer.averages[index].step.numpy()) == len(record.weights)


def test_one_average_in_a_list_is_the_single_average():
    single_model, single = compiled(decay=0.9)
    listed_model, listed = compiled(decay=[0.9])
    fit_quietly(single_model, validation=False)
    fit_quietly(listed_model, validation=False)
    assert listed.extra_averages == [] and listed.average_labels == ["ema0.9"]
    assert_bit_equal(values(single.averager.shadows), values(listed.averager.shadows))


def test_validating_every_average_leaves_training_bit_exact():
    # (Against the same optimizer: on JAX, XLA may fuse Adam's arithmetic
    # differently in a step that also updates averages, an ulp apart.)
    plain, _ = compiled()
    model, _ = compiled()
    fit_quietly(plain, epochs=2)
    fit_quietly(model, [keras_ema.EMASwap(evaluate="all")], epochs=2)
    keras_ema.EMASwap.restore_raw_weights(model)
    assert_bit_equal(
        values(plain.trainable_variables), values(model.trainable_variables)
    )


# ------------------------------------------------------- choosing an average


def test_average_argument_names_each_average():
    model, optimizer = compiled()
    fit_quietly(model, validation=False)
    raw = values(model.trainable_variables)
    choices = [(0, 0), (1, 1), (2, 2), (0.5, 0), (0.9, 1), (DECAYS[2], 2)]
    choices.append((keras_ema.schedules.PowerFunction(gamma=GAMMA), 2))
    for average, index in choices:
        with keras_ema.ema_weights(model, average=average):
            held = values(model.trainable_variables)
        assert_bit_equal(held, served(optimizer, index))
        assert_bit_equal(values(model.trainable_variables), raw)
        kernel = model.layers[0].kernel
        assert (
            optimizer.average(kernel, average=average)
            is (optimizer.averages[index].shadows[0])
        )
    assert optimizer.average_index() == optimizer.primary == 0


def test_checkpoint_takes_an_average(tmp_path):
    model, optimizer = compiled()
    path = tmp_path / "ckpt.weights.h5"
    checkpoint = keras_ema.EMACheckpoint(str(path), save_weights_only=True, average=0.9)
    fit_quietly(model, [keras_ema.EMASwap(), checkpoint])
    clone = make_model(seed=3)
    clone.load_weights(path)
    assert_bit_equal(values(clone.trainable_variables), served(optimizer, 1))
    with pytest.raises(TypeError, match="`average`"):
        keras_ema.EMACheckpoint(str(path), save_weights_only=True, average="0.9")


@tensorflow_only("a TensorFlow SavedModel")
def test_export_takes_an_average(tmp_path):
    model, optimizer = compiled()
    x, _ = learnable_data()
    fit_quietly(model, validation=False)
    keras_ema.export_saved_model(model, tmp_path / "served", average=2)
    outputs, info = serve(tmp_path / "served", x)
    expected = predict_with(model, served(optimizer, 2), x)
    np.testing.assert_allclose(outputs, expected, atol=1e-6)
    assert info["average"]["label"] == LABELS[2]


def test_another_average_goes_in_over_the_held_one():
    model, optimizer = compiled()
    fit_quietly(model, [keras_ema.EMASwap()])  # ends holding the primary
    holder = WeightHolder.of(model)
    assert holder.holds_average
    held = values(model.trainable_variables)
    with keras_ema.ema_weights(model, average=2):
        assert_bit_equal(values(model.trainable_variables), served(optimizer, 2))
    assert holder.holds_average and holder.held_by == "EMASwap at the end of fit"
    assert_bit_equal(values(model.trainable_variables), held)

    # Weights the user writes inside the block are the user's.
    mine = [np.full(v.shape, 0.25, v.dtype) for v in model.get_weights()]
    with keras_ema.ema_weights(model, average=1):
        model.set_weights(mine)
    assert not holder.holds_average
    assert_bit_equal(model.get_weights(), mine)


# ---------------------------------------------------------------- validation


def test_evaluate_all_logs_every_average_against_numpy():
    model, optimizer = compiled()
    x_val, y_val = learnable_data(n=16, seed=2)
    history = fit_quietly(model, [keras_ema.EMASwap(evaluate="all")], epochs=2)
    logs = {k: v[-1] for k, v in history.history.items()}
    keras_ema.EMASwap.restore_raw_weights(model)
    for index, label in enumerate(LABELS):
        expected = mse(predict_with(model, served(optimizer, index), x_val), y_val)
        assert logs[f"val_loss_{label}"] == pytest.approx(expected, rel=1e-5)
    assert logs["val_loss"] == logs[f"val_loss_{LABELS[0]}"]
    raw = mse(model.predict(x_val, verbose=0), y_val)
    assert logs["val_raw_loss"] == pytest.approx(raw, rel=1e-5)


@pytest.mark.parametrize("on_train_end", ["ema", "raw"])
def test_select_makes_the_best_average_primary(on_train_end, capsys, tmp_path):
    model, optimizer = compiled()
    swap = keras_ema.EMASwap(
        evaluate="all", select="val_loss", on_train_end=on_train_end
    )
    history = fit_quietly(model, [swap], epochs=2)
    scores = [history.history[f"val_loss_{label}"][-1] for label in LABELS]
    best = int(np.argmin(scores))
    assert optimizer.primary == best and swap.selected_average == LABELS[best]
    assert "primary average" not in capsys.readouterr().out  # fit's verbose=0
    holder = WeightHolder.of(model)
    assert holder.holds_average == (on_train_end == "ema")
    if on_train_end == "ema":
        assert_bit_equal(values(model.trainable_variables), served(optimizer, best))
    with keras_ema.ema_weights(model):
        assert_bit_equal(values(model.trainable_variables), served(optimizer, best))

    # The choice is saved with the model.
    path = tmp_path / "selected.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.primary == best


def test_select_max_mode_and_missing_metric(capsys):
    model, optimizer = compiled()
    swap = keras_ema.EMASwap(evaluate="all", select="val_loss", select_mode="max")
    x, y = learnable_data()
    history = model.fit(
        x,
        y,
        batch_size=8,
        validation_data=learnable_data(n=16, seed=2),
        verbose=2,
        callbacks=[swap],
    )
    scores = [history.history[f"val_loss_{label}"][-1] for label in LABELS]
    best = int(np.argmax(scores))
    assert optimizer.primary == best
    out = capsys.readouterr().out
    assert f"the primary average is now {LABELS[best]} (best val_loss, max" in out

    model, optimizer = compiled()
    swap = keras_ema.EMASwap(evaluate="all", select="val_accuracy")
    with pytest.warns(UserWarning, match="found no 'val_accuracy'"):
        fit_quietly(model, [swap])
    assert optimizer.primary == 0 and swap.selected_average is None


# -------------------------------------------------------------------- saving


def test_file_keeps_every_average_and_the_one_held(tmp_path):
    model, optimizer = compiled()
    fit_quietly(model, validation=False)
    raw = values(model.trainable_variables)
    path = tmp_path / "held.keras"
    with keras_ema.ema_weights(model, average=2):
        model.save(path)
    loaded = keras.models.load_model(path)
    for index in range(3):
        assert_bit_equal(
            values(loaded.optimizer.averages[index].shadows),
            values(optimizer.averages[index].shadows),
        )
    holder = WeightHolder.of(loaded)
    assert holder.holds_average
    assert_bit_equal(values(loaded.trainable_variables), served(optimizer, 2))
    keras_ema.EMASwap.restore_raw_weights(loaded)
    assert_bit_equal(values(loaded.trainable_variables), raw)


def test_compile_then_load_weights_and_mismatched_files(tmp_path):
    model, optimizer = compiled()
    fit_quietly(model, validation=False)
    path = tmp_path / "three.weights.h5"
    model.save_weights(path)

    fresh, fresh_optimizer = compiled()
    fresh.load_weights(path)  # before the optimizer is built
    with keras_ema.ema_weights(fresh, average=1):
        assert_bit_equal(values(fresh.trainable_variables), served(optimizer, 1))

    two, _ = compiled(decay=DECAYS[:2])
    with pytest.raises(ValueError, match="keeps 3 average"):
        two.load_weights(path)
        keras_ema.ema_weights(two).__enter__()


@tensorflow_only("tf.train.Checkpoint")
def test_tf_train_checkpoint_keeps_every_average(tmp_path):
    import tensorflow as tf

    model, optimizer = compiled()
    fit_quietly(model, validation=False)
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    fresh, fresh_optimizer = compiled()
    fresh_optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_optimizer).restore(
        prefix
    ).assert_existing_objects_matched()
    for index in range(3):
        assert_bit_equal(
            values(fresh_optimizer.averages[index].shadows),
            values(optimizer.averages[index].shadows),
        )


# ----------------------------------------------------------------- bad input


def test_bad_decay_lists_are_refused():
    adam = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="non-empty list"):
        keras_ema.EMAOptimizer(adam, decay=[])
    with pytest.raises(ValueError, match="more than once.*ema0.9"):
        keras_ema.EMAOptimizer(adam, decay=[0.9, 0.99, 0.9])
    with pytest.raises(TypeError, match="`decay`"):
        keras_ema.EMAOptimizer(adam, decay=[0.9, "0.99"])
    with pytest.raises(ValueError, match="`decay`"):
        keras_ema.EMAOptimizer(adam, decay=[0.9, 1.5])
    with pytest.raises(ValueError, match="non_trainable='average'` takes one"):
        keras_ema.EMAOptimizer(adam, decay=[0.9, 0.99], non_trainable="average")


def test_bad_average_choices_are_refused():
    model, optimizer = compiled()
    fit_quietly(model, validation=False)
    raw = values(model.trainable_variables)
    for bad, error in [
        ("ema0.9", TypeError),
        (True, TypeError),
        (3, ValueError),
        (-1, ValueError),
        (0.99, ValueError),
        (keras_ema.schedules.PowerFunction(gamma=6.0), ValueError),
    ]:
        with pytest.raises(error, match="`average`"):
            with keras_ema.ema_weights(model, average=bad):
                pass
        with pytest.raises(error, match="`average`"):
            optimizer.select_average(bad)
        with pytest.raises(error, match="`average`"):
            optimizer.average(model.layers[0].kernel, average=bad)
    assert optimizer.primary == 0
    assert not WeightHolder.of(model).holds_average
    assert_bit_equal(values(model.trainable_variables), raw)


def test_one_average_sources_refuse_another():
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(use_ema=True), loss="mse")
    fit_quietly(model, validation=False)
    with pytest.raises(ValueError, match="keeps one average"):
        with keras_ema.ema_weights(model, average=1):
            pass
    with keras_ema.ema_weights(model, average=0):
        pass


def test_bad_select_arguments_are_refused():
    with pytest.raises(ValueError, match="`select`.*evaluate='all'"):
        keras_ema.EMASwap(select="val_loss")
    with pytest.raises(ValueError, match="`select` must be the name"):
        keras_ema.EMASwap(evaluate="all", select="loss")
    with pytest.raises(ValueError, match="`select_mode`"):
        keras_ema.EMASwap(evaluate="all", select="val_loss", select_mode="best")
    with pytest.raises(ValueError, match="`evaluate`"):
        keras_ema.EMASwap(evaluate="every")


@tensorflow_only("a TensorFlow SavedModel")
def test_export_refuses_an_average_with_raw_weights(tmp_path):
    model, _ = compiled()
    fit_quietly(model, validation=False)
    with pytest.raises(ValueError, match="`average`"):
        keras_ema.export_saved_model(model, tmp_path / "m", weights="raw", average=1)
    assert not os.path.exists(tmp_path / "m")


# --------------------------------------------------------------- distributed

MIRRORED_SCRIPT = (
    TWO_LOGICAL_CPUS
    + """
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6)).astype("float32")
y = np.tanh(x[:, :1]).astype("float32")

def run(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1),
                                           decay=[0.5, 0.9], update_every=2)
        model.compile(optimizer, "mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                        validation_data=(x[:32], y[:32]),
                        callbacks=[keras_ema.EMASwap(evaluate="all")])
    shadows = [[[r.numpy().tolist() for r in
                 strategy.experimental_local_results(s.value)]
                for s in a.shadows] for a in optimizer.averages]
    return {"history": history.history, "shadows": shadows}

print(json.dumps({
    "single": run(tf.distribute.get_strategy()),
    "mirrored": run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
}))
"""
)


@tensorflow_only("tf.distribute.MirroredStrategy")
def test_several_averages_under_mirrored_strategy():
    out = last_json_line(run_python("-c", MIRRORED_SCRIPT, timeout=300))
    single, mirrored = out["single"], out["mirrored"]
    for average_single, average_mirrored in zip(single["shadows"], mirrored["shadows"]):
        for (reference,), replicas in zip(average_single, average_mirrored):
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0], replicas[1])
            # The replicas' gradients are summed in another order.
            np.testing.assert_allclose(replicas[0], reference, atol=1e-6)
    for key in ("val_loss_ema0.5", "val_loss_ema0.9", "val_raw_loss"):
        np.testing.assert_allclose(
            mirrored["history"][key], single["history"][key], atol=1e-5
        )


def test_emaswap_installs_several_averages():
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    swap = keras_ema.EMASwap(decay=[0.5, 0.9], evaluate="all", select="val_loss")
    history = fit_quietly(model, [swap])
    fit_quietly(model, [swap])  # again: the same averages, no error
    assert {"val_loss_ema0.5", "val_loss_ema0.9"} <= set(history.history)
    assert model.optimizer.average_labels == ["ema0.5", "ema0.9"]
    with pytest.raises(ValueError, match="already keeps an average"):
        fit_quietly(model, [keras_ema.EMASwap(decay=[0.5, 0.99])])
