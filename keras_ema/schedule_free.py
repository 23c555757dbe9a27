"""The averaged point of a model trained with Keras's `ScheduleFreeAdamW`.

Schedule-free AdamW (Defazio et al., 2024) trains on an interpolated point
`y` and keeps a gradient sequence `z` (Keras's `momentum` variables); the
point meant for evaluation is the average `x`, which Keras never puts in the
model. The state defines it:

    y = (1 - beta_1) * z + beta_1 * x   =>   x = (y - (1 - beta_1) * z) / beta_1

That identity holds after every Keras step on both backends, so the `x`
served here is the one Keras's own state implies. What differs between the
backends is the sequence `x` follows: on JAX, Keras 3.15 computes the
paper's `x_t = (1 - 1/t) x_{t-1} + z_t / t`; on TensorFlow it reads `z`
after updating it (`momentum.value` is a live reference there), so
`x_t = (1 - 1/t) (y_{t-1} - (1 - beta_1) z_t) / beta_1 + z_t / t`.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_ema import _compat

SCHEDULE_FREE = getattr(keras.optimizers, "ScheduleFreeAdamW", None)


def is_schedule_free(optimizer: Any) -> bool:
    """Whether `optimizer` is a Keras `ScheduleFreeAdamW` (Keras 3.12+)."""
    return SCHEDULE_FREE is not None and isinstance(optimizer, SCHEDULE_FREE)


class ScheduleFreeSource:
    """A `ScheduleFreeAdamW`'s averaged point `x`, as a swappable average.

    Quacks like `holder.AverageSource`: the holder swaps `shadows` into
    `variables` exactly and puts the raw values back afterwards. The
    variables are the model's `y` and the optimizer's `z`, and both take
    `x`: while the average is in, the optimizer's state describes `x`
    (`x = y = z` is a state whose average is `x`), so a file saved then
    (`EMACheckpoint`, `model.save` inside `ema_weights`) holds `x`, and a
    model loaded from it serves `x` as its average and resumes training from
    `x`, never taking `x` for `y`. `shadows` is computed when read, from the
    variables as they are, so read it only while the model holds its raw
    weights (the holder does).

    Args:
        optimizer: A built `keras.optimizers.ScheduleFreeAdamW`.
    """

    kind = "schedule_free"

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self._y, self._z = _compat.schedule_free_pairs(optimizer)
        self.variables = self._y + self._z

    @property
    def beta_1(self) -> float:
        beta_1 = self.optimizer.beta_1
        return float(beta_1() if callable(beta_1) else beta_1)

    @property
    def shadows(self) -> list:
        """`x = (y - (1 - beta_1) z) / beta_1` for each variable, for `y`
        and again for `z`."""
        beta_1 = self.beta_1
        x = [
            ops.divide(ops.subtract(y.value, (1.0 - beta_1) * z.value), beta_1)
            for y, z in zip(self._y, self._z)
        ]
        return x + x

    @property
    def mirrors(self) -> dict:
        """`id(z)` -> its model variable `y`: `z` holds what `y` holds."""
        return {id(z): y for y, z in zip(self._y, self._z)}

    @property
    def step(self) -> int:
        """The optimizer steps applied."""
        return int(keras.ops.convert_to_numpy(self.optimizer.iterations))

    def current_decay(self) -> float:
        """`1 - 1/t`: the weight of the past in `x`'s latest step."""
        return 0.0 if self.step <= 1 else 1.0 - 1.0 / self.step

    def describe(self) -> str:
        return f"{type(self.optimizer).__name__}(beta_1={self.beta_1})"

    def metadata(self) -> dict:
        return {
            "source": "keras ScheduleFreeAdamW",
            "beta_1": self.beta_1,
            "step": self.step,
            "current_decay": self.current_decay(),
        }
