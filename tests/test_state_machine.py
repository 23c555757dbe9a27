"""Random sequences of user operations on one model, against a numpy model.

A Hypothesis `RuleBasedStateMachine` drives one tiny compiled model through
what Keras users do with it (fit with or without `EMASwap`, EarlyStopping
with `restore_best_weights`, evaluate/predict with `EMASwap`,
`ema_weights`, `set_weights`, `EMASwap.restore_raw_weights`,
`train_on_batch`, `model.save`/`save_weights`, `keras.models.load_model`,
`model.load_weights`) in any order, and after every operation checks what
the model holds against a float64 numpy reference of what it should hold:

- `raw`: the weights training continues from (bit-exact). Every training,
  plain `fit` and `train_on_batch` included, starts from them, whatever the
  model held (README, "Saving, resuming and exporting");
- `average`: the EMA of the weights after every training step, computed
  here from the weights recorded after each step, never read from the
  library;
- `holds`: whether the model holds `raw`, the `average`, or a `snapshot`
  (an earlier state of the average, kept by EarlyStopping);
- `step`: the number of training steps of the average.

Bookkeeping bugs live in orders nobody thought of; this test looks for them.
The sequences that found bugs so far are replayed by
`test_sequences_that_found_bugs`.

By default it runs a few derandomized examples (reproducible in CI, well
under a minute). To search harder, set the number of examples, which also
makes Hypothesis random (and saves failures to its example database):

    KERAS_EMA_STATE_MACHINE_EXAMPLES=200 python -m pytest -q \
        tests/test_state_machine.py

and to try sequences longer than 8 operations, KERAS_EMA_STATE_MACHINE_STEPS
(e.g. 16).
"""

import copy
import os
import shutil
import tempfile

import keras
import numpy as np
import pytest
from helpers import (
    RecordFirstBatch,
    RecordWeights,
    assert_bit_equal,
    learnable_data,
    make_model,
    max_error,
    predict_with,
    reference_average,
    values,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
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
STEPS_ENV = "KERAS_EMA_STATE_MACHINE_STEPS"  # the longest sequence tried

TRAIN = learnable_data(N_TRAIN, seed=1)
VALIDATION = learnable_data(8, seed=2)


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

    def advance(self, start, trajectory):
        """The average over `trajectory`; a new one starts from `start`."""
        initial = start if self.step == 0 else self.average
        self.average = reference_average(initial, trajectory, DECAY)
        self.step += len(trajectory)

    def trained(self, trajectory, holds="raw", snapshot=None):
        """After training from `raw` through `trajectory`."""
        self.advance(self.raw, trajectory)
        self.raw = trajectory[-1]
        self.holds = holds
        self.snapshot = snapshot

    def served(self):
        """What EMASwap and ema_weights serve as the average."""
        return self.snapshot if self.holds == "snapshot" else self.average

    def held(self):
        return {"raw": self.raw, "average": self.average}.get(self.holds, self.snapshot)

    def copy(self):
        return copy.deepcopy(self)


class EMAStateMachine(RuleBasedStateMachine):
    files = Bundle("files")  # saved as both .keras and .weights.h5

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
        """`(weights, shadows, step)`; no average before it is built."""
        optimizer = self.model.optimizer
        averager = optimizer.averager
        if not (optimizer.built and averager.built):
            return values(self.model.weights), None, None
        return (
            values(self.model.weights),
            values(averager.shadows),
            int(averager.step.numpy()),
        )

    def _check_validation(self, history, trajectory, held_at_epoch_end):
        """Each epoch's val_loss is that of what the model held then."""
        for epoch, loss in enumerate(history.history["val_loss"]):
            weights = held_at_epoch_end(trajectory[: (epoch + 1) * STEPS])
            assert loss == pytest.approx(mse(weights, VALIDATION), rel=1e-5), (
                f"val_loss of epoch {epoch}"
            )

    def _average_after(self, prefix):
        """The reference average after the first steps `prefix` of a fit."""
        probe = self.ref.copy()
        probe.advance(probe.raw, prefix)
        return probe.average

    def _fit_from_raw(self, callbacks, epochs=1):
        """Fits; checks it started from the raw weights; the trajectory."""
        first, record = RecordFirstBatch(), RecordWeights()
        history = self._fit([first, record, *callbacks], epochs)
        assert len(record.weights) == len(history.epoch) * STEPS
        assert_bit_equal(first.weights, self.ref.raw, "fit starts from")
        return history, record.weights

    # ------------------------------------------------------------- rules

    @rule()
    def fit(self):
        """Rule 1 without EMASwap: one epoch, from the raw weights."""
        history, trajectory = self._fit_from_raw([])
        self._check_validation(history, trajectory, lambda t: t[-1])
        self.ref.trained(trajectory)

    @rule(on_train_end=st.sampled_from(["ema", "raw"]))
    def fit_with_emaswap(self, on_train_end):
        """Rule 1 with EMASwap: one epoch; validation scores the average."""
        swap = keras_ema.EMASwap(on_train_end=on_train_end)
        history, trajectory = self._fit_from_raw([swap])
        self._check_validation(history, trajectory, self._average_after)
        self.ref.trained(trajectory, "average" if on_train_end == "ema" else "raw")

    @rule(epochs=st.sampled_from([2, 3]), mode=st.sampled_from(["min", "max"]))
    def fit_with_early_stopping(self, epochs, mode):
        """Rule 6: EarlyStopping keeps the best epoch's average."""
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=1, restore_best_weights=True, mode=mode
        )
        history, trajectory = self._fit_from_raw([keras_ema.EMASwap(), stop], epochs)
        self._check_validation(history, trajectory, self._average_after)
        best = self._average_after(trajectory[: (stop.best_epoch + 1) * STEPS])
        self.ref.trained(trajectory, "snapshot", best)

    @rule()
    def train_on_batch(self):
        """Rule 9: a plain one-step fit, from the raw weights."""
        x, y = TRAIN[0][:BATCH], TRAIN[1][:BATCH]
        self.model.train_on_batch(x, y)
        after = values(self.model.trainable_variables)
        # No callbacks here: it started from the raw weights if it took one
        # SGD step from them.
        assert_close(after, sgd_step(self.ref.raw, x, y), "train_on_batch", 1e-5)
        self.ref.trained([after])

    @precondition(lambda self: self.ref.step > 0)
    @rule(how=st.sampled_from(["predict", "evaluate", "ema_weights"]))
    def use_the_average(self, how):
        """Rules 2 and 3: the average served; the model unchanged after."""
        before = values(self.model.weights)
        served = self.ref.served()
        x = VALIDATION[0]
        if how == "predict":
            predicted = self.model.predict(
                x, batch_size=BATCH, verbose=0, callbacks=[keras_ema.EMASwap()]
            )
            expected = predict_with(self.model, served, x)
            assert_close([predicted], [expected], "predict with EMASwap", 1e-5)
        elif how == "evaluate":
            loss = self.model.evaluate(
                *VALIDATION,
                batch_size=BATCH,
                verbose=0,
                callbacks=[keras_ema.EMASwap()],
            )
            expected = mse(served, VALIDATION)
            assert loss == pytest.approx(expected, rel=1e-5), "evaluate, EMASwap"
        else:
            with keras_ema.ema_weights(self.model):
                inside = values(self.model.trainable_variables)
            assert_close(inside, served, "inside ema_weights")
        assert_bit_equal(values(self.model.weights), before, f"after {how}")

    @rule(seed=st.integers(0, 2**16))
    def set_weights(self, seed):
        """Rule 4: the user's weights win; the average stays."""
        rng = np.random.default_rng(seed)
        weights = [
            (0.5 * rng.normal(size=v.shape)).astype(v.dtype) for v in self.model.weights
        ]
        self.model.set_weights(weights)
        self.ref.raw = weights
        self.ref.holds = "raw"
        self.ref.snapshot = None

    @rule()
    def restore_raw_weights(self):
        """Rule 5."""
        keras_ema.EMASwap.restore_raw_weights(self.model)
        self.ref.holds = "raw"
        self.ref.snapshot = None

    @initialize(
        target=files,
        session=st.sampled_from(["fresh", "loaded_untrained", "loaded_holding"]),
    )
    def start(self, session):
        """Saves the untrained model, and maybe goes on with a loaded one.

        "loaded_untrained": loaded from a file saved before the first step
        (its optimizer is built, with no average yet). "loaded_holding":
        trained with EMASwap, saved holding its raw weights then holding
        its average, and loaded from the latter. Sessions that start from a
        file reach the states of loaded models in fewer steps.
        """
        names = [self.save()]
        if session == "loaded_untrained":
            self.load_model(names[0])
        elif session == "loaded_holding":
            self.fit_with_emaswap("raw")
            names.append(self.save())
            self.fit_with_emaswap("ema")
            names.append(self.save())
            self.load_model(names[-1])
        return multiple(*names)

    @rule(target=files)
    def save(self):
        """`model.save` and `model.save_weights` of the same state."""
        name = f"file{len(self.saved)}"
        path = os.path.join(self.directory, name)
        self.model.save(path + ".keras")
        self.model.save_weights(path + ".weights.h5")
        weights, shadows, _ = self._state()
        self.saved[name] = (self.ref.copy(), weights, shadows)
        return name

    def _take_state_of(self, name):
        """Checks the model holds file `name`'s weights and average, bit for
        bit, and takes the file's reference state."""
        reference, weights, shadows = self.saved[name]
        assert_bit_equal(values(self.model.weights), weights, f"loaded {name}")
        _, loaded_shadows, step = self._state()
        if shadows is not None and loaded_shadows is not None:
            assert_bit_equal(loaded_shadows, shadows, f"average loaded from {name}")
            assert step == reference.step
        self.ref = reference.copy()

    @rule(name=files)
    def load_model(self, name):
        """Rule 7: a new model object, holding what the saved one held."""
        path = os.path.join(self.directory, name + ".keras")
        self.model = keras.models.load_model(path)
        self._take_state_of(name)

    @rule(target=files)
    def save_and_load_model(self):
        """Rule 7 in one step (the common case, so that it comes often)."""
        name = self.save()
        self.load_model(name)
        return name

    @rule(name=files, suffix=st.sampled_from([".keras", ".weights.h5"]))
    def load_weights(self, name, suffix):
        """Rule 8: the same model object takes the file's state."""
        self.model.load_weights(os.path.join(self.directory, name + suffix))
        self._take_state_of(name)

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
    max_examples=int(_EXAMPLES or "20"),
    stateful_step_count=int(os.environ.get(STEPS_ENV, "8")),
    deadline=None,
    derandomize=_EXAMPLES is None,
    database=None if _EXAMPLES is None else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEMAStateMachine = EMAStateMachine.TestCase


# Sequences that found keras_ema bugs (fixed in d6e86db), replayed through
# the machine with its checks after every step.
SEQUENCES_THAT_FOUND_BUGS = {
    # Loaded before the first step (its optimizer built), then set_weights:
    # the average started from the loaded weights, not from the user's.
    "set_weights_after_loading_untrained": [
        ("start", {"session": "loaded_untrained"}),
        ("set_weights", {"seed": 0}),
        ("train_on_batch", {}),
    ],
    # Loaded holding its average, then load_weights of the file saved before
    # the first step: the stale raw weights of the first file still waited.
    "untrained_load_after_held_load": [
        ("start", {"session": "fresh"}),
        ("fit_with_emaswap", {"on_train_end": "ema"}),
        ("save_and_load_model", {}),
        ("load_weights", {"name": "file0", "suffix": ".weights.h5"}),
        ("fit", {}),
    ],
    # A model object with a traced train function took load_weights of a file
    # that held its average: the plain fit trained the average.
    "held_load_into_traced_model": [
        ("start", {"session": "fresh"}),
        ("fit_with_emaswap", {"on_train_end": "ema"}),
        ("save", {}),
        ("load_model", {"name": "file0"}),
        ("fit", {}),
        ("load_weights", {"name": "file1", "suffix": ".keras"}),
        ("fit", {}),
    ],
}


@pytest.mark.parametrize("sequence", sorted(SEQUENCES_THAT_FOUND_BUGS))
def test_sequences_that_found_bugs(sequence):
    machine = EMAStateMachine()
    try:
        for name, arguments in SEQUENCES_THAT_FOUND_BUGS[sequence]:
            getattr(machine, name)(**arguments)
            machine.holds_what_the_reference_says()
            machine.the_average_is_the_reference_average()
    finally:
        machine.teardown()
