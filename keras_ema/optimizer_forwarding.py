"""What `EMAOptimizer` forwards to the optimizer it wraps."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, cast

import keras
import numpy as np

# Keras's base optimizer assigns these in its `__init__` and reads them when
# it builds and applies an update. The wrapper applies no update of its own,
# so only the wrapped optimizer's values have any effect. The defaults are
# those of Keras's `__init__` (LossScaleOptimizer checks the same table).
FORWARDED_DEFAULTS = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "gradient_accumulation_steps": None,
}
# Keras creates the variables these need in `build`.
BUILD_TIME = {
    "use_ema": "the moving averages",
    "gradient_accumulation_steps": "the gradient accumulators",
}
CLIPPING = ("clipnorm", "global_clipnorm", "clipvalue")


def _forwarded(name: str) -> property:
    def fget(self: InnerOptimizerForwarding) -> Any:
        target = self._configured_optimizer()
        return FORWARDED_DEFAULTS[name] if target is None else getattr(target, name)

    def fset(self: InnerOptimizerForwarding, value: Any) -> None:
        self._set_forwarded(name, value)

    return property(
        fget,
        fset,
        doc=f"The wrapped optimizer's `{name}`; set it here or there alike.",
    )


class InnerOptimizerForwarding:
    """Forwards the wrapped optimizer's configuration through the wrapper.

    `EMAOptimizer` applies its `inner_optimizer`'s update, so everything that
    configures that update must reach the inner optimizer, whichever of the
    two the user configures: `learning_rate`, `exclude_from_weight_decay`,
    and Keras's base settings `weight_decay`, `clipnorm`, `global_clipnorm`,
    `clipvalue`, `use_ema`, `ema_momentum`, `ema_overwrite_frequency` and
    `gradient_accumulation_steps`, read from and written to the inner
    optimizer (past a wrapped `LossScaleOptimizer`, which applies none of
    them itself). What cannot be forwarded is refused with an error that
    says where to set it, never stored on the wrapper to no effect:

    - `use_ema` and `gradient_accumulation_steps` once the inner optimizer
      is built, since Keras creates the variables they need in `build`;
    - `exclude_from_weight_decay` once built, as Keras documents;
    - a second clipping setting, which Keras would leave unused;
    - the inner optimizer's own hyperparameters (`beta_1`, `momentum`, ...),
      which belong on `optimizer.inner_optimizer`.

    Other settings written after training started reach the inner optimizer
    and, exactly as with the unwrapped optimizer, take effect when the train
    step is next traced (`model.make_train_function(force=True)`, or a new
    `compile`), since Keras reads them while tracing.
    """

    # Provided by EMAOptimizer (declared for type checkers).
    name: str
    built: bool
    inner_optimizer: Any

    if TYPE_CHECKING:

        @property
        def variables(self) -> list: ...

    weight_decay = _forwarded("weight_decay")
    clipnorm = _forwarded("clipnorm")
    global_clipnorm = _forwarded("global_clipnorm")
    clipvalue = _forwarded("clipvalue")
    use_ema = _forwarded("use_ema")
    ema_momentum = _forwarded("ema_momentum")
    ema_overwrite_frequency = _forwarded("ema_overwrite_frequency")
    gradient_accumulation_steps = _forwarded("gradient_accumulation_steps")

    @property
    def learning_rate(self) -> Any:
        """The wrapped optimizer's learning rate (schedules see its steps)."""
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> keras.Variable:
        """The wrapped optimizer's count of the updates it applied."""
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        """The wrapped optimizer scales the loss (a `LossScaleOptimizer`).

        Args:
            loss: The loss tensor.

        Returns:
            The loss as the wrapped optimizer scales it (unchanged without
            loss scaling).
        """
        return self.inner_optimizer.scale_loss(loss)

    def exclude_from_weight_decay(
        self,
        var_list: Sequence | None = None,
        var_names: Sequence[str] | None = None,
    ) -> Any:
        """Excludes variables from the wrapped optimizer's weight decay.

        Keras's own method would record the exclusions on the wrapper, which
        decays nothing, while the wrapped optimizer went on decaying those
        variables. As Keras documents (without checking it), call it before
        the optimizer is built, that is before training starts.

        Args:
            var_list: Variables to exclude.
            var_names: Strings; a variable whose name contains one of them is
                excluded (e.g. `["bias"]`).

        Returns:
            What the wrapped optimizer's `exclude_from_weight_decay` returns.

        Raises:
            ValueError: if the optimizer whose weight decay applies is built
                already.
        """
        target = self._configured_optimizer()
        if target.built:
            raise ValueError(
                "`exclude_from_weight_decay()` can only be configured before "
                f"the optimizer is built, and {type(target).__name__} "
                f"{target.name!r}, whose weight decay {type(self).__name__} "
                "applies, is built already. Call it before training starts."
            )
        return target.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def set_weights(self, weights: Sequence) -> None:
        """Assigns `weights` to `optimizer.variables`, in that order.

        These are the wrapper's own variables, then the wrapped optimizer's,
        then the average's. Keras's base method assigns the first ones only
        and would silently leave the state that matters (the inner
        optimizer's moments, the average) as it was. The weights are checked
        as a whole: on a mismatch nothing is assigned.

        Args:
            weights: One array per variable, e.g.
                `[v.numpy() for v in other.variables]` from an optimizer
                configured alike and built on the same model.

        Raises:
            ValueError: if the optimizer is not built, or `weights` differ
                from `optimizer.variables` in number or shapes.
        """
        if not self.built:
            raise ValueError(
                "You are calling `set_weights()` on an optimizer that has not "
                "yet been built. Please call "
                "`optimizer.build(trainable_variables)` to create the "
                "optimizer weights before calling `set_weights()`."
            )
        variables = self.variables
        weights = list(weights)
        if len(weights) != len(variables):
            raise ValueError(
                f"{type(self).__name__} {self.name!r} has {len(variables)} "
                "variables (`optimizer.variables`: its own, the wrapped "
                f"optimizer's and the average's), got {len(weights)} weights. "
                "Nothing was assigned."
            )
        for index, (variable, weight) in enumerate(zip(variables, weights)):
            if tuple(variable.shape) != np.shape(weight):
                path = getattr(variable, "path", None) or variable.name
                raise ValueError(
                    f"Weight {index} has shape {np.shape(weight)}, but variable "
                    f"{index} of {type(self).__name__} {self.name!r} ({path}) "
                    f"has shape {tuple(variable.shape)}. Nothing was assigned."
                )
        for variable, weight in zip(variables, weights):
            variable.assign(weight)

    def build(self, variables) -> None:
        # Keras's base build creates use_ema averages and gradient
        # accumulators when `use_ema` and `gradient_accumulation_steps` say
        # so. The inner optimizer builds its own; the wrapper's base build
        # must see Keras's defaults, or it would hold a second, unused set.
        object.__setattr__(self, "_building_own_state", True)
        try:
            super().build(variables)  # type: ignore[misc]  # Optimizer's
        finally:
            object.__setattr__(self, "_building_own_state", False)

    def __setattr__(self, name, value):
        if name in FORWARDED_DEFAULTS:
            # Straight to the property: the tracking in Keras's and
            # TensorFlow's `__setattr__` would also record a variable (a
            # weight decay kept in a `keras.Variable`) as the wrapper's own,
            # and it would be saved twice.
            object.__setattr__(self, name, value)
            return
        self._refuse_inner_hyperparameter(name)
        super().__setattr__(name, value)

    def _configured_optimizer(self):
        """The optimizer whose settings configure the update.

        The inner optimizer, or the one a wrapped `LossScaleOptimizer` wraps.
        None while Keras's base `__init__` runs (before `inner_optimizer` is
        set) and while the wrapper builds its own state.
        """
        if vars(self).get("_building_own_state", False):
            return None
        optimizer = getattr(self, "inner_optimizer", None)
        while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        return optimizer

    def _set_forwarded(self, name, value):
        target = self._configured_optimizer()
        default = FORWARDED_DEFAULTS[name]
        if target is None:
            # Keras's base `__init__` assigns its defaults before the inner
            # optimizer is set; `EMAOptimizer` refuses these arguments, so
            # anything else means a subclass passed one on.
            if not _same(value, default):
                raise ValueError(
                    f"{type(self).__name__} does not take `{name}`: set it on "
                    "the `inner_optimizer`."
                )
            return
        if (
            name in BUILD_TIME
            and target.built
            and not _same(value, getattr(target, name))
        ):
            raise ValueError(
                f"`{name}` can only be changed before the optimizer is built: "
                f"Keras creates {BUILD_TIME[name]} in `build`, and "
                f"{type(target).__name__} {target.name!r} is built already. "
                "Set it before training starts, or wrap a new optimizer."
            )
        _check_like_keras(target, name, value)
        setattr(target, name, value)

    def _refuse_inner_hyperparameter(self, name):
        if name.startswith("_") or name in vars(self) or hasattr(type(self), name):
            return
        if name in _init_parameters(cast(Hashable, type(self))):
            return
        path = "optimizer"
        optimizer = vars(self).get("inner_optimizer")
        while optimizer is not None:
            path += ".inner_optimizer"
            if name in _init_parameters(cast(Hashable, type(optimizer))):
                raise AttributeError(
                    f"`{name}` is a hyperparameter of the wrapped "
                    f"{type(optimizer).__name__}, which {type(self).__name__} "
                    f"does not forward: set `{path}.{name}` instead."
                )
            optimizer = getattr(optimizer, "inner_optimizer", None)


def _same(a, b):
    """Whether `a` is `b`, or equal plain values (not tensors)."""
    plain = (bool, int, float, str, type(None))
    return a is b or (isinstance(a, plain) and isinstance(b, plain) and a == b)


def _check_like_keras(target, name, value):
    """Refuses what Keras's optimizer constructor would refuse."""
    if name in CLIPPING and value is not None:
        others = {
            other: getattr(target, other)
            for other in CLIPPING
            if other != name and getattr(target, other) is not None
        }
        if others:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can "
                f"be set; {type(target).__name__} {target.name!r} has "
                f"{others}. Set "
                + ", ".join(f"`{other}`" for other in others)
                + " to None first."
            )
    elif name == "gradient_accumulation_steps":
        if value and not value >= 2:
            raise ValueError(
                "`gradient_accumulation_steps` must be an integer >= 2. "
                f"Received: gradient_accumulation_steps={value}"
            )
    elif name == "ema_momentum":
        if isinstance(value, (int, float)) and not 0 <= value <= 1:
            raise ValueError(
                "`ema_momentum` must be in the range [0, 1]. "
                f"Received: ema_momentum={value}"
            )
    elif name == "ema_overwrite_frequency":
        if value and (not isinstance(value, int) or value < 1):
            raise ValueError(
                "`ema_overwrite_frequency` must be an integer >= 1 or None. "
                f"Received: ema_overwrite_frequency={value}"
            )


@functools.cache
def _init_parameters(cls: Any) -> frozenset:
    """The named arguments of `cls.__init__`: its hyperparameters."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters if p.kind in named) - {"self"}
