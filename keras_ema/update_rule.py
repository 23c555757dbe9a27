"""When an average's shadows move, and by how much (DESIGN.md, Semantics).

At optimizer step t (the updates applied, the current one included),
schedules see s = t - start_step. For s <= 0, and at t = 1 when the first
step copies, the shadows are set to the weights. Otherwise, with
`update_every = k`, they move at the steps where s is a multiple of k:

    shadow <- shadow - (1 - D) * (shadow - w),   D = d(s-k+1) * ... * d(s)

with D in closed form where the schedule has one (`decay_over`).
"""

from __future__ import annotations

import tensorflow as tf


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

    def decay_at(self, step, copies_first_step: bool) -> tf.Tensor:
        """The per-step decay at step t: 0 where the shadows copy, else d(s)."""
        t = tf.cast(step, tf.int64)
        s = t - self.start_step
        copies = s <= 0
        if self.init == "first_step" or copies_first_step:
            copies = tf.logical_or(copies, tf.equal(t, 1))
        return tf.where(copies, 0.0, self.schedule(tf.maximum(s, 1)))

    def rates(self, t, dtypes) -> dict:
        """`1 - D` at step t for each shadow dtype, computed once in float64."""
        k = self.update_every
        s = tf.maximum(t - self.start_step, k)
        rate = 1.0 - self.schedule.decay_over(s, k, dtype="float64")
        return {dtype: tf.cast(rate, dtype) for dtype in dtypes}

    def conditions(self, t, copies_first_step: bool):
        """`(due, must_copy)` at step t: boolean tensors, or None for always
        (due) and never (must_copy).

        Conditions cost: every `tf.cond` around the shadows costs a pass over
        their handles even when it is not taken, so there is at most one, and
        none where the rule needs none.
        """
        s = t - self.start_step
        k = self.update_every
        due = tf.equal(s % k, 0) if k > 1 else None
        must_copy = None
        copies_first_step = copies_first_step or self.init == "first_step"
        if self.start_step > 0 or copies_first_step:
            must_copy = s <= 0
            if copies_first_step:
                must_copy = tf.logical_or(must_copy, tf.equal(t, 1))
            if due is not None:
                due = tf.logical_or(due, must_copy)
        return due, must_copy
