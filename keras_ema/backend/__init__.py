"""What only one backend has: one module per backend.

The active Keras backend's module is imported here, and the names the rest
of keras_ema uses are exported: the shadow updater, applying a wrapped
optimizer's step, reading and snapshotting variables, the base class of an
average, distribution scopes, dtype facts (float64, the step dtype), and the
compiled forward pass that recomputes BatchNorm statistics. Each backend
module defines them all. TensorFlow is only imported on the TensorFlow
backend, so that keras_ema runs on JAX without it.
"""

import keras

BACKEND = keras.backend.backend()

# The dtype of step counters, as Keras's optimizers count theirs: int64, or
# int32 on JAX without `jax_enable_x64`.
STEP_DTYPE = keras.backend.standardize_dtype("int")

if BACKEND == "tensorflow":
    from keras_ema.backend import tensorflow as _active
elif BACKEND == "jax":
    # Type checkers see the TensorFlow module; the JAX one defines the same
    # names (ShadowUpdater, Module: other classes with the same methods).
    from keras_ema.backend import jax as _active  # type: ignore[no-redef]
else:
    raise ImportError(
        f"keras_ema supports the 'tensorflow' and 'jax' Keras backends; "
        f"KERAS_BACKEND is {BACKEND!r}. Set KERAS_BACKEND=tensorflow or "
        "KERAS_BACKEND=jax before importing keras."
    )

AVERAGES_NON_TRAINABLE_IN_APPLY = _active.AVERAGES_NON_TRAINABLE_IN_APPLY
VARIABLE_TYPES = _active.VARIABLE_TYPES
Module = _active.Module
ShadowUpdater = _active.ShadowUpdater
apply_optimizer = _active.apply_optimizer
check_built_outside_replica = _active.check_built_outside_replica
float64_available = _active.float64_available
init_scope = _active.init_scope
install_non_trainable_step = _active.install_non_trainable_step
initial_value = _active.initial_value
schedule_dtype = _active.schedule_dtype
snapshot = _active.snapshot
strategy_scope = _active.strategy_scope
sync_training_state = _active.sync_training_state
training_forward = _active.training_forward
variable_key = _active.variable_key

__all__ = [
    "BACKEND",
    "STEP_DTYPE",
    "Module",
    "AVERAGES_NON_TRAINABLE_IN_APPLY",
    "apply_optimizer",
    "ShadowUpdater",
    "VARIABLE_TYPES",
    "check_built_outside_replica",
    "float64_available",
    "init_scope",
    "install_non_trainable_step",
    "initial_value",
    "schedule_dtype",
    "snapshot",
    "strategy_scope",
    "sync_training_state",
    "training_forward",
    "variable_key",
]
