"""Random sequences of user operations on one model, against a numpy model.

A Hypothesis `RuleBasedStateMachine` drives one tiny compiled model through
what Keras users do with it (fit with or without `EMASwap`, EarlyStopping
with `restore_best_weights`, evaluate/predict with `EMASwap`,
`ema_weights`, `set_weights`, `EMASwap.restore_raw_weights`,
`train_on_batch`, `model.save`/`save_weights`, `keras.models.load_model`,
`model.load_weights`) in any order, and after every operation checks what
the model holds against a float64 numpy reference of what it should hold:

- `raw`: the weights training continues from (bit-exact);
- `average`: the EMA of the weights after every training step, computed
  here from the weights recorded after each step, never read from the
  library;
- `holds`: whether the model holds `raw`, the `average`, or a `snapshot`
  (an earlier state of the average, kept by EarlyStopping);
- `step`: the number of training steps of the average;
- `refuses`: a model loaded from a file that held its average, not yet
  touched by any keras_ema function, refuses a plain `fit` or
  `train_on_batch` (RuntimeError mentioning EMASwap).

Bookkeeping bugs live in orders nobody thought of; this test looks for them.

By default it runs a few derandomized examples (reproducible in CI, well
under a minute). To search harder, set the number of examples, which also
makes Hypothesis random (and saves failures to its example database):

    KERAS_EMA_STATE_MACHINE_EXAMPLES=200 python -m pytest -q \
        tests/test_state_machine.py
"""

import copy
import os
import shutil
import tempfile

import keras
import numpy as np
import pytest
from helpers import make_model, max_error, predict_with, reference_average, values
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

import keras_ema

DECAY = 0.9
LEARNING_RATE = 0.05
BATCH = 8
N_TRAIN = 16
STEPS = N_TRAIN // BATCH  # training steps per epoch
AVERAGE_TOLERANCE = 1e-6  # float32 model values against float64 references

EXAMPLES_ENV = "KERAS_EMA_STATE_MACHINE_EXAMPLES"


def make_data(n, seed):
    """A learnable regression problem (so that validation loss falls)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    w = np.linspace(-1.0, 1.0, 6).reshape(6, 1)
    y = (np.tanh(x @ w) + 0.05 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


TRAIN = make_data(N_TRAIN, seed=1)
VALIDATION = make_data(8, seed=2)


class RecordWeights(keras.callbacks.Callback):
    """The trainable weights after every step."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(values(self.model.trainable_variables))


class RecordFirstBatch(keras.callbacks.Callback):
    """The trainable weights the first step of a fit starts from."""

    def __init__(self):
        super().__init__()
        self.weights = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.weights is None:
            self.weights = values(self.model.trainable_variables)


def ema_model():
    model = make_model(seed=0)
    model.compile(
        optimizer=keras_ema.EMAOptimizer(
            keras.optimizers.SGD(LEARNING_RATE), decay=DECAY
        ),
        loss="mse",
    )
    return model


def forward(weights, x):
    """The model's output in float64 numpy: Dense(8, tanh) -> Dense(1)."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    return np.tanh(np.asarray(x, np.float64) @ w1 + b1) @ w2 + b2


def mse(weights, data):
    x, y = data
    return float(np.mean((forward(weights, x) - y) ** 2))


def sgd_step(weights, x, y):
    """One SGD step on the mean squared error, in float64 numpy."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    x = np.asarray(x, np.float64)
    h = np.tanh(x @ w1 + b1)
    dp = 2.0 * (h @ w2 + b2 - y) / len(x)
    dz = (dp @ w2.T) * (1.0 - h**2)
    grads = [x.T @ dz, dz.sum(0), h.T @ dp, dp.sum(0)]
    return [w - LEARNING_RATE * g for w, g in zip((w1, b1, w2, b2), grads)]


def assert_bit_equal(a, b, what):
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, what
        assert x.tobytes() == y.tobytes(), (
            f"{what}: differs by {max_error([x], [y]):.3g}"
        )


def assert_close(a, b, what, tolerance=AVERAGE_TOLERANCE):
    assert len(a) == len(b), what
    error = max_error(a, b)
    assert error < tolerance, f"{what}: differs by {error:.3g}"


class Reference:
    """What the model should hold, in numpy (see the module docstring)."""

    def __init__(self, raw):
        self.raw = [np.array(w, copy=True) for w in raw]
        self.average = None  # float64 shadows; None before the first step
        self.step = 0
        self.holds = "raw"
        self.snapshot = None
        self.refuses = False  # a plain fit raises (loaded while holding)
        self.touched = False  # a keras_ema function has seen this model

    def advance(self, start, trajectory):
        """The average over `trajectory`, started from `start` if new."""
        initial = start if self.step == 0 else self.average
        self.average = reference_average(initial, trajectory, DECAY)
        self.step += len(trajectory)

    def served(self):
        """What EMASwap and ema_weights serve as the average."""
        return self.snapshot if self.holds == "snapshot" else self.average

    def held(self):
        return {"raw": self.raw, "average": self.average}.get(
            self.holds, self.snapshot
        )

    def touch(self):
        self.touched = True
        self.refuses = False

    def copy(self):
        return copy.deepcopy(self)


class EMAStateMachine(RuleBasedStateMachine):
    keras_files = Bundle("keras_files")
    weights_files = Bundle("weights_files")

    def __init__(self):
        super().__init__()
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        self.directory = tempfile.mkdtemp(prefix="keras_ema_state_machine_")
        self.saved = {}  # file name -> (reference, weights, shadows) at save
        self.model = ema_model()
        self.ref = Reference(values(self.model.trainable_variables))

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)
        keras.backend.clear_session()

    # ----------------------------------------------------------- helpers

    def _fit(self, callbacks, epochs=1):
        x, y = TRAIN
        return self.model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=epochs,
            verbose=0,
            shuffle=False,
            validation_data=VALIDATION,
            callbacks=callbacks,
        )

    def _state(self):
        optimizer = self.model.optimizer
        averager = optimizer.averager
        if not (optimizer.built and averager.built):
            return values(self.model.weights), None, None
        return (
            values(self.model.weights),
            values(averager.shadows),
            int(averager.step.numpy()),
        )

    def _assert_refused(self, train):
        before = self._state()
        with pytest.raises(RuntimeError, match="EMASwap"):
            train()
        after = self._state()
        assert_bit_equal(after[0], before[0], "weights after a refused fit")
        if before[1] is not None:
            assert_bit_equal(after[1], before[1], "shadows after a refused fit")
        assert after[2] == before[2]

    def _check_validation(self, history, trajectory, served_at_epoch_end):
        """Each epoch's val_loss is that of what the model held then."""
        for epoch, loss in enumerate(history.history["val_loss"]):
            weights = served_at_epoch_end(trajectory[: (epoch + 1) * STEPS])
            assert loss == pytest.approx(mse(weights, VALIDATION), rel=1e-5), (
                f"val_loss of epoch {epoch}"
            )

    def _average_after(self, start, prefix):
        """The reference average after the first steps `prefix` of a fit."""
        probe = self.ref.copy()
        probe.advance(start, prefix)
        return probe.average

    # ------------------------------------------------------------- rules

    @rule(swap=st.sampled_from([None, "ema", "raw"]))
    def fit(self, swap):
        """Rule 1 (and the refusal of rule 7): one epoch."""
        if swap is None and self.ref.refuses:
            self._assert_refused(lambda: self._fit([]))
            return
        first, record = RecordFirstBatch(), RecordWeights()
        callbacks = [first, record]
        if swap is not None:
            callbacks.append(keras_ema.EMASwap(on_train_end=swap))
            self.ref.touch()
        history = self._fit(callbacks)
        assert len(record.weights) == STEPS
        assert_bit_equal(first.weights, self.ref.raw, "fit starts from")
        start = self.ref.raw
        if swap is None:
            self._check_validation(history, record.weights, lambda t: t[-1])
        else:
            self._check_validation(
                history, record.weights, lambda t: self._average_after(start, t)
            )
        self.ref.advance(start, record.weights)
        self.ref.raw = record.weights[-1]
        self.ref.holds = "average" if swap == "ema" else "raw"
        self.ref.snapshot = None

    @rule(epochs=st.sampled_from([2, 3]), mode=st.sampled_from(["min", "max"]))
    def fit_with_early_stopping(self, epochs, mode):
        """Rule 6: EarlyStopping keeps the best epoch's average."""
        first, record = RecordFirstBatch(), RecordWeights()
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=1, restore_best_weights=True, mode=mode
        )
        self.ref.touch()
        history = self._fit([first, record, keras_ema.EMASwap(), stop], epochs)
        trained = len(history.epoch)
        assert len(record.weights) == trained * STEPS
        assert_bit_equal(first.weights, self.ref.raw, "fit starts from")
        start = self.ref.raw
        self._check_validation(
            history, record.weights, lambda t: self._average_after(start, t)
        )
        best = record.weights[: (stop.best_epoch + 1) * STEPS]
        self.ref.snapshot = self._average_after(start, best)
        self.ref.advance(start, record.weights)
        self.ref.raw = record.weights[-1]
        self.ref.holds = "snapshot"

    @rule()
    def train_on_batch(self):
        """Rule 9: a plain one-step fit."""
        x, y = TRAIN[0][:BATCH], TRAIN[1][:BATCH]
        if self.ref.refuses:
            self._assert_refused(lambda: self.model.train_on_batch(x, y))
            return
        self.model.train_on_batch(x, y)
        after = values(self.model.trainable_variables)
        # It started from the raw weights: one SGD step from them.
        assert_close(after, sgd_step(self.ref.raw, x, y), "train_on_batch", 1e-5)
        self.ref.advance(self.ref.raw, [after])
        self.ref.raw = after
        self.ref.holds = "raw"
        self.ref.snapshot = None

    @precondition(lambda self: self.ref.step > 0)
    @rule()
    def predict_with_emaswap(self):
        """Rule 2: predictions of the average; the model unchanged."""
        before = values(self.model.weights)
        self.ref.touch()
        x = VALIDATION[0]
        predicted = self.model.predict(
            x, batch_size=BATCH, verbose=0, callbacks=[keras_ema.EMASwap()]
        )
        expected = predict_with(self.model, self.ref.served(), x)
        assert_close([predicted], [expected], "predict with EMASwap", 1e-5)
        assert_bit_equal(values(self.model.weights), before, "after predict")

    @precondition(lambda self: self.ref.step > 0)
    @rule()
    def evaluate_with_emaswap(self):
        """Rule 2: the loss of the average; the model unchanged."""
        before = values(self.model.weights)
        self.ref.touch()
        loss = self.model.evaluate(
            *VALIDATION, batch_size=BATCH, verbose=0, callbacks=[keras_ema.EMASwap()]
        )
        expected = mse(self.ref.served(), VALIDATION)
        assert loss == pytest.approx(expected, rel=1e-5), "evaluate with EMASwap"
        assert_bit_equal(values(self.model.weights), before, "after evaluate")

    @precondition(lambda self: self.ref.step > 0)
    @rule()
    def ema_weights(self):
        """Rule 3: the average inside the block; the model unchanged after."""
        before = values(self.model.weights)
        self.ref.touch()
        with keras_ema.ema_weights(self.model):
            inside = values(self.model.trainable_variables)
        assert_close(inside, self.ref.served(), "inside ema_weights")
        assert_bit_equal(values(self.model.weights), before, "after ema_weights")

    @rule(seed=st.integers(0, 2**16))
    def set_weights(self, seed):
        """Rule 4: the user's weights win (the refusal stays)."""
        rng = np.random.default_rng(seed)
        weights = [
            (0.5 * rng.normal(size=v.shape)).astype(v.dtype)
            for v in self.model.weights
        ]
        self.model.set_weights(weights)
        self.ref.raw = weights
        self.ref.holds = "raw"
        self.ref.snapshot = None

    @rule()
    def restore_raw_weights(self):
        """Rule 5."""
        self.ref.touch()
        keras_ema.EMASwap.restore_raw_weights(self.model)
        self.ref.holds = "raw"
        self.ref.snapshot = None

    def _save(self, suffix, save):
        name = f"file{len(self.saved)}{suffix}"
        save(os.path.join(self.directory, name))
        weights, shadows, _ = self._state()
        self.saved[name] = (self.ref.copy(), weights, shadows)
        return name

    @rule(target=keras_files)
    def save_model(self):
        return self._save(".keras", self.model.save)

    @rule(target=weights_files)
    def save_weights(self):
        return self._save(".weights.h5", self.model.save_weights)

    def _loaded(self, name):
        """The state of file `name`, checked bit for bit, as reference."""
        reference, weights, shadows = self.saved[name]
        assert_bit_equal(values(self.model.weights), weights, f"loaded {name}")
        _, loaded_shadows, step = self._state()
        if shadows is not None and loaded_shadows is not None:
            assert_bit_equal(loaded_shadows, shadows, f"average loaded from {name}")
            assert step == reference.step
        state = reference.copy()
        state.touched = self.ref.touched
        state.refuses = not state.touched and state.holds != "raw"
        return state

    @rule(name=keras_files)
    def load_model(self, name):
        """Rule 7: a new model object, holding what the saved one held."""
        self.model = keras.models.load_model(os.path.join(self.directory, name))
        self.ref.touched = False
        self.ref = self._loaded(name)

    @rule(target=keras_files)
    def save_and_load_model(self):
        """Rule 7 in one step (the common case, so that it comes often)."""
        name = self.save_model()
        self.load_model(name)
        return name

    @rule(name=st.one_of(keras_files, weights_files))
    def load_weights(self, name):
        """Rule 8: the same model object takes the file's state."""
        self.model.load_weights(os.path.join(self.directory, name))
        self.ref = self._loaded(name)

    # -------------------------------------------------------- invariants

    @invariant()
    def holds_what_the_reference_says(self):
        weights = values(self.model.trainable_variables)
        if self.ref.holds == "raw":
            assert_bit_equal(weights, self.ref.raw, "the raw weights")
        else:
            assert_close(weights, self.ref.held(), f"the held {self.ref.holds}")

    @invariant()
    def the_average_is_the_reference_average(self):
        _, shadows, step = self._state()
        if shadows is None or self.ref.step == 0:
            return  # not built yet (a loaded model), or no average yet
        assert step == self.ref.step
        assert_close(shadows, self.ref.average, "the average")


_EXAMPLES = os.environ.get(EXAMPLES_ENV)
EMAStateMachine.TestCase.settings = settings(
    max_examples=int(_EXAMPLES or "8"),
    stateful_step_count=8,
    deadline=None,
    derandomize=_EXAMPLES is None,
    database=None if _EXAMPLES is None else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEMAStateMachine = EMAStateMachine.TestCase
