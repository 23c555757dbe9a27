"""The exponential moving average of a set of variables.

`ExponentialMovingAverage` owns the shadow variables and nothing else: its
configuration, building and naming the shadows, and the public entry points.
It updates them from the variables they shadow (`UpdatesShadows`, in
shadow_updates.py) and swaps them into those variables exactly
(`SwapsShadows`, in swap.py). It knows nothing about Keras training loops;
`EMAOptimizer` and the callbacks adapt it to Keras.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_ema import _compat, schedules
from keras_ema.backend import (
    STEP_DTYPE,
    VARIABLE_TYPES,
    Module,
    ShadowUpdater,
    check_built_outside_replica,
    init_scope,
    variable_key,
)
from keras_ema.shadow_updates import UpdatesShadows
from keras_ema.shadows import check_variables, create_shadows, variable_path
from keras_ema.swap import ExactSwap, SwapsShadows
from keras_ema.update_rule import UpdateRule, check_shadow_dtype


class ExponentialMovingAverage(UpdatesShadows, SwapsShadows, Module):
    """Exponential moving average of variables, kept in shadow variables.

    At step t (the number of updates applied, the current one included) the
    shadow of each variable w moves as

        shadow <- shadow - (1 - D) * (shadow - w)

    where D is the decay over the steps since the last update. Schedules see
    the step counted from `start_step`, s = t - start_step; for s <= 0 the
    shadow is set to the weights. With `update_every=k` the shadows move only
    when s is a multiple of k, with D the product of the k per-step decays
    (in closed form where the schedule has one), so the averaging window is
    the same as with k = 1.

    The update is one fused expression per variable with the decay computed
    once per step. On TensorFlow it works eagerly, inside `tf.function` (with
    or without `jit_compile=True`), and in the replica or cross-replica
    context of a `tf.distribute` strategy, where the shadows are mirrored
    like the variables they shadow. On JAX it works eagerly and inside
    Keras's stateless train step (the shadows are optimizer variables of
    `EMAOptimizer`, carried through the jitted step); for your own
    `jax.jit` step, use the pure functions of `keras_ema.stateless`.

    Shadows of float16 and bfloat16 variables are kept in float32 (or
    `shadow_dtype`); float64 variables keep float64 shadows. Swapping the
    shadows into the variables (`swap_in`, `swap_out`, `swapped`) keeps the
    raw values aside and restores them bit for bit.

    Args:
        decay: Float in [0, 1] (a constant decay) or a
            `keras_ema.schedules.DecaySchedule`.
        update_every: Positive int. Update the shadows every this many steps.
        start_step: Non-negative int. Until this step the shadows copy the
            variables.
        init: `"weights"`: shadows start as a copy of the variables when built
            (the `tf.train.ExponentialMovingAverage` convention).
            `"first_step"`: the first update copies the variables (the
            convention of Keras's `use_ema=True`).
        shadow_dtype: `"float32"` or `"float64"`: the narrowest dtype a shadow
            is kept in.
        name: Name of the average; prefixes the shadows' paths.

    Raises:
        TypeError: if `decay` is neither a number nor a schedule, or
            `update_every` or `start_step` is not an int.
        ValueError: if `decay` is outside [0, 1], `update_every < 1`,
            `start_step < 0`, `init` or `shadow_dtype` is not one of the
            accepted values (or `"float64"` without JAX's x64 mode), or
            `name` is not a non-empty string without "/".

    Example:

    ```python
    # TensorFlow only: a custom loop with tf.GradientTape and tf.function.
    # On JAX, write your own jax.jit step with keras_ema.stateless.
    import keras
    import keras_ema
    import numpy as np
    import tensorflow as tf

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.MeanSquaredError()
    ema = keras_ema.ExponentialMovingAverage(decay=0.9)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        ema.apply(model.trainable_variables)  # right after the update

    for start in range(0, 32, 8):
        train_step(x[start : start + 8], y[start : start + 8])
    assert int(ema.step) == 4
    with ema.swapped():  # the averages in the variables, raw values after
        print(float(loss_fn(y, model(x))))
    ```
    """

    def __init__(
        self,
        decay: float | schedules.DecaySchedule = 0.999,
        update_every: int = 1,
        start_step: int = 0,
        init: str = "weights",
        shadow_dtype: str = "float32",
        name: str = "ema",
    ):
        rule = UpdateRule.checked(decay, update_every, start_step, init)
        check_shadow_dtype(shadow_dtype)
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"`name` must be a non-empty string without '/', got {name!r}."
            )
        super().__init__(name=name)
        self.schedule = rule.schedule
        self.update_every = rule.update_every
        self.start_step = rule.start_step
        self.init = init
        self.shadow_dtype = shadow_dtype
        self._rule = rule
        self.built = False
        self._set_untracked(
            _averaged=[],
            _shadows=[],
            _index={},
            _swap=None,
            _updater=None,
            _copy_first_step=False,
        )

    @_compat.no_automatic_dependency_tracking
    def _set_untracked(self, **attributes):
        # The averaged variables belong to the model and the raw values are
        # transient: neither may become a checkpoint dependency of the average.
        for name, value in attributes.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ build

    def build(self, variables: Sequence) -> None:
        """Creates the shadows of `variables` and the step counter.

        Call it under the `tf.distribute` strategy's scope that owns the
        variables (outside `strategy.run`); `apply` builds lazily otherwise.

        Args:
            variables: The floating-point variables to average, each with a
                distinct path.

        Raises:
            TypeError: if `variables` is not a list of floating-point
                variables.
            ValueError: if the average is built already, or two variables
                share a path.
        """
        if self.built:
            raise ValueError(
                f"ExponentialMovingAverage {self.name!r} is already built on "
                f"{len(self._averaged)} variables."
            )
        variables = check_variables(variables)
        # Under init_scope the shadows are ordinary, initialised variables
        # even when built during the first trace of a tf.function.
        with init_scope(), keras.name_scope(self.name):
            self.step = keras.Variable(
                0,
                dtype=STEP_DTYPE,
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
                name="step",
            )
            shadows, unreadable = create_shadows(variables, self.shadow_dtype)
        self._set_untracked(
            _averaged=variables,
            _shadows=list(shadows.values()),
            _index={variable_key(v): i for i, v in enumerate(variables)},
            _swap=ExactSwap(variables, self.name),
            _updater=ShadowUpdater(list(shadows.values()), variables),
            _copy_first_step=unreadable,
        )
        # A dict keyed by relative path, so that checkpoints match shadows to
        # their variables by name rather than by position.
        self.shadows_by_path = shadows
        self.built = True

    # ----------------------------------------------------------------- access

    @property
    def averaged_variables(self) -> list:
        """The variables being averaged, in build order."""
        return list(self._averaged)

    @property
    def shadows(self) -> list:
        """The shadow variables, aligned with `averaged_variables`."""
        return list(self._shadows)

    @property
    def variables(self) -> list:
        """All state: the step counter, then the shadows."""
        if not self.built:
            return []
        return [self.step] + self._shadows

    def average(self, variable: keras.Variable) -> keras.Variable:
        """Returns the shadow variable holding the average of `variable`.

        Args:
            variable: One of the averaged variables.

        Returns:
            Its shadow variable.

        Raises:
            TypeError: if `variable` is not a variable.
            ValueError: if the average is not built or `variable` is not one
                of the averaged variables.
        """
        self._check_built("average")
        if not isinstance(variable, VARIABLE_TYPES):
            raise TypeError(
                f"`variable` must be a variable, got {type(variable).__name__}."
            )
        index = self._index.get(variable_key(variable))
        if index is None:
            raise ValueError(
                f"`variable` {variable_path(variable)!r} is not one of the "
                f"{len(self._averaged)} variables the average {self.name!r} "
                "was built on. An average belongs to the variables it was "
                "built on, not to their names: a variable of another model "
                "(a clone, a rebuilt or reloaded model) with the same path is "
                "another variable; ask that model's optimizer."
            )
        return self._shadows[index]

    # ----------------------------------------------------------------- update

    def apply(self, variables: Sequence | None = None) -> None:
        """Counts one step and updates the shadows from `variables`.

        For custom training loops: call it right after the optimizer's
        update, inside the same `tf.function`. It builds the shadows on the
        first call, which then copies the weights it is given (in a traced
        function the weights at trace time are not the ones that count).

        Args:
            variables: The variables to average (on the first call), or the
                same variables again. May be omitted once built.

        Raises:
            TypeError: if on the first call `variables` is not a list of
                floating-point variables.
            ValueError: if on the first call `variables` is None, or later
                they are not the variables the average was built on, in
                order.
            RuntimeError: if the variables hold the averages (swapped in).
        """
        if not self.built:
            if variables is None:
                raise ValueError(
                    "The first call to `apply` needs `variables` to build the "
                    "shadows, e.g. `ema.apply(model.trainable_variables)`."
                )
            check_built_outside_replica()
            self.build(variables)
            # Built while tracing, the shadows hold the weights as they were
            # at trace time; the first update copies the weights it is given,
            # so graph and eager runs agree.
            self._set_untracked(_copy_first_step=True)
        elif variables is not None:
            variables = list(variables)
            if [variable_key(v) for v in variables] != [
                variable_key(v) for v in self._averaged
            ]:
                raise ValueError(
                    "`variables` must be the variables the average was built "
                    f"on ({len(self._averaged)} variables), in the same order."
                )
        self.update()

    # ----------------------------------------------------------------- config

    def get_config(self) -> dict:
        """Returns the constructor arguments, the decay serialized.

        Returns:
            A dict for `from_config`.
        """
        return {
            "decay": keras.saving.serialize_keras_object(self.schedule),
            "update_every": self.update_every,
            "start_step": self.start_step,
            "init": self.init,
            "shadow_dtype": self.shadow_dtype,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> ExponentialMovingAverage:
        """Creates an average (unbuilt) from the output of `get_config`.

        Args:
            config: The dict `get_config` returned.

        Returns:
            A new `ExponentialMovingAverage`.
        """
        config = dict(config)
        config["decay"] = schedules.get(config["decay"])
        return cls(**config)

    def _check_built(self, method):
        if not self.built:
            raise ValueError(
                f"Call `build(variables)` or `apply(variables)` on the average "
                f"{self.name!r} before `{method}`."
            )
