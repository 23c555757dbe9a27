"""BEMA's correction: the served weights of a bias-corrected average.

`schedules.BEMA` gives the decay of the EMA part; `EMAOptimizer` keeps the
anchor theta_0 (an average that copies the weights until the end of the
burn-in, then keeps them). What goes into the model is computed when the
average is swapped in or exported, not at every step:

    served = EMA + alpha_s * (theta_t - theta_0),   alpha_s = (rho + gamma s)^-eta

with s = t - burn_in the steps since the burn-in. During the burn-in the
EMA and the anchor hold the weights exactly, so the served weights are the
weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops


def corrected_shadows(averager, anchor, raw: Sequence) -> list:
    """`EMA + alpha_s (theta_t - theta_0)` per variable, in the shadows' dtype.

    Args:
        averager: The BEMA average (`ExponentialMovingAverage` whose
            schedule is a `schedules.BEMA`).
        anchor: Its anchor (theta_0), aligned with it.
        raw: The raw weights theta_t, aligned.

    Returns:
        A list of tensors, one per shadow.
    """
    schedule = averager.schedule
    steps = int(ops.convert_to_numpy(averager.step)) - schedule.burn_in
    values = []
    for shadow, theta_0, theta in zip(averager.shadows, anchor.shadows, raw):
        dtype = keras.backend.standardize_dtype(shadow.dtype)
        alpha = schedule.correction(max(steps, 1), dtype=dtype)
        values.append(shadow.value + alpha * (ops.cast(theta, dtype) - theta_0.value))
    return values
