"""When an average's shadows move, and by how much (DESIGN.md, Semantics).

At optimizer step t (the updates applied, the current one included),
schedules see s = t - start_step. For s <= 0, and at t = 1 when the first
step copies, the shadows are set to the weights. Otherwise, with
`update_every = k`, they move at the steps where s is a multiple of k:

    shadow <- shadow - (1 - D) * (shadow - w),   D = d(s-k+1) * ... * d(s)

with D in closed form where the schedule has one (`decay_over`).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_ema import schedules
from keras_ema._checks import check_int
from keras_ema.backend import STEP_DTYPE, float64_available, schedule_dtype

INITS = ("weights", "first_step")
SHADOW_DTYPES = ("float32", "float64")


def check_shadow_dtype(shadow_dtype: Any) -> str:
    """`shadow_dtype`, checked: one of SHADOW_DTYPES, and available."""
    if shadow_dtype not in SHADOW_DTYPES:
        raise ValueError(
            f"`shadow_dtype` must be one of {SHADOW_DTYPES}, got {shadow_dtype!r}."
        )
    if shadow_dtype == "float64" and not float64_available():
        raise ValueError(
            "`shadow_dtype='float64'` needs float64 arrays, which JAX only has "
            "with `jax.config.update('jax_enable_x64', True)` (set before "
            "creating the model). Keep the default `shadow_dtype='float32'`, "
            "or enable x64."
        )
    return shadow_dtype


class UpdateRule:
    """The step rule of an average, as tensors for a compiled train step.

    Args:
        schedule: The `keras_ema.schedules.DecaySchedule`.
        update_every: k.
        start_step: Before this step the shadows copy the weights.
        init: `"weights"` or `"first_step"` (the first update copies).
    """

    def __init__(self, schedule, update_every: int, start_step: int, init: str):
        self.schedule = schedule
        self.update_every = update_every
        self.start_step = start_step
        self.init = init

    @classmethod
    def checked(
        cls, decay: Any, update_every: Any, start_step: Any, init: Any
    ) -> UpdateRule:
        """The rule of these arguments, each checked (ValueError/TypeError
        naming it)."""
        schedule = schedules.get(decay)
        update_every = check_int(update_every, "update_every", 1)
        start_step = check_int(start_step, "start_step", 0)
        if init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}, got {init!r}.")
        return cls(schedule, int(update_every), int(start_step), init)

    def decay_at(self, step, copies_first_step: bool) -> Any:
        """The per-step decay at step t: 0 where the shadows copy, else d(s)."""
        t = ops.cast(step, STEP_DTYPE)
        s = t - self.start_step
        copies = ops.less_equal(s, 0)
        if self.init == "first_step" or copies_first_step:
            copies = ops.logical_or(copies, ops.equal(t, 1))
        return ops.where(copies, 0.0, self.schedule(ops.maximum(s, 1)))

    def rates(self, t, shadows) -> list:
        """`1 - D` at step t, one per shadow, aligned (computed once per
        dtype, in float64 where the backend has it)."""
        k = self.update_every
        s = ops.maximum(t - self.start_step, k)
        rate = 1.0 - self.schedule.decay_over(s, k, dtype=schedule_dtype())
        dtypes = [keras.backend.standardize_dtype(shadow.dtype) for shadow in shadows]
        by_dtype = {dtype: ops.cast(rate, dtype) for dtype in set(dtypes)}
        return [by_dtype[dtype] for dtype in dtypes]

    def conditions(self, t, copies_first_step: bool):
        """`(due, must_copy)` at step t: boolean tensors, or None for always
        (due) and never (must_copy).

        Conditions cost: every condition around the shadows costs a pass over
        their handles even when it is not taken, so there is at most one, and
        none where the rule needs none.
        """
        s = t - self.start_step
        k = self.update_every
        due = ops.equal(s % k, 0) if k > 1 else None
        must_copy = None
        copies_first_step = copies_first_step or self.init == "first_step"
        if self.start_step > 0 or copies_first_step:
            must_copy = ops.less_equal(s, 0)
            if copies_first_step:
                must_copy = ops.logical_or(must_copy, ops.equal(t, 1))
            if due is not None:
                due = ops.logical_or(due, must_copy)
        return due, must_copy
