"""EMAOptimizer in real Keras fit loops, checked against a numpy reference."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    TWO_LOGICAL_CPUS,
    RecordWeights,
    last_json_line,
    make_data,
    make_model,
    max_error,
    reference_average,
    run_python,
    tensorflow_only,
)

import keras_ema

DECAY = 0.9


def initial_weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "update_every,start_step,init",
    [
        (1, 0, "weights"),
        (3, 0, "weights"),
        (2, 5, "weights"),
        (1, 0, "first_step"),
        (4, 3, "first_step"),
    ],
)
def test_fit_matches_reference(jit_compile, update_every, start_step, init):
    model = make_model()
    w0 = initial_weights(model)
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.5),
        decay=DECAY,
        update_every=update_every,
        start_step=start_step,
        init=init,
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    record = RecordWeights()
    x, y = make_data()
    model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[record]
    )
    assert int(optimizer.averager.step.numpy()) == 16
    expected = reference_average(
        w0, record.weights, lambda s: DECAY, update_every, start_step, init
    )
    got = [optimizer.average(v).numpy() for v in model.trainable_variables]
    assert max_error(got, expected) < 1e-6


def test_schedule_over_real_steps():
    schedule = keras_ema.schedules.PowerFunction(gamma=6.94)
    model = make_model()
    w0 = initial_weights(model)
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(1e-2), decay=schedule, update_every=3
    )
    model.compile(optimizer=optimizer, loss="mse")
    record = RecordWeights()
    model.fit(*make_data(), batch_size=4, epochs=2, verbose=0, callbacks=[record])
    expected = reference_average(
        w0, record.weights, lambda s: (1.0 - 1.0 / s) ** 7.94, update_every=3
    )
    got = [optimizer.average(v).numpy() for v in model.trainable_variables]
    assert max_error(got, expected) < 1e-6


def test_first_step_reproduces_keras_use_ema():
    x, y = make_data()
    momentum = 0.95
    keras_model = make_model(seed=3)
    keras_model.compile(
        optimizer=keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=momentum),
        loss="mse",
    )
    ours_model = make_model(seed=3)
    ours = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(1e-2), decay=momentum, init="first_step"
    )
    ours_model.compile(optimizer=ours, loss="mse")
    # Keras copies its average into the model at the end of fit, so read it
    # from the optimizer's own variables instead.
    keras_model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
    ours_model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
    keras_average = keras_model.optimizer._model_variables_moving_average
    got = [ours.average(v).numpy() for v in ours_model.trainable_variables]
    assert max_error(got, [a.numpy() for a in keras_average]) < 1e-6
    # Side by side: ours keeps the raw weights, Keras's fit overwrote them.
    assert max_error(keras_model.get_weights(), [a.numpy() for a in keras_average]) == 0
    assert max_error(ours_model.get_weights(), got) > 1e-4


def test_fit_leaves_raw_weights_in_model():
    model = make_model()
    inner = keras.optimizers.SGD(0.1, use_ema=True)
    optimizer = keras_ema.EMAOptimizer(inner, decay=DECAY)
    model.compile(optimizer=optimizer, loss="mse")
    record = RecordWeights()
    model.fit(*make_data(), batch_size=8, epochs=1, verbose=0, callbacks=[record])
    # finalize_variable_values ran at the end of fit and changed nothing,
    # not even through the inner optimizer's use_ema.
    assert max_error(initial_weights(model), record.weights[-1]) == 0
    shadows = [optimizer.average(v).numpy() for v in model.trainable_variables]
    assert max_error(initial_weights(model), shadows) > 1e-4


def fit_with_skipped_step(model, ema, initial):
    """Fits five batches of 8, the third with an inf input, and checks that
    the step it causes to be skipped moves neither the weights nor the
    average, and that the average of the other steps is the reference's."""
    x, y = make_data(n=40)
    x[16] = np.inf
    record = RecordWeights(ema)
    model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[record]
    )
    check_skip(ema, record, initial)


def check_skip(optimizer, record, initial):
    steps = record.steps
    assert steps == [1, 2, 2, 3, 4]
    # The skipped step moved neither the weights nor the average.
    assert max_error(record.shadows[2], record.shadows[1]) == 0
    assert max_error(record.weights[2], record.weights[1]) == 0
    applied = [w for i, w in enumerate(record.weights) if i != 2]
    expected = reference_average(initial, applied, lambda s: DECAY)
    got = [s.numpy() for s in optimizer.averager.shadows]
    assert max_error(got, expected) < 1e-6


@pytest.mark.parametrize("order", ["ema_outside", "ema_inside"])
def test_loss_scale_skip_both_orders(order):
    model = make_model()
    w0 = initial_weights(model)
    if order == "ema_outside":
        ema = keras_ema.EMAOptimizer(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
            decay=DECAY,
        )
        optimizer = ema
    else:
        ema = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1), decay=DECAY)
        optimizer = keras.optimizers.LossScaleOptimizer(ema)
    model.compile(optimizer=optimizer, loss="mse")
    fit_with_skipped_step(model, ema, w0)
    assert int(ema.iterations.numpy()) == 4


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_automatic_wrap(mixed_float16):
    model = make_model()
    w0 = initial_weights(model)
    ema = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1), decay=DECAY)
    model.compile(optimizer=ema, loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is ema
    fit_with_skipped_step(model, ema, w0)
    assert all(s.dtype == "float32" for s in ema.averager.shadows)


def test_mixed_float16_with_explicit_loss_scale_optimizer(mixed_float16):
    """EMAOptimizer(LossScaleOptimizer(opt)) compiled under mixed_float16 gets
    a second LossScaleOptimizer from compile: gradients are unscaled once."""
    x, y = make_data()
    trained = []
    for wrap in ("plain", "explicit"):
        model = make_model(seed=5)
        sgd = keras.optimizers.SGD(0.1)
        if wrap == "explicit":
            sgd = keras.optimizers.LossScaleOptimizer(sgd)
        model.compile(optimizer=keras_ema.EMAOptimizer(sgd, decay=DECAY), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        trained.append(initial_weights(model))
    assert max_error(trained[0], trained[1]) == 0


def test_gradient_accumulation_moves_average_per_real_update():
    model = make_model()
    w0 = initial_weights(model)
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), decay=DECAY
    )
    model.compile(optimizer=optimizer, loss="mse")
    record = RecordWeights(optimizer)
    model.fit(
        *make_data(),
        batch_size=8,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[record],
    )
    assert record.steps == [0, 1, 1, 2, 2, 3, 3, 4]
    real_updates = record.weights[1::2]
    expected = reference_average(w0, real_updates, lambda s: DECAY)
    got = [s.numpy() for s in optimizer.averager.shadows]
    assert max_error(got, expected) < 1e-6


def test_forwards_learning_rate_and_iterations():
    inner = keras.optimizers.Adam(1e-2)
    optimizer = keras_ema.EMAOptimizer(inner)
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(1e-2)
    optimizer.learning_rate = 5e-3
    assert float(inner.learning_rate.numpy()) == pytest.approx(5e-3)
    assert optimizer.iterations is inner.iterations
    assert optimizer.inner_optimizer is inner

    model = make_model()
    model.compile(optimizer=optimizer, loss="mse")
    reduce = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", mode="max", factor=0.5, patience=0, verbose=0
    )
    # The loss falls, which "max" reads as no improvement: halve once.
    model.fit(*make_data(), batch_size=8, epochs=2, verbose=0, callbacks=[reduce])
    assert float(inner.learning_rate.numpy()) == pytest.approx(5e-3 / 2)
    assert int(inner.iterations.numpy()) == 16


def test_learning_rate_schedule_sees_inner_iterations():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 4, 0.5)
    inner = keras.optimizers.SGD(schedule)
    model = make_model()
    model.compile(optimizer=keras_ema.EMAOptimizer(inner), loss="mse")
    model.fit(*make_data(), batch_size=8, epochs=1, verbose=0)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.1 * 0.5**2)


@tensorflow_only("tf.train.Checkpoint")
def test_variables_include_shadows_and_checkpoint_finds_them(tmp_path):
    model = make_model()
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(*make_data(), batch_size=8, epochs=1, verbose=0)
    ids = {id(v) for v in optimizer.variables}
    assert all(id(s) in ids for s in optimizer.averager.shadows)
    assert all(id(v) in ids for v in optimizer.inner_optimizer.variables)

    path = tf.train.Checkpoint(optimizer=optimizer).write(str(tmp_path / "ckpt"))
    keys = [name for name, _ in tf.train.list_variables(path)]
    for layer in ("hidden", "out"):
        for leaf in ("kernel", "bias"):
            assert any(f"{layer}.S{leaf}" in key for key in keys), (layer, keys)

    fresh_model = make_model(seed=9)
    fresh = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    fresh.build(fresh_model.trainable_variables)
    tf.train.Checkpoint(optimizer=fresh).read(path).assert_existing_objects_matched()
    for a, b in zip(fresh.averager.shadows, optimizer.averager.shadows):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh.averager.step.numpy()) == 8


def test_save_and_load_keras_file(tmp_path):
    model = make_model()
    schedule = keras_ema.schedules.Debiased(0.97)
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(1e-2), decay=schedule, update_every=2, start_step=1
    )
    model.compile(optimizer=optimizer, loss="mse")
    x, y = make_data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer
    assert isinstance(restored, keras_ema.EMAOptimizer)
    assert restored.get_config() == optimizer.get_config()
    assert int(restored.averager.step.numpy()) == 8
    for v, w in zip(loaded.trainable_variables, model.trainable_variables):
        np.testing.assert_array_equal(
            restored.average(v).numpy(), optimizer.average(w).numpy()
        )
    # Both continue identically: the average and the inner optimizer's state
    # were restored.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for v, w in zip(loaded.trainable_variables, model.trainable_variables):
        np.testing.assert_allclose(
            restored.average(v).numpy(), optimizer.average(w).numpy(), atol=1e-6
        )


def test_get_config_round_trip():
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.AdamW(3e-4, weight_decay=0.01),
        decay=keras_ema.schedules.PowerWarmup(0.9999, power=0.75),
        update_every=4,
        start_step=10,
        init="first_step",
        # float64 needs jax_enable_x64 on JAX (refused there: test_jax.py).
        shadow_dtype="float64" if keras_ema.backend.float64_available() else "float32",
        name="my_ema",
    )
    config = optimizer.get_config()
    clone = keras_ema.EMAOptimizer.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(optimizer)
    clone = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(clone, keras_ema.EMAOptimizer)
    assert isinstance(clone.inner_optimizer, keras.optimizers.AdamW)
    assert clone.averager.update_every == 4
    assert isinstance(clone.averager.schedule, keras_ema.schedules.PowerWarmup)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"inner_optimizer": "adam"}, TypeError, "inner_optimizer"),
        ({"inner_optimizer": None}, TypeError, "inner_optimizer"),
        ({"decay": 1.5}, ValueError, "decay"),
        ({"decay": float("nan")}, ValueError, "decay"),
        ({"decay": "0.99"}, TypeError, "decay"),
        ({"update_every": 0}, ValueError, "update_every"),
        ({"update_every": 2.0}, TypeError, "update_every"),
        ({"start_step": -1}, ValueError, "start_step"),
        ({"init": "zeros"}, ValueError, "init"),
        ({"shadow_dtype": "float16"}, ValueError, "shadow_dtype"),
        ({"learning_rate": 0.1}, ValueError, "inner_optimizer"),
        ({"use_ema": True}, ValueError, "inner_optimizer"),
        ({"bogus": 1}, ValueError, "bogus"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    kwargs = {"inner_optimizer": keras.optimizers.SGD(), **kwargs}
    with pytest.raises(error, match=match):
        keras_ema.EMAOptimizer(**kwargs)


def test_apply_unbuilt_without_variables_and_average_of_unknown():
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="trainable_variables"):
        optimizer.apply([tf.zeros(3)])
    model = make_model()
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="not one of the"):
        optimizer.average(keras.Variable(np.zeros(3, "float32")))


@tensorflow_only("tf.function custom loop (JAX: test_jax.py)")
def test_custom_loop_apply_and_jit():
    """`apply` in a GradientTape loop under XLA equals the reference."""
    model = make_model()
    w0 = initial_weights(model)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05), decay=DECAY)
    x, y = make_data()

    @tf.function(jit_compile=True)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb, training=True) - yb) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    optimizer.build(model.trainable_variables)
    trajectory = []
    for i in range(0, 64, 8):
        step(x[i : i + 8], y[i : i + 8])
        trajectory.append(initial_weights(model))
    expected = reference_average(w0, trajectory, lambda s: DECAY)
    got = [optimizer.average(v).numpy() for v in model.trainable_variables]
    assert max_error(got, expected) < 1e-6


MIRRORED_SCRIPT = TWO_LOGICAL_CPUS + """
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6)).astype("float32")
y = rng.normal(size=(64, 1)).astype("float32")

def run(strategy, loss_scale):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4),
                                  keras.layers.Dense(1)])
        inner = keras.optimizers.SGD(0.05)
        if loss_scale:
            inner = keras.optimizers.LossScaleOptimizer(inner)
        optimizer = keras_ema.EMAOptimizer(inner, decay=0.9)
        model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    return [[r.numpy().tolist() for r in
             strategy.experimental_local_results(s.value)]
            for s in optimizer.averager.shadows], int(optimizer.averager.step.numpy())

out = {}
for loss_scale in (False, True):
    out[str(loss_scale)] = {
        "single": run(tf.distribute.get_strategy(), loss_scale),
        "mirrored": run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                        loss_scale),
    }
print(json.dumps(out))
"""


@tensorflow_only("tf.distribute")
def test_mirrored_strategy_fit():
    """Two logical CPUs: mirrored shadows, identical on both replicas, equal
    to a single-device run with the same global batch."""
    out = last_json_line(run_python("-c", MIRRORED_SCRIPT, timeout=300))
    for runs in out.values():
        single, single_step = runs["single"]
        mirrored, mirrored_step = runs["mirrored"]
        assert single_step == mirrored_step == 8
        for replicas, (reference,) in zip(mirrored, single):
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0], replicas[1])
            np.testing.assert_allclose(replicas[0], reference, atol=1e-6)


@tensorflow_only("the fused XLA update of the TF backend")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_large_variables_fused_update(jit_compile):
    """Variables of FUSE_MIN_SIZE elements or more take the XLA-fused path
    outside XLA; the numbers are the reference's either way."""
    from keras_ema.backend.tensorflow import FUSE_MIN_SIZE

    width = int(np.sqrt(FUSE_MIN_SIZE))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((width,)), keras.layers.Dense(width), keras.layers.Dense(1)]
    )
    w0 = initial_weights(model)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(1e-3), decay=DECAY)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    record = RecordWeights()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, width)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[record])
    fused = optimizer.averager._updater.fused_pairs
    assert [v.shape for v, _ in fused] == [(width, width)]
    expected = reference_average(w0, record.weights, lambda s: DECAY)
    got = [optimizer.average(v).numpy() for v in model.trainable_variables]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_tensorboard_and_learning_rate_scheduler(tmp_path):
    """Callbacks that read or set the optimizer's learning rate and
    iterations work through the wrapper."""
    inner = keras.optimizers.SGD(0.1)
    model = make_model()
    model.compile(optimizer=keras_ema.EMAOptimizer(inner), loss="mse")
    history = model.fit(
        *make_data(),
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1)),
            keras.callbacks.TensorBoard(log_dir=str(tmp_path), update_freq="batch"),
        ],
    )
    assert float(inner.learning_rate.numpy()) == pytest.approx(0.05)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.05])
    assert any(files for _, _, files in os.walk(tmp_path))
