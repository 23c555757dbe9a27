"""Callbacks that put the moving average to work where the model is judged."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import keras

from keras_ema import _compat, schedules
from keras_ema.advice import JudgingAdvice
from keras_ema.batchnorm import (
    DEFAULT_BATCHNORM_STEPS,
    BatchNormData,
    BatchNormInput,
)
from keras_ema.export import ema_weights
from keras_ema.holder import (
    HELD_BY_EMASWAP,
    HELD_BY_END_OF_FIT,
    WeightHolder,
    ema_optimizer_of,
    install_average,
    optimizer_chain,
    prepare_for_training,
)
from keras_ema.optimizer_averages import (
    AverageChoice,
    averages_of,
    check_average_choice,
)
from keras_ema.schedule_free import is_schedule_free

EVALUATE_MODES = ("ema", "both", "all")
TRAIN_END_MODES = ("ema", "raw")
SELECT_MODES = ("auto", "min", "max")
# Metrics that are better when higher, for `select_mode="auto"` (as
# Keras's EarlyStopping guesses from the name when it cannot ask the
# metric).
_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou")


class EMASwap(keras.callbacks.Callback):
    """Evaluates, predicts and validates with the averaged weights.

    During `fit`, training steps always run on the raw weights; every
    validation pass runs on the averaged (EMA) weights, so the `val_*` logs,
    and with them `EarlyStopping`, `ModelCheckpoint`, `ReduceLROnPlateau`
    and TensorBoard, follow the average. From the validation to the end of
    the epoch (`swap_on_epoch`) the model holds the average, so that
    callbacks that save or restore the model at the end of an epoch get the
    weights its `val_*` metrics describe: `ModelCheckpoint` saves the average
    (the raw weights come along in the optimizer's state), and
    `EarlyStopping(restore_best_weights=True)` ends the fit holding the best
    epoch's average, which `ema_weights` and `export_saved_model` then serve.
    `model.evaluate(..., callbacks=[EMASwap()])` and `model.predict(...,
    callbacks=[EMASwap()])` use the averaged weights and leave the raw
    weights in place afterwards, bit for bit.

    EMASwap runs before the other callbacks of its `fit`, wherever it is
    listed, so that all of them see its `val_raw_*` and `ema_decay` logs.

    Where the average comes from, in this order: a `keras_ema.EMAOptimizer`
    (also inside a `LossScaleOptimizer`); a Keras optimizer with
    `use_ema=True` (its averages are swapped exactly); a Keras
    `ScheduleFreeAdamW` (its averaged point x, see
    `keras_ema.schedule_free`); otherwise, with
    `decay` given, `EMASwap` wraps the compiled optimizer in an
    `EMAOptimizer` when training begins, so the update runs inside the
    compiled train step.

    Swapping is exact: the raw weights are kept aside and assigned back,
    never recomputed. Training always resumes from the raw weights, with or
    without `EMASwap`, and weights written into the model by anything else
    while it holds the average (`set_weights`, `load_weights`, ...) are
    taken as the user's: they stay, and are never called the average.

    Args:
        decay: Float in [0, 1] or a `keras_ema.schedules.DecaySchedule`, or a
            list of them (several averages, see `EMAOptimizer`): the
            average to install when the optimizer keeps none. `None` (the
            default) requires the optimizer to keep one. If it keeps one
            configured otherwise, a ValueError names both.
        update_every: With `decay`: update every this many steps.
        start_step: With `decay`: before this step the average copies the
            weights.
        evaluate: `"ema"`: validation during `fit` uses the averaged weights.
            `"both"`: the `val_*` logs hold the averaged weights' metrics and
            `val_raw_*` the raw weights', from one pass each over the same
            validation data. `"all"`: as `"both"`, and every average of an
            `EMAOptimizer` with several decays is validated too, its
            metrics logged as `val_<metric>_<label>` (`val_loss_ema0.999`;
            a schedule's label comes from its config, e.g.
            `val_loss_emaPowerFunction_sigma_rel0.05`; see
            `EMAOptimizer.average_labels`): one more pass over the
            validation data per average but the primary one.
        on_train_end: What the model holds when `fit` returns: `"ema"` (the
            averaged weights, the raw ones kept aside for the next training)
            or `"raw"`.
        swap_on_epoch: `True` (the default): the model holds the average
            from the validation (or the last step, in epochs without one)
            to the end of each epoch. `False`: only during validation.
        batchnorm_data: Training data to recompute the BatchNorm moving
            statistics from for the averaged weights, each time the average
            goes in (validation, `evaluate`, `predict`, the end of an epoch
            or of `fit`): a NumPy array of inputs, an `(x, y)` or `(x, y,
            sample_weight)` tuple, or a `tf.data.Dataset` (see
            `keras_ema.recompute_batchnorm`). The raw model's statistics
            come back with the raw weights, bit for bit. `None`: the
            average is judged with the statistics the model has (the raw
            weights', or averaged ones), and a model with BatchNorm says so
            once.
        batchnorm_steps: How many batches of `batchnorm_data` to use
            (`None`: all).
        select: With `evaluate="all"`, a validation metric (`"val_loss"`,
            `"val_accuracy"`): at the end of `fit` the average that scored
            best on it in the last validation becomes the optimizer's
            primary average (the one `ema_weights`, export, `EMACheckpoint`
            and later validations use); the choice is kept in
            `selected_average` (its label), and printed unless `fit` runs
            with `verbose=0`. `None`: no selection.
        select_mode: `"min"`, `"max"`, or `"auto"` (`"max"` for metrics
            named like accuracy, AUC, precision, recall, F1 or IoU, else
            `"min"`).

    Attributes:
        selected_average: The label of the average `select` chose at the
            end of the latest `fit` (None before).

    Raises:
        TypeError: if `swap_on_epoch` is not a bool, `batchnorm_data` is not
            data, `decay` is neither a number nor a schedule, or
            `update_every` or `start_step` is not an int.
        ValueError: if `evaluate`, `on_train_end` or `select_mode` is not
            one of the accepted values, `select` is given without
            `evaluate="all"` or does not start with `"val_"`,
            `update_every` or `start_step` is given without
            `decay`, `decay` is outside [0, 1], `update_every < 1`,
            `start_step < 0`, or `batchnorm_steps` is not a positive int or
            None. At the start of `fit`: if the
            model keeps no average and `decay` is None, keeps one configured
            unlike `decay`, or keeps Keras's `use_ema=True` average with
            `swap_on_epoch=False` or `ema_overwrite_frequency` set, or a
            `ScheduleFreeAdamW` (its own average) and `decay` is given.

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.randint(0, 3, size=32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x, y, batch_size=8, validation_data=(x, y), epochs=2, verbose=0,
        callbacks=[
            keras_ema.EMASwap(evaluate="both"),
            keras.callbacks.EarlyStopping(patience=3),
        ],
    )
    # val_accuracy: the averaged weights'; val_raw_accuracy: the raw ones'.
    assert {"val_accuracy", "val_raw_accuracy", "ema_decay"} <= set(history.history)
    # With the callback, evaluate uses the average; the raw weights stay.
    model.evaluate(x, y, verbose=0, callbacks=[keras_ema.EMASwap()])
    ```
    """

    def __init__(
        self,
        decay: float | schedules.DecaySchedule | list | None = None,
        update_every: int = 1,
        start_step: int = 0,
        evaluate: str = "ema",
        on_train_end: str = "ema",
        swap_on_epoch: bool = True,
        batchnorm_data: BatchNormInput = None,
        batchnorm_steps: int | None = DEFAULT_BATCHNORM_STEPS,
        select: str | None = None,
        select_mode: str = "auto",
    ):
        super().__init__()
        self._batchnorm = BatchNormData.get(batchnorm_data, batchnorm_steps)
        _check_select(select, select_mode, evaluate)
        if decay is None:
            if update_every != 1 or start_step != 0:
                raise ValueError(
                    "`update_every` and `start_step` configure the average "
                    "EMASwap installs; they need `decay`."
                )
            self._install_config = None
        else:
            # Validates the arguments now, before any training.
            averages_of(decay, **_installed_rule(update_every, start_step))
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
        self.select = select
        self.select_mode = select_mode
        self.selected_average: str | None = None
        self._scores: dict = {}
        self._in_fit = False
        self._swapped_here = False
        self._restorers: list = []
        self._advice = JudgingAdvice()

    @staticmethod
    def restore_raw_weights(model: keras.Model) -> None:
        """Puts the raw weights back into a model that holds its average.

        Training does this by itself; this is for code that reads the
        weights, or a custom loop. Weights written into the model since the
        average went in are the user's: they stay. A model that holds its
        raw weights is left as it is.

        Args:
            model: The Keras model.

        Raises:
            TypeError: if `model` is not a Keras model.
        """
        WeightHolder.of(model).swap_out()

    @property
    def _holder(self) -> WeightHolder:
        return WeightHolder.of(self.model)

    # ------------------------------------------------------------ training

    def on_train_begin(self, logs=None):
        callbacks = _compat.callback_list_running(self)
        if callbacks is not None:
            # First, so that the callbacks listed before it see its logs.
            callbacks.callbacks.remove(self)
            callbacks.callbacks.insert(0, self)
        holder = self._holder
        # Training starts from the raw weights, with everything it needs.
        if prepare_for_training(holder):
            self.model.make_train_function(force=True)
        if self._check_source() and self._install_config is not None:
            install_average(self.model, **self._install_config)
        self._restorers = [
            c
            for c in (callbacks.callbacks if callbacks is not None else [])
            if isinstance(c, keras.callbacks.EarlyStopping) and c.restore_best_weights
        ]
        holder.emaswap_in_fit = self._in_fit = True
        self._scores = {}

    def _check_source(self) -> bool:
        """Checks the model's average against this callback's arguments.

        Returns whether to install one (`decay` given, none there).
        """
        config = self._install_config
        ema_optimizer = ema_optimizer_of(self.model)
        if ema_optimizer is not None:
            if config is not None and _differs(ema_optimizer, config):
                averager = ema_optimizer.averager
                raise ValueError(
                    "The model already keeps an average, keras_ema.EMAOptimizer("
                    f"decay={_decays_text(ema_optimizer.averages)}, update_every="
                    f"{averager.update_every}), and EMASwap(decay="
                    f"{config['decay']!r}, update_every={config['update_every']}, "
                    f"start_step={config['start_step']}) would not change it. "
                    "Pass `EMASwap()` to use the model's average, or compile "
                    "with the EMAOptimizer you want."
                )
            return False
        chain = optimizer_chain(getattr(self.model, "optimizer", None))
        keras_average = next((o for o in chain if getattr(o, "use_ema", False)), None)
        schedule_free = next((o for o in chain if is_schedule_free(o)), None)
        if keras_average is None and schedule_free is not None:
            if config is not None:
                raise ValueError(
                    "The model's ScheduleFreeAdamW keeps its own average (its "
                    "point x), which EMASwap() swaps in; "
                    f"EMASwap(decay={config['decay']!r}) would average its "
                    "interpolated point y instead. Pass `EMASwap()`, or compile "
                    "with `keras_ema.EMAOptimizer(ScheduleFreeAdamW(...), "
                    "decay=...)` to average y."
                )
            return False
        if keras_average is None:
            if config is None:
                raise ValueError(
                    "EMASwap found no moving average to swap: the optimizer is "
                    "neither a keras_ema.EMAOptimizer nor a Keras optimizer "
                    "with `use_ema=True`. Pass `decay` (e.g. "
                    "`EMASwap(decay=0.999)`) to install one, or compile with "
                    "`keras_ema.EMAOptimizer(optimizer, decay=...)`."
                )
            return True
        _check_keras_average(keras_average, config, self.swap_on_epoch)
        return False

    def on_epoch_begin(self, epoch, logs=None):
        self._holder.swap_out()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        holder = self._holder
        if self.swap_on_epoch:
            holder.swap_in(HELD_BY_EMASWAP, self._batchnorm)
        validation = {k[4:]: v for k, v in logs.items() if k.startswith("val_")}
        if self.evaluate in ("both", "all") and validation:
            with holder.holding_raw():
                raw_logs = _compat.evaluate_on_fit_validation_data(self.model)
            logs.update({f"val_raw_{k}": v for k, v in raw_logs.items()})
        if self.evaluate == "all" and validation:
            self._validate_every_average(validation, logs)
        logs["ema_decay"] = holder.require_source().current_decay()

    def _validate_every_average(self, validation: dict, logs: dict) -> None:
        """Logs `val_<metric>_<label>` for every average of the model's
        `EMAOptimizer`: the primary one's from the validation just run, the
        others' from a pass each, over the primary (restored exactly)."""
        optimizer = ema_optimizer_of(self.model)
        if optimizer is None:
            return
        holder = self._holder
        for index, label in enumerate(optimizer.average_labels):
            results = validation
            if index != optimizer.primary:
                with holder.holding_average(HELD_BY_EMASWAP, self._batchnorm, index):
                    results = _compat.evaluate_on_fit_validation_data(self.model)
            logs.update({f"val_{k}_{label}": v for k, v in results.items()})
            if self.select is not None:
                score = results.get(self.select[len("val_") :])
                if score is not None:
                    self._scores[index] = float(score)

    def on_train_end(self, logs=None):
        holder = self._holder
        self._in_fit = holder.emaswap_in_fit = False
        if holder.source() is None:
            return  # stopped before the first step
        if self.select is not None and self._select_best():
            holder.swap_out()  # the former primary average
        restorer = next(
            (c for c in reversed(self._restorers) if c.best_weights is not None),
            None,
        )
        if restorer is not None and self.swap_on_epoch:
            # It will restore the weights it kept at its best epoch, which
            # were the average's: hold them as such, the raw weights aside.
            holder.hold_snapshot(restorer.best_weights)
        elif self.on_train_end_mode == "ema":
            holder.swap_in(HELD_BY_END_OF_FIT, self._batchnorm)
            holder.held_by = HELD_BY_END_OF_FIT
        else:
            holder.swap_out()
        self._restorers = []
        self._advice.after_fit(holder.require_source())

    def _select_best(self) -> bool:
        """Makes the best-scoring average the primary one; returns whether
        the primary changed."""
        optimizer = ema_optimizer_of(self.model)
        if optimizer is None or not self._scores:
            warnings.warn(
                f"EMASwap(select={self.select!r}) found no {self.select!r} of "
                "the model's averages in this fit's validation logs (is there "
                "validation data, and is the metric compiled?); the primary "
                "average stays as it was.",
                stacklevel=2,
            )
            return False
        mode = self.select_mode
        if mode == "auto":
            name = str(self.select).lower()
            mode = "max" if any(m in name for m in _HIGHER_IS_BETTER) else "min"
        scores = self._scores
        best = (max if mode == "max" else min)(scores, key=lambda i: scores[i])
        labels = optimizer.average_labels
        previous = optimizer.primary
        optimizer.select_average(best)
        self.selected_average = labels[best]
        listed = ", ".join(
            f"{labels[i]} {score:.6g}" for i, score in sorted(scores.items())
        )
        if not self.params.get("verbose", 1):
            return best != previous
        print(
            f"EMASwap: the primary average is now {labels[best]} (best "
            f"{self.select}, {mode}, in the last validation: {listed})."
        )
        return best != previous

    # ---------------------------------------------- evaluation, prediction

    def _begin_judging(self):
        holder = self._holder
        self._swapped_here = holder.swap_in(HELD_BY_EMASWAP, self._batchnorm)
        self._advice.when_judging(self.model, holder.statistics)

    def _end_judging(self):
        keep = self._in_fit and self.swap_on_epoch
        if self._swapped_here and not keep:
            self._holder.swap_out()
        self._swapped_here = False

    def on_test_begin(self, logs=None):
        self._begin_judging()

    def on_test_end(self, logs=None):
        self._end_judging()

    def on_predict_begin(self, logs=None):
        self._begin_judging()

    def on_predict_end(self, logs=None):
        self._end_judging()


def _check_select(select, select_mode, evaluate) -> None:
    if select_mode not in SELECT_MODES:
        raise ValueError(
            f"`select_mode` must be one of {SELECT_MODES}, got {select_mode!r}."
        )
    if select is None:
        return
    if not isinstance(select, str) or not select.startswith("val_"):
        raise ValueError(
            "`select` must be the name of a validation metric, such as "
            f"'val_loss' or 'val_accuracy', got {select!r}."
        )
    if evaluate != "all":
        raise ValueError(
            f"`select`={select!r} picks among the averages that "
            f"`evaluate='all'` validates; got evaluate={evaluate!r}."
        )


def _check_keras_average(optimizer, config, swap_on_epoch):
    momentum = optimizer.ema_momentum
    if config is not None and (
        config["decay"] != momentum
        or config["update_every"] != 1
        or config["start_step"] != 0
    ):
        raise ValueError(
            "The model already keeps an average, Keras's use_ema=True with "
            f"ema_momentum={momentum}, and EMASwap(decay={config['decay']!r}, "
            f"update_every={config['update_every']}) would not change it. Pass "
            "`EMASwap()` to use it, or compile with "
            "`keras_ema.EMAOptimizer(optimizer, decay=...)`."
        )
    if not swap_on_epoch:
        raise ValueError(
            "EMASwap(swap_on_epoch=False) cannot keep the raw weights of a "
            "Keras optimizer with use_ema=True: Keras copies its average over "
            "the weights at the end of fit, after the last epoch. Use "
            "swap_on_epoch=True (the default), or compile with "
            "keras_ema.EMAOptimizer."
        )
    if optimizer.ema_overwrite_frequency:
        raise ValueError(
            "EMASwap cannot keep the raw weights of a Keras optimizer with "
            "`ema_overwrite_frequency` set: Keras copies its average over the "
            "weights inside the train step. Set it to None."
        )


def _installed_rule(update_every, start_step) -> dict:
    """The step rule of the average `EMASwap(decay=...)` installs."""
    return dict(
        update_every=update_every,
        start_step=start_step,
        init="weights",
        shadow_dtype="float32",
    )


def _differs(optimizer, config) -> bool:
    """Whether `optimizer`'s averages are not those `config` would install."""
    wanted, _ = averages_of(
        config["decay"],
        **_installed_rule(config["update_every"], config["start_step"]),
    )

    def rules(averages):
        return [
            (
                keras.saving.serialize_keras_object(a.schedule),
                a.update_every,
                a.start_step,
            )
            for a in averages
        ]

    return rules(optimizer.averages) != rules(wanted)


def _decays_text(averages) -> str:
    decays = [a.schedule for a in averages]
    return repr(decays[0] if len(decays) == 1 else decays)


class EMACheckpoint(_compat.CheckpointWithSaveHook):
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

    Args:
        *args: `ModelCheckpoint`'s positional arguments (`filepath`, ...).
        batchnorm_data: Optional training data to recompute the BatchNorm
            moving statistics from for the average before it is saved (see
            `keras_ema.recompute_batchnorm`), so that the file's statistics
            match its weights. If the model holds its average already with
            statistics recomputed by `EMASwap(batchnorm_data=...)`, those
            are saved as they are.
        batchnorm_steps: How many batches of `batchnorm_data` to use.
        average: Which average to save, for an `EMAOptimizer` with several
            decays (see `keras_ema.ema_weights`); `None`: the primary one.
        **kwargs: `ModelCheckpoint`'s keyword arguments.

    Raises:
        TypeError: if `batchnorm_data` is not data, or `average` is not
            None, an int, a float or a schedule.
        ValueError: if `batchnorm_steps` is not a positive int or None,
            or `ModelCheckpoint` refuses its arguments
            (e.g. a `filepath` not ending in `.keras`, or not in
            `.weights.h5` with `save_weights_only=True`). When saving: if
            the model keeps no average, or `average` names none of its
            averages.

    Example:

    ```python
    import os
    import tempfile

    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=0.9),
        loss="mse",
    )
    path = os.path.join(tempfile.mkdtemp(), "best-ema.keras")
    model.fit(
        x, y, batch_size=8, validation_data=(x, y), epochs=2, verbose=0,
        callbacks=[
            keras_ema.EMASwap(),  # so that val_loss is the average's
            keras_ema.EMACheckpoint(path, monitor="val_loss", save_best_only=True),
        ],
    )
    averaged = keras.models.load_model(path)  # predicts like the average
    print(averaged.evaluate(x, y, verbose=0))
    ```
    """

    def __init__(
        self,
        *args: Any,
        batchnorm_data: BatchNormInput = None,
        batchnorm_steps: int | None = DEFAULT_BATCHNORM_STEPS,
        average: AverageChoice = None,
        **kwargs: Any,
    ):
        BatchNormData.get(batchnorm_data, batchnorm_steps)  # checks them now
        check_average_choice(average)
        self._batchnorm_args = (batchnorm_data, batchnorm_steps)
        self.average = average
        super().__init__(*args, **kwargs)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._warned = False

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Context manager: the average in while the checkpoint is written.

        Warns once per `fit` if the monitored `val_*` metric is not the
        average's (no `EMASwap` in the fit).

        Yields:
            None, with the model holding its averaged weights.

        Raises:
            ValueError: if the model keeps no average.
        """
        if (
            not self._warned
            and self.monitor.startswith("val_")
            and not WeightHolder.of(self.model).emaswap_in_fit
        ):
            warnings.warn(
                f"EMACheckpoint monitors {self.monitor!r}, but this fit has no "
                "EMASwap, so validation uses the raw weights. Add "
                "keras_ema.EMASwap() to the callbacks.",
                stacklevel=2,
            )
            self._warned = True
        data, steps = self._batchnorm_args
        with ema_weights(self.model, data, steps, self.average):
            yield
