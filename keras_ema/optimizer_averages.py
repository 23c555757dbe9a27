"""The averages an `EMAOptimizer` keeps, and the ones attached to it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import keras

from keras_ema.averager import ExponentialMovingAverage
from keras_ema.backend import AVERAGES_NON_TRAINABLE_IN_APPLY

NON_TRAINABLE_OUTSIDE_FIT = (
    "On JAX, EMAOptimizer(non_trainable='average') averages the non-trainable "
    "variables after Keras's own train step (`model.fit`, `train_on_batch`), "
    "which hands the optimizer the trainable variables only. In a train step "
    "of your own, keep non_trainable='live' and recompute BatchNorm "
    "statistics for the average (`batchnorm_data=` of EMASwap, ema_weights, "
    "EMACheckpoint, export_saved_model)."
)


class OptimizerAverages:
    """The part of `EMAOptimizer` that knows which averages it updates.

    Its own average of the trainable variables (`averager`), the optional
    average of the float non-trainable ones (`non_trainable_averager`), and
    averages attached by others (`PostHocEMA`'s), which it updates but does
    not save. Needs `averager`, `non_trainable_averager`, `_attached`,
    `_set_untracked` and `_finish_non_trainable_load` from the optimizer.
    """

    # Provided by EMAOptimizer (declared for type checkers).
    averager: ExponentialMovingAverage
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
    def averaged_variables(self) -> list:
        """The model variables averaged, trainable then non-trainable."""
        return [v for a in self.averagers for v in a.averaged_variables]

    @property
    def shadow_variables(self) -> list:
        """Their averages, aligned with `averaged_variables`."""
        return [v for a in self.averagers for v in a.shadows]

    @property
    def needs_non_trainable(self) -> bool:
        """Whether it waits for `track_non_trainable` before training."""
        averager = self.non_trainable_averager
        return averager is not None and not averager.built

    @property
    def averagers(self) -> list:
        """Its own averages, built: trainable, then non-trainable."""
        averagers = [self.averager]
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

    def average(self, variable: keras.Variable) -> keras.Variable:
        """Returns the shadow variable holding the average of `variable`.

        Args:
            variable: One of the trainable variables the optimizer updates.

        Returns:
            The shadow variable (float32 or wider, see `shadow_dtype`).

        Raises:
            TypeError: if `variable` is not a variable.
            ValueError: if the optimizer is not built yet, or `variable` is
                not one of the variables it averages.
        """
        return self.averager.average(variable)

    def _averagers_to_update(self) -> list:
        """The averages a step updates: its own, then the attached ones."""
        averagers = [self.averager]
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
