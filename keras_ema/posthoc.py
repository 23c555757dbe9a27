"""Post-hoc EMA: choose the averaging length after training.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (CVPR 2024): a power-function average with exponent gamma weighs the
weights of step tau <= t in proportion to tau^gamma, i.e. with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t.

Snapshots of two such averages, taken during training, span (in the least
squares sense) the profiles of averages of any other length: after training
`reconstruct` solves for the combination of snapshots whose profile is
closest to the wanted one, and combines the snapshots' weights with it.

`PostHocEMA` keeps the averages inside the compiled train step and writes
the snapshots; `reconstruct`, `load_into` and `sweep` use them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from numpy.typing import ArrayLike

from keras_ema import schedules
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.backend import strategy_scope, sync_training_state
from keras_ema.holder import ema_optimizer_of, install_average
from keras_ema.shadows import relative_paths

__all__ = [
    "PostHocEMA",
    "list_snapshots",
    "load_into",
    "profile_inner_product",
    "reconstruct",
    "snapshot_name",
    "solve_coefficients",
    "sweep",
]

PathLike = str | os.PathLike
SNAPSHOT_DTYPES = ("float16", "float32")
_SNAPSHOT = re.compile(r"^phema-(?P<sigma_rel>\d+\.\d+)-(?P<step>\d+)\.npz$")
MODEL_FILE = "model.keras"


# --------------------------------------------------------------- profile math


def profile_inner_product(
    t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike
) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}>, the L2 inner product of two profiles.

    In closed form, with m = min(t_a, t_b):

        (gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1)
        / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1))

    The arguments are floats or numpy arrays that broadcast together (so
    that one call gives a whole Gram matrix); their values are not checked.

    Args:
        t_a: The first profile's step (time), > 0.
        gamma_a: The first profile's exponent, > 0.
        t_b: The second profile's step, > 0.
        gamma_b: The second profile's exponent, > 0.

    Returns:
        The inner products, in float64, of the broadcast shape.

    Raises:
        ValueError: if an argument is not numeric, or the shapes do not
            broadcast.

    Example:

    ```python
    import keras
    import keras_ema
    import numpy as np

    inner = keras_ema.posthoc.profile_inner_product
    # <p, p> = (gamma + 1)^2 / ((2 gamma + 1) t)
    assert np.isclose(inner(1.0, 1.0, 1.0, 1.0), 4 / 3)
    steps = np.array([1000.0, 2000.0])
    gram = inner(steps[:, None], 7.0, steps, 7.0)  # 2 x 2
    print(gram)
    ```
    """
    t_a, gamma_a, t_b, gamma_b = (
        np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b)
    )
    # Written with ratios (m/t <= 1) so that large steps do not overflow.
    m = np.minimum(t_a, t_b)
    return (
        (gamma_a + 1)
        * (gamma_b + 1)
        * (m / t_a) ** (gamma_a + 1)
        * (m / t_b) ** (gamma_b + 1)
        / ((gamma_a + gamma_b + 1) * m)
    )


def solve_coefficients(
    steps: ArrayLike, gammas: ArrayLike, target_step: float, target_gamma: float
) -> tuple[np.ndarray, float]:
    """Least-squares coefficients of snapshot profiles for a target profile.

    Solves `A x = b` with `A_ij = <p_i, p_j>` and `b_i = <p_i, p_target>` in
    float64 (by least squares, as `A` is close to singular when snapshots
    are dense), normalises `x` to sum to 1, and measures the fit.

    Args:
        steps: The snapshots' steps, a 1-D array.
        gammas: The snapshots' exponents, aligned with `steps` (or one for
            all).
        target_step: The step of the profile to reconstruct.
        target_gamma: The exponent of the profile to reconstruct.

    Returns:
        `(coefficients, error)`: the coefficients (a float64 array aligned
        with `steps`), and the fitting error
        `|sum_i x_i p_i - p_target| / |p_target|` (relative L2).

    Raises:
        ValueError: if an argument is not numeric, `steps` is empty or not
            1-D, a step is not positive, or `gammas` does not broadcast
            against `steps`.

    Example:

    ```python
    import keras
    import keras_ema
    from keras_ema.schedules import sigma_rel_to_gamma

    # Snapshots of sigma_rel 0.05 and 0.10 at steps 1000 and 2000.
    steps = [1000, 2000, 1000, 2000]
    gammas = [sigma_rel_to_gamma(0.05)] * 2 + [sigma_rel_to_gamma(0.10)] * 2
    coefficients, error = keras_ema.posthoc.solve_coefficients(
        steps, gammas, target_step=2000, target_gamma=sigma_rel_to_gamma(0.08)
    )
    assert abs(coefficients.sum() - 1) < 1e-9
    print(coefficients.round(3), f"relative error {error:.4f}")
    ```
    """
    steps = np.asarray(steps, np.float64)
    gammas = np.asarray(gammas, np.float64)
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError(
            "`steps` must be a non-empty 1-D array of snapshot steps, got shape "
            f"{steps.shape}."
        )
    if np.any(steps <= 0) or not float(target_step) > 0:
        raise ValueError(
            "`steps` and `target_step` must be positive: a power-function "
            f"profile starts at step 1; got steps {steps.tolist()} and "
            f"target_step {target_step!r}."
        )
    a = profile_inner_product(steps[:, None], gammas[:, None], steps, gammas)
    b = profile_inner_product(steps, gammas, target_step, target_gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum()
    target = profile_inner_product(target_step, target_gamma, target_step, target_gamma)
    residual = max(float(x @ a @ x - 2 * x @ b + target), 0.0)
    return x, float(np.sqrt(residual / target))


# ------------------------------------------------------------------ snapshots


def snapshot_name(sigma_rel: float, step: int) -> str:
    """The file name `PostHocEMA` gives the snapshot of `sigma_rel` at `step`.

    `phema-<sigma_rel, 6 decimals>-<step, 10 digits>.npz`, the form
    `list_snapshots` recognises. The values are not checked.

    Args:
        sigma_rel: The relative length of the average.
        step: The optimizer step of the snapshot.

    Returns:
        The file name, without a directory.

    Raises:
        ValueError: if `sigma_rel` is a string, or `step` is not an
            integer (the name's number formats refuse them).
        TypeError: if `sigma_rel` or `step` is None.

    Example:

    ```python
    import keras
    import keras_ema

    name = keras_ema.posthoc.snapshot_name(0.05, 1000)
    assert name == "phema-0.050000-0000001000.npz"
    ```
    """
    return f"phema-{sigma_rel:.6f}-{step:010d}.npz"


def list_snapshots(directory: PathLike) -> list[tuple[float, int, str]]:
    """The snapshots in `directory` as `(sigma_rel, step, path)`, sorted.

    Files whose names are not snapshot names (`snapshot_name`) are ignored.

    Args:
        directory: A `PostHocEMA` directory.

    Returns:
        A list of `(sigma_rel, step, path)` tuples, sorted by `sigma_rel`,
        then step.

    Raises:
        ValueError: if `directory` does not exist.

    Example:

    ```python
    import tempfile

    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    directory = tempfile.mkdtemp()
    # 16 steps, a snapshot of each of the two averages every 4.
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[keras_ema.PostHocEMA(directory, every_n_steps=4)])
    snapshots = keras_ema.posthoc.list_snapshots(directory)
    assert [(s, step) for s, step, _ in snapshots[:2]] == [(0.05, 4), (0.05, 8)]
    assert len(snapshots) == 8
    ```
    """
    if not os.path.isdir(directory):
        raise ValueError(f"`directory` {directory!r} does not exist.")
    found = []
    for name in os.listdir(directory):
        match = _SNAPSHOT.match(name)
        if match:
            found.append(
                (
                    float(match["sigma_rel"]),
                    int(match["step"]),
                    os.path.join(directory, name),
                )
            )
    return sorted(found)


def _write_atomically(path, write, suffix=".npz"):
    directory = os.path.dirname(path)
    handle, staging = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(handle)
    try:
        write(staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def _read_snapshot(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# ------------------------------------------------------------------- callback


class PostHocEMA(keras.callbacks.Callback):
    """Keeps power-function averages during training and snapshots them.

    One `PowerFunction` average per `sigma_rel` is updated inside the
    compiled train step (attached to the model's `EMAOptimizer`, which is
    installed around the compiled optimizer if there is none). Every
    `every_n_steps` optimizer steps each average is written to `directory`
    as `phema-<sigma_rel>-<step>.npz` (a temporary file, then renamed). The
    model itself is saved once as `model.keras` for `keras-ema posthoc`.

    Resuming: when training restarts from a checkpoint taken at a snapshot's
    step (e.g. `ModelCheckpoint(save_freq=every_n_steps)`), the averages
    continue from those snapshots; snapshots of later steps, left by the
    interrupted run, are removed (they are rewritten), so none is duplicated
    or lost.

    Args:
        directory: Where snapshots go (created if needed).
        sigma_rels: The relative lengths of the stored averages, in
            (0, 0.2887); Karras et al. store 0.05 and 0.10.
        every_n_steps: Optimizer steps between snapshots.
        dtype: `"float16"` (half the disk) or `"float32"` snapshots.
        update_every: Update the averages every this many steps (decay
            compensated exactly: ((t - k) / t)^(gamma + 1) over k steps).
        max_disk_bytes: Optional cap: refuse to train if the snapshots of
            this `fit` would need more. The estimate is printed at train
            begin either way.

    Raises:
        TypeError: if `directory` is not a path, `sigma_rels` is not a
            sequence, or one of them is not a real number.
        ValueError: if `sigma_rels` is empty, has duplicates or a value
            outside (0, 0.2887); `every_n_steps` or `update_every` is not a
            positive int, or `every_n_steps` is not a multiple of
            `update_every`; `dtype` is not one of the accepted values; or
            `max_disk_bytes` is not a positive int or None. At the start of
            `fit`: if the snapshots would exceed `max_disk_bytes`, or the
            model's step does not continue the snapshots in `directory`.

    Example:

    ```python
    import tempfile

    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    directory = tempfile.mkdtemp()
    posthoc = keras_ema.PostHocEMA(directory, sigma_rels=(0.05, 0.10), every_n_steps=4)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[posthoc])

    # After training: any sigma_rel from the stored snapshots.
    keras_ema.posthoc.load_into(model, directory, sigma_rel=0.08)
    print(model.evaluate(x, y, verbose=0))
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 1000,
        dtype: str = "float16",
        update_every: int = 1,
        max_disk_bytes: int | None = None,
    ):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`directory` must be a path, got {directory!r}.")
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
            raise TypeError(f"`sigma_rels` must be a sequence, got {sigma_rels!r}.")
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(
                f"`sigma_rels` must be non-empty and distinct, got {sigma_rels!r}."
            )
        profiles = [schedules.PowerFunction(sigma_rel=s) for s in sigma_rels]
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("update_every", update_every),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if every_n_steps % update_every:
            raise ValueError(
                "`every_n_steps` must be a multiple of `update_every`, got "
                f"{every_n_steps} and {update_every}."
            )
        if dtype not in SNAPSHOT_DTYPES:
            raise ValueError(
                f"`dtype` must be one of {SNAPSHOT_DTYPES}, got {dtype!r}."
            )
        if max_disk_bytes is not None and (
            isinstance(max_disk_bytes, bool)
            or not isinstance(max_disk_bytes, int)
            or max_disk_bytes < 1
        ):
            raise ValueError(
                "`max_disk_bytes` must be a positive int or None, got "
                f"{max_disk_bytes!r}."
            )
        self.directory = os.fspath(directory)
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.profiles = profiles
        self.every_n_steps = every_n_steps
        self.dtype = dtype
        self.update_every = update_every
        self.max_disk_bytes = max_disk_bytes
        # One average per profile, built at the first `fit`.
        self.averagers: list[ExponentialMovingAverage] = []
        self._optimizer: Any = None
        self._model_saved = False
        self._last_snapshot = 0

    def on_train_begin(self, logs=None):
        model = self.model
        os.makedirs(self.directory, exist_ok=True)
        optimizer = self._optimizer = _ensure_ema_optimizer(model)
        variables = model.trainable_variables
        if not self.averagers:
            with strategy_scope(model):
                for profile in self.profiles:
                    averager = ExponentialMovingAverage(
                        decay=profile,
                        update_every=self.update_every,
                        name=f"posthoc_{len(self.averagers)}",
                    )
                    averager.build(variables)
                    self.averagers.append(averager)
            self._resume(int(optimizer.iterations.numpy()))
        step = int(optimizer.iterations.numpy())
        if int(self.averagers[0].step.numpy()) != step:
            raise ValueError(
                self._missed_steps_message(list_snapshots(self.directory), step)
            )
        for averager in self.averagers:
            optimizer.attach(averager)
        model.make_train_function(force=True)
        self._report_disk_use(variables)

    def _resume(self, step):
        """Continues from the snapshots of `step` (the model's optimizer's)."""
        snapshots = [
            s for s in list_snapshots(self.directory) if s[0] in self.sigma_rels
        ]
        if step == 0:
            stale = snapshots  # left by an earlier run: rewritten
        elif not snapshots:
            # A model that trained before: the averages start from its
            # weights, counted as the average of the steps before.
            for averager in self.averagers:
                averager.step.assign(step)
            self._last_snapshot = step
            print(
                f"PostHocEMA: the model trained {step} steps before this fit; "
                "the post-hoc averages start from its current weights."
            )
            stale = []
        else:
            at_step = [
                os.path.join(self.directory, snapshot_name(sigma_rel, step))
                for sigma_rel in self.sigma_rels
            ]
            if not all(os.path.exists(path) for path in at_step):
                raise ValueError(self._missed_steps_message(snapshots, step))
            for averager, path in zip(self.averagers, at_step):
                _load_snapshot(averager, _read_snapshot(path))
            stale = [s for s in snapshots if s[1] > step]
            self._last_snapshot = step
        for _, _, path in stale:
            os.remove(path)

    def _missed_steps_message(self, snapshots, step):
        last = max(s[1] for s in snapshots)
        return (
            f"PostHocEMA: the snapshots in {self.directory!r} end at step "
            f"{last}, but the model is at step {step}, so the post-hoc "
            "averages cannot continue: the model trained without this "
            "callback in between, or was restored from a checkpoint taken "
            "between snapshots. Pass the same PostHocEMA callback to every fit "
            "of the run, resume from a checkpoint taken at a snapshot step (a "
            f"multiple of every_n_steps={self.every_n_steps}), or record into a "
            "new directory."
        )

    def _report_disk_use(self, variables):
        per_snapshot = sum(int(np.prod(v.shape)) for v in variables)
        per_snapshot *= np.dtype(self.dtype).itemsize * len(self.sigma_rels)
        epochs = (self.params or {}).get("epochs") or 1
        steps = (self.params or {}).get("steps") or 0
        count = (epochs * steps) // self.every_n_steps if steps else None
        total = per_snapshot * count if count is not None else None
        estimate = f"{total / 1e6:.1f} MB" if total is not None else "unknown total"
        print(
            f"PostHocEMA: {len(self.sigma_rels)} averages (sigma_rel "
            f"{', '.join(map(str, self.sigma_rels))}), a snapshot every "
            f"{self.every_n_steps} steps: {per_snapshot / 1e6:.2f} MB each, "
            f"{count if count is not None else '?'} this fit, {estimate}."
        )
        if self.max_disk_bytes is not None and total and total > self.max_disk_bytes:
            raise ValueError(
                f"PostHocEMA would write {total} bytes, over max_disk_bytes="
                f"{self.max_disk_bytes}; raise every_n_steps or the cap."
            )

    def on_train_batch_end(self, batch, logs=None):
        if not self._model_saved:
            # The architecture, for `keras-ema posthoc` (saved once the model
            # is built, which fit may do at its first step).
            model_file = os.path.join(self.directory, MODEL_FILE)
            if not os.path.exists(model_file):
                _write_atomically(model_file, self.model.save, suffix=".keras")
            self._model_saved = True
        sync_training_state(self.model)
        step = int(self.averagers[0].step.numpy())
        if step // self.every_n_steps > self._last_snapshot // self.every_n_steps:
            self._snapshot(step)

    def on_train_end(self, logs=None):
        for averager in self.averagers:
            self._optimizer.detach(averager)
        self.model.make_train_function(force=True)

    def _snapshot(self, step):
        for sigma_rel, profile, averager in zip(
            self.sigma_rels, self.profiles, self.averagers
        ):
            arrays = {
                f"w:{path}": shadow.numpy().astype(self.dtype)
                for path, shadow in averager.shadows_by_path.items()
            }
            arrays["meta"] = np.array(
                json.dumps(
                    {"sigma_rel": sigma_rel, "gamma": profile.gamma, "step": step}
                )
            )
            path = os.path.join(self.directory, snapshot_name(sigma_rel, step))
            _write_atomically(path, lambda p, a=arrays: _save_npz(p, a))
        self._last_snapshot = step


def _save_npz(path, arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def _ensure_ema_optimizer(model):
    optimizer = ema_optimizer_of(model)
    if optimizer is None:
        # No average yet: wrap the optimizer in one whose own average is
        # cheap to ignore (the post-hoc averages are attached to it).
        return install_average(model, decay=0.999)
    if not optimizer.built:
        with strategy_scope(model):
            optimizer.build(model.trainable_variables)
    return optimizer


def _load_snapshot(averager, snapshot):
    meta = json.loads(str(snapshot["meta"]))
    for path, shadow in averager.shadows_by_path.items():
        shadow.assign(snapshot[f"w:{path}"].astype(shadow.dtype))
    averager.step.assign(meta["step"])


# ------------------------------------------------------------ reconstruction


def reconstruct(
    directory: PathLike, sigma_rel: float, step: int | None = None
) -> tuple[dict[str, np.ndarray], list[tuple[float, int, float]], float]:
    """The weights of the power-function average of `sigma_rel` at `step`.

    Uses only snapshots taken at or before `step` (default: the last
    snapshot's step), the closed-form inner products of their profiles, and
    a float64 least-squares solve; the coefficients are normalised to sum to
    1.

    Args:
        directory: A `PostHocEMA` directory.
        sigma_rel: The relative length to reconstruct, in (0, 0.2887).
        step: The step to reconstruct at.

    Returns:
        `(weights, coefficients, error)`: a dict from variable path (relative
        to the model) to float32 array; a list of
        `(sigma_rel, step, coefficient)` per snapshot used; and the profile
        fitting error (relative L2).

    Raises:
        TypeError: if `sigma_rel` is not a real number.
        ValueError: if `sigma_rel` is outside (0, 0.2887), `directory` does
            not exist or holds no snapshot, `step` is not a positive int or
            None, or no snapshot was taken at or before `step`.

    Example:

    ```python
    import tempfile

    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    directory = tempfile.mkdtemp()
    # 16 steps, a snapshot of each of the two averages every 4.
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[keras_ema.PostHocEMA(directory, every_n_steps=4)])
    weights, coefficients, error = keras_ema.posthoc.reconstruct(directory, 0.08)
    print(sorted(weights))  # the variables' paths: ['bias', 'kernel']
    sigma_rel, step, coefficient = coefficients[-1]  # one per snapshot used
    print(f"{len(coefficients)} snapshots, profile fit error {error:.3f}")
    ```
    """
    gamma = schedules.PowerFunction(sigma_rel=sigma_rel).gamma
    snapshots = list_snapshots(directory)
    if not snapshots:
        raise ValueError(f"`directory` {directory!r} holds no PostHocEMA snapshot.")
    if step is None:
        step = max(s[1] for s in snapshots)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"`step` must be a positive int or None, got {step!r}.")
    used = [s for s in snapshots if s[1] <= step]
    if not used:
        raise ValueError(f"No snapshot in {directory!r} at or before step {step}.")
    gammas = [schedules.sigma_rel_to_gamma(s[0]) for s in used]
    coefficients, error = solve_coefficients([s[1] for s in used], gammas, step, gamma)
    weights: dict | None = None
    for coefficient, (_, _, path) in zip(coefficients, used):
        snapshot = _read_snapshot(path)
        arrays = {
            key[2:]: snapshot[key].astype(np.float64)
            for key in snapshot
            if key.startswith("w:")
        }
        if weights is None:
            weights = {key: coefficient * value for key, value in arrays.items()}
        else:
            for key, value in arrays.items():
                weights[key] += coefficient * value
    if weights is None:
        raise ValueError("No snapshot to combine.")
    weights = {key: value.astype(np.float32) for key, value in weights.items()}
    table = [(s[0], s[1], float(c)) for s, c in zip(used, coefficients)]
    return weights, table, error


def load_into(
    model: keras.Model, directory: PathLike, sigma_rel: float, step: int | None = None
) -> tuple[list[tuple[float, int, float]], float]:
    """Assigns the reconstructed average of `sigma_rel` to `model`'s weights.

    Variables are matched by path relative to the model.

    Args:
        model: A model of the architecture the snapshots come from.
        directory: A `PostHocEMA` directory.
        sigma_rel: The relative length to reconstruct, in (0, 0.2887).
        step: The step to reconstruct at (default: the last snapshot's).

    Returns:
        `(coefficients, error)`, as `reconstruct` returns them.

    Raises:
        TypeError: if `model` is not a Keras model, or `sigma_rel` is not a
            real number.
        ValueError: if the snapshots' variables do not match the model's
            trainable variables, or for the reasons `reconstruct` gives.

    Example:

    ```python
    import tempfile

    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    directory = tempfile.mkdtemp()
    # 16 steps, a snapshot of each of the two averages every 4.
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[keras_ema.PostHocEMA(directory, every_n_steps=4)])
    coefficients, error = keras_ema.posthoc.load_into(model, directory, 0.08)
    print(model.evaluate(x, y, verbose=0))  # the reconstructed average's loss
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    weights, coefficients, error = reconstruct(directory, sigma_rel, step)
    variables = model.trainable_variables
    paths = relative_paths(variables)
    missing = sorted(set(paths) ^ set(weights))
    if missing:
        raise ValueError(
            "The snapshots do not match the model's variables; differing "
            f"paths: {missing[:5]}."
        )
    for variable, path in zip(variables, paths):
        variable.assign(weights[path].astype(variable.dtype))
    return coefficients, error


def sweep(
    model: keras.Model,
    directory: PathLike,
    sigma_rels: Sequence[float],
    evaluate_fn: Callable[[keras.Model], float],
    step: int | None = None,
    plot: str | os.PathLike | None = None,
) -> list[dict]:
    """Evaluates reconstructed averages over a grid of `sigma_rels`.

    The model's weights are restored afterwards.

    Args:
        model: A model of the architecture the snapshots come from.
        directory: A `PostHocEMA` directory.
        sigma_rels: The relative lengths to evaluate.
        evaluate_fn: Called with the model holding each average; returns a
            float metric.
        step: The step to reconstruct at (default: the last).
        plot: Optional PNG path for a plot of the metric against sigma_rel.

    Returns:
        One dict per sigma_rel: `sigma_rel`, `metric`, `fit_error`.

    Raises:
        TypeError: if `model` is not a Keras model, `evaluate_fn` is not
            callable, or a `sigma_rels` entry
            is not a real number.
        ValueError: for the reasons `load_into` gives.
        ImportError: with `plot`, if matplotlib is not installed.

    Example:

    ```python
    import tempfile

    import keras
    import keras_ema
    import numpy as np

    x = np.random.rand(32, 4).astype("float32")
    y = np.random.rand(32, 1).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    directory = tempfile.mkdtemp()
    # 16 steps, a snapshot of each of the two averages every 4.
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[keras_ema.PostHocEMA(directory, every_n_steps=4)])
    rows = keras_ema.posthoc.sweep(
        model, directory, sigma_rels=[0.05, 0.08, 0.10],
        evaluate_fn=lambda m: m.evaluate(x, y, verbose=0),
    )
    best = min(rows, key=lambda row: row["metric"])
    print(best["sigma_rel"], best["metric"])
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if not callable(evaluate_fn):
        raise TypeError(f"`evaluate_fn` must be callable, got {evaluate_fn!r}.")
    original = [v.numpy() for v in model.trainable_variables]
    rows = []
    try:
        for sigma_rel in sigma_rels:
            _, error = load_into(model, directory, sigma_rel, step)
            rows.append(
                {
                    "sigma_rel": float(sigma_rel),
                    "metric": float(evaluate_fn(model)),
                    "fit_error": error,
                }
            )
    finally:
        for variable, value in zip(model.trainable_variables, original):
            variable.assign(value)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot([r["sigma_rel"] for r in rows], [r["metric"] for r in rows], "o-")
        axis.set_xlabel("sigma_rel")
        axis.set_ylabel("metric")
        axis.set_title("Post-hoc EMA sweep")
        figure.tight_layout()
        figure.savefig(plot, dpi=100)
        plt.close(figure)
    return rows
