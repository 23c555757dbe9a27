"""Decay schedules for exponential moving averages of model weights.

A decay schedule gives the per-step decay `d(s)` of an exponential moving
average (EMA) as a function of the step `s`, the number of optimizer updates
since the average was started. One EMA update at step `s` is

```
average = d(s) * average + (1 - d(s)) * weights
```

so `s >= 1` whenever a schedule is consulted. When the average is updated only
every `k` steps (or when `k` updates are folded into one), the decay of the
stale average over those `k` steps is `D = d(s - k + 1) * ... * d(s)`, which
`DecaySchedule.decay_over` returns (in closed form where one exists).

All schedules compute in float64 internally and cast the result at the end, so
that `1 - d` stays accurate for decays close to 1 (on JAX, float64 needs
`jax_enable_x64`; without it they compute in float32, as Keras's own
`use_ema` does there). They are written in `keras.ops` and work eagerly,
inside `tf.function` (with or without XLA) and inside `jax.jit`.

Example:

>>> schedule = PowerFunction(sigma_rel=0.05)
>>> float(schedule(1000, dtype="float64"))  # doctest: +ELLIPSIS
0.98...
>>> get(0.999)
Constant(decay=0.999)
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_ema import backend
from keras_ema._checks import check_int

# A backend tensor (Tensor, jax.Array).
Tensor = Any

__all__ = [
    "BEMA",
    "Constant",
    "DecaySchedule",
    "Debiased",
    "PowerFunction",
    "PowerWarmup",
    "TFWarmup",
    "decay_to_half_life",
    "gamma_to_sigma_rel",
    "get",
    "half_life_to_decay",
    "scale_decay",
    "sigma_rel_to_gamma",
]

# sigma_rel of the power-function EMA tends to sqrt(1/12) as gamma -> 0.
_MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _as_float(value: Any, name: str) -> float:
    """Converts a real number (Python or NumPy scalar) to a Python float."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a real number (int or float), got {value!r} "
            f"of type {type(value).__name__}."
        )
    return float(value)


def _check_in(
    value: Any,
    name: str,
    low: float,
    high: float,
    interval: str,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validates that `value` is a finite real number in the given interval.

    `interval` is the human-readable interval used in the error message,
    e.g. `"[0, 1]"`.
    """
    x = _as_float(value, name)
    ok = (
        math.isfinite(x)
        and (x > low if low_open else x >= low)
        and (x < high if high_open else x <= high)
    )
    if not ok:
        raise ValueError(f"`{name}` must be a float in {interval}, got {x}.")
    return x


def _check_decay(value: Any, name: str = "decay") -> float:
    return _check_in(value, name, 0.0, 1.0, "[0, 1]")


def _check_positive(value: Any, name: str) -> float:
    return _check_in(
        value, name, 0.0, math.inf, "(0, inf)", low_open=True, high_open=True
    )


def _check_non_negative(value: Any, name: str) -> float:
    return _check_in(value, name, 0.0, math.inf, "[0, inf)", high_open=True)


def _check_dtype(dtype: Any) -> str:
    try:
        dtype = keras.backend.standardize_dtype(dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`dtype` must be a floating dtype such as 'float32', got {dtype!r}."
        ) from e
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(
            f"`dtype` must be a floating dtype such as 'float32', got {dtype}."
        )
    if dtype == "float64" and not backend.float64_available():
        raise ValueError(
            "`dtype='float64'` needs float64 arrays, which JAX only has with "
            "`jax.config.update('jax_enable_x64', True)`; ask for 'float32'."
        )
    return dtype


def _step_to_compute_dtype(step: Any, minimum: int = 1) -> Tensor:
    """Converts `step` (int or integer tensor) to a tensor of the dtype
    schedules compute in (`backend.schedule_dtype()`, float64 where the
    backend has it).

    Python ints are checked against `minimum`; tensors are not checked (so
    that the schedules stay XLA-compatible), the caller guarantees it.
    """
    if isinstance(step, bool | np.bool_):
        raise TypeError(f"`step` must be an int or an integer tensor, got {step!r}.")
    if isinstance(step, numbers.Integral):
        step = int(step)
        if step < minimum:
            raise ValueError(f"`step` must be an int >= {minimum}, got {step}.")
        return ops.convert_to_tensor(step, dtype=backend.schedule_dtype())
    if isinstance(step, numbers.Number | str) or step is None:
        raise TypeError(
            f"`step` must be an int or an integer tensor, got {step!r} of type "
            f"{type(step).__name__}."
        )
    step = ops.convert_to_tensor(step)
    dtype = keras.backend.standardize_dtype(step.dtype)
    if not dtype.startswith(("int", "uint")):
        raise TypeError(
            f"`step` must be an int or an integer tensor, got a tensor of dtype "
            f"{dtype}."
        )
    return ops.cast(step, backend.schedule_dtype())


# ---------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------


class DecaySchedule:
    """Base class of EMA decay schedules.

    A schedule maps the step `s` (the number of optimizer updates since the
    average was started, `s >= 1`) to the per-step decay `d(s)` in `[0, 1]`.

    Subclasses implement `_decay(s)`, the per-step formula (in `keras.ops`)
    on a float64 tensor `s` of any shape (elementwise, so it also works on
    vectors of steps), and `get_config()`. They may override
    `_decay_over(s, k)` with a closed form of the decay over `k` steps; the
    default is the product of the `k` per-step decays, evaluated on a vector
    of `k` steps (O(k) memory, `k` is static so this is XLA-compatible).

    Example:

    ```python
    import keras
    import keras_ema
    from keras import ops

    @keras.saving.register_keras_serializable(package="my_project")
    class Linear(keras_ema.schedules.DecaySchedule):
        # d(s) = min(decay, s / ramp)
        def __init__(self, decay, ramp):
            self.decay, self.ramp = decay, ramp

        def _decay(self, s):
            return ops.minimum(self.decay, s / self.ramp)

        def get_config(self):
            return {"decay": self.decay, "ramp": self.ramp}

    schedule = Linear(0.99, ramp=100)
    assert abs(float(schedule(50)) - 0.5) < 1e-6
    # Without a closed form, the decay over k steps is the product.
    assert abs(float(schedule.decay_over(50, k=2)) - 0.49 * 0.5) < 1e-6
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=schedule)
    ```
    """

    def __call__(self, step: int | Tensor, dtype: Any = "float32") -> Tensor:
        """Returns the per-step decay `d(step)`.

        Args:
            step: Python int `>= 1`, or an integer (int32/int64) tensor. A
                scalar tensor gives a scalar; a tensor of any other shape is
                evaluated elementwise. Tensor values are not checked (they
                must be `>= 1`).
            dtype: floating dtype of the result, `"float32"` (default) or
                `"float64"`.

        Returns:
            A tensor of `dtype` with the decay, computed in float64 and cast.

        Raises:
            TypeError: if `step` is not an int or an integer tensor (bools
                and floats included), or `dtype` is not a dtype.
            ValueError: if `step` is an int < 1, or `dtype` is not a
                floating dtype (or float64 on JAX without x64).
        """
        dtype = _check_dtype(dtype)
        s = _step_to_compute_dtype(step)
        return ops.cast(self._decay(s), dtype)

    def decay_over(self, step: int | Tensor, k: int, dtype: Any = "float32") -> Tensor:
        """Returns the decay over the `k` steps ending at `step`.

        That is `D = d(step - k + 1) * d(step - k + 2) * ... * d(step)`: an
        average that missed the updates of those `k` steps must be multiplied
        by `D` (and the weights by `1 - D`) to catch up, when the weights did
        not change in between.

        Args:
            step: Python int `>= k`, or an integer (int32/int64) tensor (any
                shape, elementwise; values must be `>= k`, not checked).
            k: static Python int `>= 1`, the number of steps.
            dtype: floating dtype of the result, `"float32"` (default) or
                `"float64"`.

        Returns:
            A tensor of `dtype` with the decay over the `k` steps.

        Raises:
            TypeError: if `k` is not an int, `step` is not an int or an
                integer tensor, or `dtype` is not a dtype.
            ValueError: if `k < 1`, `step` is an int < `k`, or `dtype` is
                not a floating dtype (or float64 on JAX without x64).
        """
        k = check_int(k, "k", 1)
        dtype = _check_dtype(dtype)
        s = _step_to_compute_dtype(step, minimum=k)
        return ops.cast(self._decay_over(s, k), dtype)

    def _decay(self, s: Tensor) -> Tensor:
        """Per-step decay on a float64 tensor of steps (any shape)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `_decay(s)`.")

    def _decay_over(self, s: Tensor, k: int) -> Tensor:
        """Decay over `k` steps ending at the float64 tensor `s`.

        Default: product of the per-step decays of the steps
        `s - k + 1, ..., s`, evaluated as one vectorised call of `_decay`.
        """
        if k == 1:
            return self._decay(s)
        offsets = ops.arange(k, dtype=s.dtype)  # 0, 1, ..., k - 1
        steps = ops.expand_dims(s, -1) - offsets  # s, s - 1, ..., s - k + 1
        return ops.prod(self._decay(steps), axis=-1)

    def get_config(self) -> dict[str, Any]:
        """Returns the constructor arguments of the schedule.

        Returns:
            A dict of the constructor arguments, for `from_config`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `get_config()`."
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DecaySchedule:
        """Creates a schedule from the output of `get_config()`.

        Args:
            config: The dict `get_config()` returned.

        Returns:
            A new schedule of this class.
        """
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_ema")
class Constant(DecaySchedule):
    """Constant decay: `d(s) = decay`.

    The decay over `k` steps is `decay ** k`.

    Args:
        decay: float in `[0, 1]`.

    Raises:
        TypeError: if `decay` is not a real number.
        ValueError: if `decay` is not in `[0, 1]`.

    Example:

    ```python
    import keras
    import keras_ema

    schedule = keras_ema.schedules.Constant(0.9)
    assert abs(float(schedule.decay_over(5, k=2)) - 0.81) < 1e-6  # 0.9 ** 2
    # The same as decay=0.9:
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=schedule)
    ```
    """

    def __init__(self, decay: float):
        self.decay = _check_decay(decay)

    def _decay(self, s: Tensor) -> Tensor:
        return ops.full_like(s, self.decay)

    def _decay_over(self, s: Tensor, k: int) -> Tensor:
        return ops.full_like(s, self.decay**k)

    def get_config(self) -> dict[str, Any]:
        return {"decay": self.decay}


@keras.saving.register_keras_serializable(package="keras_ema")
class TFWarmup(DecaySchedule):
    """The warmup of `tf.train.ExponentialMovingAverage(decay, num_updates=s)`.

    `d(s) = min(decay, (1 + s) / (10 + s))`.

    No closed form for the decay over `k` steps (product of per-step decays).

    Args:
        decay: float in `[0, 1]`, the asymptotic decay.

    Raises:
        TypeError: if `decay` is not a real number.
        ValueError: if `decay` is not in `[0, 1]`.

    Example:

    ```python
    import keras
    import keras_ema

    schedule = keras_ema.schedules.TFWarmup(0.999)
    assert abs(float(schedule(1)) - 2 / 11) < 1e-6  # (1 + 1) / (10 + 1)
    assert abs(float(schedule(100_000)) - 0.999) < 1e-6  # the decay
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=schedule)
    ```
    """

    def __init__(self, decay: float):
        self.decay = _check_decay(decay)

    def _decay(self, s: Tensor) -> Tensor:
        return ops.minimum(self.decay, (1.0 + s) / (10.0 + s))

    def get_config(self) -> dict[str, Any]:
        return {"decay": self.decay}


@keras.saving.register_keras_serializable(package="keras_ema")
class PowerWarmup(DecaySchedule):
    """Power-law ("inverse gamma") warmup, as in timm / diffusers EMA.

    `d(s) = clip(1 - (1 + s / inv_gamma) ** -power, min_decay, decay)`.

    `power=2/3` suits long runs (decay 0.999 reached around 31.6K steps),
    `power=3/4` short ones (0.999 at about 10K steps). No closed form for the
    decay over `k` steps (product of per-step decays).

    Args:
        decay: float in `[0, 1]`, the maximum decay.
        inv_gamma: float `> 0`, the step scale of the warmup.
        power: float `> 0`, the exponent of the warmup.
        min_decay: float in `[0, decay]`, the minimum decay.

    Raises:
        TypeError: if an argument is not a real number.
        ValueError: if `decay` is not in `[0, 1]`, `inv_gamma` or `power`
            is not a finite float > 0, or `min_decay` is not in
            `[0, decay]`.

    Example:

    ```python
    import keras
    import keras_ema

    schedule = keras_ema.schedules.PowerWarmup(0.9999, inv_gamma=1.0, power=0.75)
    assert abs(float(schedule(10_000)) - 0.999) < 1e-6  # 1 - 10001 ** -0.75
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=schedule)
    ```
    """

    def __init__(
        self,
        decay: float,
        inv_gamma: float = 1.0,
        power: float = 2.0 / 3.0,
        min_decay: float = 0.0,
    ):
        self.decay = _check_decay(decay)
        self.inv_gamma = _check_positive(inv_gamma, "inv_gamma")
        self.power = _check_positive(power, "power")
        self.min_decay = _check_decay(min_decay, "min_decay")
        if self.min_decay > self.decay:
            raise ValueError(
                f"`min_decay` must be in [0, decay] = [0, {self.decay}], "
                f"got {self.min_decay}."
            )

    def _decay(self, s: Tensor) -> Tensor:
        # 1 - (1 + s/inv_gamma)^-p = -expm1(-p * log1p(s/inv_gamma)), accurate
        # when the result is close to 0 or to 1.
        d = -ops.expm1(-self.power * ops.log1p(s / self.inv_gamma))
        return ops.clip(d, self.min_decay, self.decay)

    def get_config(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "min_decay": self.min_decay,
        }


@keras.saving.register_keras_serializable(package="keras_ema")
class Debiased(DecaySchedule):
    """Zero-debiased EMA: Adam-style bias correction folded into the decay.

    `d(s) = (decay - decay ** s) / (1 - decay ** s)`, so `d(1) = 0`.

    Updating an average with this decay gives exactly the bias-corrected
    value `m_s / (1 - decay ** s)` of an EMA `m` started at zero with
    constant `decay`. The decay over the `k` steps ending at `s` has the
    closed form `decay ** k * (1 - decay ** (s - k)) / (1 - decay ** s)`.

    Args:
        decay: float in `[0, 1)` (1 gives the undefined `0 / 0`).

    Raises:
        TypeError: if `decay` is not a real number.
        ValueError: if `decay` is not in `[0, 1)`.

    Example:

    ```python
    import keras
    import keras_ema

    schedule = keras_ema.schedules.Debiased(0.9)
    assert float(schedule(1)) == 0.0  # the first update copies the weights
    assert abs(float(schedule(2)) - 0.09 / 0.19) < 1e-6  # (0.9 - 0.81) / (1 - 0.81)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=schedule)
    ```
    """

    def __init__(self, decay: float):
        decay = _as_float(decay, "decay")
        if decay == 1.0:
            raise ValueError(
                "`decay` must be a float in [0, 1) for Debiased: decay=1 makes "
                "d(s) = (decay - decay**s) / (1 - decay**s) the undefined 0/0, "
                "got 1.0."
            )
        self.decay = _check_in(decay, "decay", 0.0, 1.0, "[0, 1)", high_open=True)

    def _decay(self, s: Tensor) -> Tensor:
        if self.decay == 0.0:
            return ops.zeros_like(s)
        log_decay = math.log(self.decay)
        # d(s) = decay * (1 - decay^(s-1)) / (1 - decay^s), the differences via
        # expm1: accurate to a few ulps both for tiny decays and near 1.
        num = ops.expm1((s - 1.0) * log_decay)
        return self.decay * num / ops.expm1(s * log_decay)

    def _decay_over(self, s: Tensor, k: int) -> Tensor:
        if self.decay == 0.0:
            return ops.zeros_like(s)
        log_decay = math.log(self.decay)
        num = -ops.expm1((s - k) * log_decay)  # 1 - decay^(s - k)
        den = -ops.expm1(s * log_decay)  # 1 - decay^s
        return math.exp(k * log_decay) * num / den

    def get_config(self) -> dict[str, Any]:
        return {"decay": self.decay}


@keras.saving.register_keras_serializable(package="keras_ema")
class BEMA(DecaySchedule):
    """Bias-corrected EMA (BEMA, Block & Zhang 2025, arXiv 2508.00180).

    An EMA lags behind weights that keep moving; BEMA adds back an estimate
    of the lag. After a burn-in of `burn_in` optimizer steps, with
    `s = t - burn_in` the steps since (t the optimizer step), the weights
    `theta_t` and `theta_0` the weights at the end of the burn-in:

        beta_s  = (rho + gamma * s) ** -kappa
        alpha_s = (rho + gamma * s) ** -eta
        EMA    <- (1 - beta_s) * EMA + beta_s * theta_t
        served  = EMA + alpha_s * (theta_t - theta_0)

    During the burn-in (t <= burn_in) the EMA and `theta_0` copy the
    weights, and the served weights are the weights. Step-counting rule
    (the paper, the authors' code and TRL's callback differ): s counts the
    updates after the burn-in, from 1; TRL uses the global step and the
    authors' script `t - burn_in + 1`.

    As a schedule, `d(s) = 1 - beta_s` (the EMA's decay, counted from the
    end of the burn-in); `correction(s)` gives `alpha_s`. Give it to
    `keras_ema.EMAOptimizer` (or `EMASwap(decay=...)`), alone or in a list
    of decays: the optimizer keeps `theta_0` (one more copy of the weights,
    saved with it) and applies the correction when the average is swapped
    in or exported, not at every step.

    Args:
        burn_in: Int >= 0: the optimizer steps before `theta_0` is fixed.
            With 0, `theta_0` is the weights training starts from: right
            when fine-tuning pretrained weights, a warning otherwise reminds
            you that randomly initialised weights make a poor `theta_0`.
        kappa: Float >= 0: the EMA's exponent (0.5 in the paper).
        eta: Float >= 0: the correction's exponent (0.2; 0 gives the
            plain extrapolation, a large value no correction).
        rho: Float > 0: the offset of the step (10).
        gamma: Float > 0: the step's scale (1).

    Raises:
        TypeError: if `burn_in` is not an int or another argument is not a
            real number.
        ValueError: if `burn_in < 0`, `kappa` or `eta` is negative or not
            finite, `rho` or `gamma` is not a finite float > 0, or
            `rho + gamma < 1` (the first beta would exceed 1).

    Example:

    ```python
    import keras
    import keras_ema

    bema = keras_ema.schedules.BEMA(burn_in=100)
    assert abs(float(bema(1)) - (1 - 11 ** -0.5)) < 1e-6  # 1 - beta_1
    assert abs(float(bema.correction(1)) - 11 ** -0.2) < 1e-6  # alpha_1
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=[0.999, bema])
    ```
    """

    def __init__(
        self,
        burn_in: int,
        kappa: float = 0.5,
        eta: float = 0.2,
        rho: float = 10.0,
        gamma: float = 1.0,
    ):
        self.burn_in = int(check_int(burn_in, "burn_in", 0))
        self.kappa = _check_in(
            kappa, "kappa", 0.0, math.inf, "[0, inf)", high_open=True
        )
        self.eta = _check_in(eta, "eta", 0.0, math.inf, "[0, inf)", high_open=True)
        self.rho = _check_positive(rho, "rho")
        self.gamma = _check_positive(gamma, "gamma")
        if self.rho + self.gamma < 1.0:
            raise ValueError(
                "`rho + gamma` must be >= 1, so that beta_1 = (rho + gamma) ** "
                f"-kappa <= 1; got rho={self.rho}, gamma={self.gamma}."
            )
        if self.burn_in == 0:
            warnings.warn(
                "BEMA(burn_in=0): theta_0 is the weights training starts from. "
                "Right when fine-tuning pretrained weights; if they are a "
                "random initialisation, the correction pulls the served "
                "weights towards it: set `burn_in` to a step count (e.g. a "
                "tenth of the run).",
                stacklevel=2,
            )

    def _decay(self, s: Tensor) -> Tensor:
        # 1 - (rho + gamma s)^-kappa = -expm1(-kappa log(rho + gamma s)).
        return -ops.expm1(-self.kappa * ops.log(self.rho + self.gamma * s))

    def correction(self, step: int | Tensor, dtype: Any = "float32") -> Tensor:
        """Returns `alpha_s = (rho + gamma * s) ** -eta`.

        Args:
            step: s, the steps since the burn-in (an int >= 1 or an integer
                tensor).
            dtype: Floating dtype of the result.

        Returns:
            A scalar tensor of `dtype`.

        Raises:
            TypeError: if `step` is not an int or an integer tensor.
            ValueError: if `step` is an int < 1.
        """
        dtype = _check_dtype(dtype)
        s = _step_to_compute_dtype(step)
        return ops.cast(ops.exp(-self.eta * ops.log(self.rho + self.gamma * s)), dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            "burn_in": self.burn_in,
            "kappa": self.kappa,
            "eta": self.eta,
            "rho": self.rho,
            "gamma": self.gamma,
        }


@keras.saving.register_keras_serializable(package="keras_ema")
class PowerFunction(DecaySchedule):
    """Power-function EMA of Karras et al. (2024), "Analyzing and Improving
    the Training Dynamics of Diffusion Models" (EDM2).

    `d(s) = (1 - 1 / s) ** (gamma + 1)`, so `d(1) = 0`.

    The average at step `s` weighs the weights of step `t` proportionally to
    `t ** gamma`; its width relative to the training length is `sigma_rel`
    (see `gamma_to_sigma_rel`). The decay over the `k` steps ending at `s`
    has the closed form `((s - k) / s) ** (gamma + 1)`.

    Give exactly one of `gamma` and `sigma_rel`; both are available as
    attributes afterwards.

    Args:
        gamma: float `> 0`, the exponent.
        sigma_rel: float in `(0, sqrt(1/12))`, the relative standard deviation
            of the averaging profile (Karras et al. use 0.05 to 0.10).

    Raises:
        TypeError: if the argument given is not a real number.
        ValueError: if neither or both of `gamma` and `sigma_rel` are
            given, `gamma` is not a finite float > 0, or `sigma_rel` is not
            in `(0, sqrt(1/12))`.

    Example:

    ```python
    import keras
    import keras_ema

    schedule = keras_ema.schedules.PowerFunction(sigma_rel=0.10)
    assert round(schedule.gamma, 2) == 6.94
    assert float(schedule(1)) == 0.0  # the first update copies the weights
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=schedule)
    ```
    """

    def __init__(self, gamma: float | None = None, sigma_rel: float | None = None):
        if (gamma is None) == (sigma_rel is None):
            raise ValueError(
                "Exactly one of `gamma` and `sigma_rel` must be given, got "
                f"gamma={gamma!r}, sigma_rel={sigma_rel!r}."
            )
        if gamma is not None:
            self.gamma = _check_positive(gamma, "gamma")
            self.sigma_rel = gamma_to_sigma_rel(self.gamma)
        else:
            self.sigma_rel = _check_sigma_rel(sigma_rel)
            self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        self._given = "gamma" if gamma is not None else "sigma_rel"

    def _decay(self, s: Tensor) -> Tensor:
        # (1 - 1/s)^(gamma + 1); log1p(-1) = -inf gives d(1) = 0.
        return ops.exp((self.gamma + 1.0) * ops.log1p(-1.0 / s))

    def _decay_over(self, s: Tensor, k: int) -> Tensor:
        return ops.exp((self.gamma + 1.0) * ops.log1p(-k / s))

    def get_config(self) -> dict[str, Any]:
        # Keep the argument that was given, so that the round trip is exact.
        if self._given == "gamma":
            return {"gamma": self.gamma, "sigma_rel": None}
        return {"gamma": None, "sigma_rel": self.sigma_rel}


_SCHEDULES = {
    cls.__name__: cls
    for cls in (Constant, TFWarmup, PowerWarmup, Debiased, PowerFunction, BEMA)
}


def get(identifier: Any) -> DecaySchedule:
    """Retrieves a decay schedule.

    Args:
        identifier: a float (or int) in `[0, 1]`, giving a `Constant`
            schedule; a `DecaySchedule`, returned as is; or a dict, as
            returned by `keras.saving.serialize_keras_object(schedule)` (or
            `{"class_name": ..., "config": ...}`), deserialized.

    Returns:
        A `DecaySchedule`.

    Raises:
        TypeError: for any other `identifier` (including bools and strings),
            or a dict that deserializes to something else.
        ValueError: for a number outside `[0, 1]`.

    Example:

    ```python
    import keras
    import keras_ema

    assert repr(keras_ema.schedules.get(0.999)) == "Constant(decay=0.999)"
    schedule = keras_ema.schedules.PowerFunction(gamma=7.0)
    assert keras_ema.schedules.get(schedule) is schedule
    config = keras.saving.serialize_keras_object(schedule)
    print(keras_ema.schedules.get(config))  # PowerFunction(gamma=7.0, ...)
    ```
    """
    if isinstance(identifier, DecaySchedule):
        return identifier
    if isinstance(identifier, numbers.Real) and not isinstance(
        identifier, bool | np.bool_
    ):
        return Constant(float(identifier))
    if isinstance(identifier, dict):
        schedule = keras.saving.deserialize_keras_object(
            identifier, custom_objects=_SCHEDULES
        )
        if not isinstance(schedule, DecaySchedule):
            raise TypeError(
                f"`decay` dict must deserialize to a DecaySchedule, got "
                f"{type(schedule).__name__}."
            )
        return schedule
    raise TypeError(
        "`decay` must be a float in [0, 1], a DecaySchedule or a serialized "
        f"DecaySchedule dict, got {identifier!r} of type "
        f"{type(identifier).__name__}."
    )


# ---------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------


def half_life_to_decay(steps: float) -> float:
    """Returns the constant decay whose half-life is `steps` steps.

    `decay = 0.5 ** (1 / steps)`: after `steps` updates the weight of the
    old average has halved.

    Args:
        steps: float `> 0`, the half-life in steps.

    Returns:
        The decay, a float in `(0, 1)` (it may round to 1 for huge half-lives).

    Raises:
        TypeError: if `steps` is not a real number.
        ValueError: if `steps` is not a finite float > 0.

    Example:

    ```python
    import keras
    import keras_ema

    decay = keras_ema.schedules.half_life_to_decay(693.1)
    assert round(decay, 6) == 0.999
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(), decay=decay)
    ```
    """
    steps = _check_positive(steps, "steps")
    return 0.5 ** (1.0 / steps)


def decay_to_half_life(decay: float) -> float:
    """Returns the half-life in steps of a constant decay.

    `half_life = ln(0.5) / ln(decay)`.

    Args:
        decay: float in `(0, 1)`.

    Returns:
        The half-life in steps, a float `> 0`.

    Raises:
        TypeError: if `decay` is not a real number.
        ValueError: if `decay` is not in `(0, 1)`.

    Example:

    ```python
    import keras
    import keras_ema

    assert round(keras_ema.schedules.decay_to_half_life(0.999), 1) == 692.8
    ```
    """
    decay = _check_in(decay, "decay", 0.0, 1.0, "(0, 1)", low_open=True, high_open=True)
    return math.log(0.5) / math.log(decay)


def scale_decay(decay: float, batch_size: float, reference_batch_size: float) -> float:
    """Scales a decay tuned at one batch size to another batch size.

    `decay ** (batch_size / reference_batch_size)`: the EMA scaling rule of
    Busbridge et al. (2023), "How to Scale Your EMA", which keeps the
    averaging horizon fixed in samples rather than in steps.

    Args:
        decay: float in `[0, 1]`, the decay tuned at `reference_batch_size`.
        batch_size: float `> 0`, the new batch size.
        reference_batch_size: float `> 0`, the batch size `decay` was tuned at.

    Returns:
        The scaled decay, a float in `[0, 1]`.

    Raises:
        TypeError: if an argument is not a real number.
        ValueError: if `decay` is not in `[0, 1]`, or a batch size is not a
            finite float > 0.

    Example:

    ```python
    import keras
    import keras_ema

    decay = keras_ema.schedules.scale_decay(
        0.9, batch_size=512, reference_batch_size=256
    )
    assert abs(decay - 0.81) < 1e-12  # twice the batch: two steps in one
    ```
    """
    decay = _check_decay(decay)
    batch_size = _check_positive(batch_size, "batch_size")
    reference_batch_size = _check_positive(reference_batch_size, "reference_batch_size")
    return decay ** (batch_size / reference_batch_size)


def _check_sigma_rel(sigma_rel: Any) -> float:
    return _check_in(
        sigma_rel,
        "sigma_rel",
        0.0,
        _MAX_SIGMA_REL,
        f"(0, {_MAX_SIGMA_REL!r}) (i.e. (0, sqrt(1/12)))",
        low_open=True,
        high_open=True,
    )


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Returns the power-function EMA exponent `gamma` of a relative width.

    Solves `sigma_rel ** 2 = (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))`
    for `gamma > 0`, i.e. takes the largest real root of
    `g**3 + 7 g**2 + (16 - t) g + (12 - t) = 0` with `t = sigma_rel ** -2`
    (Karras et al. 2024, Algorithm 2), refined by Newton steps.

    Args:
        sigma_rel: float in `(0, sqrt(1/12))`.

    Returns:
        `gamma`, a float `> 0`.

    Raises:
        TypeError: if `sigma_rel` is not a real number.
        ValueError: if `sigma_rel` is not in `(0, sqrt(1/12))`.

    Example:

    ```python
    import keras
    import keras_ema

    assert round(keras_ema.schedules.sigma_rel_to_gamma(0.05), 2) == 16.97
    ```
    """
    sigma_rel = _check_sigma_rel(sigma_rel)
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    g = float(np.max(roots.real[np.abs(roots.imag) <= 1e-7 * (1 + np.abs(roots))]))
    for _ in range(2):  # Newton polish; the root is simple.
        f = ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t)
        df = (3.0 * g + 14.0) * g + (16.0 - t)
        if df == 0.0:
            break
        g -= f / df
    return g


def gamma_to_sigma_rel(gamma: float) -> float:
    """Returns the relative width of the power-function EMA with exponent gamma.

    `sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`.

    Args:
        gamma: float `> 0`.

    Returns:
        `sigma_rel`, a float in `(0, sqrt(1/12))`.

    Raises:
        TypeError: if `gamma` is not a real number.
        ValueError: if `gamma` is not a finite float > 0.

    Example:

    ```python
    import keras
    import keras_ema

    assert round(keras_ema.schedules.gamma_to_sigma_rel(6.94), 3) == 0.1
    ```
    """
    g = _check_positive(gamma, "gamma")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))
