"""The TensorFlow side of keras_ema: fused kernels, tf.distribute, tracking.

`ShadowUpdater` applies `shadow <- shadow - rate * (shadow - w)` (or a copy)
to every shadow, in the replica or cross-replica context of a
`tf.distribute` strategy, with the fewest kernels per variable, under a
condition where the step rule needs one (`run_if`: a `tf.cond`, or under XLA
a loop of at most one iteration, which copies nothing when not taken).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_ema import _compat

# Variables with at least this many elements are updated by one XLA-compiled
# function when the step itself is not XLA-compiled (see `ShadowUpdater`).
FUSE_MIN_SIZE = 1 << 20


class Module(tf.Module):
    """The base of an average: a `tf.Module`, so that `tf.train.Checkpoint`
    (through the optimizer) tracks its shadows."""


VARIABLE_TYPES: tuple[Any, ...] = (keras.Variable, tf.Variable)

# Variables created under it are ordinary, initialised variables even when
# created during the first trace of a `tf.function`.
init_scope = tf.init_scope


def float64_available() -> bool:
    """Whether tensors can be float64: always on TensorFlow."""
    return True


def schedule_dtype() -> str:
    """The dtype decay schedules compute in."""
    return "float64"


def strategy_scope(model):
    """The scope of the `tf.distribute` strategy `model` was built under."""
    return model.distribute_strategy.scope()


# Optimizer steps see the whole model state on TensorFlow: the average of
# the non-trainable variables is updated in `EMAOptimizer.apply`.
AVERAGES_NON_TRAINABLE_IN_APPLY = True


def install_non_trainable_step(model, find_optimizer) -> bool:
    """Nothing to install: `EMAOptimizer.apply` sees the whole state."""
    del model, find_optimizer
    return False


def apply_optimizer(optimizer, grads, trainable_variables=None):
    """`optimizer.apply(grads, trainable_variables)`."""
    optimizer.apply(grads, trainable_variables)


def sync_training_state(model):
    """Nothing to do: TF trains the variables in place."""
    del model


def snapshot(variable):
    """The variable's value now, ordered before later writes in a graph."""
    return tf.identity(variable)


def check_built_outside_replica() -> None:
    """Refuses to build an average inside `strategy.run`."""
    if tf.distribute.has_strategy() and tf.distribute.get_replica_context() is not None:
        raise ValueError(
            "Build the average under `strategy.scope()` before "
            "`strategy.run`: `ema.build(model.trainable_variables)`."
        )


def tf_variable(variable) -> tf.Variable:
    """The `tf.Variable` behind a Keras variable (or the variable itself)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def variable_key(variable) -> int:
    """A key that identifies a variable, the same for all its replicas."""
    # A replica sees its component of a mirrored variable; the strategy
    # knows the mirrored variable it belongs to.
    strategy = tf.distribute.get_strategy()
    return id(strategy.extended.value_container(tf_variable(variable)))


def initial_value(variable):
    """The variable's current value (a snapshot), or None if it has none yet."""
    try:
        # `tf.cast` would pass a variable of the same dtype through, aliasing
        # the weight; `convert_to_tensor` reads a snapshot.
        value = tf.convert_to_tensor(tf_variable(variable))
    except (ValueError, TypeError, tf.errors.OpError):
        return None
    if value.shape != tuple(variable.shape):
        return None
    return value


def shadow_update(shadow, weight, rate):
    """`shadow -= rate * (shadow - weight)`, as one fused kernel.

    `ResourceApplyGradientDescent` computes `var -= alpha * delta` in a single
    pass over memory (and XLA lowers it to the same fused loop), which saves a
    full read and write of a temporary against `assign_sub(rate * delta)`.
    """
    delta = shadow - tf.cast(weight, shadow.dtype)
    return tf.raw_ops.ResourceApplyGradientDescent(
        var=shadow.handle, alpha=rate, delta=delta
    )


def _shadow_update_or_copy(shadow, weight, rate, must_copy):
    """`shadow_update`, or a copy of the weight where `must_copy` holds."""
    weight = tf.cast(weight, shadow.dtype)
    moved = shadow - rate * (shadow - weight)
    return shadow.assign(tf.where(must_copy, weight, moved))


def _shadow_copy(shadow, weight, constraint=None):
    value = tf.convert_to_tensor(weight)
    if constraint is not None:
        value = constraint(value)
    return shadow.assign(tf.cast(value, shadow.dtype))


def _size(variable) -> int:
    return int(np.prod(variable.shape))


def _fused_update_function(pairs):
    """`shadow_update` for all `pairs`, compiled into one XLA cluster.

    The function closes over the variables (rather than taking them as
    arguments), so each average traces its own.
    """

    def update(rates):
        for (shadow, weight), rate in zip(pairs, rates):
            shadow_update(shadow, weight, rate)

    return tf.function(update, jit_compile=True, autograph=False)


def run_if(condition, fn: Callable[[], None]) -> None:
    """Runs `fn()` in a graph where the boolean scalar tensor `condition` holds.

    Under XLA, a `tf.cond` whose branch writes variables copies every one of
    them when the branch is not taken: the other branch passes the buffers
    through, and XLA's copy insertion does not alias them (the compiled HLO
    of an `update_every=10` step had one `copy` per shadow). A loop of at
    most one iteration updates the variables in place and copies nothing.
    """
    if not _compat.in_xla_context():
        tf.cond(condition, fn, lambda: None)
        return

    def body(iteration):
        fn()
        return (iteration + 1,)

    tf.while_loop(
        lambda iteration: iteration < tf.cast(condition, tf.int32),
        body,
        (tf.constant(0),),
        maximum_iterations=1,
    )


class ShadowUpdater:
    """Moves shadow variables towards the variables they shadow.

    Args:
        shadows: The shadow variables.
        variables: The variables they shadow, aligned.
    """

    def __init__(self, shadows, variables):
        self.strategy = tf.distribute.get_strategy()
        self.pairs = list(zip(shadows, variables))
        self._fused_index = [
            i for i, (_, v) in enumerate(self.pairs) if _size(v) >= FUSE_MIN_SIZE
        ]
        self.fused_pairs = [
            (tf_variable(shadow), tf_variable(variable))
            for shadow, variable in (self.pairs[i] for i in self._fused_index)
        ]
        self._fused = (
            _fused_update_function(self.fused_pairs) if self.fused_pairs else None
        )
        fused = set(self._fused_index)
        self._unfused_index = [i for i in range(len(self.pairs)) if i not in fused]

    def run(self, fn, *args):
        """Calls `fn(agreed, *args)` in the cross-replica context.

        `agreed(value)` turns a value that all replicas agree on (arriving as
        `PerReplica` through a merge call) into a plain tensor.
        """
        strategy = self.strategy

        def agreed(value):
            return strategy.experimental_local_results(value)[0]

        if tf.distribute.in_cross_replica_context():
            return fn(agreed, *args)
        return _compat.maybe_merge_call(lambda _: fn(agreed, *args), strategy)

    def copy(self):
        """Sets every shadow to its variable."""
        self._for_each(_shadow_copy, self.pairs)

    def copy_constrained(self):
        """Sets every shadow to its variable with the variable's constraint
        applied (weights before the first step may not satisfy it yet:
        Keras applies constraints after each optimizer update)."""
        for shadow, variable in self.pairs:
            self.strategy.extended.update(
                tf_variable(shadow),
                _shadow_copy,
                args=(tf_variable(variable), getattr(variable, "constraint", None)),
                group=False,
            )

    def update(self, due, must_copy, rates):
        """Moves every shadow (or copies, where `must_copy`) if `due`.

        Args:
            due: Boolean scalar tensor, or None for always.
            must_copy: Boolean scalar tensor, or None for never.
            rates: A function returning `1 - D` per shadow (aligned with
                the shadows), called only in the branch that moves them.
        """

        def move():
            self.move(rates())

        body = move
        if must_copy is not None and _compat.in_xla_context():
            # A select fuses into the update's loop; a `tf.cond` would make
            # XLA copy its result into the shadows.
            body = lambda: self._for_each(  # noqa: E731
                _shadow_update_or_copy, self.pairs, rates(), must_copy
            )
        elif must_copy is not None:
            # Outside XLA a select is one more kernel per variable at every
            # step; the branches cost a few ops in all.
            body = lambda: tf.cond(must_copy, self.copy, move)  # noqa: E731
        if due is None:
            body()
        else:
            run_if(due, body)

    def copy_constrained_if(self, condition):
        """`copy_constrained()` where the boolean scalar `condition` holds."""
        run_if(condition, self.copy_constrained)

    def move(self, rates):
        """`shadow -= rate * (shadow - w)` for every shadow, `rates`
        aligned with the shadows."""
        if tf.distribute.has_strategy() or self._fused is None:
            self._for_each(shadow_update, self.pairs, rates)
            return
        # Outside XLA, TF runs `shadow - w` and the update as two kernels,
        # twice the memory traffic of one fused loop; an inner XLA function
        # fuses them. It pays off for large variables only: an XLA launch has
        # a fixed cost per argument.
        self._fused([rates[i] for i in self._fused_index])
        unfused = self._unfused_index
        self._for_each(
            shadow_update, [self.pairs[i] for i in unfused], [rates[i] for i in unfused]
        )

    def _for_each(self, fn, pairs, rates=None, *extra):
        for i, (shadow, variable) in enumerate(pairs):
            args: tuple = (tf_variable(variable),)
            if rates is not None:
                args += (rates[i], *extra)
            self.strategy.extended.update(
                tf_variable(shadow), fn, args=args, group=False
            )


def training_forward(model) -> Callable:
    """`model(x, training=True)` as a `tf.function`, made once per model.

    Kept on the model (untracked, like its holder), so that recomputing
    BatchNorm statistics at every validation traces once. The layers'
    settings at the first call are baked into the trace; `BatchNormData`
    always calls it with the same ones.
    """
    forward = model.__dict__.get("_keras_ema_training_forward")
    if forward is None:

        def call(x):
            model(x, training=True)

        forward = tf.function(call, reduce_retracing=True)
        object.__setattr__(model, "_keras_ema_training_forward", forward)
    return forward
