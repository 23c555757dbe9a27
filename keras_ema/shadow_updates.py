"""Moving an average's shadows: the per-step update, its start and reset."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keras_ema.update_rule import UpdateRule

import numpy as np
from keras import ops

from keras_ema.backend import STEP_DTYPE, ShadowUpdater, init_scope, initial_value

# A backend tensor (Tensor, jax.Array).
Tensor = Any


class UpdatesShadows:
    """Moves an average's shadows towards its variables, step by step.

    For `ExponentialMovingAverage`, which provides `step`, `_rule` (an
    `UpdateRule`), `_updater` (a `ShadowUpdater`), `_shadows`, `_averaged`,
    `_copy_first_step`, `_set_untracked`, `is_swapped` and `_check_built`.
    """

    # Provided by ExponentialMovingAverage (declared for type checkers).
    name: str
    step: Any
    is_swapped: bool
    update_every: int
    start_step: int
    _rule: UpdateRule
    _updater: ShadowUpdater
    _shadows: list
    _averaged: list
    _copy_first_step: bool
    _set_untracked: Callable[..., None]
    _check_built: Callable[[str], None]

    def decay_at(self, step: int | Tensor) -> Tensor:
        """The per-step decay at optimizer step `step` (0 while copying).

        Args:
            step: The optimizer step t (an int or int tensor).

        Returns:
            A float32 scalar tensor: 0 where the shadows copy the weights
            (t <= start_step, or t = 1 with `init="first_step"`), else the
            schedule's d(t - start_step).
        """
        return self._rule.decay_at(step, self._copy_first_step)

    def current_decay(self) -> Tensor:
        """The per-step decay at the latest step (`decay_at(step)`).

        Returns:
            A float32 scalar tensor.

        Raises:
            ValueError: if the average is not built.
        """
        self._check_built("current_decay")
        return self.decay_at(self.step)

    def reset(self) -> None:
        """Starts the average again from the variables as they are now.

        Every shadow is set to its variable's value and the step to 0, as
        when the average is built. Call it outside a `tf.function` (or in the
        cross-replica context of a strategy).

        Raises:
            ValueError: if the average is not built.
        """
        self._check_built("reset")
        self._updater.run(lambda agreed: self._updater.copy_constrained())
        self.step.assign(0)
        self._set_untracked(_copy_first_step=False)

    def capture_before_first_step(self) -> None:
        """Starts the average from the weights the first step starts from.

        Call it in a traced train step, before the optimizer's update. Until
        a step is taken the shadows should hold the weights training starts
        from; they do not if this trace created the variables (a model first
        built inside its train step: their initial values could not be read
        when the average was built) or if the weights were written since the
        average was built (`set_weights` after `load_model`). Then this adds
        a condition that copies the variables into the shadows while the step
        is 0. Traces made after a step, or with the shadows up to date, add
        nothing.
        """
        self._check_built("capture_before_first_step")
        with init_scope():
            step = initial_value(self.step)
            # On JAX the trace of a train step cannot read the step: the
            # start of `fit` (`prepare_for_training`) captured the weights.
            if step is None or int(step) > 0:
                return
            if not self._copy_first_step and self._shadows_hold_variables():
                return
        self._set_untracked(_copy_first_step=False)

        def capture(agreed):
            self._updater.copy_constrained_if(ops.equal(self.step.value, 0))

        self._updater.run(capture)

    def _shadows_hold_variables(self) -> bool:
        """Whether every shadow holds its variable's value (read eagerly)."""
        for shadow, variable in zip(self._shadows, self._averaged):
            value = initial_value(variable)
            if value is None:
                return False
            if getattr(variable, "constraint", None) is not None:
                value = variable.constraint(value)
            wanted = ops.convert_to_numpy(ops.cast(value, shadow.dtype))
            if wanted.tobytes() != np.asarray(shadow.value).tobytes():
                return False
        return True

    def _check_updatable(self) -> None:
        self._check_built("update")
        if self.is_swapped:
            raise RuntimeError(
                f"The variables hold the averages of {self.name!r} (swapped "
                "in); updating now would average the average. Call "
                "`swap_out()` before training."
            )

    def update(
        self, step: int | Tensor | None = None, applied: Tensor | None = None
    ) -> None:
        """Updates the shadows for optimizer step `step`.

        Args:
            step: The number of optimizer updates applied, the current one
                included (an int or int tensor). `None` counts one more step
                than the last update.
            applied: Optional boolean tensor: whether the optimizer really
                applied this step. When false nothing moves, not even the
                step count (a step skipped by a loss scaler is not a step).

        Raises:
            ValueError: if the average is not built.
            RuntimeError: if the variables hold the averages (swapped in).
        """
        self._check_updatable()
        self._updater.run(move_together, [self], self._updater, step, applied)


def move_together(agreed, averagers, updater, step, applied) -> None:
    """Moves the shadows of `averagers` one step, in the cross-replica context.

    The averages share their variables and their step rule but for the
    decay (`AverageGroup`), so the rule's conditions are evaluated once and
    `updater`, over all their shadows, moves them in one update. Each step
    counter is computed from its own value: on JAX, one array assigned to
    two variables would be donated twice by Keras's train step.
    """
    lead = averagers[0]
    lasts = [averager.step.value for averager in averagers]
    if step is None:
        steps = [last + 1 for last in lasts]
    else:
        steps = [ops.cast(agreed(step), STEP_DTYPE) for _ in averagers]
    t = steps[0]
    due, must_copy = lead._rule.conditions(t, lead._copy_first_step)
    if applied is not None:
        applied = agreed(applied)
        due = applied if due is None else ops.logical_and(applied, due)

    def rates():
        return [r for a in averagers for r in a._rule.rates(t, a._shadows)]

    updater.update(due, must_copy, rates)
    for averager, last, new in zip(averagers, lasts, steps):
        averager.step.assign(new if applied is None else ops.where(applied, new, last))


class AverageGroup:
    """Averages of the same variables that differ in their decay only,
    updated together: one merge call, one evaluation of the step rule, one
    condition and one backend update over all their shadows (on TensorFlow
    without XLA, one XLA function for the large variables).

    Args:
        averagers: Built `ExponentialMovingAverage`s of the same variables,
            with the same `update_every`, `start_step` and `init`.
    """

    def __init__(self, averagers: list):
        self.averagers = list(averagers)
        self._updater = ShadowUpdater(
            [s for a in self.averagers for s in a.shadows],
            [v for a in self.averagers for v in a.averaged_variables],
        )

    def update(self, applied: Tensor | None = None) -> None:
        """Updates every average of the group for the next step.

        Args:
            applied: As for `ExponentialMovingAverage.update`.
        """
        for averager in self.averagers:
            averager._check_updatable()
        self._updater.run(move_together, self.averagers, self._updater, None, applied)
