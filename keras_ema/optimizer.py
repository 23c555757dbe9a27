"""`EMAOptimizer`: a Keras optimizer that keeps an average of the weights."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_ema import schedules
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.optimizer_forwarding import InnerOptimizerForwarding

LossScaleOptimizer = keras.optimizers.LossScaleOptimizer
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
class EMAOptimizer(InnerOptimizerForwarding, keras.optimizers.Optimizer):
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

    The wrapper forwards `learning_rate`, `iterations` and `scale_loss` to the
    wrapped optimizer, so learning-rate schedules and callbacks such as
    `ReduceLROnPlateau` keep working. It composes with `LossScaleOptimizer` in
    either order, including the wrap `compile` adds under `mixed_float16`.

    The model always trains on, and after `fit` holds, the raw weights:
    `finalize_variable_values` does not copy the average into the model (and
    stops a wrapped optimizer with `use_ema=True` from doing so). Use
    `keras_ema.EMASwap`, `keras_ema.ema_weights` or
    `keras_ema.export_saved_model` to put the averaged weights to work.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap.
        decay: Float in [0, 1] or a `keras_ema.schedules.DecaySchedule`.
        update_every: Update the average every this many optimizer steps
            (decay compensated).
        start_step: Before this step the average copies the weights.
        init: `"weights"` (shadows start as the weights) or `"first_step"`
            (the first update copies the weights, as Keras's `use_ema=True`).
        shadow_dtype: `"float32"` or `"float64"`: the narrowest dtype a shadow
            is kept in (float16/bfloat16 weights get float32 shadows).
        name: Name of the optimizer.

    Example:

    ```python
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-3), decay=0.999)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, callbacks=[keras_ema.EMASwap()])
    optimizer.average(model.layers[0].kernel)  # the shadow variable
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
        **kwargs,
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
        config = dict(
            decay=decay,
            update_every=update_every,
            start_step=start_step,
            init=init,
            shadow_dtype=shadow_dtype,
        )
        averager = ExponentialMovingAverage(name="average", **config)
        super().__init__(learning_rate=0.0, name=name)
        self._outer_loss_scaling = False
        self.inner_optimizer = inner_optimizer
        self.averager = averager
        self.non_trainable = non_trainable
        # Float non-trainable state (BatchNorm's moving statistics) has its
        # own average, with the same configuration and steps; integer state
        # stays live. Keras builds optimizers on the trainable variables
        # only, so these arrive through `track_non_trainable`.
        self.non_trainable_averager = (
            ExponentialMovingAverage(name="average_non_trainable", **config)
            if non_trainable == "average"
            else None
        )
        self._pending_non_trainable = None
        self._set_attached([])

    @tf.__internal__.tracking.no_automatic_dependency_tracking
    def _set_attached(self, averagers):
        # Attached averages keep their own state (PostHocEMA's snapshots);
        # they are not part of this optimizer's saved state.
        self._attached = averagers

    def attach(self, averager: ExponentialMovingAverage) -> None:
        """Updates another built average at every step, after this one's.

        The attached average runs in the same compiled train step, with the
        same rule for skipped steps; it is not saved with the optimizer.
        Rebuild the train function (`model.make_train_function(force=True)`)
        if it was traced before. `keras_ema.PostHocEMA` uses it.

        Args:
            averager: A built `keras_ema.ExponentialMovingAverage`.
        """
        if not isinstance(averager, ExponentialMovingAverage) or not averager.built:
            raise TypeError(
                "`averager` must be a built keras_ema.ExponentialMovingAverage, "
                f"got {averager!r}."
            )
        if any(a is averager for a in self._attached):
            return
        self._set_attached(self._attached + [averager])

    def detach(self, averager: ExponentialMovingAverage) -> None:
        """Stops updating an average attached with `attach`."""
        self._set_attached([a for a in self._attached if a is not averager])

    # A LossScaleOptimizer wrapping this one sets `loss_scale_factor = None` on
    # it, meaning "I own loss scaling now". If this optimizer wraps a
    # LossScaleOptimizer too (EMAOptimizer(LossScaleOptimizer(opt)) compiled
    # under mixed_float16), the inner one must then stop scaling, or the
    # gradients would be unscaled twice. Keras skips `x.attr = value` when
    # `x.attr is value` already, so the getter reports the inner scale.
    @property
    def loss_scale_factor(self):
        """The loss scale of a wrapped `LossScaleOptimizer` still in charge."""
        inner = getattr(self, "inner_optimizer", None)
        outer = getattr(self, "_outer_loss_scaling", False)
        if isinstance(inner, LossScaleOptimizer) and not outer:
            return inner.dynamic_scale if inner.built else inner.initial_scale
        return None

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        if value is not None:
            raise ValueError(
                "EMAOptimizer does not take `loss_scale_factor`; set it on the "
                "`inner_optimizer`."
            )
        if isinstance(getattr(self, "inner_optimizer", None), LossScaleOptimizer):
            self._outer_loss_scaling = True

    @property
    def _stepping_optimizer(self):
        """The optimizer whose `apply` this one calls."""
        if self._outer_loss_scaling:
            return self.inner_optimizer.inner_optimizer
        return self.inner_optimizer

    @tf.__internal__.tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        # The wrapped optimizer may have trained before it was wrapped.
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        self.averager.build(var_list)
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        # Checked before anything is built: variables created in a trace
        # that then fails are left unusable.
        averagers = [self.averager]
        if self.non_trainable_averager is not None:
            if not self.non_trainable_averager.built:
                raise ValueError(
                    "EMAOptimizer(non_trainable='average') needs the model's "
                    "non-trainable variables: train with "
                    "`callbacks=[keras_ema.EMASwap()]` or call "
                    "`optimizer.track_non_trainable(model.non_trainable_variables)`"
                    " before training."
                )
            averagers.append(self.non_trainable_averager)
        averagers += self._attached
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "EMAOptimizer is not built: pass `trainable_variables` to "
                    "`apply` or call `optimizer.build(trainable_variables)`."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        stepper = self._stepping_optimizer
        if not self._may_skip_steps():
            stepper.apply(grads, trainable_variables)
            for averager in averagers:
                averager.update()
            return
        before = tf.identity(stepper.iterations)
        stepper.apply(grads, trainable_variables)
        applied = tf.not_equal(tf.identity(stepper.iterations), before)
        for averager in averagers:
            averager.update(applied=applied)

    def track_non_trainable(self, variables) -> None:
        """Averages the model's float non-trainable variables too.

        For `non_trainable="average"`: call it with
        `model.non_trainable_variables` before training (`EMASwap`,
        `ema_weights` and `export_saved_model` do it for you). Integer
        variables are left live. Calling it again is a no-op.

        Args:
            variables: The model's non-trainable variables.
        """
        averager = self.non_trainable_averager
        if averager is None:
            raise ValueError(
                "`track_non_trainable` is for EMAOptimizer(non_trainable="
                "'average'); this one keeps non-trainable variables live."
            )
        if averager.built:
            return
        floats = [
            v for v in variables if tf.as_dtype(v.dtype).is_floating and not v.trainable
        ]
        averager.build(floats)
        averager.step.assign(self.averager.step)
        if self._pending_non_trainable is not None:
            _load_average(averager, self._pending_non_trainable, "non_trainable")
            self._pending_non_trainable = None

    def _may_skip_steps(self):
        """Whether a call to the wrapped optimizer may apply no update.

        A LossScaleOptimizer skips steps with non-finite gradients, and
        gradient accumulation applies one update per several calls; other
        optimizers update at every call, and then the average needs no
        condition (which costs time with many variables).
        """
        optimizer = self._stepping_optimizer
        while optimizer is not None:
            if isinstance(optimizer, LossScaleOptimizer) or getattr(
                optimizer, "gradient_accumulation_steps", None
            ):
                return True
            optimizer = getattr(optimizer, "inner_optimizer", None)
        return False

    def average(self, variable):
        """Returns the shadow variable holding the average of `variable`."""
        return self.averager.average(variable)

    @property
    def variables(self):
        variables = (
            self._variables[:]
            + self.inner_optimizer.variables
            + self.averager.variables
        )
        if self.non_trainable_averager is not None:
            variables += self.non_trainable_averager.variables
        return variables

    def finalize_variable_values(self, var_list):
        # Deliberately keeps the raw weights in the model: training resumes
        # from them, and the average is swapped in where it is wanted.
        del var_list

    def save_own_variables(self, store):
        # The wrapped optimizer saves its own state (Keras walks into it);
        # the average is saved by path, so it loads into the right variables.
        # Saved while the model holds the average, the file also keeps the
        # raw weights, so that nothing is lost.
        _save_average(self.averager, store, "")
        averager = self.non_trainable_averager
        if averager is not None and averager.built:
            _save_average(averager, store, "non_trainable")

    def load_own_variables(self, store):
        if not self.built:
            raise ValueError(
                f"EMAOptimizer {self.name!r} must be built before loading its "
                "average: call `optimizer.build(model.trainable_variables)`."
            )
        found = set(store.keys())
        if found and all(key.isdigit() for key in found):
            raise ValueError(
                f"Cannot load the average of EMAOptimizer {self.name!r}: the "
                f"file's optimizer state ({len(found)} numbered variables) was "
                "saved without a keras_ema average. To start an average from "
                "those weights, load them into the model compiled with the "
                "plain optimizer, then train with "
                "`keras_ema.EMASwap(decay=...)` or recompile with EMAOptimizer."
            )
        non_trainable = {
            key: store[key] for key in found if key.startswith("non_trainable")
        }
        averager = self.non_trainable_averager
        if averager is None and non_trainable:
            raise ValueError(
                f"The file averages non-trainable variables, but EMAOptimizer "
                f"{self.name!r} has non_trainable='live'."
            )
        if averager is not None and not non_trainable:
            raise ValueError(
                f"EMAOptimizer {self.name!r} has non_trainable='average', but "
                "the file holds no average of non-trainable variables."
            )
        trainable = {key: store[key] for key in found - set(non_trainable)}
        _load_average(self.averager, trainable, "", self.name)
        if averager is not None:
            if averager.built:
                _load_average(averager, non_trainable, "non_trainable", self.name)
            else:
                # Loaded before the model's non-trainable variables are known.
                self._pending_non_trainable = non_trainable

    def get_config(self):
        averager_config = self.averager.get_config()
        del averager_config["name"]
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            **averager_config,
            "non_trainable": self.non_trainable,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner_optimizer = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        config["decay"] = schedules.get(config["decay"])
        return cls(inner_optimizer, **config)


def _store_key(prefix, kind, path=None):
    # HDF5 reads '/' in a key as nested groups, which `store.keys()` hides.
    key = f"{prefix}_{kind}" if prefix else kind
    return key if path is None else f"{key}:" + path.replace("/", "|")


def _save_average(averager, store, prefix):
    store[_store_key(prefix, "step")] = averager.step.numpy()
    paths = list(averager.shadows_by_path)
    for path, shadow in zip(paths, averager.shadows):
        store[_store_key(prefix, "average", path)] = shadow.numpy()
    if averager.is_swapped:
        for path, raw in zip(paths, averager._swap.raw_values):
            store[_store_key(prefix, "raw", path)] = raw.numpy()


def _load_average(averager, values, prefix, name="EMAOptimizer"):
    """Loads `values` (key -> array) saved by `_save_average` into `averager`."""
    paths = list(averager.shadows_by_path)
    expected = {_store_key(prefix, "step")}
    expected |= {_store_key(prefix, "average", p) for p in paths}
    raw_keys = {_store_key(prefix, "raw", p) for p in paths}
    found = set(values)
    has_raw = bool(found & raw_keys)
    if has_raw:
        expected |= raw_keys
    if expected != found:
        missing = sorted(expected - found)
        unexpected = sorted(found - expected)
        raise ValueError(
            f"Cannot load the average of EMAOptimizer {name!r}: the saved "
            "average does not match this model's variables. Missing from the "
            f"file: {missing[:5]}; in the file but not in the model: "
            f"{unexpected[:5]}."
        )
    averager.step.assign(values[_store_key(prefix, "step")])
    for path, shadow in zip(paths, averager.shadows):
        shadow.assign(values[_store_key(prefix, "average", path)])
    # The model's weights come from the same file: the averaged ones if it
    # was saved while swapped, with the raw ones kept aside again.
    averager._swap.raw_values = (
        [
            tf.constant(np.asarray(values[_store_key(prefix, "raw", p)]), dtype=v.dtype)
            for p, v in zip(paths, averager.averaged_variables)
        ]
        if has_raw
        else None
    )
