"""The exponential moving average of a set of variables.

`ExponentialMovingAverage` owns the shadow variables and nothing else: it
knows how to update them from the variables they shadow and how to swap them
into those variables exactly. It knows nothing about Keras training loops;
`EMAOptimizer` and the callbacks adapt it to Keras.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_ema import _compat, schedules
from keras_ema.backend.tensorflow import (
    ShadowUpdater,
    initial_value,
    variable_key,
)
from keras_ema.swap import ExactSwap
from keras_ema.update_rule import UpdateRule

INITS = ("weights", "first_step")
SHADOW_DTYPES = ("float32", "float64")


def variable_path(variable) -> str:
    """The path that names a variable: Keras's `path`, else the TF name."""
    path = getattr(variable, "path", None)
    if path is None:
        path = variable.name.split(":")[0]
    return path


def relative_paths(variables: Sequence) -> list[str]:
    """Paths of `variables` without the leading components they all share.

    Keras names a variable after the scopes it was built in, which depend on
    how the model was built: `sequential/dense/kernel` when trained,
    `dense/kernel` after `keras.models.load_model`. Dropping the shared
    prefix gives names that survive saving and loading.
    """
    split = [variable_path(v).split("/") for v in variables]
    shared = 0
    while all(len(parts) > shared + 1 for parts in split) and (
        len({parts[shared] for parts in split}) == 1
    ):
        shared += 1
    return ["/".join(parts[shared:]) for parts in split]


class ExponentialMovingAverage(tf.Module):
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
    once per step. It works eagerly, inside `tf.function` (with or without
    `jit_compile=True`), and in the replica or cross-replica context of a
    `tf.distribute` strategy, where the shadows are mirrored like the
    variables they shadow.

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

    Example:

    ```python
    ema = keras_ema.ExponentialMovingAverage(decay=0.999)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        ema.apply(model.trainable_variables)

    with ema.swapped():
        model.evaluate(x_val, y_val)
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
        schedule = schedules.get(decay)
        _check_int("update_every", update_every, minimum=1)
        _check_int("start_step", start_step, minimum=0)
        if init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}, got {init!r}.")
        if shadow_dtype not in SHADOW_DTYPES:
            raise ValueError(
                f"`shadow_dtype` must be one of {SHADOW_DTYPES}, got {shadow_dtype!r}."
            )
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"`name` must be a non-empty string without '/', got {name!r}."
            )
        super().__init__(name=name)
        self.schedule = schedule
        self.update_every = int(update_every)
        self.start_step = int(start_step)
        self.init = init
        self.shadow_dtype = shadow_dtype
        self._rule = UpdateRule(schedule, self.update_every, self.start_step, init)
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
        """
        if self.built:
            raise ValueError(
                f"ExponentialMovingAverage {self.name!r} is already built on "
                f"{len(self._averaged)} variables."
            )
        variables = _check_variables(variables)
        # Variables created in the function being traced (a model that fit
        # builds at its first step) have no value yet: their shadows start at
        # zero and the first update copies the weights it is given.
        unreadable = False
        shadows = {}
        # Under init_scope the shadows are ordinary, initialised variables
        # even when built during the first trace of a tf.function.
        with tf.init_scope(), keras.name_scope(self.name):
            self.step = keras.Variable(
                0,
                dtype="int64",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
                name="step",
            )
            for variable, path in zip(variables, relative_paths(variables)):
                dtype = _shadow_dtype(variable.dtype, self.shadow_dtype)
                with contextlib.ExitStack() as scopes:
                    *parents, leaf = path.split("/")
                    for parent in parents:
                        scopes.enter_context(keras.name_scope(parent))
                    initial = initial_value(variable)
                    if initial is None:
                        unreadable = True
                        initial = tf.zeros(variable.shape, dtype)
                    shadows[path] = keras.Variable(
                        tf.cast(initial, dtype),
                        dtype=dtype,
                        trainable=False,
                        autocast=False,
                        aggregation="only_first_replica",
                        name=leaf,
                    )
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

    def average(self, variable):
        """Returns the shadow variable holding the average of `variable`.

        Raises:
            ValueError: if the average is not built or `variable` is not one
                of the averaged variables.
        """
        self._check_built("average")
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

    def decay_at(self, step) -> tf.Tensor:
        """The per-step decay at optimizer step `step` (0 while copying).

        Args:
            step: The optimizer step t (an int or int tensor).

        Returns:
            A float32 scalar tensor: 0 where the shadows copy the weights
            (t <= start_step, or t = 1 with `init="first_step"`), else the
            schedule's d(t - start_step).
        """
        return self._rule.decay_at(step, self._copy_first_step)

    def current_decay(self) -> tf.Tensor:
        """The per-step decay at the latest step (`decay_at(step)`)."""
        self._check_built("current_decay")
        return self.decay_at(self.step)

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
        """
        if not self.built:
            if variables is None:
                raise ValueError(
                    "The first call to `apply` needs `variables` to build the "
                    "shadows, e.g. `ema.apply(model.trainable_variables)`."
                )
            in_replica = tf.distribute.get_replica_context() is not None
            if tf.distribute.has_strategy() and in_replica:
                raise ValueError(
                    "Build the average under `strategy.scope()` before "
                    "`strategy.run`: `ema.build(model.trainable_variables)`."
                )
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

    def reset(self) -> None:
        """Starts the average again from the variables as they are now.

        Every shadow is set to its variable's value and the step to 0, as
        when the average is built. Call it outside a `tf.function` (or in the
        cross-replica context of a strategy).
        """
        self._check_built("reset")
        self._updater.run(lambda agreed: self._updater.copy())
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
        with tf.init_scope():
            if int(self.step.numpy()) > 0:
                return
            if not self._copy_first_step and self._shadows_hold_variables():
                return
        self._set_untracked(_copy_first_step=False)

        def capture(agreed):
            tf.cond(tf.equal(self.step, 0), self._updater.copy, lambda: None)

        self._updater.run(capture)

    def _shadows_hold_variables(self) -> bool:
        """Whether every shadow holds its variable's value (read eagerly)."""
        for shadow, variable in zip(self._shadows, self._averaged):
            value = initial_value(variable)
            if value is None:
                return False
            wanted = np.asarray(tf.cast(value, shadow.dtype))
            if wanted.tobytes() != np.asarray(shadow.value).tobytes():
                return False
        return True

    def update(self, step=None, applied=None) -> None:
        """Updates the shadows for optimizer step `step`.

        Args:
            step: The number of optimizer updates applied, the current one
                included (an int or int tensor). `None` counts one more step
                than the last update.
            applied: Optional boolean tensor: whether the optimizer really
                applied this step. When false nothing moves, not even the
                step count (a step skipped by a loss scaler is not a step).
        """
        self._check_built("update")
        if self.is_swapped:
            raise RuntimeError(
                f"The variables hold the averages of {self.name!r} (swapped "
                "in); updating now would average the average. Call "
                "`swap_out()` before training."
            )
        self._updater.run(self._update_cross_replica, step, applied)

    def _update_cross_replica(self, agreed, step, applied):
        t = self.step + 1 if step is None else tf.cast(agreed(step), tf.int64)
        due, must_copy = self._rule.conditions(t, self._copy_first_step)

        def move():
            dtypes = {shadow.dtype for shadow in self._shadows}
            self._updater.move(self._rule.rates(t, dtypes))

        body = move
        if must_copy is not None:
            body = lambda: tf.cond(must_copy, self._updater.copy, move)  # noqa: E731
        if applied is not None:
            applied = agreed(applied)
            due = applied if due is None else tf.logical_and(applied, due)
            t = tf.where(applied, t, self.step)
        if due is None:
            body()
        else:
            tf.cond(due, body, lambda: None)
        self.step.assign(t)

    # ------------------------------------------------------------------- swap

    @property
    def is_swapped(self) -> bool:
        """Whether the variables hold the averages (see `swap_in`)."""
        return self._swap is not None and self._swap.is_swapped

    def swap_in(self) -> None:
        """Puts the averages into the variables, keeping the raw values aside.

        The shadows are cast to each variable's dtype. Call `swap_out` to
        restore the raw values bit for bit.
        """
        self._check_built("swap_in")
        self._swap.swap_in(self._shadows)

    def swap_out(self) -> None:
        """Restores the raw values put aside by `swap_in`, bit for bit."""
        self._check_built("swap_out")
        self._swap.swap_out()

    @contextlib.contextmanager
    def swapped(self) -> Iterator[ExponentialMovingAverage]:
        """Context manager: the averages inside, the raw values after.

        The raw values come back bit for bit on exit, exceptions included.
        """
        self.swap_in()
        try:
            yield self
        finally:
            self.swap_out()

    # ----------------------------------------------------------------- config

    def get_config(self) -> dict:
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
        config = dict(config)
        config["decay"] = schedules.get(config["decay"])
        return cls(**config)

    def _check_built(self, method):
        if not self.built:
            raise ValueError(
                f"Call `build(variables)` or `apply(variables)` on the average "
                f"{self.name!r} before `{method}`."
            )


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def _check_variables(variables):
    try:
        if isinstance(variables, (str, bytes)):
            raise TypeError
        variables = list(variables)
    except TypeError:
        raise TypeError(
            f"`variables` must be a list of variables, got {variables!r}."
        ) from None
    paths = set()
    for variable in variables:
        if not isinstance(variable, (keras.Variable, tf.Variable)):
            raise TypeError(
                "`variables` must hold keras.Variable or tf.Variable objects, "
                f"got {type(variable).__name__}."
            )
        if not tf.as_dtype(variable.dtype).is_floating:
            raise TypeError(
                f"`variables` must be floating point; {variable_path(variable)!r}"
                f" is {variable.dtype}."
            )
        path = variable_path(variable)
        if path in paths:
            raise ValueError(
                f"`variables` holds two variables with the path {path!r}; "
                "shadows are matched to variables by path."
            )
        paths.add(path)
    return variables


def _shadow_dtype(variable_dtype, shadow_dtype):
    variable_dtype = tf.as_dtype(variable_dtype)
    if variable_dtype == tf.float64:
        return "float64"
    return shadow_dtype
