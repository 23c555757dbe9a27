"""What only the JAX backend has: the stateless train step, jax.jit custom
loops, and keras.distribution meshes (4 virtual CPU devices, set by
conftest.py), each checked against a numpy reference."""

import keras
import numpy as np
import pytest
from helpers import (
    RecordWeights,
    fit_quietly,
    make_data,
    make_model,
    max_error,
    reference_average,
    values,
)

import keras_ema

pytestmark = pytest.mark.backend(
    "jax", reason="Keras's stateless JAX train step, jax.jit and jax shardings"
)

DECAY = 0.9
# Float32 arithmetic in a different order than the float64 reference: a few
# float32 resolutions (1.2e-7) of the weights' magnitude (~1).
TOLERANCE = 2e-6


def test_average_is_carried_through_the_stateless_step():
    model = make_model()
    w0 = values(model.trainable_variables)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    model.compile(optimizer=optimizer, loss="mse")
    record = RecordWeights()
    x, y = make_data()
    model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[record]
    )
    # The shadows and the step are optimizer variables: Keras's jitted step
    # took them in and gave them back, nothing wrote them from Python.
    ids = {id(v) for v in optimizer.variables}
    assert all(id(s) in ids for s in optimizer.averager.shadows)
    assert id(optimizer.averager.step) in ids
    assert int(optimizer.averager.step.numpy()) == 16
    expected = reference_average(w0, record.weights, DECAY)
    assert max_error(values(optimizer.averager.shadows), expected) < TOLERANCE


def test_stateless_apply_in_a_jitted_step():
    import jax

    model = make_model()
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1), decay=DECAY)
    optimizer.build(model.trainable_variables)
    weights = [v.value for v in model.trainable_variables]
    state = [v.value for v in optimizer.variables]
    grads = [np.full(w.shape, 0.5, "float32") for w in weights]
    step = jax.jit(optimizer.stateless_apply)
    trajectory = []
    for _ in range(3):
        weights, state = step(state, grads, weights)
        trajectory.append([np.asarray(w) for w in weights])
    expected = reference_average(values(model.trainable_variables), trajectory, DECAY)
    by_id = dict(zip([id(v) for v in optimizer.variables], state))
    got = [np.asarray(by_id[id(s)]) for s in optimizer.averager.shadows]
    assert max_error(got, expected) < TOLERANCE
    assert int(by_id[id(optimizer.averager.step)]) == 3


@pytest.mark.parametrize(
    "update_every,start_step,init", [(3, 0, "weights"), (2, 3, "first_step")]
)
def test_stateless_functions_in_jax_jit(update_every, start_step, init):
    import jax

    rng = np.random.default_rng(0)
    weights = [
        rng.normal(size=(3, 2)).astype("float32"),
        rng.normal(size=4).astype("bfloat16"),
    ]
    shadows = keras_ema.stateless.init_shadows(weights)
    assert [str(s.dtype) for s in shadows] == ["float32", "float32"]
    schedule = keras_ema.schedules.PowerFunction(gamma=3.0)

    @jax.jit
    def train_step(weights, shadows, step):
        weights = [w - 0.1 * (w + 1.0) for w in weights]
        step = step + 1
        shadows = keras_ema.stateless.update_shadows(
            shadows, weights, step, schedule, update_every, start_step, init
        )
        return weights, shadows, step

    trajectory, step = [], np.int32(0)
    initial = [np.asarray(w, np.float64) for w in weights]
    weights = [jax.numpy.asarray(w) for w in weights]
    for _ in range(9):
        weights, shadows, step = train_step(weights, shadows, step)
        trajectory.append([np.asarray(w, np.float64) for w in weights])
    expected = reference_average(
        initial,
        trajectory,
        lambda s: (1.0 - 1.0 / s) ** 4.0,
        update_every,
        start_step,
        init,
    )
    assert max_error([np.asarray(s) for s in shadows], expected) < TOLERANCE


def test_stateless_functions_bad_inputs():
    shadows = keras_ema.stateless.init_shadows([np.zeros(2, "float32")])
    with pytest.raises(ValueError, match="shadow_dtype"):
        keras_ema.stateless.init_shadows([np.zeros(2)], shadow_dtype="float16")
    with pytest.raises(TypeError, match="weights"):
        keras_ema.stateless.init_shadows([np.zeros(2, "int32")])
    with pytest.raises(TypeError, match="weights"):
        keras_ema.stateless.init_shadows("w")
    with pytest.raises(ValueError, match="aligned"):
        keras_ema.stateless.update_shadows(shadows, [np.zeros(3, "float32")], 1)
    with pytest.raises(ValueError, match="step"):
        keras_ema.stateless.update_shadows(shadows, [np.zeros(2, "float32")], 0)
    with pytest.raises(TypeError, match="step"):
        keras_ema.stateless.update_shadows(shadows, [np.zeros(2, "float32")], 1.5)
    with pytest.raises(ValueError, match="decay"):
        keras_ema.stateless.update_shadows(shadows, shadows, 1, decay=1.5)
    with pytest.raises(ValueError, match="init"):
        keras_ema.stateless.update_shadows(shadows, shadows, 1, init="zeros")
    with pytest.raises(ValueError, match="update_every"):
        keras_ema.stateless.update_shadows(shadows, shadows, 1, update_every=0)


def test_exponential_moving_average_eagerly():
    model = make_model()
    optimizer = keras.optimizers.SGD(0.1)
    ema = keras_ema.ExponentialMovingAverage(decay=DECAY, update_every=2)
    trajectory = []
    for _ in range(5):
        grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
        optimizer.apply(grads, model.trainable_variables)
        ema.apply(model.trainable_variables)
        trajectory.append(values(model.trainable_variables))
    expected = reference_average(
        trajectory[0], trajectory, DECAY, update_every=2
    )  # built at the first call, which copies the weights it is given
    assert max_error(values(ema.shadows), expected) < TOLERANCE
    raw = values(model.trainable_variables)
    with ema.swapped():
        assert max_error(values(model.trainable_variables), expected) < TOLERANCE
    assert max_error(values(model.trainable_variables), raw) == 0


def _mesh_distribution(kind):
    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 4:
        pytest.fail(
            "4 virtual CPU devices expected (conftest.py sets XLA_FLAGS="
            f"--xla_force_host_platform_device_count=4); found {len(devices)}."
        )
    if kind == "data":
        return keras.distribution.DataParallel(devices=devices[:4])
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices[:4])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    layout_map[".*out/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


@pytest.mark.parametrize("kind", ["data", "model"])
def test_keras_distribution_shards_each_shadow_like_its_weight(kind):
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(_mesh_distribution(kind))
    try:
        model = make_model()
        w0 = values(model.trainable_variables)
        optimizer = keras_ema.EMAOptimizer(
            keras.optimizers.Adam(1e-2), decay=DECAY, update_every=2
        )
        model.compile(optimizer=optimizer, loss="mse")
        record = RecordWeights()
        x, y = make_data()
        model.fit(
            x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[record]
        )
        for weight in model.trainable_variables:
            shadow = optimizer.average(weight)
            assert shadow.value.sharding == weight.value.sharding, weight.path
        if kind == "model":
            kernel = model.get_layer("hidden").kernel
            assert len(kernel.value.sharding.device_set) == 4
            assert not kernel.value.sharding.is_fully_replicated
        expected = reference_average(w0, record.weights, DECAY, update_every=2)
        assert max_error(values(optimizer.averager.shadows), expected) < TOLERANCE
        # Swapping in and out keeps the sharding and the raw bits.
        raw = values(model.trainable_variables)
        with keras_ema.ema_weights(model):
            assert max_error(values(model.trainable_variables), expected) < TOLERANCE
        assert max_error(values(model.trainable_variables), raw) == 0
        for weight in model.trainable_variables:
            assert optimizer.average(weight).value.sharding == weight.value.sharding
    finally:
        keras.distribution.set_distribution(previous)


def test_bfloat16_weights_keep_float32_shadows():
    model = make_model(dtype="bfloat16")
    w0 = values(model.trainable_variables)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05), decay=DECAY)
    model.compile(optimizer=optimizer, loss="mse")
    record = RecordWeights()
    fit_quietly(model, callbacks=[record], validation=False)
    assert {str(s.dtype) for s in optimizer.averager.shadows} == {"float32"}
    expected = reference_average(w0, record.weights, DECAY)
    assert max_error(values(optimizer.averager.shadows), expected) < TOLERANCE


def test_schedules_in_float32_inside_jax_jit():
    """Without jax_enable_x64 schedules compute in float32 (Keras's own
    use_ema does too); inside jax.jit they match the float64 reference to a
    few float32 resolutions."""
    import jax
    from test_schedules import CASES, ref_decay_over

    steps = np.array([1, 2, 3, 10, 200, 12345], np.int32)
    for name, make, ref in CASES:
        schedule = make()
        per_step = jax.jit(lambda s, schedule=schedule: schedule(s))(steps)
        over = jax.jit(lambda s, schedule=schedule: schedule.decay_over(s, 3))(
            steps[2:]
        )
        assert per_step.dtype == np.float32 and over.dtype == np.float32
        # 1e-6: float32 arithmetic (eps 1.2e-7) over a handful of operations.
        np.testing.assert_allclose(per_step, ref(steps), rtol=1e-6, atol=1e-7)
        expected = [ref_decay_over(ref, int(s), 3) for s in steps[2:]]
        np.testing.assert_allclose(over, expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_float64_without_x64_is_a_clear_error():
    with pytest.raises(ValueError, match="jax_enable_x64"):
        keras_ema.schedules.Constant(0.9)(3, dtype="float64")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        keras_ema.EMAOptimizer(keras.optimizers.SGD(), shadow_dtype="float64")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        keras_ema.stateless.init_shadows([np.ones(2, "float32")], "float64")


def test_non_trainable_average_outside_keras_train_step_says_what_to_do():
    """Keras's train step updates the average of the non-trainable variables
    after the optimizer's; a step of one's own cannot, and is told so."""
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.BatchNormalization(), keras.layers.Dense(1)]
    )
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.SGD(0.05), decay=DECAY, non_trainable="average"
    )
    optimizer.build(model.trainable_variables)
    optimizer.track_non_trainable(model.non_trainable_variables)
    grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="train_on_batch.*batchnorm_data"):
        optimizer.apply(grads, model.trainable_variables)
    assert int(optimizer.averager.step.numpy()) == 0


class StatelessStep(keras.Sequential):
    """A custom `train_step` as Keras's JAX guide writes it: pure, with
    `optimizer.stateless_apply`."""

    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_state, metrics_state = state
        x, y = data

        def loss_fn(trainable):
            y_pred, updated = self.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return keras.ops.mean(keras.ops.square(y_pred - y)), updated

        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable
        )
        trainable, optimizer_state = self.optimizer.stateless_apply(
            optimizer_state, grads, trainable
        )
        return {"loss": loss}, (
            trainable,
            non_trainable,
            optimizer_state,
            metrics_state,
        )


def test_custom_stateless_train_step_carries_the_average():
    keras.utils.set_random_seed(0)
    model = StatelessStep(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    w0 = values(model.trainable_variables)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05), decay=DECAY)
    model.compile(optimizer=optimizer, loss="mse")
    record = RecordWeights()
    x, y = make_data()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[record, keras_ema.EMASwap(on_train_end="raw")],
    )
    expected = reference_average(w0, record.weights, DECAY)
    assert max_error(values(optimizer.averager.shadows), expected) < TOLERANCE
    assert max_error(values(model.trainable_variables), record.weights[-1]) == 0


def test_export_without_tensorflow_says_what_to_do(tmp_path, monkeypatch):
    """Without TensorFlow there is no SavedModel; the error says so, and
    the averaged `.keras` file still works."""
    import sys

    model = make_model()
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05), decay=DECAY),
        loss="mse",
    )
    fit_quietly(model, validation=False)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails
    with pytest.raises(ImportError, match="needs TensorFlow.*model.keras"):
        keras_ema.export_saved_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with keras_ema.ema_weights(model):
        average = values(model.trainable_variables)
        model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert max_error(values(loaded.trainable_variables), average) == 0
