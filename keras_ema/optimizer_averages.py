"""The averages an `EMAOptimizer` keeps, and the ones attached to it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras

from keras_ema import schedules
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.backend import AVERAGES_NON_TRAINABLE_IN_APPLY
from keras_ema.shadow_updates import AverageGroup

AverageChoice = int | float | str | schedules.DecaySchedule | None
# `average=` naming the mean of the latest epoch-end weights (`keras_ema.LAWA`).
LAWA_AVERAGE = "lawa"

NON_TRAINABLE_OUTSIDE_FIT = (
    "On JAX, EMAOptimizer(non_trainable='average') averages the non-trainable "
    "variables after Keras's own train step (`model.fit`, `train_on_batch`), "
    "which hands the optimizer the trainable variables only. In a train step "
    "of your own, keep non_trainable='live' and recompute BatchNorm "
    "statistics for the average (`batchnorm_data=` of EMASwap, ema_weights, "
    "EMACheckpoint, export_saved_model)."
)


def average_label(schedule: schedules.DecaySchedule) -> str:
    """The name of an average in logs: `ema0.999` for a constant decay,
    `bema_burn_in<n>` for BEMA (and its other arguments that differ from
    the defaults), else `ema<Schedule>_<argument><value>...` from the
    schedule's config."""
    config = schedule.get_config()
    if isinstance(schedule, schedules.Constant):
        return f"ema{config['decay']}"
    if isinstance(schedule, schedules.BEMA):
        defaults = schedules.BEMA(burn_in=1).get_config()
        changed = {
            k: v for k, v in config.items() if k == "burn_in" or v != defaults[k]
        }
        return "bema" + "".join(f"_{k}{v}" for k, v in changed.items())
    arguments = "".join(f"_{k}{v}" for k, v in config.items() if v is not None)
    return f"ema{type(schedule).__name__}{arguments}"


def averages_of(decay: Any, **config: Any) -> tuple[list, list]:
    """`(averages, anchors)` for `decay` (a decay or a list of them), each
    checked.

    One `ExponentialMovingAverage` per entry, the first named `average`,
    the others `average_<i>`; a `schedules.BEMA` entry starts at its
    `burn_in` and gets an anchor, `anchor_<i>`: an average that copies the
    weights until then and keeps them (theta_0).
    """
    entries = list(decay) if isinstance(decay, list | tuple) else [decay]
    if not entries:
        raise ValueError(
            "`decay` must be a decay or a non-empty list of decays, got []."
        )
    averages, anchors = [], []
    for i, entry in enumerate(entries):
        name = "average" if i == 0 else f"average_{i}"
        entry_config = dict(config)
        if isinstance(entry, schedules.BEMA):
            if config["start_step"] != 0:
                raise ValueError(
                    "`start_step` does not apply to a schedules.BEMA entry, "
                    "which starts after its own `burn_in`; pass start_step=0 "
                    f"(got {config['start_step']!r}) and set `burn_in`."
                )
            entry_config["start_step"] = entry.burn_in
            anchors.append(
                ExponentialMovingAverage(
                    decay=schedules.Constant(1.0), name=f"anchor_{i}", **entry_config
                )
            )
        averages.append(
            ExponentialMovingAverage(decay=entry, name=name, **entry_config)
        )
    labels = [average_label(a.schedule) for a in averages]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(
            f"`decay` lists the same average more than once: {repeated}. Give "
            "each decay once."
        )
    return averages, anchors


def update_groups(averagers: list) -> list:
    """The averages a step updates, those with the same `start_step` (all
    else is shared) as one `AverageGroup` (a lone average as itself)."""
    by_start: dict = {}
    for averager in averagers:
        by_start.setdefault(averager.start_step, []).append(averager)
    return [
        group[0] if len(group) == 1 else AverageGroup(group)
        for group in by_start.values()
    ]


def check_average_choice(average: Any) -> None:
    """Raises a TypeError unless `average` is None, an int, a float, a
    `DecaySchedule` (what may name one of an `EMAOptimizer`'s averages) or
    `"lawa"` (`keras_ema.LAWA`'s)."""
    if average is None or average == LAWA_AVERAGE:
        return
    if isinstance(average, bool) or not isinstance(
        average, int | float | schedules.DecaySchedule
    ):
        raise TypeError(
            "`average` must be None, an index, a decay, a DecaySchedule or "
            f"'lawa', got {average!r} of type {type(average).__name__}."
        )


class OptimizerAverages:
    """The part of `EMAOptimizer` that knows which averages it updates.

    Its own averages of the trainable variables (`averages`: one per decay,
    `averager` the first), the primary one of them (`primary`, the average
    that `ema_weights`, export and `EMACheckpoint` use unless told
    otherwise), the optional average of the float non-trainable ones
    (`non_trainable_averager`), and averages attached by others
    (`PostHocEMA`'s), which it updates but does not save. Needs `averager`,
    `extra_averages`, `_primary`, `non_trainable_averager`, `_attached`,
    `_set_untracked` and `_finish_non_trainable_load` from the optimizer.
    """

    # Provided by EMAOptimizer (declared for type checkers).
    averager: ExponentialMovingAverage
    extra_averages: list
    anchors: list
    _primary: int
    _groups: list
    non_trainable_averager: ExponentialMovingAverage | None
    _attached: list
    _non_trainable_after_step: bool
    _set_untracked: Callable[..., None]
    _finish_non_trainable_load: Callable[[], None]

    def attach(self, averager: ExponentialMovingAverage) -> None:
        """Updates another built average at every step, after this one's.

        The attached average runs in the same compiled train step, with the
        same rule for skipped steps; it is not saved with the optimizer.
        Rebuild the train function (`model.make_train_function(force=True)`)
        if it was traced before. `keras_ema.PostHocEMA` uses it.

        Args:
            averager: A built `keras_ema.ExponentialMovingAverage`.

        Raises:
            TypeError: if `averager` is not a built
                `keras_ema.ExponentialMovingAverage`.
        """
        if not isinstance(averager, ExponentialMovingAverage) or not averager.built:
            raise TypeError(
                "`averager` must be a built keras_ema.ExponentialMovingAverage, "
                f"got {averager!r}."
            )
        if any(a is averager for a in self._attached):
            return
        self._set_untracked(_attached=self._attached + [averager])

    def detach(self, averager: ExponentialMovingAverage) -> None:
        """Stops updating an average attached with `attach`.

        Args:
            averager: The attached average; one not attached is ignored.
        """
        self._set_untracked(_attached=[a for a in self._attached if a is not averager])

    @property
    def averages(self) -> list:
        """Its averages of the trainable variables, one per decay, in the
        order of `decay` (`averages[0] is averager`)."""
        return [self.averager, *self.extra_averages]

    @property
    def average_labels(self) -> list:
        """Their names in logs, aligned: `ema0.999`, ..."""
        return [average_label(a.schedule) for a in self.averages]

    @property
    def primary(self) -> int:
        """The index in `averages` of the primary average: the one that
        `EMASwap`, `ema_weights`, export and `EMACheckpoint` use unless told
        otherwise (0 until `select_average` changes it; saved)."""
        return self._primary

    def average_index(self, average: AverageChoice = None) -> int:
        """The index in `averages` of the average `average` names.

        Args:
            average: None (the primary average), an int (an index into
                `averages`), a float (the constant decay of one of them) or
                a `keras_ema.schedules.DecaySchedule` (configured as one of
                them).

        Returns:
            An index into `averages`.

        Raises:
            TypeError: if `average` is none of these types.
            ValueError: if no average of this optimizer matches it.
        """
        check_average_choice(average)
        if average is None:
            return self._primary
        if average == LAWA_AVERAGE:
            raise ValueError(
                "`average`='lawa' names keras_ema.LAWA's average, not one of "
                f"this EMAOptimizer's: {self.average_labels}."
            )
        count = len(self.extra_averages) + 1
        if isinstance(average, int):
            if 0 <= average < count:
                return average
        else:
            label = average_label(schedules.get(average))
            if label in self.average_labels:
                return self.average_labels.index(label)
        raise ValueError(
            f"`average`={average!r} names none of the {count} averages this "
            f"EMAOptimizer keeps: {self.average_labels} (indices 0 to "
            f"{count - 1})."
        )

    def select_average(self, average: AverageChoice) -> None:
        """Makes one of the averages the primary one (see `primary`).

        Args:
            average: As for `average_index`.

        Raises:
            TypeError: if `average` is not None, an int, a float or a
                schedule.
            ValueError: if it names none of the averages.
        """
        self._set_untracked(_primary=self.average_index(average))

    def served_pairs(self, average: AverageChoice = None) -> tuple:
        """What goes into the model when an average is swapped in.

        Args:
            average: As for `average_index`.

        Returns:
            `(averager, variables, shadows)`: the `ExponentialMovingAverage`
            that `average` names, the model variables it averages (with the
            non-trainable ones, if averaged) and their shadows, aligned.

        Raises:
            TypeError: if `average` is not None, an int, a float or a
                schedule.
            ValueError: if it names none of the averages.
        """
        averager = self.averages[self.average_index(average)]
        variables, shadows = averager.averaged_variables, averager.shadows
        non_trainable = self.non_trainable_averager
        if non_trainable is not None and non_trainable.built:
            variables += non_trainable.averaged_variables
            shadows += non_trainable.shadows
        return averager, variables, shadows

    @property
    def needs_non_trainable(self) -> bool:
        """Whether it waits for `track_non_trainable` before training."""
        averager = self.non_trainable_averager
        return averager is not None and not averager.built

    def anchor_of(self, index: int) -> ExponentialMovingAverage | None:
        """The anchor (BEMA's theta_0) of `averages[index]`, or None."""
        return next((a for a in self.anchors if a.name == f"anchor_{index}"), None)

    @property
    def averagers(self) -> list:
        """Its own averages, built: trainable (BEMA's anchors included),
        then non-trainable."""
        averagers = self.averages + list(self.anchors)
        if self.non_trainable_averager is not None:
            averagers.append(self.non_trainable_averager)
        return [a for a in averagers if a.built]

    def track_non_trainable(self, variables: Sequence) -> None:
        """Averages the model's float non-trainable variables too.

        For `non_trainable="average"`: `fit` calls it with
        `model.non_trainable_variables` at its start (from the first `fit`
        with `EMASwap` on, or once any keras_ema function has seen the model);
        custom loops call it before training. Integer variables are left
        live. Calling it again is a no-op.

        Args:
            variables: The model's non-trainable variables.

        Raises:
            ValueError: if the optimizer has `non_trainable="live"`.
        """
        averager = self.non_trainable_averager
        if averager is None:
            raise ValueError(
                "`track_non_trainable` is for EMAOptimizer(non_trainable="
                "'average'); this one keeps non-trainable variables live."
            )
        if averager.built:
            return
        floats = [
            v
            for v in variables
            if keras.backend.is_float_dtype(v.dtype) and not v.trainable
        ]
        averager.build(floats)
        if self.averager.built:
            # A copy: on JAX two variables holding one array are donated
            # twice by Keras's train step.
            averager.step.assign(keras.ops.copy(self.averager.step.value))
        self._finish_non_trainable_load()

    def average(
        self, variable: keras.Variable, average: AverageChoice = None
    ) -> keras.Variable:
        """Returns the shadow variable holding the average of `variable`.

        Args:
            variable: One of the trainable variables the optimizer updates.
            average: Which average, with several decays (see
                `average_index`); None: the primary one.

        Returns:
            The shadow variable (float32 or wider, see `shadow_dtype`).

        Raises:
            TypeError: if `variable` is not a variable, or `average` not
                an accepted type.
            ValueError: if the optimizer is not built yet, `variable` is
                not one of the variables it averages, or `average` names
                none of its averages.
        """
        return self.averages[self.average_index(average)].average(variable)

    def _averagers_to_update(self) -> list:
        """The averages a step updates: its own (several decays as one
        `AverageGroup`), then the attached ones."""
        averagers = list(self._groups)
        if self.non_trainable_averager is not None:
            if not self.non_trainable_averager.built:
                raise ValueError(
                    "EMAOptimizer(non_trainable='average') needs the model's "
                    "non-trainable variables before training: pass "
                    "`callbacks=[keras_ema.EMASwap()]` to `fit` (it hands them "
                    "over at the start of `fit`, once the model is built), or "
                    "call `optimizer.track_non_trainable("
                    "model.non_trainable_variables)` first."
                )
            if AVERAGES_NON_TRAINABLE_IN_APPLY:
                averagers.append(self.non_trainable_averager)
            elif not self._non_trainable_after_step:
                raise ValueError(NON_TRAINABLE_OUTSIDE_FIT)
        return averagers + self._attached

    @contextlib.contextmanager
    def non_trainable_updated_after_step(self) -> Iterator[None]:
        """Context manager: the train step run inside updates the average of
        the non-trainable variables after the optimizer's (on JAX, where
        `apply` does not see them)."""
        self._set_untracked(_non_trainable_after_step=True)
        try:
            yield
        finally:
            self._set_untracked(_non_trainable_after_step=False)
