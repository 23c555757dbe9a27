"""Tests of keras_ema.ExponentialMovingAverage against independent references.

Every number is checked against a NumPy float64 reference written here from
the formula of DESIGN.md ("Semantics"), or against
`tf.train.ExponentialMovingAverage`; never against keras_ema itself.

    t = number of updates applied, the current one included (t = 1 first)
    s = t - start_step
    s <= 0                         -> shadow = w
    init="first_step" and t == 1   -> shadow = w
    s % k == 0                     -> shadow -= (1 - D) * (shadow - w),
                                      D = d(s - k + 1) * ... * d(s)
    otherwise                      -> unchanged
    init="weights": shadow = w when built.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tensorflow_only

import keras_ema
from keras_ema import schedules

BF16 = tf.bfloat16.as_numpy_dtype

# ---------------------------------------------------------------------------
# NumPy references (float64), written from the formulas.
# ---------------------------------------------------------------------------

# name -> (schedule factory, per-step decay d(s) as a float64 function of s)
SCHEDULES = {
    "constant": (
        lambda: schedules.Constant(0.9),
        lambda s: 0.9,
    ),
    "tf_warmup": (
        # (1 + s) / (10 + s) reaches 0.8 at s = 35: warmup, then constant.
        lambda: schedules.TFWarmup(0.8),
        lambda s: min(0.8, (1.0 + s) / (10.0 + s)),
    ),
    "power_warmup": (
        # 1 - (1 + 2 s)^-0.5 is 0.42 at s = 1 (clipped to 0.45) and reaches
        # 0.85 at s = 22: both ends of the clip are exercised.
        lambda: schedules.PowerWarmup(0.85, inv_gamma=0.5, power=0.5, min_decay=0.45),
        lambda s: float(np.clip(1.0 - (1.0 + s / 0.5) ** -0.5, 0.45, 0.85)),
    ),
    "debiased": (
        lambda: schedules.Debiased(0.9),
        lambda s: (0.9 - 0.9**s) / (1.0 - 0.9**s),
    ),
    "power_function": (
        lambda: schedules.PowerFunction(gamma=3.0),
        lambda s: (1.0 - 1.0 / s) ** (3.0 + 1.0),
    ),
}


def ref_decay_over(d, s, k):
    """D = d(s - k + 1) * ... * d(s), as a product of per-step decays."""
    return float(np.prod([d(float(j)) for j in range(s - k + 1, s + 1)]))


def ref_trajectory(traj, d, update_every, start_step, init):
    """Shadows after each step t = 1..T of the weight trajectory `traj`.

    `traj[0]` holds the weights at build time, `traj[t]` the weights after
    the optimizer step t. Returns a list (over t = 1..T) of lists (over
    variables) of float64 arrays.
    """
    shadows = [np.asarray(w, np.float64).copy() for w in traj[0]]
    history = []
    for t in range(1, len(traj)):
        weights = [np.asarray(w, np.float64) for w in traj[t]]
        s = t - start_step
        if s <= 0 or (init == "first_step" and t == 1):
            shadows = [w.copy() for w in weights]
        elif s % update_every == 0:
            rate = 1.0 - ref_decay_over(d, s, update_every)
            shadows = [sh - rate * (sh - w) for sh, w in zip(shadows, weights)]
        history.append([sh.copy() for sh in shadows])
    return history


def random_trajectory(rng, shapes, steps, dtype=np.float32, scale=1.0):
    """`steps + 1` sets of weights: a random walk, so that averages matter."""
    current = [rng.normal(size=shape) * scale for shape in shapes]
    traj = [[c.astype(dtype) for c in current]]
    for _ in range(steps):
        current = [c + rng.normal(size=c.shape) * scale for c in current]
        traj.append([c.astype(dtype) for c in current])
    return traj


def make_step_fn(mode, fn):
    if mode == "eager":
        return fn
    if mode == "graph":
        return tf.function(fn)
    if mode == "xla":
        return tf.function(fn, jit_compile=True)
    raise AssertionError(mode)


def keras_variables(values, prefix="w"):
    return [
        keras.Variable(
            v,
            dtype=v.dtype.name if v.dtype != BF16 else "bfloat16",
            name=f"{prefix}{i}",
        )
        for i, v in enumerate(values)
    ]


SHAPES = [(), (7,), (3, 4)]
# JAX has float64 only with jax_enable_x64, which the suite leaves off.
FLOAT64 = tensorflow_only("float64 arrays")
# The widest shadow dtype the backend has.
WIDE = "float64" if keras.backend.backend() == "tensorflow" else "float32"
MODES = ["eager", *tensorflow_only("tf.function graphs", "graph", "xla")]


# ---------------------------------------------------------------------------
# 1. Random weight trajectories against the NumPy reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("update_every", [1, 3, 10])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_trajectory_matches_reference(schedule, update_every, mode):
    """Shadows follow the float64 reference at every step.

    One step function drives four averages on the same variables, one for
    each (start_step, init) in {0, 5} x {"weights", "first_step"}.
    """
    factory, d = SCHEDULES[schedule]
    steps = 42
    rng = np.random.default_rng([update_every, len(schedule)])
    traj = random_trajectory(rng, SHAPES, steps)
    variables = keras_variables(traj[0])
    configs = [(s0, init) for s0 in (0, 5) for init in ("weights", "first_step")]
    emas = [
        keras_ema.ExponentialMovingAverage(
            factory(),
            update_every=update_every,
            start_step=s0,
            init=init,
            name=f"ema_{s0}_{init}",
        )
        for s0, init in configs
    ]
    for ema in emas:
        ema.build(variables)

    def train_step(weights):
        for variable, w in zip(variables, weights):
            variable.assign(w)
        for ema in emas:
            ema.apply(variables)

    train_step = make_step_fn(mode, train_step)
    got = [[] for _ in emas]
    for t in range(1, steps + 1):
        train_step([tf.constant(w) for w in traj[t]])
        for history, ema in zip(got, emas):
            history.append([s.numpy() for s in ema.shadows])

    for (s0, init), ema, history in zip(configs, emas, got):
        assert int(ema.step.numpy()) == steps
        expected = ref_trajectory(traj, d, update_every, s0, init)
        for t, (want_t, got_t) in enumerate(zip(expected, history), start=1):
            for i, (want, have) in enumerate(zip(want_t, got_t)):
                assert have.dtype == np.float32
                np.testing.assert_allclose(
                    have,
                    want,
                    rtol=1e-5,
                    atol=1e-5,
                    err_msg=f"start_step={s0} init={init} t={t} variable {i}",
                )


@tensorflow_only("tf.function graphs")
@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_update_with_explicit_step(mode):
    """`update(step=t)` uses t as the step and stores it in `ema.step`."""
    _, d = SCHEDULES["debiased"]
    steps = 24
    rng = np.random.default_rng(7)
    traj = random_trajectory(rng, SHAPES, steps)
    variables = keras_variables(traj[0])
    ema = keras_ema.ExponentialMovingAverage(
        SCHEDULES["debiased"][0](), update_every=3, start_step=2, init="first_step"
    )
    ema.build(variables)

    def train_step(weights, t):
        for variable, w in zip(variables, weights):
            variable.assign(w)
        ema.update(step=t)

    train_step = make_step_fn(mode, train_step)
    expected = ref_trajectory(traj, d, 3, 2, "first_step")
    for t in range(1, steps + 1):
        train_step([tf.constant(w) for w in traj[t]], tf.constant(t, tf.int64))
        assert int(ema.step.numpy()) == t
        for want, have in zip(expected[t - 1], ema.shadows):
            np.testing.assert_allclose(have.numpy(), want, rtol=1e-5, atol=1e-5)


def test_eager_update_without_step_counts_steps():
    """`update()` (no step) counts one more step than the last update."""
    _, d = SCHEDULES["tf_warmup"]
    steps = 12
    traj = random_trajectory(np.random.default_rng(3), SHAPES, steps)
    variables = keras_variables(traj[0])
    ema = keras_ema.ExponentialMovingAverage(SCHEDULES["tf_warmup"][0]())
    ema.build(variables)
    assert int(ema.step.numpy()) == 0
    for t in range(1, steps + 1):
        for variable, w in zip(variables, traj[t]):
            variable.assign(w)
        ema.update()
        assert int(ema.step.numpy()) == t
    expected = ref_trajectory(traj, d, 1, 0, "weights")[-1]
    for want, have in zip(expected, ema.shadows):
        np.testing.assert_allclose(have.numpy(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 2. TFWarmup side by side with tf.train.ExponentialMovingAverage.
# ---------------------------------------------------------------------------


@tensorflow_only("compared with tf.train.ExponentialMovingAverage")
@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_tf_warmup_matches_tf_train_exponential_moving_average(decay):
    """TFWarmup(decay) == tf.train.ExponentialMovingAverage(decay, num_updates).

    TF computes, at each `apply`, decay_t = min(decay, (1 + n) / (10 + n))
    with n = `num_updates` read at that moment (in float32). The canonical TF
    pattern runs `ema.apply` under a control dependency on the optimizer's
    `apply_gradients`, which has already incremented the global step, so
    n = t, the 1-based count of updates including the current one: the step
    keras_ema's TFWarmup sees (start_step=0). TF shadows start as the
    variable's value when the shadow is created (init="weights"); TF creates
    them on the first `apply`, so a first `apply` on the build-time weights
    (an exact no-op on the values, shadow == w) creates them before step 1.
    """
    steps = 40
    traj = random_trajectory(np.random.default_rng(11), SHAPES, steps)
    # Plain tf.Variables: TF's EMA needs them, and they name themselves.
    variables = [tf.Variable(w, name=f"tfv{i}") for i, w in enumerate(traj[0])]
    num_updates = tf.Variable(0, dtype=tf.int64)
    tf_ema = tf.train.ExponentialMovingAverage(decay, num_updates=num_updates)
    tf_ema.apply(variables)  # creates the shadows at traj[0]
    ema = keras_ema.ExponentialMovingAverage(schedules.TFWarmup(decay))
    ema.build(variables)
    for want, have in zip(variables, ema.shadows):
        np.testing.assert_array_equal(tf_ema.average(want).numpy(), have.numpy())

    @tf.function
    def train_step(weights):
        for variable, w in zip(variables, weights):
            variable.assign(w)
        num_updates.assign_add(1)  # the "global step" after the update
        tf_ema.apply(variables)
        ema.apply(variables)

    for t in range(1, steps + 1):
        train_step([tf.constant(w) for w in traj[t]])
        assert int(num_updates.numpy()) == t == int(ema.step.numpy())
        for variable, shadow in zip(variables, ema.shadows):
            np.testing.assert_allclose(
                shadow.numpy(),
                tf_ema.average(variable).numpy(),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"t={t}",
            )
    # And both agree with the reference (the warmup really was exercised:
    # with decay 0.999 the whole run is in the warmup).
    expected = ref_trajectory(
        traj, lambda s: min(decay, (1.0 + s) / (10.0 + s)), 1, 0, "weights"
    )[-1]
    for want, shadow in zip(expected, ema.shadows):
        np.testing.assert_allclose(shadow.numpy(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 3. Exact swap.
# ---------------------------------------------------------------------------


def _special_values(dtype):
    """Values a swap must keep bit for bit: signed zero, subnormals, extremes,
    infinities, a NaN with a payload, and ordinary values."""
    if dtype == np.float32:
        bits = np.array(
            [
                0x80000000,
                0x00000001,
                0x007FFFFF,
                0x7F7FFFFF,
                0x7F800000,
                0xFF800000,
                0x7FC00123,
                0x3EAAAAAB,
                0xBF800001,
                0x00800000,
            ],
            np.uint32,
        )
        return bits.view(np.float32)
    if dtype == np.float16:
        bits = np.array(
            [
                0x8000,
                0x0001,
                0x03FF,
                0x7BFF,
                0x7C00,
                0xFC00,
                0x7E05,
                0x3555,
                0xBC01,
                0x0400,
            ],
            np.uint16,
        )
        return bits.view(np.float16)
    bits = np.array(
        [
            0x8000,
            0x0001,
            0x007F,
            0x7F7F,
            0x7F80,
            0xFF80,
            0x7FC5,
            0x3EAB,
            0xBF81,
            0x0080,
        ],
        np.uint16,
    )
    return bits.view(BF16)


def _raw_bytes(variable):
    return variable.numpy().tobytes()


SWAP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BF16}


def _swap_setup():
    """Variables of three dtypes whose shadows differ from their weights."""
    rng = np.random.default_rng(5)
    variables = []
    for name, dtype in SWAP_DTYPES.items():
        variables.append(
            keras.Variable(
                rng.normal(size=(10,)).astype(dtype), dtype=name, name=f"swap_{name}"
            )
        )
    ema = keras_ema.ExponentialMovingAverage(0.5)
    ema.build(variables)
    for _ in range(3):
        for variable, dtype in zip(variables, SWAP_DTYPES.values()):
            variable.assign(rng.normal(size=(10,)).astype(dtype))
        ema.update()
    for variable, dtype in zip(variables, SWAP_DTYPES.values()):
        variable.assign(_special_values(dtype))
    return ema, variables


def test_swap_cycles_are_bit_exact():
    ema, variables = _swap_setup()
    raw = [_raw_bytes(v) for v in variables]
    for dtype, raw_v in zip(SWAP_DTYPES.values(), raw):
        # The special values made it into the variables unchanged.
        assert raw_v == _special_values(dtype).tobytes()
    shadows_before = [s.numpy().copy() for s in ema.shadows]
    for shadow, variable in zip(ema.shadows, variables):
        assert shadow.dtype == "float32"
        assert shadow.numpy().astype(variable.numpy().dtype).tobytes() != _raw_bytes(
            variable
        )
    for _ in range(1000):
        ema.swap_in()
        ema.swap_out()
    assert not ema.is_swapped
    for variable, raw_v in zip(variables, raw):
        assert _raw_bytes(variable) == raw_v, variable.path
    for shadow, before in zip(ema.shadows, shadows_before):
        np.testing.assert_array_equal(shadow.numpy(), before)


def test_swapped_holds_shadows_cast_to_variable_dtype():
    ema, variables = _swap_setup()
    raw = [_raw_bytes(v) for v in variables]
    assert not ema.is_swapped
    with ema.swapped() as inside:
        assert inside is ema
        assert ema.is_swapped
        for variable, shadow in zip(variables, ema.shadows):
            dtype = variable.numpy().dtype
            expected = shadow.numpy().astype(dtype)  # round to nearest even
            assert variable.numpy().tobytes() == expected.tobytes(), variable.path
    assert not ema.is_swapped
    for variable, raw_v in zip(variables, raw):
        assert _raw_bytes(variable) == raw_v


def test_swapped_restores_on_exception():
    ema, variables = _swap_setup()
    raw = [_raw_bytes(v) for v in variables]

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with ema.swapped():
            assert _raw_bytes(variables[0]) != raw[0]
            raise Boom()
    assert not ema.is_swapped
    for variable, raw_v in zip(variables, raw):
        assert _raw_bytes(variable) == raw_v
    # And the average is usable again afterwards.
    with ema.swapped():
        pass
    for variable, raw_v in zip(variables, raw):
        assert _raw_bytes(variable) == raw_v


def test_swap_misuse_raises():
    ema, variables = _swap_setup()
    raw = [_raw_bytes(v) for v in variables]
    with pytest.raises(ValueError, match="not swapped in"):
        ema.swap_out()
    ema.swap_in()
    swapped = [_raw_bytes(v) for v in variables]
    with pytest.raises(ValueError, match="already swapped in"):
        ema.swap_in()
    # The failed swap_in changed nothing: still swapped, raw values kept.
    assert ema.is_swapped
    assert [_raw_bytes(v) for v in variables] == swapped
    ema.swap_out()
    assert [_raw_bytes(v) for v in variables] == raw
    with pytest.raises(ValueError, match="not swapped in"):
        ema.swap_out()
    with pytest.raises(ValueError, match="not swapped in"):
        with ema.swapped():
            ema.swap_out()
    # swap_out inside swapped() restored the raw values; exit failed loudly.
    assert [_raw_bytes(v) for v in variables] == raw


# ---------------------------------------------------------------------------
# 4. Shadow dtypes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "var_dtype, shadow_dtype, expected",
    [
        ("float16", "float32", "float32"),
        ("bfloat16", "float32", "float32"),
        ("float32", "float32", "float32"),
        *[
            pytest.param(*case, marks=FLOAT64)
            for case in [
                ("float64", "float32", "float64"),
                ("float16", "float64", "float64"),
                ("bfloat16", "float64", "float64"),
                ("float32", "float64", "float64"),
                ("float64", "float64", "float64"),
            ]
        ],
    ],
)
def test_shadow_dtype(var_dtype, shadow_dtype, expected):
    np_dtype = BF16 if var_dtype == "bfloat16" else np.dtype(var_dtype)
    value = np.linspace(-1, 1, 6).astype(np_dtype)
    variable = keras.Variable(value, dtype=var_dtype, name="v")
    ema = keras_ema.ExponentialMovingAverage(0.5, shadow_dtype=shadow_dtype)
    ema.build([variable])
    shadow = ema.average(variable)
    assert shadow.dtype == expected
    assert ema.shadows[0].dtype == expected
    # Built as a copy of the weights, converted exactly to the wider dtype.
    np.testing.assert_array_equal(
        shadow.numpy(), np.asarray(value, np.float64).astype(expected)
    )
    # One update in the shadow dtype.
    new = np.linspace(1, 2, 6).astype(np_dtype)
    variable.assign(new)
    ema.update()
    want = 0.5 * np.asarray(value, np.float64) + 0.5 * np.asarray(new, np.float64)
    np.testing.assert_allclose(
        shadow.numpy(), want, rtol=1e-7 if expected == "float32" else 1e-15
    )


@tensorflow_only("float64 arrays and tf.function")
def test_float64_shadows_track_to_float64_precision():
    """float64 variables get float64 shadows updated in float64."""
    steps = 30
    traj = random_trajectory(np.random.default_rng(2), [(5,)], steps, np.float64)
    variable = keras.Variable(traj[0][0], dtype="float64", name="w64")
    ema = keras_ema.ExponentialMovingAverage(schedules.PowerFunction(gamma=2.0))
    ema.build([variable])

    @tf.function
    def train_step(w):
        variable.assign(w)
        ema.apply([variable])

    for t in range(1, steps + 1):
        train_step(tf.constant(traj[t][0]))
    expected = ref_trajectory(traj, lambda s: (1.0 - 1.0 / s) ** 3.0, 1, 0, "weights")[
        -1
    ][0]
    assert ema.shadows[0].dtype == "float64"
    np.testing.assert_allclose(ema.shadows[0].numpy(), expected, rtol=1e-12)


@tensorflow_only("tf.function(jit_compile=True) around the stateful update")
def test_bfloat16_trajectory_tracks_float64_reference():
    """A bfloat16 weight trajectory averaged with decay 0.999 keeps float32
    precision: the shadow is far more accurate than bfloat16 (eps 2^-8)."""
    steps = 400
    rng = np.random.default_rng(13)
    # Weights around 1 with small steps: exactly where a bfloat16 shadow
    # would stall (0.001 * (w - shadow) is below half an ulp of bfloat16).
    base = 1.0 + 0.25 * rng.normal(size=(64,))
    traj = [
        [(base + 0.02 * rng.normal(size=(64,))).astype(BF16)] for _ in range(steps + 1)
    ]
    variable = keras.Variable(traj[0][0], dtype="bfloat16", name="wbf16")
    ema = keras_ema.ExponentialMovingAverage(0.999)
    ema.build([variable])
    assert ema.shadows[0].dtype == "float32"

    @tf.function(jit_compile=True)
    def train_step(w):
        variable.assign(w)
        ema.apply([variable])

    for t in range(1, steps + 1):
        train_step(tf.constant(traj[t][0]))
    expected = ref_trajectory(traj, lambda s: 0.999, 1, 0, "weights")[-1][0]
    got = ema.shadows[0].numpy().astype(np.float64)
    # Float32-ish: relative error ~ steps * eps32, far below eps_bf16 = 2^-8.
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=0)
    # The average actually moved away from the build-time weights.
    assert np.max(np.abs(expected - np.asarray(traj[0][0], np.float64))) > 1e-3


# ---------------------------------------------------------------------------
# 5. Trackable: tf.train.Checkpoint.
# ---------------------------------------------------------------------------


def _dense(name, seed):
    layer = keras.layers.Dense(3, name=name)
    layer.build((None, 4))
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        w.assign(rng.normal(size=w.shape).astype(np.float32))
    return layer


@tensorflow_only("tf.train.Checkpoint")
def test_checkpoint_round_trip(tmp_path):
    layer = _dense("dense_a", 0)
    extra = keras.Variable(np.arange(5, dtype=np.float64), name="extra")
    variables = [layer.kernel, layer.bias, extra]
    ema = keras_ema.ExponentialMovingAverage(0.7, update_every=2)
    ema.build(variables)
    rng = np.random.default_rng(1)
    for _ in range(7):
        for v in variables:
            v.assign(rng.normal(size=v.shape))
        ema.update()
    saved = {v.path: ema.average(v).numpy().copy() for v in variables}
    path = tf.train.Checkpoint(ema=ema).write(str(tmp_path / "ckpt"))

    # Checkpoint keys name each shadow by its variable's path (TF escapes "/"
    # in a trackable's name as ".S"), and the step.
    keys = [name for name, _ in tf.train.list_variables(path)]
    for v in variables:
        escaped = v.path.replace("/", ".S")
        assert any(escaped in key for key in keys), (v.path, keys)
    assert any("step" in key for key in keys), keys
    assert len([k for k in keys if "VARIABLE_VALUE" in k]) == len(variables) + 1

    # Restore into a fresh average on fresh variables, built in another order:
    # shadows are matched by path, not by position.
    fresh_layer = _dense("dense_a", 99)
    fresh_extra = keras.Variable(np.zeros(5), dtype="float64", name="extra")
    fresh_vars = [fresh_extra, fresh_layer.bias, fresh_layer.kernel]
    fresh = keras_ema.ExponentialMovingAverage(0.7, update_every=2)
    fresh.build(fresh_vars)
    assert int(fresh.step.numpy()) == 0
    tf.train.Checkpoint(ema=fresh).read(path).assert_consumed()
    assert int(fresh.step.numpy()) == 7
    for v in fresh_vars:
        np.testing.assert_array_equal(fresh.average(v).numpy(), saved[v.path])
    # The model's own variables are not part of the average's checkpoint.
    np.testing.assert_array_equal(fresh_extra.numpy(), np.zeros(5))


@tensorflow_only("tf.train.Checkpoint")
def test_checkpoint_does_not_track_averaged_variables(tmp_path):
    """Only the step and the shadows are saved, not the model's weights."""
    layer = _dense("dense_b", 0)
    ema = keras_ema.ExponentialMovingAverage(0.5)
    ema.build(layer.weights)
    assert len(ema.variables) == 3
    assert ema.variables[0] is ema.step
    assert ema.variables[1:] == ema.shadows
    path = tf.train.Checkpoint(ema=ema).write(str(tmp_path / "ckpt"))
    values = [n for n, _ in tf.train.list_variables(path) if "VARIABLE_VALUE" in n]
    assert len(values) == 3


# ---------------------------------------------------------------------------
# 6. average(), build and apply misuse.
# ---------------------------------------------------------------------------


def test_average_returns_the_right_shadow():
    rng = np.random.default_rng(4)
    variables = keras_variables([rng.normal(size=s).astype(np.float32) for s in SHAPES])
    ema = keras_ema.ExponentialMovingAverage(0.5)
    assert ema.variables == []
    ema.build(variables)
    assert ema.averaged_variables == variables
    for i, variable in enumerate(variables):
        shadow = ema.average(variable)
        assert shadow is ema.shadows[i]
        assert tuple(shadow.shape) == tuple(variable.shape)
        np.testing.assert_array_equal(shadow.numpy(), variable.numpy())
        if keras.backend.backend() == "tensorflow":
            # The underlying tf.Variable finds the same shadow.
            assert ema.average(variable.value) is shadow
    # Each shadow moves towards its own variable.
    before = [v.numpy().astype(np.float64) for v in variables]
    new = [np.full(s, float(i + 10), np.float32) for i, s in enumerate(SHAPES)]
    for variable, w in zip(variables, new):
        variable.assign(w)
    ema.update()
    for variable, w, w0 in zip(variables, new, before):
        np.testing.assert_allclose(
            ema.average(variable).numpy(), 0.5 * w0 + 0.5 * w, rtol=1e-6
        )


def test_average_of_unknown_variable_raises():
    variables = keras_variables([np.ones(3, np.float32)])
    ema = keras_ema.ExponentialMovingAverage(0.5)
    ema.build(variables)
    other = keras.Variable(np.ones(3, np.float32), name="other")
    with pytest.raises(ValueError, match="other"):
        ema.average(other)
    # A different variable with the same path is still a different variable.
    twin = keras.Variable(np.ones(3, np.float32), name="w0")
    with pytest.raises(ValueError):
        ema.average(twin)
    with pytest.raises(TypeError, match="variable"):
        ema.average(np.ones(3, np.float32))


@pytest.mark.parametrize(
    "call",
    [
        lambda ema: ema.average(keras.Variable(1.0, name="x")),
        lambda ema: ema.update(),
        lambda ema: ema.update(step=3),
        lambda ema: ema.swap_in(),
        lambda ema: ema.swap_out(),
        lambda ema: ema.swapped().__enter__(),
        lambda ema: ema.apply(),
        lambda ema: ema.apply(None),
    ],
    ids=[
        "average",
        "update",
        "update_step",
        "swap_in",
        "swap_out",
        "swapped",
        "apply",
        "apply_none",
    ],
)
def test_calls_before_build_raise(call):
    ema = keras_ema.ExponentialMovingAverage(0.5)
    with pytest.raises(ValueError):
        call(ema)
    assert not ema.built
    assert ema.variables == []


def test_build_twice_raises():
    variables = keras_variables([np.ones(3, np.float32)])
    ema = keras_ema.ExponentialMovingAverage(0.5)
    ema.build(variables)
    with pytest.raises(ValueError, match="already built"):
        ema.build(variables)


def test_apply_builds_lazily_then_checks_variables():
    rng = np.random.default_rng(8)
    traj = random_trajectory(rng, SHAPES, 3)
    variables = keras_variables(traj[0])
    ema = keras_ema.ExponentialMovingAverage(0.6)
    # The first apply builds the shadows (at the current weights) and updates.
    for v, w in zip(variables, traj[1]):
        v.assign(w)
    ema.apply(variables)
    assert ema.built
    assert int(ema.step.numpy()) == 1
    for v, w in zip(variables, traj[1]):
        np.testing.assert_allclose(ema.average(v).numpy(), w, rtol=1e-6)
    # apply() without variables once built.
    for v, w in zip(variables, traj[2]):
        v.assign(w)
    ema.apply()
    assert int(ema.step.numpy()) == 2
    for v, w1, w2 in zip(variables, traj[1], traj[2]):
        want = 0.6 * np.float64(w1) + 0.4 * np.float64(w2)
        np.testing.assert_allclose(ema.average(v).numpy(), want, rtol=1e-5, atol=1e-6)
    before = [s.numpy().copy() for s in ema.shadows]
    others = keras_variables([np.zeros(s, np.float32) for s in SHAPES], "o")
    with pytest.raises(ValueError, match="variables"):
        ema.apply(others)
    with pytest.raises(ValueError, match="same order"):
        ema.apply(list(reversed(variables)))
    with pytest.raises(ValueError):
        ema.apply(variables[:2])
    # Nothing moved.
    assert int(ema.step.numpy()) == 2
    for shadow, b in zip(ema.shadows, before):
        np.testing.assert_array_equal(shadow.numpy(), b)


@pytest.mark.parametrize("mode", MODES)
def test_lazy_build_in_apply_starts_from_weights_at_first_call(mode):
    """`apply` called first inside the train step builds the shadows from the
    weights it is given at that call, in every execution mode.

    The docstring's custom-loop pattern: the optimizer updates the weights,
    then `ema.apply(vars)` builds (first call) and updates. With
    init="weights" the shadows start as a copy of the weights when built,
    i.e. the weights at the first call (traj[1]); the update at t = 1 then
    leaves them there. The function is traced before the weights are set
    (as when `get_concrete_function` runs before a checkpoint restore), so
    values read at trace time would be stale.
    """
    steps = 6
    traj = random_trajectory(np.random.default_rng(31), SHAPES, steps)
    stale = [np.full(s, 100.0, np.float32) for s in SHAPES]
    variables = keras_variables(stale, prefix="lazy")
    ema = keras_ema.ExponentialMovingAverage(0.5)

    def train_step(weights):
        for variable, w in zip(variables, weights):
            variable.assign(w)
        ema.apply(variables)

    train_step = make_step_fn(mode, train_step)
    if mode != "eager":
        train_step.get_concrete_function([tf.constant(w) for w in traj[0]])
        assert not ema.built or int(ema.step.numpy()) == 0
    # Weights at the start of training ("restored" after the trace).
    for variable, w in zip(variables, traj[0]):
        variable.assign(w)
    history = []
    for t in range(1, steps + 1):
        train_step([tf.constant(w) for w in traj[t]])
        history.append([s.numpy() for s in ema.shadows])
    assert int(ema.step.numpy()) == steps
    # Reference: built at the first call, i.e. from traj[1].
    expected = ref_trajectory(traj[1:], lambda s: 0.5, 1, 0, "weights")
    expected = [[w.astype(np.float64) for w in traj[1]]] + expected
    for t, (want_t, got_t) in enumerate(zip(expected, history), start=1):
        for want, have in zip(want_t, got_t):
            np.testing.assert_allclose(
                have, want, rtol=1e-5, atol=1e-5, err_msg=f"t={t}"
            )


def test_duplicate_paths_raise():
    a = keras.Variable(np.ones(3, np.float32), name="same")
    b = keras.Variable(np.zeros(3, np.float32), name="same")
    assert a.path == b.path
    ema = keras_ema.ExponentialMovingAverage(0.5)
    with pytest.raises(ValueError, match="same"):
        ema.build([a, b])
    assert not ema.built
    ema = keras_ema.ExponentialMovingAverage(0.5)
    with pytest.raises(ValueError, match="same"):
        ema.apply([a, b])
    assert not ema.built


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_non_float_variables_raise(dtype):
    good = keras.Variable(np.ones(3, np.float32), name="good")
    bad = keras.Variable(np.ones(3, dtype), dtype=dtype, name="bad", trainable=False)
    ema = keras_ema.ExponentialMovingAverage(0.5)
    with pytest.raises(TypeError, match="bad"):
        ema.build([good, bad])
    assert not ema.built
    with pytest.raises(TypeError, match="bad"):
        ema.apply([good, bad])
    assert not ema.built


def test_non_variables_raise():
    ema = keras_ema.ExponentialMovingAverage(0.5)
    with pytest.raises(TypeError, match="variables"):
        ema.build([np.ones(3, np.float32)])
    with pytest.raises(TypeError, match="variables"):
        ema.build([tf.constant([1.0])])
    with pytest.raises(TypeError, match="variables"):
        ema.build(3)
    assert not ema.built


# ---------------------------------------------------------------------------
# 7. MirroredStrategy over two logical CPUs (in a subprocess).
# ---------------------------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_ema

    spec = json.loads(sys.stdin.read())
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    traj = [[np.asarray(w, np.float32) for w in ws] for ws in spec["traj"]]
    n_replica_steps = spec["n_replica_steps"]
    out = []
    for cfg in spec["configs"]:
        with strategy.scope():
            variables = [
                keras.Variable(w, name=f"w{i}", aggregation="only_first_replica")
                for i, w in enumerate(traj[0])
            ]
            ema = keras_ema.ExponentialMovingAverage(
                cfg["decay"], update_every=cfg["update_every"],
                start_step=cfg["start_step"], init=cfg["init"])
            ema.build(variables)

        @tf.function
        def train_step(weights):
            def step_fn(weights):
                for v, w in zip(variables, weights):
                    v.assign(w)
                ema.apply(variables)
            strategy.run(step_fn, args=(weights,))

        @tf.function
        def cross_replica_step(weights):
            for v, w in zip(variables, weights):
                v.assign(w)
            ema.update()

        result = {"cross": [], "kinds": [type(s.value).__name__ for s in ema.shadows]}
        for t in range(1, len(traj)):
            weights = [tf.constant(w) for w in traj[t]]
            if t <= n_replica_steps:
                train_step(weights)  # (a) replica context, in tf.function
            elif t % 2:
                cross_replica_step(weights)  # (b) cross-replica, tf.function
            else:
                for v, w in zip(variables, weights):  # (b) cross-replica, eager
                    v.assign(w)
                ema.update()
            result["cross"].append({
                "step": [int(x.numpy()) for x in
                         strategy.experimental_local_results(ema.step.value)],
                "shadows": [[x.numpy().tolist() for x in
                             strategy.experimental_local_results(s.value)]
                            for s in ema.shadows],
            })
        out.append(result)
    print("RESULT " + json.dumps(out))
    """
)


@tensorflow_only("tf.distribute")
def test_mirrored_strategy_replica_and_cross_replica():
    steps, n_replica_steps = 9, 5
    traj = random_trajectory(np.random.default_rng(21), [(3,), (2, 2)], steps)
    configs = [
        {"decay": 0.8, "update_every": 1, "start_step": 0, "init": "weights"},
        {"decay": 0.7, "update_every": 2, "start_step": 1, "init": "first_step"},
    ]
    spec = {
        "traj": [[w.tolist() for w in ws] for ws in traj],
        "n_replica_steps": n_replica_steps,
        "configs": configs,
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    results = json.loads(lines[0][len("RESULT ") :])
    for cfg, result in zip(configs, results):
        assert result["kinds"] == ["MirroredVariable"] * 2
        expected = ref_trajectory(
            traj,
            lambda s, c=cfg["decay"]: c,
            cfg["update_every"],
            cfg["start_step"],
            cfg["init"],
        )
        for t, (record, want_t) in enumerate(zip(result["cross"], expected), 1):
            assert record["step"] == [t, t], (cfg, t)
            for i, (replicas, want) in enumerate(zip(record["shadows"], want_t)):
                first, second = (np.asarray(r, np.float32) for r in replicas)
                # Both replicas hold bit-identical shadows ...
                np.testing.assert_array_equal(
                    first, second, err_msg=f"{cfg} t={t} var {i}"
                )
                # ... equal to the reference.
                np.testing.assert_allclose(
                    first, want, rtol=1e-5, atol=1e-5, err_msg=f"{cfg} t={t} var {i}"
                )


# ---------------------------------------------------------------------------
# 8. Bad constructor arguments.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"decay": 1.5}, ValueError, "decay"),
        ({"decay": -0.1}, ValueError, "decay"),
        ({"decay": float("nan")}, ValueError, "decay"),
        ({"decay": float("inf")}, ValueError, "decay"),
        ({"decay": "0.9"}, TypeError, "decay"),
        ({"decay": None}, TypeError, "decay"),
        ({"decay": True}, TypeError, "decay"),
        ({"update_every": 0}, ValueError, "update_every"),
        ({"update_every": -1}, ValueError, "update_every"),
        ({"update_every": 1.5}, TypeError, "update_every"),
        ({"update_every": 2.0}, TypeError, "update_every"),
        ({"update_every": True}, TypeError, "update_every"),
        ({"update_every": "2"}, TypeError, "update_every"),
        ({"start_step": -1}, ValueError, "start_step"),
        ({"start_step": "3"}, TypeError, "start_step"),
        ({"start_step": 3.0}, TypeError, "start_step"),
        ({"start_step": False}, TypeError, "start_step"),
        ({"init": "foo"}, ValueError, "init"),
        ({"init": None}, ValueError, "init"),
        ({"shadow_dtype": "float16"}, ValueError, "shadow_dtype"),
        ({"shadow_dtype": "bfloat16"}, ValueError, "shadow_dtype"),
        ({"shadow_dtype": "int32"}, ValueError, "shadow_dtype"),
        ({"name": ""}, ValueError, "name"),
        ({"name": "a/b"}, ValueError, "name"),
    ],
    ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__,
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_ema.ExponentialMovingAverage(**kwargs)


def test_good_constructor_arguments():
    ema = keras_ema.ExponentialMovingAverage(
        decay=np.float32(0.5),
        update_every=np.int64(4),
        start_step=np.int32(2),
        init="first_step",
        shadow_dtype=WIDE,
        name="my_ema",
    )
    assert ema.update_every == 4 and type(ema.update_every) is int
    assert ema.start_step == 2 and type(ema.start_step) is int
    assert ema.name == "my_ema"
    for decay in (0, 1, 0.0, 1.0):
        keras_ema.ExponentialMovingAverage(decay)


# ---------------------------------------------------------------------------
# 9. Graph structure: few ops per variable, one decay per step.
# ---------------------------------------------------------------------------

# Op types a schedule's decay is computed with.
SCHEDULE_OPS = {
    "Pow",
    "Exp",
    "Expm1",
    "Log",
    "Log1p",
    "Minimum",
    "Maximum",
    "ClipByValue",
    "Prod",
    "RealDiv",
    "Div",
    "Range",
}


def _op_counts(schedule, n, update_every, init, start_step):
    variables = [
        keras.Variable(np.ones((4,), np.float32), name=f"g{i}") for i in range(n)
    ]
    ema = keras_ema.ExponentialMovingAverage(
        schedule, update_every=update_every, init=init, start_step=start_step
    )
    ema.build(variables)
    graph_def = tf.function(ema.update).get_concrete_function().graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:  # tf.cond branches
        nodes.extend(function.node_def)
    # Placeholders are the captured variable handles, not computation.
    ops = [node.op for node in nodes if node.op != "Placeholder"]
    return len(ops), sum(op in SCHEDULE_OPS for op in ops)


@tensorflow_only("op counts of a TF graph")
@pytest.mark.parametrize(
    "update_every, init, start_step",
    [(1, "weights", 0), (3, "weights", 0), (4, "first_step", 2)],
)
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_ops_per_variable_and_one_decay_per_step(
    schedule, update_every, init, start_step
):
    factory = SCHEDULES[schedule][0]
    counts = {
        n: _op_counts(factory(), n, update_every, init, start_step)
        for n in (1, 2, 4, 8)
    }
    for n in (1, 2, 4):
        total_n, sched_n = counts[n]
        total_2n, sched_2n = counts[2 * n]
        per_variable = (total_2n - total_n) / n
        assert per_variable <= 6, (n, counts)
        # The decay is computed once per step, whatever the number of variables.
        assert sched_2n == sched_n, (n, counts)
    assert counts[1][1] > 0, "no schedule op found: update SCHEDULE_OPS"


@tensorflow_only("tf.function retracing")
def test_xla_update_compiles_without_retracing():
    variables = keras_variables([np.ones(s, np.float32) for s in SHAPES])
    ema = keras_ema.ExponentialMovingAverage(
        schedules.PowerFunction(gamma=5.0), update_every=2, init="first_step"
    )
    ema.build(variables)
    fn = tf.function(ema.apply, jit_compile=True)
    for _ in range(5):
        fn()
    assert int(ema.step.numpy()) == 5
    assert fn.experimental_get_tracing_count() == 1


# ---------------------------------------------------------------------------
# 10. get_config / from_config.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", sorted(SCHEDULES) + ["float"])
def test_config_round_trip(schedule):
    decay = 0.95 if schedule == "float" else SCHEDULES[schedule][0]()
    ema = keras_ema.ExponentialMovingAverage(
        decay,
        update_every=3,
        start_step=7,
        init="first_step",
        shadow_dtype=WIDE,
        name="avg",
    )
    config = ema.get_config()
    assert set(config) == {
        "decay",
        "update_every",
        "start_step",
        "init",
        "shadow_dtype",
        "name",
    }
    assert config["update_every"] == 3
    assert config["start_step"] == 7
    assert config["init"] == "first_step"
    assert config["shadow_dtype"] == WIDE
    assert config["name"] == "avg"
    # JSON-serializable, and the round trip is a fixed point.
    config = json.loads(json.dumps(config))
    clone = keras_ema.ExponentialMovingAverage.from_config(config)
    assert json.loads(json.dumps(clone.get_config())) == config
    assert type(clone.schedule) is type(ema.schedule)
    assert clone.schedule.get_config() == ema.schedule.get_config()
    for attr in ("update_every", "start_step", "init", "shadow_dtype", "name"):
        assert getattr(clone, attr) == getattr(ema, attr)
    # The clone computes the reference decays.
    d = (lambda s: 0.95) if schedule == "float" else SCHEDULES[schedule][1]
    # float64: 1e-12; float32 (JAX without x64): a few resolutions (1.2e-7).
    rtol = 1e-12 if WIDE == "float64" else 1e-6
    for s in (1, 2, 5, 40):
        np.testing.assert_allclose(
            float(clone.schedule(s, dtype=WIDE)), d(float(s)), rtol=rtol
        )
    assert not clone.built
