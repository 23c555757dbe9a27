"""Callbacks that put the moving average to work where the model is judged."""

from __future__ import annotations

import warnings
import weakref

import keras

from keras_ema import schedules
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.export import ema_weights
from keras_ema.model_average import ModelAverage, optimizer_chain
from keras_ema.optimizer import EMAOptimizer

EVALUATE_MODES = ("ema", "both")
# Models in a fit with an EMASwap: their val_* metrics are the average's.
_FITTING_WITH_EMASWAP = weakref.WeakSet()
TRAIN_END_MODES = ("ema", "raw")


class EMASwap(keras.callbacks.Callback):
    """Evaluates, predicts and validates with the averaged weights.

    During `fit`, training steps always run on the raw weights; every
    validation pass runs on the averaged (EMA) weights, so the `val_*` logs,
    and with them `EarlyStopping`, `ModelCheckpoint`, `ReduceLROnPlateau`
    and TensorBoard, follow the average. `model.evaluate(...,
    callbacks=[EMASwap()])` and `model.predict(..., callbacks=[EMASwap()])`
    use the averaged weights and leave the raw weights in place afterwards,
    bit for bit.

    Where the average comes from, in this order: a `keras_ema.EMAOptimizer`
    (also inside a `LossScaleOptimizer`); a Keras optimizer with
    `use_ema=True` (its averages are swapped exactly; its end-of-fit
    overwrite of the weights is suspended so the raw weights survive);
    otherwise, with `decay` given, `EMASwap` wraps the compiled optimizer in
    an `EMAOptimizer` when training begins, so the update runs inside the
    compiled train step.

    Swapping is exact: the raw weights are kept aside and assigned back,
    never recomputed. While the model holds the averaged weights, its train
    function refuses to run, so the average is never trained by mistake; the
    next `fit` with `EMASwap` resumes from the raw weights.

    Args:
        decay: Float in [0, 1] or a `keras_ema.schedules.DecaySchedule`: the
            average to install when the optimizer keeps none. `None` (the
            default) requires the optimizer to keep one.
        update_every: With `decay`: update every this many steps.
        start_step: With `decay`: before this step the average copies the
            weights.
        evaluate: `"ema"`: validation during `fit` uses the averaged weights.
            `"both"`: the `val_*` logs hold the averaged weights' metrics and
            `val_raw_*` the raw weights', from one pass each over the same
            validation data.
        on_train_end: What the model holds when `fit` returns: `"ema"` (the
            averaged weights, the raw ones kept aside for the next `fit`) or
            `"raw"`.
        swap_on_epoch: Hold the averaged weights from validation through the
            end of each epoch, so that callbacks listed after this one that
            read the model in `on_epoch_end` (`ModelCheckpoint`,
            `EarlyStopping(restore_best_weights=True)`) see the average.

    Example:

    ```python
    model.compile(optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam()),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, validation_data=(x_val, y_val),
              callbacks=[keras_ema.EMASwap(evaluate="both"),
                         keras.callbacks.EarlyStopping(patience=3)])
    # logs: val_accuracy (EMA), val_raw_accuracy (raw), ema_decay
    ```
    """

    def __init__(
        self,
        decay: float | schedules.DecaySchedule | None = None,
        update_every: int = 1,
        start_step: int = 0,
        evaluate: str = "ema",
        on_train_end: str = "ema",
        swap_on_epoch: bool = False,
    ):
        super().__init__()
        if decay is None:
            if update_every != 1 or start_step != 0:
                raise ValueError(
                    "`update_every` and `start_step` configure the average "
                    "EMASwap installs; they need `decay`."
                )
            self._install_config = None
        else:
            # Validates the arguments now, before any training.
            ExponentialMovingAverage(
                decay=decay, update_every=update_every, start_step=start_step
            )
            self._install_config = {
                "decay": decay,
                "update_every": update_every,
                "start_step": start_step,
            }
        if evaluate not in EVALUATE_MODES:
            raise ValueError(
                f"`evaluate` must be one of {EVALUATE_MODES}, got {evaluate!r}."
            )
        if on_train_end not in TRAIN_END_MODES:
            raise ValueError(
                f"`on_train_end` must be one of {TRAIN_END_MODES}, "
                f"got {on_train_end!r}."
            )
        if not isinstance(swap_on_epoch, bool):
            raise TypeError(f"`swap_on_epoch` must be a bool, got {swap_on_epoch!r}.")
        self.decay = decay
        self.evaluate = evaluate
        self.on_train_end_mode = on_train_end
        self.swap_on_epoch = swap_on_epoch
        self._average = None
        self._in_fit = False
        self._swapped_here = False
        self._suspended_finalize = None

    @staticmethod
    def restore_raw_weights(model) -> None:
        """Puts the raw weights back into a model that holds its average.

        For a model that `fit(..., callbacks=[EMASwap()])` left holding the
        averaged weights, before training it without `EMASwap`.
        """
        average = ModelAverage.of(model)
        if average.is_swapped:
            average.swap_out()

    # ------------------------------------------------------------ training

    def on_train_begin(self, logs=None):
        _FITTING_WITH_EMASWAP.add(self.model)
        self._in_fit = True
        chain = optimizer_chain(getattr(self.model, "optimizer", None))
        has_source = any(
            isinstance(o, EMAOptimizer) or getattr(o, "use_ema", False) for o in chain
        )
        if not has_source and self._install_config is None:
            raise ValueError(
                "EMASwap found no moving average to swap: the optimizer is "
                "neither a keras_ema.EMAOptimizer nor a Keras optimizer with "
                "`use_ema=True`. Pass `decay` (e.g. `EMASwap(decay=0.999)`) "
                "to install one, or compile with "
                "`keras_ema.EMAOptimizer(optimizer, decay=...)`."
            )
        for optimizer in chain:
            if getattr(optimizer, "use_ema", False):
                self._suspend_keras_finalize(optimizer)
        if has_source:
            average = ModelAverage.find(self.model, build=True)
        else:
            average = ModelAverage.install(self.model, **self._install_config)
        if average is not None and average.is_swapped:
            # Left holding the average by an earlier fit: resume from raw.
            average.swap_out()
        # None for a model that fit builds at its first step (subclassed, or
        # no Input): the average is built then, and found at first use.
        self._average = average

    @property
    def _model_average(self):
        """The average; found at first use for models built by fit."""
        if self._average is None:
            self._average = ModelAverage.of(self.model)
        return self._average

    def on_epoch_begin(self, epoch, logs=None):
        if self._average is not None and self._average.is_swapped:
            self._average.swap_out()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        validated = any(key.startswith("val_") for key in logs)
        if self.evaluate == "both" and validated:
            logs.update(self._evaluate_raw())
        logs["ema_decay"] = self._model_average.current_decay()
        if self.swap_on_epoch and not self._average.is_swapped:
            self._average.swap_in()

    def on_train_end(self, logs=None):
        self._in_fit = False
        _FITTING_WITH_EMASWAP.discard(self.model)
        self._restore_keras_finalize()
        if self._average is None and ModelAverage.find(self.model) is None:
            return  # stopped before the first step
        average = self._model_average
        if self.on_train_end_mode == "ema" and not average.is_swapped:
            average.swap_in()
        elif self.on_train_end_mode == "raw" and average.is_swapped:
            average.swap_out()

    def _evaluate_raw(self):
        """The raw weights' metrics on fit's validation data, as `val_raw_*`."""
        swapped = self._model_average.is_swapped
        if swapped:
            self._average.swap_out()
        try:
            # fit keeps its validation iterator for the epoch; reuse it rather
            # than asking the user for the validation data twice.
            raw_logs = self.model.evaluate(
                verbose=0, return_dict=True, _use_cached_eval_dataset=True
            )
        finally:
            if swapped:
                self._average.swap_in()
        return {f"val_raw_{name}": value for name, value in raw_logs.items()}

    def _suspend_keras_finalize(self, optimizer):
        # Keras's use_ema copies its average over the weights at the end of
        # fit, which would lose the raw weights; keep them, and swap instead.
        if self._suspended_finalize is None:
            optimizer.finalize_variable_values = _keep_raw_weights
            self._suspended_finalize = optimizer

    def _restore_keras_finalize(self):
        if self._suspended_finalize is not None:
            del self._suspended_finalize.finalize_variable_values
            self._suspended_finalize = None

    # ---------------------------------------------- evaluation, prediction

    def _begin_judging(self):
        if self._in_fit:
            average = self._model_average
        else:
            average = ModelAverage.of(self.model)
            self._average = average
        self._swapped_here = not average.is_swapped
        if self._swapped_here:
            average.swap_in()

    def _end_judging(self):
        if self._in_fit and self.swap_on_epoch:
            return
        if self._swapped_here and self._average.is_swapped:
            self._average.swap_out()
        self._swapped_here = False

    def on_test_begin(self, logs=None):
        self._begin_judging()

    def on_test_end(self, logs=None):
        self._end_judging()

    def on_predict_begin(self, logs=None):
        self._begin_judging()

    def on_predict_end(self, logs=None):
        self._end_judging()


def _keep_raw_weights(var_list):
    del var_list


class EMACheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that saves the averaged weights.

    Takes `ModelCheckpoint`'s arguments (`filepath` with `{epoch}` and metric
    fields, `monitor`, `mode`, `save_best_only`, `save_weights_only`,
    `save_freq`, ...) and writes the model with its averaged weights swapped
    in, as `.keras` or `.weights.h5`. The raw weights are back in the model,
    bit for bit, as soon as the file is written. A `.keras` file loads with
    `keras.models.load_model` and predicts like the averaged model; it also
    keeps the raw weights and the optimizer state, so training can resume
    from it (pass `EMASwap()` to that `fit`).

    The monitored metric should be the average's: add `EMASwap()` to the
    same fit, so that `val_*` are the averaged weights' metrics (it warns
    otherwise). With Keras's `use_ema=True` as the source, the file holds
    the averaged weights only: Keras's optimizer keeps no copy of the raw
    ones in its state.

    Example:

    ```python
    model.fit(x, y, validation_data=(x_val, y_val), callbacks=[
        keras_ema.EMASwap(),
        keras_ema.EMACheckpoint("ckpt/ema-{epoch:02d}.keras",
                                monitor="val_loss", save_best_only=True),
    ])
    ```
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._warned = False

    def _save_model(self, epoch, batch, logs):
        if (
            not self._warned
            and self.monitor.startswith("val_")
            and self.model not in _FITTING_WITH_EMASWAP
        ):
            warnings.warn(
                f"EMACheckpoint monitors {self.monitor!r}, but this fit has no "
                "EMASwap, so validation uses the raw weights. Add "
                "keras_ema.EMASwap() to the callbacks.",
                stacklevel=2,
            )
            self._warned = True
        with ema_weights(self.model):
            super()._save_model(epoch, batch, logs)
