"""Everyday Keras workflows, run as a Keras user runs them, with keras_ema.

One test (or a parametrised family) per workflow: transfer learning,
`steps_per_execution`, `validation_freq`, class and sample weights,
`ModelCheckpoint` and `BackupAndRestore`, learning-rate schedules and
callbacks, gradient accumulation, multi-input/multi-output models, a custom
`train_step`, several `fit` calls in a row, saving mid-run, RNN/Embedding
models and mixed precision. Every number is checked against an independent
reference: the average computed in float64 numpy (`helpers.reference_average`)
from the weights recorded after every step, or a twin run without keras_ema,
or a clone holding the reference weights for validation metrics.
"""

import functools

import keras
import ml_dtypes
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
    predict_with,
    reference_average,
    tensorflow_only,
    values,
)

import keras_ema
from keras_ema.holder import WeightHolder

DECAY = 0.9
BATCH = 8
N_TRAIN = 32
STEPS = N_TRAIN // BATCH  # steps per epoch
TOL = 1e-6  # float32 shadows against the float64 reference


TRAIN = learnable_data()
VALIDATION = learnable_data(n=16, seed=2)


class RecordEpochLogs(keras.callbacks.Callback):
    """A copy of every epoch's logs (EMASwap runs first, so they are final)."""

    def __init__(self):
        super().__init__()
        self.logs = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs or {}))


class InterruptAfter(keras.callbacks.Callback):
    """Raises in the middle of training, after `steps` steps."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise RuntimeError("interrupted")


def fit(model, callbacks=(), epochs=1, validation=True, data=None, **kwargs):
    return fit_quietly(model, callbacks, epochs, validation, data, **kwargs)


def ema_optimizer(inner=None, decay=DECAY):
    return keras_ema.EMAOptimizer(
        keras.optimizers.SGD(0.05) if inner is None else inner, decay=decay
    )


def ema_model(seed=0, inner=None, **compile_kwargs):
    model = make_model(seed=seed)
    compile_kwargs.setdefault("loss", "mse")
    model.compile(optimizer=ema_optimizer(inner), **compile_kwargs)
    return model


def shadows(model):
    return values(keras_ema.holder.ema_optimizer_of(model).averager.shadows)


def averager_step(model):
    return int(keras_ema.holder.ema_optimizer_of(model).averager.step.numpy())


def score_with(build, weights, validation=VALIDATION, **compile_kwargs):
    """`evaluate` of a fresh model from `build()` holding `weights` (numpy):
    the metrics the reference weights really have, computed independently."""
    model = build()
    compile_kwargs.setdefault("loss", "mse")
    model.compile(optimizer="sgd", **compile_kwargs)
    for variable, value in zip(model.trainable_variables, weights):
        variable.assign(np.asarray(value, np.float64).astype(variable.dtype))
    x, y = validation
    return model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)


def clone_of(model):
    return lambda: keras.models.clone_model(model)


def assert_val_logs_match(logs, scores, prefix="val_", rel=1e-5):
    """Every `prefix*` log equals the independent score of the same name."""
    logged = {k[len(prefix) :]: v for k, v in logs.items() if k.startswith(prefix)}
    if prefix == "val_":
        logged = {k: v for k, v in logged.items() if not k.startswith("raw_")}
    assert logged and set(logged) == set(scores), (sorted(logged), sorted(scores))
    for name, value in logged.items():
        assert value == pytest.approx(scores[name], rel=rel), name


# --------------------------------------------------- 1. transfer learning


def transfer_model(seed=0):
    """A "pretrained" base and a new head, the base frozen."""
    keras.utils.set_random_seed(seed)
    base = keras.layers.Dense(8, activation="tanh", name="base")
    model = keras.Sequential(
        [keras.Input((6,)), base, keras.layers.Dense(1, name="head")], name="tl"
    )
    base.trainable = False
    return model, base


def test_transfer_learning_freeze_then_fine_tune_with_a_new_ema_optimizer():
    model, base = transfer_model()
    frozen = values(base.weights)
    head_start = values(model.trainable_variables)
    first_optimizer = ema_optimizer()
    model.compile(optimizer=first_optimizer, loss="mse")
    record = RecordWeights()
    history = fit(model, [record, keras_ema.EMASwap()], epochs=2)

    # Stage 1: only the head trains and is averaged; the base is untouched.
    assert len(first_optimizer.averager.shadows) == 2
    with pytest.raises(ValueError, match="not one of the 2 variables"):
        first_optimizer.average(base.kernel)
    assert_bit_equal(values(base.weights), frozen)
    head_average = reference_average(head_start, record.weights, DECAY)
    assert max_error(shadows(model), head_average) < TOL
    # EMASwap's default on_train_end="ema": the model holds the average.
    assert max_error(values(model.trainable_variables), head_average) < TOL

    # The clone keeps the base frozen (its trainable variables are the
    # head's) and starts from fresh random weights: give it the base's.
    def clone_with_base():
        clone = keras.models.clone_model(model)
        clone.get_layer("base").set_weights(frozen)
        return clone

    model_val = score_with(clone_with_base, head_average)["loss"]
    assert history.history["val_loss"][-1] == pytest.approx(model_val, rel=1e-5)

    # Stage 2, as the Keras transfer-learning guide does it: unfreeze and
    # recompile with a lower learning rate (here a new EMAOptimizer).
    base.trainable = True
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.01), decay=0.5),
        loss="mse",
    )
    first = RecordFirstBatch()
    tuned = RecordWeights()
    logs = RecordEpochLogs()
    fit(model, [first, tuned, logs, keras_ema.EMASwap(evaluate="both")])
    # It starts from the raw weights of stage 1 (the model held the average).
    assert_bit_equal(first.weights, frozen + record.weights[-1])
    assert len(model.optimizer.averager.shadows) == 4  # base and head
    expected = reference_average(first.weights, tuned.weights, 0.5)
    assert max_error(shadows(model), expected) < TOL
    assert (
        max_error([model.optimizer.average(base.kernel).numpy()], [expected[0]]) < TOL
    )
    assert max_error(tuned.weights[-1][:2], frozen) > 1e-5  # the base trained
    assert_val_logs_match(logs.logs[-1], score_with(clone_of(model), expected))
    assert_val_logs_match(
        logs.logs[-1],
        score_with(clone_of(model), tuned.weights[-1]),
        prefix="val_raw_",
    )


@tensorflow_only(
    "Keras's JAX trainer loses the model's variables when a fit fails (plain "
    "Keras too), so nothing is left intact to check"
)
@pytest.mark.parametrize("reuse", ["same_ema_optimizer", "new_wrapper_same_inner"])
def test_transfer_learning_recompile_reusing_the_optimizer_fails_like_keras(reuse):
    """Keras's own optimizers refuse variables they were not built on
    ("Unknown variable"). Recompiled after unfreezing with the same
    EMAOptimizer object, keras_ema fails the same way, with Keras's message;
    with a new EMAOptimizer around the same (built) wrapped optimizer, with
    a message naming the wrapped optimizer. Either way at the first step,
    leaving the model and the first average intact: a new optimizer then
    resumes cleanly from the raw weights."""
    model, base = transfer_model()
    frozen = values(base.weights)
    inner = keras.optimizers.SGD(0.05)
    optimizer = ema_optimizer(inner)
    model.compile(optimizer=optimizer, loss="mse")
    record = RecordWeights()
    fit(model, [record, keras_ema.EMASwap()])
    average = values(optimizer.averager.shadows)

    base.trainable = True
    again = optimizer if reuse == "same_ema_optimizer" else ema_optimizer(inner)
    model.compile(optimizer=again, loss="mse")
    message = (
        "Unknown variable.*new optimizer instance"
        if reuse == "same_ema_optimizer"
        else "wrapped SGD .* was built for other variables.*Wrap a new optimizer"
    )
    with pytest.raises(ValueError, match=message):
        fit(model, [keras_ema.EMASwap()])
    # Nothing moved: the failing trace ran no step, and the model holds the
    # raw weights (EMASwap put them back before the failing step).
    assert_bit_equal(values(optimizer.averager.shadows), average)
    assert int(optimizer.averager.step.numpy()) == STEPS
    assert_bit_equal(values(model.trainable_variables), frozen + record.weights[-1])

    # Plain Keras behaves the same.
    plain, plain_base = transfer_model()
    sgd = keras.optimizers.SGD(0.05)
    plain.compile(optimizer=sgd, loss="mse")
    fit(plain, validation=False)
    plain_base.trainable = True
    plain.compile(optimizer=sgd, loss="mse")
    with pytest.raises(ValueError, match="Unknown variable"):
        fit(plain, validation=False)

    # A new EMAOptimizer (around a new optimizer) resumes from the raw weights.
    model.compile(optimizer=ema_optimizer(), loss="mse")
    first = RecordFirstBatch()
    tuned = RecordWeights()
    fit(model, [first, tuned, keras_ema.EMASwap(on_train_end="raw")])
    assert_bit_equal(first.weights, frozen + record.weights[-1])
    expected = reference_average(first.weights, tuned.weights, DECAY)
    assert max_error(shadows(model), expected) < TOL


# ------------------------------------------------ 2. steps_per_execution


def test_steps_per_execution_averages_every_step_inside_an_execution():
    twin = ema_model()
    w0 = values(twin.trainable_variables)
    per_step = RecordWeights()
    fit(twin, [per_step], epochs=2, validation=False)

    model = ema_model(steps_per_execution=3)
    record = RecordWeights(model.optimizer)
    fit(model, [record], epochs=2, validation=False)
    # on_train_batch_end fires once per execution: 4 steps an epoch run as
    # executions of 3 and 1 steps, so the callback sees steps 3, 4, 7, 8.
    assert record.steps == [3, 4, 7, 8]
    for i, t in enumerate(record.steps):
        assert max_error(record.weights[i], per_step.weights[t - 1]) < TOL
        # The average moved at every step inside the execution, not once.
        expected = reference_average(w0, per_step.weights[:t], DECAY)
        assert max_error(record.shadows[i], expected) < TOL
    once_per_execution = reference_average(w0, record.weights, DECAY)
    assert max_error(record.shadows[-1], once_per_execution) > 1e-3


# ------------------------------------------------------ 3. validation_freq


@pytest.mark.parametrize("source", ["validation_data", "validation_split"])
def test_validation_freq_with_emaswap_evaluate_both(source):
    model = ema_model(metrics=["mae"])
    w0 = values(model.trainable_variables)
    record = RecordWeights()
    logs = RecordEpochLogs()
    if source == "validation_data":
        kwargs, validation, steps = {}, VALIDATION, STEPS
    else:  # Keras validates on the last quarter and trains on the rest
        kwargs = {"validation_split": 0.25}
        validation = (TRAIN[0][24:], TRAIN[1][24:])
        steps = 24 // BATCH
    history = fit(
        model,
        [record, logs, keras_ema.EMASwap(evaluate="both")],
        epochs=4,
        validation_freq=2,
        validation=source == "validation_data",
        **kwargs,
    )
    assert len(record.weights) == 4 * steps
    assert len(history.history["val_loss"]) == 2
    for epoch, epoch_logs in enumerate(logs.logs):
        validated = epoch in (1, 3)
        assert ("val_loss" in epoch_logs) == validated, epoch
        assert ("val_raw_loss" in epoch_logs) == validated, epoch
        assert epoch_logs["ema_decay"] == pytest.approx(DECAY)
        if not validated:
            continue
        done = record.weights[: (epoch + 1) * steps]
        average = reference_average(w0, done, DECAY)
        build = clone_of(model)
        scores = score_with(build, average, validation=validation, metrics=["mae"])
        assert_val_logs_match(epoch_logs, scores)
        raw = score_with(build, done[-1], validation=validation, metrics=["mae"])
        assert_val_logs_match(epoch_logs, raw, prefix="val_raw_")
    assert max_error(shadows(model), reference_average(w0, record.weights, DECAY)) < TOL


# --------------------------------------------- 4. class and sample weights


def classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ],
        name="classifier",
    )


@pytest.mark.parametrize("weighting", ["class_weight", "sample_weight"])
def test_class_and_sample_weights(weighting):
    rng = np.random.default_rng(3)
    x = TRAIN[0]
    labels = (np.digitize(x[:, 0], [-0.5, 0.5])).astype("int32")
    if weighting == "class_weight":
        kwargs = {"class_weight": {0: 0.2, 1: 1.0, 2: 3.0}}
    else:
        kwargs = {"sample_weight": rng.uniform(0.0, 2.0, N_TRAIN).astype("float32")}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def run(optimizer):
        model = classifier()
        model.compile(optimizer=optimizer, loss=loss)
        initial = values(model.trainable_variables)
        record = RecordWeights()
        fit(model, [record], epochs=2, validation=False, data=(x, labels), **kwargs)
        return model, initial, record.weights

    model, w0, trajectory = run(ema_optimizer())
    _, _, twin = run(keras.optimizers.SGD(0.05))
    for ours, theirs in zip(trajectory, twin):
        assert_bit_equal(ours, theirs)
    assert max_error(shadows(model), reference_average(w0, trajectory, DECAY)) < TOL


# ------------------------------- 5. ModelCheckpoint and BackupAndRestore


def test_model_checkpoint_save_best_only_saves_the_logged_average(tmp_path):
    model = ema_model()
    w0 = values(model.trainable_variables)
    record = RecordWeights()
    best_low = keras.callbacks.ModelCheckpoint(
        tmp_path / "low.keras", monitor="val_loss", save_best_only=True
    )
    # mode="max" on a falling loss keeps epoch 0: a file that is not the last.
    best_high = keras.callbacks.ModelCheckpoint(
        tmp_path / "high.keras", monitor="val_loss", mode="max", save_best_only=True
    )
    history = fit(model, [record, best_low, best_high, keras_ema.EMASwap()], epochs=3)
    val_loss = history.history["val_loss"]
    low, high = int(np.argmin(val_loss)), int(np.argmax(val_loss))
    assert (low, high) == (2, 0)
    x = VALIDATION[0]
    for name, epoch in (("low", low), ("high", high)):
        steps = (epoch + 1) * STEPS
        average = reference_average(w0, record.weights[:steps], DECAY)
        loaded = keras.models.load_model(tmp_path / f"{name}.keras")
        # The file holds the weights whose val_loss was logged: the average.
        assert max_error(values(loaded.trainable_variables), average) < TOL
        raw = record.weights[steps - 1]
        assert max_error(values(loaded.trainable_variables), raw) > 1e-4
        predicted = loaded.predict(x, verbose=0)
        assert max_error([predicted], [predict_with(model, average, x)]) < TOL
        score = loaded.evaluate(*VALIDATION, batch_size=BATCH, verbose=0)
        assert score == pytest.approx(val_loss[epoch], rel=1e-5)
        assert averager_step(loaded) == steps

    # Training the epoch-0 file further resumes from that epoch's raw
    # weights (kept in the file's optimizer state), the average continuing.
    loaded = keras.models.load_model(tmp_path / "high.keras")
    saved_average = shadows(loaded)
    first = RecordFirstBatch()
    more = RecordWeights()
    fit(loaded, [first, more, keras_ema.EMASwap(on_train_end="raw")])
    assert_bit_equal(first.weights, record.weights[STEPS - 1])
    expected = reference_average(saved_average, more.weights, DECAY)
    assert max_error(shadows(loaded), expected) < TOL


def adam_model(seed=0):
    return ema_model(seed=seed, inner=keras.optimizers.Adam(1e-2))


def state(model):
    """Raw weights, shadows, step and the wrapped Adam's variables."""
    optimizer = keras_ema.holder.ema_optimizer_of(model)
    return {
        "weights": values(model.trainable_variables),
        "shadows": values(optimizer.averager.shadows),
        "step": int(optimizer.averager.step.numpy()),
        "inner": values(optimizer.inner_optimizer.variables),
    }


@functools.cache
def uninterrupted_three_epochs():
    model = adam_model()
    fit(model, epochs=3, validation=False)
    return state(model)


def assert_same_state(a, b, tol=TOL):
    assert a["step"] == b["step"]
    for key in ("weights", "shadows", "inner"):
        assert len(a[key]) == len(b[key])
        assert max_error(a[key], b[key]) <= tol, key


@pytest.mark.parametrize("emaswap", [False, True], ids=["plain", "emaswap"])
@pytest.mark.parametrize("resume_in", ["same_model", "new_model"])
def test_backup_and_restore_after_an_interruption(tmp_path, emaswap, resume_in):
    """Interrupted in epoch 1 (after step 6), resumed with the same backup
    directory: Keras restores the epoch-0 backup and reruns epoch 1, and the
    run ends where an uninterrupted one does. With EMASwap the backups are
    written while the model holds the average (end of epoch)."""
    backup_dir = tmp_path / "backup"

    def swap():
        return [keras_ema.EMASwap(on_train_end="raw")] if emaswap else []

    validation = VALIDATION if emaswap else False
    model = adam_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(
            model,
            [keras.callbacks.BackupAndRestore(backup_dir), InterruptAfter(6), *swap()],
            epochs=3,
            validation=validation,
        )
    assert averager_step(model) == 6
    if resume_in == "new_model":
        model = adam_model()
    history = fit(
        model,
        [keras.callbacks.BackupAndRestore(backup_dir), *swap()],
        epochs=3,
        validation=validation,
    )
    assert history.epoch == [1, 2]
    assert_same_state(state(model), uninterrupted_three_epochs())


# ----------------------------------------------------- 6. learning rates


def lr_setup(kind):
    if kind == "exponential_decay":
        schedule = keras.optimizers.schedules.ExponentialDecay(
            0.1, decay_steps=2, decay_rate=0.5
        )
        return schedule, []
    if kind == "reduce_lr_on_plateau":
        # min_delta larger than any loss: no epoch after the first improves,
        # so the learning rate halves at the end of epochs 1 and 2.
        return 0.1, [
            keras.callbacks.ReduceLROnPlateau(
                monitor="loss", factor=0.5, patience=0, min_delta=10.0
            )
        ]
    return 0.1, [keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 * 0.5**epoch)]


@pytest.mark.parametrize(
    "kind", ["exponential_decay", "reduce_lr_on_plateau", "learning_rate_scheduler"]
)
def test_learning_rate_schedules_and_callbacks(kind):
    def run(wrap):
        learning_rate, callbacks = lr_setup(kind)
        model = make_model()
        inner = keras.optimizers.SGD(learning_rate)
        model.compile(optimizer=ema_optimizer(inner) if wrap else inner, loss="mse")
        initial = values(model.trainable_variables)
        record = RecordWeights()
        history = fit(model, [record, *callbacks], epochs=3, validation=False)
        return model, initial, record.weights, history.history

    model, w0, trajectory, history = run(wrap=True)
    twin, _, twin_trajectory, twin_history = run(wrap=False)
    assert len(trajectory) == len(twin_trajectory) == 3 * STEPS
    for ours, theirs in zip(trajectory, twin_trajectory):
        assert_bit_equal(ours, theirs)
    if kind == "exponential_decay":
        final = 0.1 * 0.5 ** (3 * STEPS / 2)
    else:
        final = 0.1 * 0.5**2
        assert history["learning_rate"] == pytest.approx(twin_history["learning_rate"])
    assert float(model.optimizer.learning_rate) == pytest.approx(final, rel=1e-6)
    assert float(twin.optimizer.learning_rate) == pytest.approx(final, rel=1e-6)
    assert max_error(shadows(model), reference_average(w0, trajectory, DECAY)) < TOL


# ------------------------------------------------- 7. gradient accumulation


def test_gradient_accumulation_moves_the_average_once_per_real_update():
    def inner():
        return keras.optimizers.SGD(0.05, gradient_accumulation_steps=2)

    model = ema_model(inner=inner())
    w0 = values(model.trainable_variables)
    record = RecordWeights(model.optimizer)
    fit(model, [record], epochs=2, validation=False)
    # Micro-batches 1, 3, 5, 7 accumulate; 2, 4, 6, 8 update.
    assert record.steps == [0, 1, 1, 2, 2, 3, 3, 4]
    previous = w0
    for i, weights in enumerate(record.weights):
        if i % 2 == 0:
            assert_bit_equal(weights, previous)  # accumulated only
        else:
            assert max_error(weights, previous) > 1e-6
        previous = weights
    updates = record.weights[1::2]
    for i, step in enumerate(record.steps):
        expected = reference_average(w0, updates[:step], DECAY)
        assert max_error(record.shadows[i], expected) < TOL
    # The raw trajectory is that of the same optimizer without keras_ema.
    twin = make_model()
    twin.compile(optimizer=inner(), loss="mse")
    twin_record = RecordWeights()
    fit(twin, [twin_record], epochs=2, validation=False)
    for ours, theirs in zip(record.weights, twin_record.weights):
        assert_bit_equal(ours, theirs)


# ------------------------------------ 8. multi-input / multi-output model


def two_headed_model(seed=0):
    keras.utils.set_random_seed(seed)
    a = keras.Input((6,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(h)
    outputs = {
        "reg": keras.layers.Dense(1, name="reg")(h),
        "cls": keras.layers.Dense(3, name="cls")(h),
    }
    return keras.Model({"a": a, "b": b}, outputs, name="two_headed")


def two_headed_data(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 6)).astype("float32")
    b = rng.normal(size=(n, 3)).astype("float32")
    y = {
        "reg": np.tanh(a[:, :1] - b[:, :1]).astype("float32"),
        "cls": np.digitize(a[:, 1] + b[:, 1], [-0.5, 0.5]).astype("int32"),
    }
    return {"a": a, "b": b}, y


def fit_validating_both(model, data, validation):
    """Two epochs with `EMASwap(evaluate="both")`; checks the average.

    Returns the initial weights, the RecordWeights and RecordEpochLogs of
    the fit, and the reference average.
    """
    w0 = values(model.trainable_variables)
    record = RecordWeights()
    logs = RecordEpochLogs()
    fit(
        model,
        [record, logs, keras_ema.EMASwap(evaluate="both")],
        epochs=2,
        data=data,
        validation=validation,
    )
    expected = reference_average(w0, record.weights, DECAY)
    assert max_error(shadows(model), expected) < TOL
    return w0, record, logs, expected


def test_multi_input_multi_output_functional_model():
    compile_kwargs = dict(
        loss={
            "reg": "mse",
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        },
        loss_weights={"reg": 1.0, "cls": 0.5},
        metrics={"cls": ["sparse_categorical_accuracy"], "reg": ["mae"]},
    )
    model = two_headed_model()
    model.compile(optimizer=ema_optimizer(), **compile_kwargs)
    validation = two_headed_data(16, seed=2)
    _, record, logs, expected = fit_validating_both(
        model, two_headed_data(N_TRAIN, seed=1), validation
    )
    # Each output's val_* are the average's; val_raw_* the raw weights'.
    last = logs.logs[-1]
    assert {"val_reg_loss", "val_cls_loss", "val_raw_cls_loss"} <= set(last)
    build = clone_of(model)
    scores = score_with(build, expected, validation=validation, **compile_kwargs)
    assert_val_logs_match(last, scores)
    raw = score_with(build, record.weights[-1], validation=validation, **compile_kwargs)
    assert_val_logs_match(last, raw, prefix="val_raw_")


# ----------------------------------------------- 9. custom train_step


class CustomStep(keras.Model):
    """A subclassed model with its own train_step, as in the Keras guide
    "Customizing what happens in fit()"."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


def custom_step_model(built):
    keras.utils.set_random_seed(0)
    model = CustomStep()
    if built:
        model(np.zeros((1, 6), "float32"))
    return model


@tensorflow_only(
    "a TF train_step with GradientTape (JAX's stateless train_step: test_jax.py)"
)
@pytest.mark.parametrize("built", [True, False], ids=["built", "built_by_fit"])
def test_custom_train_step_calling_optimizer_apply(built):
    initial = values(custom_step_model(built=True).trainable_variables)
    model = custom_step_model(built)
    model.compile(optimizer=ema_optimizer(), loss="mse")
    record = RecordWeights()
    logs = RecordEpochLogs()
    fit(model, [record, logs, keras_ema.EMASwap(evaluate="both", on_train_end="raw")])
    expected = reference_average(initial, record.weights, DECAY)
    assert max_error(shadows(model), expected) < TOL

    twin = custom_step_model(built)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    twin_record = RecordWeights()
    fit(twin, [twin_record], validation=False)
    for ours, theirs in zip(record.weights, twin_record.weights):
        assert_bit_equal(ours, theirs)

    def build():
        return custom_step_model(built=True)

    assert_val_logs_match(logs.logs[-1], score_with(build, expected))
    raw_scores = score_with(build, record.weights[-1])
    assert_val_logs_match(logs.logs[-1], raw_scores, prefix="val_raw_")


# ------------------------------------------------ 10. several fits in a row


def test_several_fits_in_a_row_mixing_emaswap_modes():
    model = ema_model()
    w0 = values(model.trainable_variables)
    trajectory = []
    plan = [
        ("emaswap", "ema"),
        ("plain", None),
        ("emaswap", "raw"),
        ("emaswap", "ema"),
        ("emaswap", "ema"),
        ("plain", None),
    ]
    for i, (kind, end) in enumerate(plan):
        first = RecordFirstBatch()
        record = RecordWeights()
        callbacks = [first, record]
        if kind == "emaswap":
            callbacks.append(keras_ema.EMASwap(evaluate="both", on_train_end=end))
        fit(model, callbacks, validation=kind == "emaswap")
        # Each fit starts from the raw weights where the last one stopped.
        assert_bit_equal(first.weights, trajectory[-1] if trajectory else w0)
        trajectory += record.weights
        # The average continues exactly across the fits.
        expected = reference_average(w0, trajectory, DECAY)
        assert averager_step(model) == len(trajectory) == (i + 1) * STEPS
        assert max_error(shadows(model), expected) < TOL
        held = values(model.trainable_variables)
        if end == "ema":
            assert_bit_equal(held, shadows(model))
            assert WeightHolder.of(model).holds_average
        else:
            assert_bit_equal(held, trajectory[-1])
            assert not WeightHolder.of(model).holds_average


# --------------------------------------------- 11. saving mid-run, continuing


@pytest.mark.parametrize("held", [False, True], ids=["raw", "held_average"])
@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_save_mid_run_and_continue(tmp_path, suffix, held):
    model = adam_model()
    fit(model, [keras_ema.EMASwap(on_train_end="ema" if held else "raw")])
    path = tmp_path / f"mid{suffix}"
    if suffix == ".keras":
        model.save(path)
        restored = keras.models.load_model(path)
    else:
        model.save_weights(path)
        restored = adam_model(seed=3)  # compiled the same way
        # Built, so that Keras restores Adam's moments too (see README).
        restored.optimizer.build(restored.trainable_variables)
        restored.load_weights(path)
    assert averager_step(restored) == STEPS
    callbacks = [keras_ema.EMASwap(on_train_end="raw")] if held else []
    fit(restored, callbacks, epochs=3, initial_epoch=1, validation=held)
    assert_same_state(state(restored), uninterrupted_three_epochs())


def test_plain_fit_on_a_loaded_held_average_resumes_from_the_raw_weights(tmp_path):
    """A file saved while the model held its average, loaded, then a plain
    fit: it starts from the file's raw weights, the average continuing."""
    model = adam_model()
    record = RecordWeights()
    fit(model, [record, keras_ema.EMASwap()])
    model.save(tmp_path / "held.keras")
    restored = keras.models.load_model(tmp_path / "held.keras")
    assert_bit_equal(values(restored.trainable_variables), shadows(model))
    first = RecordFirstBatch()
    fit(restored, [first], validation=False)
    assert_bit_equal(first.weights, record.weights[-1])
    assert averager_step(restored) == 2 * STEPS


# ------------------------------------------------ 12. LSTM and Embedding


def sequence_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 20, size=(n, 5)).astype("int32")
    lengths = rng.integers(2, 6, size=n)
    x[np.arange(5)[None, :] >= lengths[:, None]] = 0  # padded, masked
    y = (np.sum(np.where(x > 0, x - 10, 0), axis=1, keepdims=True) / 20).astype(
        "float32"
    )
    return x, y


def test_lstm_and_embedding_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 4, mask_zero=True, name="embed"),
            keras.layers.LSTM(6, name="lstm"),
            keras.layers.Dense(1, name="out"),
        ],
        name="sequence",
    )
    model.compile(optimizer=ema_optimizer(keras.optimizers.SGD(0.2)), loss="mse")
    validation = sequence_data(16, seed=2)
    w0, record, logs, expected = fit_validating_both(
        model, sequence_data(N_TRAIN, seed=1), validation
    )
    embedding = model.get_layer("embed").embeddings
    index = [v.path for v in model.trainable_variables].index(embedding.path)
    # The sparse (IndexedSlices) embedding update moved some rows only: the
    # padding row 0 never gets a gradient (masked inputs still look it up,
    # but the LSTM ignores their outputs), and its average stays put.
    assert max_error([expected[index][1:]], [w0[index][1:]]) > 1e-4
    assert all(w[index][0].tobytes() == w0[index][0].tobytes() for w in record.weights)
    assert shadows(model)[index][0].tobytes() == w0[index][0].tobytes()
    scores = score_with(clone_of(model), expected, validation=validation)
    assert_val_logs_match(logs.logs[-1], scores)
    raw = score_with(clone_of(model), record.weights[-1], validation=validation)
    assert_val_logs_match(logs.logs[-1], raw, prefix="val_raw_")


# --------------------------------------------------- 13. mixed precision


@pytest.fixture
def dtype_policy():
    previous = keras.mixed_precision.dtype_policy()
    yield keras.mixed_precision.set_dtype_policy
    keras.mixed_precision.set_dtype_policy(previous)


FLOAT16_EPS = float(np.finfo(np.float16).eps)  # 2**-10: float16 resolution at 1
BFLOAT16_EPS = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)  # 2**-7


def test_mixed_float16_policy(dtype_policy):
    dtype_policy("mixed_float16")
    model = make_model()
    optimizer = ema_optimizer()
    model.compile(optimizer=optimizer, loss="mse")
    # Keras wraps the EMAOptimizer in its LossScaleOptimizer.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is optimizer
    w0 = values(model.trainable_variables)
    # The second batch of each epoch has huge targets: its scaled gradients
    # overflow float16, and the loss scaler skips that step.
    x, y = TRAIN
    y = y.copy()
    y[BATCH : 2 * BATCH] = 1e4
    record = RecordWeights(optimizer)
    logs = RecordEpochLogs()
    fit(
        model,
        [record, logs, keras_ema.EMASwap(on_train_end="raw")],
        epochs=2,
        data=(x, y),
    )
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert all(s.dtype == "float32" for s in optimizer.averager.shadows)

    # Skipped steps leave the weights as they were and must not count.
    # Judge them from the weights, independently of keras_ema's counter.
    applied = []
    previous = w0
    for weights in record.weights:
        applied.append(max_error(weights, previous) > 0)
        previous = weights
    assert not applied[1] and not applied[STEPS + 1]  # the huge batches
    assert sum(applied) >= STEPS
    assert record.steps == list(np.cumsum(applied))
    updates = [w for w, a in zip(record.weights, applied) if a]
    expected = reference_average(w0, updates, DECAY)
    # Tolerance: the variables and shadows are float32 and the update is
    # computed in float32 from the stored weights (float16 is only the
    # forward/backward compute), so the shadows agree with the float64
    # reference to float32 rounding. We allow 1/1000 of float16's
    # resolution (2**-10 ~ 1e-3, i.e. ~1e-6 absolute at weights of order 1):
    # an average computed in float16 anywhere would miss it by ~1000x.
    assert max_error(optimizer.averager.shadows, expected) < FLOAT16_EPS / 1000

    # Validation is the average's: an independent float16 forward pass of
    # a clone holding the reference weights, within 10 float16 ulps
    # (relative), since float16 results may differ across CPUs and by one
    # rounding of the weights.
    scores = score_with(clone_of(model), expected)
    assert logs.logs[-1]["val_loss"] == pytest.approx(
        scores["loss"], rel=10 * FLOAT16_EPS
    )


def test_bfloat16_variables_get_float32_shadows():
    model = make_model(dtype="bfloat16")
    optimizer = ema_optimizer()
    model.compile(optimizer=optimizer, loss="mse")
    w0 = values(model.trainable_variables)
    record = RecordWeights()
    fit(model, [record], epochs=2, validation=False)
    assert all(v.dtype == "bfloat16" for v in model.trainable_variables)
    assert all(s.dtype == "float32" for s in optimizer.averager.shadows)
    # Stored bfloat16 weights are exact in float64; the reference averages
    # those. The float32 shadows agree to float32 rounding over 8 updates:
    # within 1/1000 of bfloat16's resolution (2**-7) relative to weights of
    # order 1, i.e. ~8e-6. A bfloat16 shadow would be off by up to half a
    # bfloat16 ulp, which the second check shows is far larger.
    expected = reference_average(w0, record.weights, DECAY)
    tolerance = BFLOAT16_EPS / 1000
    held = values(optimizer.averager.shadows)
    assert max_error(held, expected) < tolerance
    rounded = [np.asarray(e).astype(ml_dtypes.bfloat16) for e in expected]
    assert max_error(rounded, expected) > 10 * tolerance

    # Swapped in, the shadows are cast to bfloat16 (a copy, compared
    # exactly); the raw bfloat16 weights come back bit for bit.
    raw = values(model.trainable_variables)
    with keras_ema.ema_weights(model):
        inside = values(model.trainable_variables)
    assert_bit_equal(inside, [s.astype(ml_dtypes.bfloat16) for s in held])
    assert_bit_equal(values(model.trainable_variables), raw)
