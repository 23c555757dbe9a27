"""BEMA, the bias-corrected EMA: `schedules.BEMA` in `EMAOptimizer`.

The reference is numpy, written from the rule the docs state (the steps s
count the updates after the burn-in, from 1):

    s <= 0:  EMA = theta_0 = theta_t
    s > 0:   EMA <- D EMA + (1 - D) theta_t at the steps where s % k == 0,
             D = prod over the k steps of (1 - (rho + gamma j) ** -kappa)
    served = EMA + (rho + gamma s) ** -eta * (theta_t - theta_0)
"""

import warnings

import keras
import numpy as np
import pytest
from helpers import (
    RecordFirstBatch,
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
from keras import ops

import keras_ema

BURN_IN = 4
# float32 shadows against a float64 reference, tens of steps, |w| ~ 1; the
# correction adds alpha * (theta - theta_0), a few more ulps.
TOLERANCE = 2e-6


def reference_bema(
    initial,
    trajectory,
    burn_in,
    update_every=1,
    kappa=0.5,
    eta=0.2,
    rho=10.0,
    gamma=1.0,
):
    """`(ema, theta_0, served)` after the last step of `trajectory`."""
    ema = [np.asarray(w, np.float64) for w in initial]
    anchor = list(ema)
    weights = ema
    for t, step_weights in enumerate(trajectory, start=1):
        weights = [np.asarray(w, np.float64) for w in step_weights]
        s = t - burn_in
        if s <= 0:
            ema, anchor = weights, weights
        elif s % update_every == 0:
            steps = np.arange(s - update_every + 1, s + 1, dtype=np.float64)
            decay = np.prod(1.0 - (rho + gamma * steps) ** -kappa)
            ema = [decay * e + (1.0 - decay) * w for e, w in zip(ema, weights)]
    s = len(trajectory) - burn_in
    alpha = (rho + gamma * max(s, 1)) ** -eta
    served = [e + alpha * (w - a) for e, w, a in zip(ema, weights, anchor)]
    return ema, anchor, served


def bema_model(burn_in=BURN_IN, jit_compile=False, **options):
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # burn_in=0's reminder
        bema = keras_ema.schedules.BEMA(burn_in=burn_in)
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(0.05), decay=[0.9, bema], **options
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model, optimizer


def held(model, average):
    with keras_ema.ema_weights(model, average=average):
        return values(model.trainable_variables)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("burn_in,update_every", [(BURN_IN, 1), (BURN_IN, 3), (0, 1)])
def test_bema_follows_numpy(jit_compile, burn_in, update_every):
    model, optimizer = bema_model(burn_in, jit_compile, update_every=update_every)
    first, record = RecordFirstBatch(), RecordWeights()
    fit_quietly(model, [first, record], epochs=3, validation=False)
    ema, anchor, expected = reference_bema(
        first.weights, record.weights, burn_in, update_every
    )
    assert max_error(ema, values(optimizer.averages[1].shadows)) < TOLERANCE
    assert max_error(anchor, values(optimizer.anchor_of(1).shadows)) < TOLERANCE
    assert max_error(expected, held(model, 1)) < TOLERANCE
    assert optimizer.anchor_of(0) is None
    # The raw weights stay raw.
    assert_bit_equal(values(model.trainable_variables), record.weights[-1])


def counting_model(burn_in, update_every=1):
    """A one-weight model whose weight is the step: SGD(1) on loss -w."""
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.SGD(1.0),
        decay=keras_ema.schedules.BEMA(burn_in=burn_in),
        update_every=update_every,
    )
    model.compile(optimizer=optimizer, loss=lambda y, p: -ops.mean(p))
    return model


@pytest.mark.parametrize("update_every", [1, 2])
@pytest.mark.parametrize("steps", [2, 3, 4, 6])
def test_bema_on_weights_that_count_the_steps(steps, update_every):
    model = counting_model(burn_in=2, update_every=update_every)
    x = np.ones((steps, 1), "float32")
    model.fit(x, x, batch_size=1, verbose=0, shuffle=False)
    trajectory = [[np.array([[float(t)]])] for t in range(1, steps + 1)]
    _, _, expected = reference_bema([np.zeros((1, 1))], trajectory, 2, update_every)
    assert max_error(expected, held(model, None)) < 1e-6
    assert float(model.layers[0].kernel.numpy()[0, 0]) == steps  # raw again


def test_validation_save_load_and_resume(tmp_path):
    model, optimizer = bema_model()
    x_val, y_val = learnable_data(n=16, seed=2)
    history = fit_quietly(model, [keras_ema.EMASwap(evaluate="all")], epochs=2)
    keras_ema.EMASwap.restore_raw_weights(model)
    label = f"bema_burn_in{BURN_IN}"
    assert optimizer.average_labels == ["ema0.9", label]
    bema_weights = held(model, 1)
    expected = np.mean((predict_with(model, bema_weights, x_val) - y_val) ** 2)
    assert history.history[f"val_loss_{label}"][-1] == pytest.approx(expected, rel=1e-5)

    path = tmp_path / "bema.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    anchor = loaded.optimizer.anchor_of(1)
    assert_bit_equal(values(anchor.shadows), values(optimizer.anchor_of(1).shadows))
    assert_bit_equal(held(loaded, 1), bema_weights)
    # Both continue alike: the anchor stays theta_0.
    fit_quietly(model, validation=False)
    fit_quietly(loaded, validation=False)
    assert_bit_equal(held(loaded, 1), held(model, 1))
    assert_bit_equal(
        values(loaded.optimizer.anchor_of(1).shadows), values(anchor.shadows)
    )


@tensorflow_only("a TensorFlow SavedModel and tf.train.Checkpoint")
def test_export_and_tf_checkpoint(tmp_path):
    import tensorflow as tf

    model, optimizer = bema_model()
    fit_quietly(model, validation=False)
    x, _ = learnable_data()
    keras_ema.export_saved_model(model, tmp_path / "served", average=1)
    outputs, info = serve(tmp_path / "served", x)
    np.testing.assert_allclose(
        outputs, predict_with(model, held(model, 1), x), atol=1e-6
    )
    assert info["average"]["label"] == f"bema_burn_in{BURN_IN}"

    prefix = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "ckpt"))
    fresh, fresh_optimizer = bema_model()
    fresh_optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(optimizer=fresh_optimizer).restore(prefix).assert_consumed()
    assert_bit_equal(
        values(fresh_optimizer.anchor_of(1).shadows),
        values(optimizer.anchor_of(1).shadows),
    )


def test_bema_alone_through_emaswap():
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    first, record = RecordFirstBatch(), RecordWeights()
    bema = keras_ema.schedules.BEMA(burn_in=BURN_IN)
    fit_quietly(model, [keras_ema.EMASwap(decay=bema), first, record], epochs=2)
    _, _, expected = reference_bema(first.weights, record.weights, BURN_IN)
    # The model holds the average after fit (on_train_end="ema").
    assert max_error(expected, values(model.trainable_variables)) < TOLERANCE


def test_burn_in_zero_warns():
    with pytest.warns(UserWarning, match="theta_0 is the weights training starts"):
        keras_ema.schedules.BEMA(burn_in=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_ema.schedules.BEMA(burn_in=1)


def test_bad_bema_arguments_are_refused():
    BEMA = keras_ema.schedules.BEMA
    with pytest.raises(ValueError, match="`burn_in`"):
        BEMA(burn_in=-1)
    with pytest.raises(TypeError, match="`burn_in`"):
        BEMA(burn_in=1.5)
    with pytest.raises(ValueError, match="`kappa`"):
        BEMA(burn_in=1, kappa=-0.5)
    with pytest.raises(ValueError, match="`eta`"):
        BEMA(burn_in=1, eta=float("nan"))
    with pytest.raises(ValueError, match="`rho`"):
        BEMA(burn_in=1, rho=0.0)
    with pytest.raises(ValueError, match="`rho \\+ gamma`"):
        BEMA(burn_in=1, rho=0.3, gamma=0.5)
    with pytest.raises(TypeError, match="`gamma`"):
        BEMA(burn_in=1, gamma="1")
    with pytest.raises(ValueError, match="`start_step` does not apply"):
        keras_ema.EMAOptimizer(
            keras.optimizers.Adam(), decay=[0.9, BEMA(burn_in=5)], start_step=3
        )
    with pytest.raises(ValueError, match="`step`|>= 1"):
        BEMA(burn_in=1).correction(0)


def test_bema_config_round_trip():
    bema = keras_ema.schedules.BEMA(burn_in=7, kappa=0.4, eta=0.3, rho=5.0, gamma=2.0)
    config = keras.saving.serialize_keras_object(bema)
    again = keras_ema.schedules.get(config)
    assert again.get_config() == bema.get_config()
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=[0.99, bema])
    clone = keras_ema.EMAOptimizer.from_config(optimizer.get_config())
    assert clone.average_labels == optimizer.average_labels
    assert clone.average_labels[1] == "bema_burn_in7_kappa0.4_eta0.3_rho5.0_gamma2.0"


def test_bema_alone_saves_loads_and_refits(tmp_path):
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    swap = keras_ema.EMASwap(decay=keras_ema.schedules.BEMA(burn_in=BURN_IN))
    fit_quietly(model, [swap])
    fit_quietly(model, [swap])  # the same callback again: the same average
    path = tmp_path / "bema.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.average_labels == [f"bema_burn_in{BURN_IN}"]
    assert loaded.optimizer.get_config()["start_step"] == 0
    assert_bit_equal(held(loaded, None), held(model, None))
