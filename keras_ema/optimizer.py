"""`EMAOptimizer`: a Keras optimizer that keeps an average of the weights."""

from __future__ import annotations

import weakref
from typing import Any

import keras

from keras_ema import _compat, schedules
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.backend import (
    AVERAGES_NON_TRAINABLE_IN_APPLY,
    apply_optimizer,
    snapshot,
)
from keras_ema.optimizer_averages import (
    OptimizerAverages,
    averages_of,
    update_groups,
)
from keras_ema.optimizer_forwarding import InnerOptimizerForwarding
from keras_ema.optimizer_state import AverageSaving
from keras_ema.optimizer_steps import InnerSteps

NON_TRAINABLE_MODES = ("live", "average")

_BASE_OPTIMIZER_ARGS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


@keras.saving.register_keras_serializable(package="keras_ema")
class EMAOptimizer(
    OptimizerAverages,
    InnerOptimizerForwarding,
    InnerSteps,
    AverageSaving,
    keras.optimizers.Optimizer,
):
    """Wraps an optimizer and keeps the moving average of the weights.

    Each step runs the wrapped optimizer's update, then the average's update,
    inside the same compiled train step (`tf.function` or XLA):

        shadow <- shadow - (1 - D) * (shadow - w)

    with `w` the weights after this step's update and constraints, and `D`
    the decay since the last update (see `keras_ema.ExponentialMovingAverage`
    for `update_every`, `start_step` and `init`). Steps count the updates the
    wrapped optimizer actually applied: a step that a `LossScaleOptimizer`
    skips for non-finite gradients moves neither the average nor the step
    count, and with `gradient_accumulation_steps` the average moves once per
    real update, not per micro-batch.

    The wrapper forwards to the wrapped optimizer what configures its update:
    `learning_rate` (so schedules and `ReduceLROnPlateau` keep working),
    `iterations`, `scale_loss`, clipping, weight decay and
    `exclude_from_weight_decay`, `use_ema` and gradient accumulation
    settings (see `InnerOptimizerForwarding`); what it cannot forward it
    refuses with an error. It composes with `LossScaleOptimizer` in either
    order, including the wrap `compile` adds under `mixed_float16`.

    Saved with the model (`.keras`, `.weights.h5`, `tf.train.Checkpoint`),
    the average is keyed by its variables' paths; it also loads into an
    optimizer not built yet (`compile` then `load_weights`), when the first
    step or a keras_ema function builds it. A file saved while the model
    held its average keeps the raw weights too. The legacy `.h5` format is
    refused: its loader restores no optimizer state.

    Several averages: `decay=[0.99, 0.999, 0.9999]` keeps one average per
    entry, all updated in the same compiled step by one update (one
    evaluation of the step rule, one condition, each shadow read and
    written once). The first is the primary average, the one `EMASwap`,
    `ema_weights`, export and `EMACheckpoint` use unless their `average=`
    names another (by index, decay or schedule);
    `EMASwap(evaluate="all", select="val_loss")` validates them all and
    makes the best one primary (`select_average`).

    The model always trains on, and after `fit` holds, the raw weights:
    `finalize_variable_values` does not copy the average into the model (and
    stops a wrapped optimizer with `use_ema=True` from doing so). Use
    `keras_ema.EMASwap`, `keras_ema.ema_weights` or
    `keras_ema.export_saved_model` to put the averaged weights to work.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap.
        decay: Float in [0, 1] or a `keras_ema.schedules.DecaySchedule`, or
            a list of them: one average per entry, the first primary.
            `update_every`, `start_step`, `init` and `shadow_dtype` apply
            to all.
        update_every: Update the average every this many optimizer steps
            (decay compensated).
        start_step: Before this step the average copies the weights.
        init: `"weights"` (shadows start as the weights) or `"first_step"`
            (the first update copies the weights, as Keras's `use_ema=True`).
        shadow_dtype: `"float32"` or `"float64"`: the narrowest dtype a shadow
            is kept in (float16/bfloat16 weights get float32 shadows).
        non_trainable: `"live"` (float non-trainable variables such as
            BatchNorm statistics stay as training leaves them) or
            `"average"` (they are averaged too; see `track_non_trainable`;
            on JAX, in `fit` and `train_on_batch`).
        name: Name of the optimizer.
        **kwargs: Not accepted: Keras's base optimizer arguments
            (`learning_rate`, `clipnorm`, `weight_decay`, ...) belong on
            `inner_optimizer`.

    Attributes:
        inner_optimizer: The wrapped optimizer.
        averager: The `keras_ema.ExponentialMovingAverage` of the trainable
            variables that this optimizer updates after each step (of the
            first decay, with several).
        extra_averages: The averages of the other decays, in order (empty
            with one decay).

    Raises:
        TypeError: if `inner_optimizer` is not a `keras.optimizers.Optimizer`,
            `decay` (or an entry of it) is neither a number nor a schedule,
            or `update_every` or `start_step` is not an int.
        ValueError: if any `**kwargs` is given, `non_trainable`, `init` or
            `shadow_dtype` is not one of the accepted values, `decay` is
            outside [0, 1], an empty list, lists one average twice, or
            lists several with `non_trainable="average"`,
            `update_every < 1` or `start_step < 0`.

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)]
    )
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-3), decay=0.9)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # trains the raw weights

    kernel = model.layers[0].kernel
    shadow = optimizer.average(kernel)  # the variable holding its average
    assert shadow.shape == kernel.shape
    with keras_ema.ema_weights(model):  # the averaged weights inside
        print(model.evaluate(x, y, verbose=0))
    ```
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        decay: float | schedules.DecaySchedule = 0.999,
        update_every: int = 1,
        start_step: int = 0,
        init: str = "weights",
        shadow_dtype: str = "float32",
        non_trainable: str = "live",
        name: str | None = None,
        **kwargs: Any,
    ):
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`inner_optimizer` must be a keras.optimizers.Optimizer, got "
                f"{type(inner_optimizer).__name__}."
            )
        unsupported = sorted(kwargs)
        if unsupported:
            where = [a for a in unsupported if a in _BASE_OPTIMIZER_ARGS]
            raise ValueError(
                f"EMAOptimizer does not take {unsupported}."
                + (f" Set {where} on the `inner_optimizer` instead." if where else "")
            )
        if non_trainable not in NON_TRAINABLE_MODES:
            raise ValueError(
                f"`non_trainable` must be one of {NON_TRAINABLE_MODES}, got "
                f"{non_trainable!r}."
            )
        config: dict[str, Any] = dict(
            update_every=update_every,
            start_step=start_step,
            init=init,
            shadow_dtype=shadow_dtype,
        )
        averages, anchors = averages_of(decay, **config)
        if len(averages) > 1 and non_trainable != "live":
            raise ValueError(
                "`non_trainable='average'` takes one decay; with several "
                f"({len(averages)}), keep non_trainable='live' and recompute "
                "BatchNorm statistics for the average judged (`batchnorm_data=` "
                "of EMASwap, ema_weights, EMACheckpoint, export_saved_model)."
            )
        super().__init__(learning_rate=0.0, name=name)
        self._outer_loss_scaling = False
        self.inner_optimizer = inner_optimizer
        self.averager = averages[0]
        # Tracked, so that tf.train.Checkpoint saves them with the optimizer.
        self.extra_averages = averages[1:]
        self.anchors = anchors
        self._start_step = start_step
        self.non_trainable = non_trainable
        # Float non-trainable state (BatchNorm's moving statistics) has its
        # own average, with the same configuration and steps; integer state
        # stays live. Keras builds optimizers on the trainable variables
        # only, so these arrive through `track_non_trainable`.
        self.non_trainable_averager = (
            ExponentialMovingAverage(
                decay=decay, name="average_non_trainable", **config
            )
            if non_trainable == "average"
            else None
        )
        self._set_untracked(
            _attached=[],
            _introduced=None,
            _non_trainable_after_step=False,
            _primary=0,
            _groups=[self.averager],
        )
        self._init_saving()

    @_compat.no_automatic_dependency_tracking
    def _set_untracked(self, **attributes):
        # Attached averages (PostHocEMA's), loaded entries waiting for their
        # variables and the holder's reference are no part of this
        # optimizer's checkpointed state.
        for name, value in attributes.items():
            setattr(self, name, value)

    @_compat.no_automatic_dependency_tracking
    def build(self, var_list: list) -> None:
        """Builds the wrapped optimizer (if needed) and the average.

        `fit` calls it; custom loops may, or let the first `apply` do it.

        Args:
            var_list: The trainable variables to optimize and average.

        Raises:
            ValueError: if the wrapped optimizer was built for other
                variables (it trained before, on another set).
        """
        # The wrapped optimizer may have trained before it was wrapped.
        inner = self.inner_optimizer
        if not inner.built:
            inner.build(var_list)
        else:
            known = {id(v) for v in _compat.variables_built_for(inner)}
            unknown = [v.path for v in var_list if id(v) not in known]
            if unknown:
                raise ValueError(
                    f"The wrapped {type(inner).__name__} {inner.name!r} was "
                    "built for other variables (it trained before, on another "
                    f"set of trainable variables) and cannot update {unknown[:3]}"
                    f"{'...' if len(unknown) > 3 else ''}. Wrap a new optimizer, "
                    f"e.g. keras_ema.EMAOptimizer(keras.optimizers."
                    f"{type(inner).__name__}(...)), as after unfreezing layers."
                )
        own = self.averages + list(self.anchors)
        for averager in own:
            averager.build(var_list)
        self._set_untracked(_groups=update_groups(own))
        super().build(var_list)
        if self._pending_store is not None:
            self._load_entries(*self._pending_store)
        if self.non_trainable_averager is not None and (
            not AVERAGES_NON_TRAINABLE_IN_APPLY
        ):
            # Keras's JAX `fit` builds the optimizer before its train step;
            # introduced now, the model's holder hands the average its
            # non-trainable variables before the step is traced.
            self._introduce_to_model()

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Applies the wrapped optimizer's update, then the average's.

        Args:
            grads: The gradients, aligned with `trainable_variables`.
            trainable_variables: The variables to update; needed on the
                first call if the optimizer is not built.

        Raises:
            ValueError: if the optimizer is not built and
                `trainable_variables` is None, or (with
                `non_trainable="average"`) it has not been given the
                non-trainable variables, or on JAX is called outside
                Keras's own train step.
            RuntimeError: if the model holds an average loaded from a file
                and training would start from it.
        """
        # Checked before anything is built: variables created in a trace
        # that then fails are left unusable.
        self._check_not_holding_loaded_average()
        averagers = self._averagers_to_update()
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "EMAOptimizer is not built: pass `trainable_variables` to "
                    "`apply` or call `optimizer.build(trainable_variables)`."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
            averagers = self._averagers_to_update()  # grouped once built
        # Until the first step, the average takes the weights that step
        # starts from, whatever happened to them since it was built.
        for averager in self.averages + list(self.anchors):
            averager.capture_before_first_step()
        if self._introduced is None or self._introduced() is None:
            # Once is enough: eager steps call `apply` every step.
            self._introduce_to_model()
        stepper = self._stepping_optimizer
        if not self._may_skip_steps():
            apply_optimizer(stepper, grads, trainable_variables)
            for averager in averagers:
                averager.update()
            return
        before = snapshot(stepper.iterations)
        apply_optimizer(stepper, grads, trainable_variables)
        applied = keras.ops.not_equal(snapshot(stepper.iterations), before)
        for averager in averagers:
            averager.update(applied=applied)

    def _introduce_to_model(self):
        # The model's WeightHolder guards every later `fit` of the model,
        # making it start from the raw weights, and takes over the raw
        # weights of a file loaded while the average was in. A model only
        # ever trained with plain `fit`, or just loaded, has none yet.
        # Training and loading are where the optimizer meets its model.
        from keras_ema.holder import WeightHolder

        model = _compat.model_using(self)
        if model is not None:
            WeightHolder.of(model)
            self._set_untracked(_introduced=weakref.ref(model))

    @property
    def variables(self) -> list:
        # Its own (iterations, learning rate), then the wrapped optimizer's
        # and the averages'.
        variables = super().variables + self.inner_optimizer.variables
        for averager in self.averages + list(self.anchors):
            variables += averager.variables
        if self.non_trainable_averager is not None:
            variables += self.non_trainable_averager.variables
        # Attached averages (not saved with it) too: on JAX, Keras's train
        # step carries exactly these variables through the jitted step.
        for averager in self._attached:
            variables += averager.variables
        return variables

    def finalize_variable_values(self, var_list: list) -> None:
        """Does nothing: the model keeps its raw weights after `fit`.

        Args:
            var_list: The model's trainable variables (ignored).
        """
        # Deliberately keeps the raw weights in the model: training resumes
        # from them, and the average is swapped in where it is wanted.
        del var_list

    def get_config(self) -> dict:
        """Returns the configuration, the wrapped optimizer's included.

        Returns:
            A dict for `from_config`.

        Raises:
            ValueError: when saved in the legacy `.h5` format.
        """
        if _compat.in_legacy_h5_save():
            raise ValueError(
                "keras_ema's EMAOptimizer cannot be saved in the legacy `.h5` "
                "format: Keras's legacy loader restores no optimizer state "
                "(not even Adam's), so the average would be lost. Save as "
                "`.keras` (`model.save('model.keras')`), or pass "
                "`include_optimizer=False` to save the model's weights alone."
            )
        averager_config = self.averager.get_config()
        del averager_config["name"]
        # A BEMA average starts at its burn-in; the optimizer's own
        # start_step is what was passed.
        averager_config["start_step"] = self._start_step
        if self.extra_averages:
            averager_config["decay"] = [
                keras.saving.serialize_keras_object(a.schedule) for a in self.averages
            ]
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            **averager_config,
            "non_trainable": self.non_trainable,
        }

    @classmethod
    def from_config(
        cls, config: dict, custom_objects: dict | None = None
    ) -> EMAOptimizer:
        """Creates an `EMAOptimizer` from the output of `get_config`.

        Args:
            config: The dict `get_config` returned.
            custom_objects: Optional dict of custom objects, to deserialize
                the wrapped optimizer.

        Returns:
            A new, unbuilt `EMAOptimizer`.
        """
        config = dict(config)
        inner_optimizer = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        decay = config["decay"]
        config["decay"] = (
            [schedules.get(d) for d in decay]
            if isinstance(decay, list)
            else schedules.get(decay)
        )
        return cls(inner_optimizer, **config)
