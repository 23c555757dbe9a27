"""Saying so when an average looks bad for a reason the user can fix."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_ema.backend import STEP_DTYPE

# Above this share of the initial weights, the average is mostly where
# training started, not where it went.
INITIAL_SHARE_LIMIT = 0.5
_CHUNK = 65536  # steps per evaluation of the schedule


def initial_share(averager) -> float:
    """The share of the weights training started from in the average now.

    With w_0 the weights at step 0 and D_u the decay of the update at step
    u (0 where the shadows copy the weights), the average after its last
    update, at step T', is

        shadow = (prod_{u=1..T'} d_u) * w_0 + (terms of w_1 .. w_T')

    so the share is the product of the per-step decays d_u = `decay_at(u)`
    over steps 1..T' (with `update_every = k` an update's decay is the
    product of its k steps' decays). It is 0 for schedules that start from
    the first steps' weights (`Debiased`, `init="first_step"`,
    `start_step > 0`).

    Args:
        averager: A built `keras_ema.ExponentialMovingAverage`.

    Returns:
        A float in [0, 1].
    """
    step = int(averager.step.numpy())
    k, start = averager.update_every, averager.start_step
    if step > start:
        step -= (step - start) % k  # the last step that moved the shadows
    log_share = 0.0
    for first in range(1, step + 1, _CHUNK):
        steps = keras.ops.arange(first, min(first + _CHUNK, step + 1), dtype=STEP_DTYPE)
        decays = np.asarray(averager.decay_at(steps), np.float64)
        if np.any(decays <= 0.0):
            return 0.0
        log_share += float(np.sum(np.log(decays)))
        if log_share < np.log(1e-6):
            break  # nothing left of it worth reporting
    return float(np.exp(log_share))


class JudgingAdvice:
    """Warns, once each, when what EMASwap judges is misleading.

    - BatchNorm statistics that do not belong to the averaged weights;
    - an average made mostly of the weights training started from.
    """

    def __init__(self):
        self._said_statistics = False
        self._said_initial = False

    def when_judging(self, model, statistics: str | None) -> None:
        """At a validation, evaluation or prediction on the average."""
        if self._said_statistics or statistics not in ("raw", "averaged"):
            return
        self._said_statistics = True
        which = {
            "raw": "the moving statistics of the raw weights, which describe "
            "another network",
            "averaged": "averaged moving statistics, which match neither the "
            "raw nor the averaged weights",
        }[statistics]
        warnings.warn(
            f"{model.name!r} has BatchNormalization layers, and its average "
            f"is judged with {which}: the averaged weights can score far "
            "below their worth (a small conv net after 3 epochs, in the "
            "README: 11% with the raw statistics, 88% recomputed). Pass "
            "training data to recompute "
            "the statistics for the average each time it goes in, e.g. "
            "`keras_ema.EMASwap(batchnorm_data=x_train)` (or `(x, y)`, or a "
            "tf.data.Dataset; `batchnorm_steps` batches).",
            stacklevel=3,
        )

    def after_fit(self, source) -> None:
        """At the end of `fit`: the initial weights' share of the average."""
        if self._said_initial or source.kind != "keras_ema":
            return
        averager = source.averager
        share = initial_share(averager)
        if share <= INITIAL_SHARE_LIMIT:
            return
        self._said_initial = True
        warnings.warn(
            f"After {int(averager.step.numpy())} steps, {share:.0%} of the "
            "average is still the weights training started from "
            f"(decay {source.describe()}): it is mostly the untrained model. "
            "Use a warmup schedule (`decay=keras_ema.schedules.Debiased"
            "(0.999)` or `PowerWarmup`), `init='first_step'`, a lower decay, or "
            "train longer.",
            stacklevel=3,
        )
