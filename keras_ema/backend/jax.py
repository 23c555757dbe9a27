"""The JAX side of keras_ema: the update as pure functions of values.

On JAX, Keras trains with a stateless train step: `optimizer.stateless_apply`
runs `apply` in a `StatelessScope` that maps every variable (the shadows
included, they are optimizer variables) to a traced value and collects the
values assigned. `ShadowUpdater` therefore reads the shadows and weights
once, computes the new shadows as a pure function (`shadow_values.updated`:
conditions are `ops.cond` branches, not selects over whole tensors) and
assigns the results. Under `keras.distribution` every shadow is created
with its weight's layout, so it is sharded like the weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import keras
import numpy as np
from keras import ops

from keras_ema import _compat
from keras_ema.shadow_values import updated

VARIABLE_TYPES: tuple[Any, ...] = (keras.Variable,)


class Module:
    """The base of an average: a name (what `tf.Module` gives on TF).

    Nothing is tracked: on JAX the averages are saved through the
    optimizer's own variables and `save_own_variables`.
    """

    def __init__(self, name: str | None = None):
        self._name = name

    @property
    def name(self) -> str | None:
        return self._name


def init_scope() -> contextlib.AbstractContextManager:
    """Nothing to lift out of: JAX variables are created eagerly."""
    return contextlib.nullcontext()


def float64_available() -> bool:
    """Whether arrays can be float64: only with `jax_enable_x64`."""
    return bool(jax.config.read("jax_enable_x64"))


def schedule_dtype() -> str:
    """The dtype decay schedules compute in: float64 where JAX has it."""
    return "float64" if float64_available() else "float32"


def strategy_scope(model):
    """Nothing to enter: `keras.distribution` is global, not per model."""
    del model
    return contextlib.nullcontext()


# Keras's JAX train step gives the optimizer the trainable variables only;
# the average of the non-trainable ones is updated after it (see
# `NonTrainableStep`).
AVERAGES_NON_TRAINABLE_IN_APPLY = False


def apply_optimizer(optimizer, grads, trainable_variables=None):
    """`optimizer.apply`, in the pure form Keras's JAX train step uses.

    `stateless_apply` on the values the variables hold (in a traced train
    step, the values of the enclosing `StatelessScope`), then the results
    assigned. A `LossScaleOptimizer`'s stateful `apply` assigns inside
    `ops.cond` branches, which leaks tracers under `jax.jit`; its
    `stateless_apply` does not.
    """
    variables = (
        list(trainable_variables)
        if trainable_variables is not None
        else _compat.variables_built_for(optimizer)
    )
    weights, state = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], grads, [v.value for v in variables]
    )
    for variable, value in zip(variables, weights):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, state):
        variable.assign(value)


def sync_training_state(model):
    """Puts the state of a running `fit` back into the model's variables.

    Keras's JAX trainer carries the state outside the variables between
    epoch boundaries; a callback that reads them mid-epoch asks for it.
    """
    model.jax_state_sync()


def snapshot(variable):
    """The variable's value now (a value: later writes make new ones)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def check_built_outside_replica() -> None:
    """Nothing to check: JAX has no replica context."""


def variable_key(variable) -> int:
    """A key that identifies a variable."""
    return id(variable)


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def initial_value(variable):
    """The variable's current value, or None if it cannot be read here.

    A variable has no readable value inside a trace (its value there is a
    tracer) or while Keras's JAX trainer holds the values outside the
    variables during `fit`.
    """
    try:
        value = variable.value
    except (AttributeError, TypeError, ValueError):
        return None
    if (
        value is None
        or _is_traced(value)
        or tuple(value.shape) != tuple(variable.shape)
    ):
        return None
    return ops.copy(value)


def _cond(condition, true_fn, false_fn):
    """`ops.cond`, or a Python branch where `condition` is known.

    Outside a trace (an eager custom loop) `jax.lax.cond` would trace and
    compile a conditional at every call.
    """
    if _is_traced(condition):
        return ops.cond(condition, true_fn, false_fn)
    return true_fn() if bool(condition) else false_fn()


def _as_stored(weight):
    """The weight as its variable stores it, also inside `jax.jit`.

    XLA drops a float32 -> bfloat16 -> float32 round trip as a no-op, so a
    float32 shadow of a low-precision weight would average the optimizer's
    result before its rounding to the weight's dtype, not the weight. The
    barrier keeps the rounding.
    """
    if keras.backend.standardize_dtype(weight.dtype) in ("float16", "bfloat16"):
        return jax.lax.optimization_barrier(weight)
    return weight


class ShadowUpdater:
    """Moves shadow variables towards the variables they shadow.

    Args:
        shadows: The shadow variables.
        variables: The variables they shadow, aligned.
    """

    def __init__(self, shadows, variables):
        self.pairs = list(zip(shadows, variables))

    def run(self, fn: Callable, *args):
        """Calls `fn(agreed, *args)`; every value is agreed on JAX."""
        return fn(lambda value: value, *args)

    def _values(self):
        weights = [variable.value for _, variable in self.pairs]
        return (
            [shadow.value for shadow, _ in self.pairs],
            [_as_stored(w) for w in weights],
        )

    def _assign(self, values):
        for (shadow, _), value in zip(self.pairs, values):
            shadow.assign(value)

    def _constrained(self, shadows, weights):
        # Weights before the first step may not satisfy their constraint
        # yet: Keras constrains them after each optimizer update.
        values = []
        for (_, variable), shadow, weight in zip(self.pairs, shadows, weights):
            constraint = getattr(variable, "constraint", None)
            if constraint is not None:
                weight = constraint(weight)
            # A copy: outside a trace a cast to the same dtype is the
            # weight's own array, which the train step would donate twice.
            values.append(ops.copy(ops.cast(weight, shadow.dtype)))
        return values

    def copy_constrained(self):
        """Sets every shadow to its variable, the variable's constraint
        applied."""
        self._assign(self._constrained(*self._values()))

    def copy_constrained_if(self, condition):
        """`copy_constrained()` where the boolean scalar `condition` holds."""
        shadows, weights = self._values()
        self._assign(
            _cond(
                condition,
                lambda: self._constrained(shadows, weights),
                lambda: list(shadows),
            )
        )

    def update(self, due, must_copy, rates: Callable[[], dict]):
        """Moves every shadow (or copies, where `must_copy`) if `due`.

        `due` and `must_copy` are boolean scalars or None (always, never);
        `rates()` gives `1 - D` per shadow, aligned.
        """
        shadows, weights = self._values()
        self._assign(updated(shadows, weights, due, must_copy, rates, _cond))


class NonTrainableStep:
    """Stands in for a model's `train_step`: Keras's step, then the update of
    the average of the non-trainable variables.

    Keras's JAX train step hands `optimizer.stateless_apply` the trainable
    variables only; the step's new non-trainable values (BatchNorm's moving
    statistics) come out of the forward pass beside it. This runs the
    original step, then `non_trainable_averager.update` in a
    `StatelessScope` over the new non-trainable values and optimizer state,
    inside the same jitted function. A step the optimizer skipped (its
    average's step did not move) is not a step here either.

    Args:
        model: The model.
        train_step: Its original `train_step`.
        find_optimizer: Returns the model's `EMAOptimizer` (or None) now.
    """

    def __init__(self, model, train_step, find_optimizer):
        self.model = model
        self.train_step = train_step
        self.find_optimizer = find_optimizer

    @classmethod
    def install(cls, model, find_optimizer) -> bool:
        """Installs it on `model` once; returns whether it was new (a train
        function traced before must be traced again)."""
        if isinstance(model.__dict__.get("train_step"), cls):
            return False
        original = type(model).train_step.__get__(model)
        object.__setattr__(model, "train_step", cls(model, original, find_optimizer))
        return True

    def __call__(self, state, data):
        optimizer = self.find_optimizer(self.model)
        averager = getattr(optimizer, "non_trainable_averager", None)
        if averager is None or not averager.built:
            return self.train_step(state, data)
        variables = list(optimizer.variables)
        step_index = [id(v) for v in variables].index(id(optimizer.averager.step))
        before = state[2][step_index]
        with optimizer.non_trainable_updated_after_step():
            logs, state = self.train_step(state, data)
        trainable, non_trainable, optimizer_state, metrics = state
        mapping = list(zip(self.model.non_trainable_variables, non_trainable))
        mapping += list(zip(variables, optimizer_state))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            applied = None
            if optimizer._may_skip_steps():
                applied = ops.not_equal(optimizer.averager.step.value, before)
            averager.update(applied=applied)
        optimizer_state = [scope.get_current_value(v) for v in variables]
        return logs, (trainable, non_trainable, optimizer_state, metrics)


def install_non_trainable_step(model, find_optimizer) -> bool:
    """Makes `model`'s train step update the non-trainable average after it
    (`NonTrainableStep`); returns whether the train function must be traced
    again."""
    return NonTrainableStep.install(model, find_optimizer)


def training_forward(model) -> Callable:
    """`model(x, training=True)` as one jitted function, made once per model.

    The forward pass is `model.stateless_call` under `jax.jit`; the
    non-trainable values it returns (BatchNorm's moving statistics) are
    assigned to the model's variables. Kept on the model (untracked, like
    its holder), so that recomputing statistics at every validation traces
    once.
    """
    forward = model.__dict__.get("_keras_ema_training_forward")
    if forward is None:

        def stateless(trainable, non_trainable, x):
            _, non_trainable = model.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return non_trainable

        jitted = jax.jit(stateless)

        def forward(x):
            # Batches of a tf.data pipeline arrive as TF tensors.
            x = keras.tree.map_structure(np.asarray, x)
            values = jitted(
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                x,
            )
            for variable, value in zip(model.non_trainable_variables, values):
                variable.assign(value)

        object.__setattr__(model, "_keras_ema_training_forward", forward)
    return forward
