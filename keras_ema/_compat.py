"""Every private Keras, TensorFlow and JAX name keras_ema uses, in one place.

Each entry says why no public API does the job.
"""

from __future__ import annotations

import contextlib
import sys
from types import FrameType

import keras

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    # Attributes of a Keras module or trackable that must not become
    # checkpoint dependencies (the averaged variables belong to the model,
    # kept-aside raw values are transient). TF has no public spelling of
    # this decorator.
    no_automatic_dependency_tracking = (
        tf.__internal__.tracking.no_automatic_dependency_tracking
    )

    # Runs a function in the cross-replica context from a replica context,
    # or calls it directly where there is no strategy. TF's public
    # `ReplicaContext.merge_call` fails without a strategy.
    maybe_merge_call = tf.__internal__.distribute.interim.maybe_merge_call

    # Plain Python that autograph must leave alone (see the frame walks).
    do_not_convert = tf.autograph.experimental.do_not_convert

    from tensorflow.python.ops import control_flow_util

    def in_xla_context() -> bool:
        """Whether the graph being traced will be compiled by XLA.

        A conditional update takes another form under XLA (see
        `keras_ema.backend.tensorflow.run_if`); a `tf.function` knows it is
        `jit_compile=True` only through this private query.
        """
        graph = tf.compat.v1.get_default_graph()
        return control_flow_util.GraphOrParentsInXlaContext(graph)
else:

    def no_automatic_dependency_tracking(function):
        """Other backends track no checkpoint dependencies."""
        return function

    do_not_convert = no_automatic_dependency_tracking


def variable_layout(variable):
    """The `keras.distribution` layout a Keras variable was created with.

    A shadow must be sharded like its weight. Keras's optimizers pass the
    private `_layout` of the weight to the variables they create from it
    (`add_variable_from_reference`); a public getter does not exist.
    """
    return getattr(variable, "_layout", None)


@do_not_convert
def callback_list_running(callback) -> keras.callbacks.CallbackList | None:
    """The `CallbackList` whose hook is calling `callback` now, if any.

    Keras gives a callback no handle on the other callbacks of its `fit`,
    yet EMASwap must run before the callbacks that read the logs it writes
    and must know which EarlyStopping will restore weights. The list is the
    `self` of a frame up the stack.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, keras.callbacks.CallbackList) and any(
            c is callback for c in candidate.callbacks
        ):
            return candidate
        frame = frame.f_back
    return None


# A frame walk is plain Python: autograph, converting a custom loop's
# `optimizer.apply`, would rewrite its early return and break it.
@do_not_convert
def model_using(optimizer) -> keras.Model | None:
    """The Keras model that is training or loading `optimizer` now, if any.

    An optimizer never learns which model it belongs to; while the model's
    train step calls it, or Keras loads it as part of a model
    (`load_model`, `load_weights`), that model is a local of a frame up the
    stack.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, keras.Model) and _uses(value, optimizer):
                return value
        frame = frame.f_back
    return None


def _uses(model, optimizer) -> bool:
    candidate = getattr(model, "optimizer", None)
    while candidate is not None and candidate is not optimizer:
        candidate = getattr(candidate, "inner_optimizer", None)
    return candidate is optimizer


class CheckpointWithSaveHook(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` with a context manager around every save.

    Every save, whatever `save_freq`, `save_best_only` or the format, goes
    through `ModelCheckpoint`'s private `_save_model`; there is no public
    hook between "this checkpoint will be written" and writing it.
    """

    def saving(self) -> contextlib.AbstractContextManager:
        """The context the model is saved in (subclasses override it)."""
        return contextlib.nullcontext()

    def _save_model(self, epoch, batch, logs):
        with self.saving():
            super()._save_model(epoch, batch, logs)


def in_legacy_h5_save() -> bool:
    """Whether Keras is writing a legacy `.h5` file now.

    Keras's legacy HDF5 saver sets this flag around the configs it writes
    and exposes no public way to ask.
    """
    from keras.src.backend.common import global_state

    return bool(global_state.get_global_attribute("use_legacy_config", False))


def record_compiled_optimizer(model, optimizer) -> None:
    """Makes `model.save` record `optimizer` as the compiled one.

    Keras serialises the `compile()` arguments it kept, not
    `model.optimizer`; there is no public way to change them after compile.
    """
    compile_config = getattr(model, "_compile_config", None)
    if compile_config is not None:
        compile_config.config["optimizer"] = optimizer


def keras_use_ema_pairs(optimizer) -> tuple[list, list]:
    """The variables a Keras `use_ema=True` optimizer averages, and their
    averages: Keras keeps both in private attributes."""
    return (
        list(optimizer._trainable_variables),
        list(optimizer._model_variables_moving_average),
    )


def schedule_free_pairs(optimizer) -> tuple[list, list]:
    """The variables a built Keras `ScheduleFreeAdamW` trains, and its `z`
    sequence for each (the variables it calls `momentum`): Keras keeps both
    in private attributes and has no public way to ask for either."""
    pairs = [
        (variable, momentum)
        for variable, momentum in zip(
            optimizer._trainable_variables, optimizer._momentums
        )
        if momentum is not None
    ]
    return [v for v, _ in pairs], [m for _, m in pairs]


def variables_built_for(optimizer) -> list:
    """The variables a built Keras optimizer can update.

    Keras keeps them in a private list and only checks them (with a message
    about "this optimizer") when a step runs.
    """
    return list(getattr(optimizer, "_trainable_variables", []))


def evaluate_on_fit_validation_data(model) -> dict:
    """`model.evaluate` on the validation data of the running `fit`.

    `fit` caches its validation iterator for the epoch behind a private
    `evaluate` argument; reusing it saves asking for the data twice.
    """
    return model.evaluate(verbose=0, return_dict=True, _use_cached_eval_dataset=True)


def flatten_layers(model) -> list:
    """Every layer inside `model`, nested ones included (not `model`)."""
    return list(model._flatten_layers(include_self=False))


def input_signature(model):
    """The input signature `model.export` would use for `model`."""
    try:
        from keras.src.export.export_utils import get_input_signature
    except ImportError:  # older Keras 3: the model's symbolic inputs
        return [
            keras.InputSpec(shape=tensor.shape, dtype=tensor.dtype)
            for tensor in model.inputs
        ]
    return get_input_signature(model)
