"""The average as pure functions, for train steps you write yourself.

Optax style: the shadows are values you carry in your train state, and
`update_shadows` returns new ones. Written in `keras.ops`, so it traces
inside `jax.jit` (and `tf.function`); conditions are `keras.ops.cond`
branches, not selects over whole tensors. For `model.fit` use
`EMAOptimizer`, which does this inside Keras's own train step.

Example (JAX):

```python
shadows = keras_ema.stateless.init_shadows(weights)

@jax.jit
def train_step(weights, opt_state, shadows, step, x, y):
    grads = jax.grad(loss_fn)(weights, x, y)
    weights, opt_state = apply_optimizer(weights, opt_state, grads)
    step = step + 1  # updates applied, this one included
    shadows = keras_ema.stateless.update_shadows(shadows, weights, step, 0.999)
    return weights, opt_state, shadows, step
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_ema import schedules
from keras_ema.backend import STEP_DTYPE
from keras_ema.shadow_values import updated
from keras_ema.shadows import shadow_dtype_for
from keras_ema.update_rule import UpdateRule, check_shadow_dtype

__all__ = ["init_shadows", "update_shadows"]


def init_shadows(weights: Sequence, shadow_dtype: str = "float32") -> list:
    """Shadows that start as copies of `weights`.

    Shadows of float16/bfloat16 weights are kept in float32 (or
    `shadow_dtype`); float64 weights keep float64 shadows.

    Args:
        weights: A list of floating-point arrays or tensors (or variables).
        shadow_dtype: `"float32"` or `"float64"`: the narrowest dtype a
            shadow is kept in.

    Returns:
        A list of new tensors, aligned with `weights`.

    Raises:
        TypeError: if `weights` is not a list of floating-point arrays.
        ValueError: if `shadow_dtype` is not one of the accepted values.

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np

    weights = [np.ones((2, 2), "float16"), np.zeros(3, "float32")]
    shadows = keras_ema.stateless.init_shadows(weights)
    dtypes = [keras.backend.standardize_dtype(s.dtype) for s in shadows]
    assert dtypes == ["float32", "float32"]  # float16 gets a float32 shadow
    ```
    """
    check_shadow_dtype(shadow_dtype)
    weights = _float_values(weights, "weights")
    return [
        ops.copy(ops.cast(w, shadow_dtype_for(w.dtype, shadow_dtype))) for w in weights
    ]


def update_shadows(
    shadows: Sequence,
    weights: Sequence,
    step: Any,
    decay: float | schedules.DecaySchedule = 0.999,
    update_every: int = 1,
    start_step: int = 0,
    init: str = "weights",
) -> list:
    """The shadows after optimizer step `step`: a pure function.

    With s = step - start_step and `update_every = k`, each shadow becomes

        shadow - (1 - D) * (shadow - w)    if s > 0 and s is a multiple of k
        w                                  if s <= 0 (or step = 1 and
                                           init="first_step")
        shadow                             otherwise

    where w is the weight after this step's optimizer update and
    D = d(s-k+1) * ... * d(s) the decay over the k steps (in closed form
    where the schedule has one). The same rule as `EMAOptimizer`.

    Args:
        shadows: The current shadows (from `init_shadows` or a previous
            call).
        weights: The weights after this step's update, aligned.
        step: The number of optimizer updates applied, this one included
            (a Python int >= 1 or an integer scalar tensor).
        decay: Float in [0, 1] or a `keras_ema.schedules.DecaySchedule`.
        update_every: Positive int k.
        start_step: Non-negative int; until this step the shadows copy.
        init: `"weights"` or `"first_step"` (step 1 copies the weights, as
            Keras's `use_ema=True`).

    Returns:
        A list of new shadows, aligned, in the shadows' dtypes.

    Raises:
        TypeError: if `shadows` or `weights` are not lists of floating-point
            arrays, `step`, `update_every` or `start_step` is not an
            integer, or `decay` is neither a number nor a schedule.
        ValueError: if they differ in length or shapes, `init` is not one of
            the accepted values, or an argument is out of range (`step < 1`,
            `decay` outside [0, 1], `update_every < 1`, `start_step < 0`).

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np

    shadows = keras_ema.stateless.init_shadows([np.zeros(2, "float32")])
    weights = [np.ones(2, "float32")]  # the weights after each step's update
    for step in (1, 2):  # in a jitted step, `step` is an integer tensor
        shadows = keras_ema.stateless.update_shadows(
            shadows, weights, step, decay=0.9
        )
    # 1 - 0.9**2 of the way from the initial weights to the new ones.
    value = keras.ops.convert_to_numpy(shadows[0])
    np.testing.assert_allclose(value, [0.19, 0.19], rtol=1e-6)
    ```
    """
    rule = UpdateRule.checked(decay, update_every, start_step, init)
    shadows = _float_values(shadows, "shadows")
    weights = _float_values(weights, "weights")
    if len(shadows) != len(weights) or any(
        tuple(s.shape) != tuple(w.shape) for s, w in zip(shadows, weights)
    ):
        raise ValueError(
            "`shadows` and `weights` must be aligned lists of the same shapes; "
            f"got {[tuple(s.shape) for s in shadows]} and "
            f"{[tuple(w.shape) for w in weights]}."
        )
    _check_step(step)
    t = ops.cast(step, STEP_DTYPE)
    due, must_copy = rule.conditions(t, copies_first_step=False)
    return updated(shadows, weights, due, must_copy, lambda: rule.rates(t, shadows))


def _check_step(step) -> None:
    if isinstance(step, (bool, float, str)) or step is None:
        raise TypeError(
            f"`step` must be an int >= 1 or an integer tensor, got {step!r}."
        )
    if isinstance(step, int) and step < 1:
        raise ValueError(f"`step` must be an int >= 1, got {step}.")
    if not isinstance(step, int):
        dtype = keras.backend.standardize_dtype(ops.convert_to_tensor(step).dtype)
        if not dtype.startswith(("int", "uint")):
            raise TypeError(f"`step` must be an integer tensor, got dtype {dtype}.")


def _float_values(values, name) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"`{name}` must be a list of arrays, got {values!r}.")
    converted = []
    for value in values:
        if isinstance(value, keras.Variable):
            value = value.value
        value = ops.convert_to_tensor(value)
        if not keras.backend.is_float_dtype(value.dtype):
            raise TypeError(
                f"`{name}` must hold floating-point arrays, got {value.dtype}."
            )
        converted.append(value)
    return converted
