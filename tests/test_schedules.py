"""Tests of keras_ema.schedules against independent NumPy references."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tensorflow_only
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keras_ema import schedules

# On JAX the suite runs without jax_enable_x64 (float32 schedules, checked in
# test_jax.py); the float64 arithmetic checked here needs it on.
pytestmark = pytest.mark.usefixtures("float64_arrays")


@pytest.fixture(scope="module")
def float64_arrays():
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def tensor(value, dtype=None):
    """A backend tensor (TF or JAX), as schedules receive steps."""
    return keras.ops.convert_to_tensor(value, dtype)

# ---------------------------------------------------------------------------
# NumPy references, written from the formulas (float64).
# ---------------------------------------------------------------------------


def ref_constant(decay):
    return lambda s: np.full_like(np.asarray(s, np.float64), decay)


def ref_tf_warmup(decay):
    return lambda s: np.minimum(decay, (1.0 + np.float64(s)) / (10.0 + np.float64(s)))


def ref_power_warmup(decay, inv_gamma=1.0, power=2.0 / 3.0, min_decay=0.0):
    def f(s):
        s = np.asarray(s, np.float64)
        return np.clip(1.0 - (1.0 + s / inv_gamma) ** (-power), min_decay, decay)

    return f


def ref_debiased(decay):
    def f(s):
        s = np.asarray(s, np.float64)
        return (decay - decay**s) / (1.0 - decay**s)

    return f


def ref_power_function(gamma):
    return lambda s: (1.0 - 1.0 / np.asarray(s, np.float64)) ** (gamma + 1.0)


def ref_sigma_rel(gamma):
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def ref_gamma(sigma_rel):
    """Bisection on the (decreasing) sigma_rel(gamma) relation."""
    lo, hi = 0.0, 1e9
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if ref_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def ref_decay_over(ref, s, k):
    return np.prod(ref(np.arange(s - k + 1, s + 1)))


# (id, factory, reference): factories so that each test gets a fresh object.
CASES = [
    ("constant", lambda: schedules.Constant(0.999), ref_constant(0.999)),
    ("constant0", lambda: schedules.Constant(0.0), ref_constant(0.0)),
    ("constant1", lambda: schedules.Constant(1.0), ref_constant(1.0)),
    ("tf_warmup", lambda: schedules.TFWarmup(0.999), ref_tf_warmup(0.999)),
    ("tf_warmup_low", lambda: schedules.TFWarmup(0.9), ref_tf_warmup(0.9)),
    ("power_warmup", lambda: schedules.PowerWarmup(0.9999), ref_power_warmup(0.9999)),
    (
        "power_warmup_args",
        lambda: schedules.PowerWarmup(0.999, inv_gamma=10.0, power=0.75, min_decay=0.5),
        ref_power_warmup(0.999, 10.0, 0.75, 0.5),
    ),
    ("debiased", lambda: schedules.Debiased(0.9), ref_debiased(0.9)),
    ("debiased_slow", lambda: schedules.Debiased(0.9999), ref_debiased(0.9999)),
    (
        "debiased0",
        lambda: schedules.Debiased(0.0),
        lambda s: np.zeros_like(np.asarray(s, np.float64)),
    ),
    (
        "power_function",
        lambda: schedules.PowerFunction(gamma=7.0),
        ref_power_function(7.0),
    ),
    (
        "power_function_sigma",
        lambda: schedules.PowerFunction(sigma_rel=0.05),
        ref_power_function(ref_gamma(0.05)),
    ),
]
CASE_PARAMS = [pytest.param(f, r, id=i) for i, f, r in CASES]

STEPS = list(range(1, 201)) + [1000, 12345, 10**6]

TOL = {"float64": dict(rtol=1e-12, atol=1e-15), "float32": dict(rtol=2e-7, atol=2e-7)}
# Products of k decays accumulate k rounding errors.
TOL_OVER = {
    "float64": dict(rtol=1e-10, atol=1e-15),
    "float32": dict(rtol=1e-6, atol=1e-7),
}


def _check(actual, expected, dtype):
    assert actual.dtype == np.dtype(dtype)
    np.testing.assert_allclose(actual.astype(np.float64), expected, **TOL[dtype])


def _scalar_loop(fn, steps, dtype, int_dtype=None):
    """Evaluates `fn(step, dtype)` eagerly on each (Python int or tensor) step."""
    if int_dtype is not None:
        steps = [tensor(s, int_dtype) for s in steps]
    return np.array([np.asarray(fn(s, dtype)) for s in steps])


def _map_all(fns, steps, int_dtype, mode):
    """Evaluates every scalar `fns[name](step, dtype)` on each step in one graph.

    One tf.function (and one XLA compilation) for all schedules and both
    dtypes; the schedules are called on scalar step tensors via `tf.map_fn`.
    Returns a dict `{(name, dtype): array}`.
    """
    keys = [(name, dtype) for name in fns for dtype in ("float64", "float32")]
    labels = [f"{name}/{dtype}" for name, dtype in keys]

    def one_step(step):
        return {
            label: fns[name](step, dtype)
            for label, (name, dtype) in zip(labels, keys, strict=True)
        }

    signature = {
        label: tf.TensorSpec([], dtype)
        for label, (_, dtype) in zip(labels, keys, strict=True)
    }

    @tf.function(jit_compile=mode == "jit")
    def run(x):
        return tf.map_fn(one_step, x, fn_output_signature=signature)

    out = run(tf.constant(steps, int_dtype))
    pairs = zip(labels, keys, strict=True)
    return {key: np.asarray(out[label]) for label, key in pairs}


GRAPH_MODES = [
    ("function", "int32"),
    ("function", "int64"),
    ("jit", "int32"),
    ("jit", "int64"),
]


# ---------------------------------------------------------------------------
# Per-step decays
# ---------------------------------------------------------------------------

FEW_STEPS = [1, 2, 3, 10, 200, 10**6]


@pytest.mark.parametrize("make,ref", CASE_PARAMS)
def test_call_matches_reference_eager(make, ref):
    schedule = make()
    for dtype in ("float64", "float32"):
        # Scalars: Python ints, int32 and int64 tensors.
        for int_dtype in (None, "int32", "int64"):
            actual = _scalar_loop(schedule, FEW_STEPS, dtype, int_dtype)
            _check(actual, ref(FEW_STEPS), dtype)
        # All the steps at once, elementwise.
        _check(np.asarray(schedule(tensor(STEPS), dtype)), ref(STEPS), dtype)
    # NumPy integers are accepted like Python ints.
    _check(np.asarray(schedule(np.int64(7), dtype="float64")), ref(7), "float64")


@tensorflow_only("tf.function and XLA graphs")
@pytest.mark.parametrize("mode,int_dtype", GRAPH_MODES)
def test_call_matches_reference_in_graph(mode, int_dtype):
    fns = {name: make().__call__ for name, make, _ in CASES}
    results = _map_all(fns, STEPS, int_dtype, mode)
    for name, _, ref in CASES:
        for dtype in ("float64", "float32"):
            actual = results[name, dtype]
            assert actual.dtype == np.dtype(dtype)
            np.testing.assert_allclose(
                actual.astype(np.float64),
                ref(STEPS),
                **TOL[dtype],
                err_msg=f"{name} {dtype}",
            )


@tensorflow_only("tf.function(jit_compile=True)")
def test_call_python_int_under_jit():
    made = [(make(), ref) for _, make, ref in CASES]
    steps = [1, 2, 3, 50, 10**6]

    @tf.function(jit_compile=True)
    def run():
        return [tf.stack([schedule(s) for s in steps]) for schedule, _ in made]

    for actual, (_, ref) in zip(run(), made, strict=True):
        _check(np.asarray(actual), ref(steps), "float32")


@pytest.mark.parametrize("make,ref", CASE_PARAMS)
def test_call_vector_of_steps(make, ref):
    steps = np.array([[1, 2, 3], [10, 100, 1000]], np.int64)
    actual = np.asarray(make()(tensor(steps), dtype="float64"))
    assert actual.shape == steps.shape
    _check(actual, ref(steps), "float64")


def test_one_minus_decay_is_accurate_near_one():
    # 1 - d must not suffer from the cancellation of 1 - (something near 1).
    s = 10**9
    d = schedules.PowerFunction(gamma=7.0)(tensor(s, "int64"), "float64")
    expected = -math.expm1(8.0 * math.log1p(-1.0 / s))
    assert 1.0 - float(d) == pytest.approx(expected, rel=1e-6)

    d = schedules.PowerWarmup(1.0)(tensor(s, "int64"), "float64")
    expected = (1.0 + s) ** (-2.0 / 3.0)
    assert 1.0 - float(d) == pytest.approx(expected, rel=1e-6)

    d = schedules.Debiased(1.0 - 1e-9)(10**10, "float64")
    expected = 1e-9 / -math.expm1(1e10 * math.log1p(-1e-9))
    assert 1.0 - float(d) == pytest.approx(expected, rel=1e-6)


def test_debiased_is_bias_corrected_ema():
    # EMA started at 0 with constant decay, divided by 1 - decay^s, equals the
    # EMA updated with the debiased decay (started from anything).
    rng = np.random.default_rng(0)
    xs = rng.normal(size=30)
    decay = 0.8
    schedule = schedules.Debiased(decay)
    m, avg = 0.0, 123.0
    for s, x in enumerate(xs, start=1):
        m = decay * m + (1 - decay) * x
        d = float(schedule(s, "float64"))
        avg = d * avg + (1 - d) * x
        assert avg == pytest.approx(m / (1 - decay**s), rel=1e-10, abs=1e-12)


@tensorflow_only("compared with tf.train.ExponentialMovingAverage")
def test_tf_warmup_matches_tf_train_ema():
    # d(s) must be the decay tf.train.ExponentialMovingAverage applies.
    for s in [1, 5, 100, 10**4]:
        var = tf.Variable(1.0, dtype=tf.float64)
        ema = tf.train.ExponentialMovingAverage(0.999, num_updates=s)
        ema.apply([var])
        var.assign(0.0)
        ema.apply([var])  # average = d * 1 + (1 - d) * 0 = d
        expected = ema.average(var).numpy()
        actual = np.asarray(schedules.TFWarmup(0.999)(s, "float64"))
        assert actual == pytest.approx(expected, rel=1e-6)  # TF uses float32


# ---------------------------------------------------------------------------
# Decay over k steps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 10])
@pytest.mark.parametrize("make,ref", CASE_PARAMS)
def test_decay_over_matches_product_eager(make, ref, k):
    schedule = make()
    steps = list(range(k, k + 60)) + [1000, 10**6]
    expected = np.array([ref_decay_over(ref, s, k) for s in steps])
    tol = dict(rtol=1e-10, atol=1e-15)
    # Scalar Python ints (including s == k).
    few = [k, k + 1, k + 5, 10**6]
    actual = _scalar_loop(lambda s, dt: schedule.decay_over(s, k, dt), few, "float64")
    np.testing.assert_allclose(actual, [ref_decay_over(ref, s, k) for s in few], **tol)
    # A vector of int64 steps, elementwise.
    actual = np.asarray(schedule.decay_over(tensor(steps, "int64"), k, "float64"))
    np.testing.assert_allclose(actual, expected, **tol)
    actual = np.asarray(schedule.decay_over(tensor(steps, "int32"), k))
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


@tensorflow_only("tf.function and XLA graphs")
@pytest.mark.parametrize("mode,int_dtype", [("function", "int64"), ("jit", "int32")])
def test_decay_over_matches_product_in_graph(mode, int_dtype):
    ks = (2, 10)  # k = 1 is the per-step decay, tested above.
    steps = list(range(10, 60)) + [1000, 10**6]
    made = {name: (make(), ref) for name, make, ref in CASES}
    fns = {
        (name, k): (lambda s, dt, sch=sch, k=k: sch.decay_over(s, k, dt))
        for name, (sch, _) in made.items()
        for k in ks
    }
    results = _map_all(fns, steps, int_dtype, mode)
    for (name, k), _ in fns.items():
        ref = made[name][1]
        expected = np.array([ref_decay_over(ref, s, k) for s in steps])
        for dtype in ("float64", "float32"):
            actual = results[(name, k), dtype]
            assert actual.dtype == np.dtype(dtype)
            np.testing.assert_allclose(
                actual.astype(np.float64),
                expected,
                **TOL_OVER[dtype],
                err_msg=f"{name} k={k} {dtype}",
            )


@pytest.mark.parametrize("k", [1, 2, 10, 37])
@pytest.mark.parametrize("make,ref", CASE_PARAMS)
def test_closed_form_matches_generic_product(make, ref, k):
    schedule = make()
    s = tensor(np.arange(k, k + 100, dtype=np.float64))
    closed = np.asarray(schedule._decay_over(s, k))
    product = np.asarray(schedules.DecaySchedule._decay_over(schedule, s, k))
    np.testing.assert_allclose(closed, product, rtol=1e-10, atol=1e-15)


@tensorflow_only("tf.function")
def test_decay_over_in_tf_function_with_int64():
    schedule = schedules.Debiased(0.99)

    @tf.function
    def run(step):
        return schedule.decay_over(step, 5)

    actual = np.asarray(run(tf.constant(40, tf.int64)))
    assert actual == pytest.approx(ref_decay_over(ref_debiased(0.99), 40, 5), rel=1e-6)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

unit = st.floats(0.0, 1.0)
open_unit = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)


@st.composite
def any_schedule(draw):
    kind = draw(st.sampled_from(["constant", "tf", "pw", "deb", "pf"]))
    decay = draw(unit)
    if kind == "constant":
        return schedules.Constant(decay)
    if kind == "tf":
        return schedules.TFWarmup(decay)
    if kind == "pw":
        min_decay = draw(st.floats(0.0, decay))
        return schedules.PowerWarmup(
            decay,
            inv_gamma=draw(st.floats(1e-3, 1e4)),
            power=draw(st.floats(1e-2, 10.0)),
            min_decay=min_decay,
        )
    if kind == "deb":
        return schedules.Debiased(draw(st.floats(0.0, 1.0, exclude_max=True)))
    if draw(st.booleans()):
        return schedules.PowerFunction(gamma=draw(st.floats(1e-3, 1e3)))
    return schedules.PowerFunction(sigma_rel=draw(st.floats(1e-3, 0.28)))


@settings(max_examples=30, deadline=None)
@given(any_schedule(), st.integers(1, 10**9))
def test_decay_in_unit_interval(schedule, step):
    for dtype in ("float64", "float32"):
        d = float(schedule(step, dtype))
        assert 0.0 <= d <= 1.0


@settings(max_examples=30, deadline=None)
@given(any_schedule(), st.integers(1, 10**7), st.integers(1, 6))
def test_decay_over_is_product_of_one_step_decays(schedule, step, k):
    step = step + k - 1
    product = np.prod(
        [float(schedule(step - j, "float64")) for j in range(k)], dtype=np.float64
    )
    actual = float(schedule.decay_over(step, k, "float64"))
    assert actual == pytest.approx(product, rel=1e-9, abs=1e-300)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-2, 1e6))
def test_half_life_round_trip(half_life):
    decay = schedules.half_life_to_decay(half_life)
    assert decay == pytest.approx(0.5 ** (1.0 / half_life), rel=1e-15)
    assert schedules.decay_to_half_life(decay) == pytest.approx(half_life, rel=1e-8)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-6, 1.0 - 1e-9))
def test_decay_to_half_life_round_trip(decay):
    half_life = schedules.decay_to_half_life(decay)
    assert half_life == pytest.approx(math.log(0.5) / math.log(decay), rel=1e-15)
    assert 0.5 ** (1.0 / half_life) == pytest.approx(decay, rel=1e-12)
    assert schedules.half_life_to_decay(half_life) == pytest.approx(decay, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-3, 0.2886))
def test_sigma_rel_round_trip(sigma_rel):
    gamma = schedules.sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma == pytest.approx(ref_gamma(sigma_rel), rel=1e-7)
    assert schedules.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-3, 1e4))
def test_gamma_round_trip(gamma):
    sigma_rel = schedules.gamma_to_sigma_rel(gamma)
    assert sigma_rel == pytest.approx(ref_sigma_rel(gamma), rel=1e-15)
    assert schedules.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, rel=1e-7)


@settings(max_examples=50, deadline=None)
@given(unit, st.integers(1, 4096), st.integers(1, 4096))
def test_scale_decay_round_trip(decay, batch_size, reference):
    scaled = schedules.scale_decay(decay, batch_size, reference)
    assert scaled == pytest.approx(decay ** (batch_size / reference), rel=1e-15)
    assert 0.0 <= scaled <= 1.0
    assume(decay == 0.0 or scaled > 1e-300)
    back = schedules.scale_decay(scaled, reference, batch_size)
    assert back == pytest.approx(decay, rel=1e-9, abs=1e-300)


def test_sigma_rel_reference_values():
    # Karras et al. (2024) quote gamma 16.97 for sigma_rel 0.05, 6.94 for 0.10.
    assert ref_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert ref_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.05, 0.10):
        gamma = schedules.sigma_rel_to_gamma(sigma_rel)
        assert gamma == pytest.approx(ref_gamma(sigma_rel), rel=1e-10)
        assert schedules.gamma_to_sigma_rel(gamma) == pytest.approx(
            sigma_rel, rel=1e-12
        )
    schedule = schedules.PowerFunction(sigma_rel=0.10)
    assert schedule.sigma_rel == 0.10
    assert schedule.gamma == pytest.approx(ref_gamma(0.10), rel=1e-10)
    schedule = schedules.PowerFunction(gamma=16.97)
    assert schedule.gamma == 16.97
    assert schedule.sigma_rel == pytest.approx(ref_sigma_rel(16.97), rel=1e-15)


def test_scalar_helpers_reference_values():
    assert schedules.half_life_to_decay(1) == 0.5
    assert schedules.decay_to_half_life(0.5) == pytest.approx(1.0)
    assert schedules.scale_decay(0.9, 512, 256) == pytest.approx(0.81)
    assert schedules.scale_decay(np.float32(0.5), np.int64(3), 1) == 0.125
    assert isinstance(schedules.half_life_to_decay(np.float64(10.0)), float)


# ---------------------------------------------------------------------------
# Serialization and `get`
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make,ref", CASE_PARAMS)
def test_config_round_trip(make, ref):
    schedule = make()
    config = schedule.get_config()
    restored = type(schedule).from_config(config)
    assert type(restored) is type(schedule)
    assert restored.get_config() == config
    assert repr(restored) == repr(schedule)
    assert repr(schedule).startswith(type(schedule).__name__ + "(")
    for key, value in config.items():
        assert f"{key}={value!r}" in repr(schedule)
    np.testing.assert_array_equal(
        np.asarray(restored(tensor(STEPS), "float64")),
        np.asarray(schedule(tensor(STEPS), "float64")),
    )


@pytest.mark.parametrize("make,ref", CASE_PARAMS)
def test_keras_serialization_round_trip(make, ref):
    schedule = make()
    serialized = keras.saving.serialize_keras_object(schedule)
    assert serialized["registered_name"] == f"keras_ema>{type(schedule).__name__}"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    via_get = schedules.get(serialized)
    assert type(via_get) is type(schedule)
    assert via_get.get_config() == schedule.get_config()
    short = {"class_name": type(schedule).__name__, "config": schedule.get_config()}
    assert schedules.get(short).get_config() == schedule.get_config()


def test_power_function_attributes_and_config():
    by_gamma = schedules.PowerFunction(gamma=6.94)
    by_sigma = schedules.PowerFunction(sigma_rel=0.1)
    assert by_gamma.get_config() == {"gamma": 6.94, "sigma_rel": None}
    assert by_sigma.get_config() == {"gamma": None, "sigma_rel": 0.1}
    assert by_gamma.sigma_rel == pytest.approx(0.1, abs=1e-4)
    assert by_sigma.gamma == pytest.approx(6.94, abs=0.01)


def test_get():
    constant = schedules.get(0.999)
    assert isinstance(constant, schedules.Constant) and constant.decay == 0.999
    assert schedules.get(1).decay == 1.0
    assert schedules.get(0).decay == 0.0
    assert schedules.get(np.float32(0.5)).decay == 0.5
    schedule = schedules.PowerWarmup(0.99)
    assert schedules.get(schedule) is schedule
    for bad in ("0.9", None, True, False, [0.9], (0.9,), tensor(0.9)):
        with pytest.raises(TypeError, match="decay"):
            schedules.get(bad)
    for bad in (1.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="decay"):
            schedules.get(bad)
    with pytest.raises(TypeError, match="decay"):
        schedules.get(keras.saving.serialize_keras_object(keras.layers.Dense(1)))


def test_custom_subclass_uses_generic_product():
    class Linear(schedules.DecaySchedule):
        def __init__(self, ramp):
            self.ramp = ramp

        def _decay(self, s):
            return keras.ops.minimum(0.99, s / self.ramp)

        def get_config(self):
            return {"ramp": self.ramp}

    schedule = Linear(100.0)
    assert repr(schedule) == "Linear(ramp=100.0)"
    expected = np.prod(np.minimum(0.99, np.arange(8, 11) / 100.0))
    assert float(schedule.decay_over(10, 3, "float64")) == pytest.approx(expected)
    with pytest.raises(NotImplementedError):
        schedules.DecaySchedule()(1)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
S = schedules

BAD_INPUTS = [
    # decay, for every schedule that takes one.
    *[
        pytest.param(lambda c=c, v=v: c(v), ValueError, "decay", id=f"{c.__name__}-{v}")
        for c in (S.Constant, S.TFWarmup, S.PowerWarmup, S.Debiased)
        for v in (-0.1, 1.1, NAN, INF, -INF)
    ],
    *[
        pytest.param(
            lambda c=c, v=v: c(v),
            TypeError,
            "decay",
            id=f"{c.__name__}-{type(v).__name__}",
        )
        for c in (S.Constant, S.TFWarmup, S.PowerWarmup, S.Debiased)
        for v in ("0.9", None, True, [0.9])
    ],
    pytest.param(
        lambda: S.Debiased(1.0), ValueError, r"decay.*\[0, 1\)", id="debiased-1"
    ),
    pytest.param(lambda: S.Debiased(1), ValueError, "0/0", id="debiased-int-1"),
    # PowerWarmup.
    pytest.param(
        lambda: S.PowerWarmup(0.9, inv_gamma=0),
        ValueError,
        "inv_gamma",
        id="inv_gamma-0",
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, inv_gamma=-1),
        ValueError,
        "inv_gamma",
        id="inv_gamma-neg",
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, inv_gamma=NAN),
        ValueError,
        "inv_gamma",
        id="inv_gamma-nan",
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, inv_gamma="1"),
        TypeError,
        "inv_gamma",
        id="inv_gamma-str",
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, power=0), ValueError, "power", id="power-0"
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, power=INF), ValueError, "power", id="power-inf"
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, power=None), TypeError, "power", id="power-none"
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, min_decay=-0.1),
        ValueError,
        "min_decay",
        id="min_decay-neg",
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, min_decay=1.5),
        ValueError,
        "min_decay",
        id="min_decay-big",
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, min_decay=0.95),
        ValueError,
        "min_decay",
        id="min_decay-above-decay",
    ),
    pytest.param(
        lambda: S.PowerWarmup(0.9, min_decay=True),
        TypeError,
        "min_decay",
        id="min_decay-bool",
    ),
    # PowerFunction.
    pytest.param(
        lambda: S.PowerFunction(), ValueError, "gamma.*sigma_rel", id="pf-neither"
    ),
    pytest.param(
        lambda: S.PowerFunction(gamma=7, sigma_rel=0.1),
        ValueError,
        "gamma.*sigma_rel",
        id="pf-both",
    ),
    pytest.param(lambda: S.PowerFunction(gamma=0), ValueError, "gamma", id="gamma-0"),
    pytest.param(
        lambda: S.PowerFunction(gamma=-1), ValueError, "gamma", id="gamma-neg"
    ),
    pytest.param(
        lambda: S.PowerFunction(gamma=NAN), ValueError, "gamma", id="gamma-nan"
    ),
    pytest.param(
        lambda: S.PowerFunction(gamma="7"), TypeError, "gamma", id="gamma-str"
    ),
    pytest.param(
        lambda: S.PowerFunction(sigma_rel=0), ValueError, "sigma_rel", id="sigma_rel-0"
    ),
    pytest.param(
        lambda: S.PowerFunction(sigma_rel=math.sqrt(1 / 12)),
        ValueError,
        "sigma_rel",
        id="sigma_rel-max",
    ),
    pytest.param(
        lambda: S.PowerFunction(sigma_rel=0.5),
        ValueError,
        "sigma_rel",
        id="sigma_rel-big",
    ),
    pytest.param(
        lambda: S.PowerFunction(sigma_rel=True),
        TypeError,
        "sigma_rel",
        id="sigma_rel-bool",
    ),
    # Helpers.
    pytest.param(
        lambda: S.sigma_rel_to_gamma(0.3), ValueError, "sigma_rel", id="s2g-big"
    ),
    pytest.param(
        lambda: S.sigma_rel_to_gamma(-0.1), ValueError, "sigma_rel", id="s2g-neg"
    ),
    pytest.param(
        lambda: S.sigma_rel_to_gamma(None), TypeError, "sigma_rel", id="s2g-none"
    ),
    pytest.param(lambda: S.gamma_to_sigma_rel(0.0), ValueError, "gamma", id="g2s-0"),
    pytest.param(
        lambda: S.gamma_to_sigma_rel([1.0]), TypeError, "gamma", id="g2s-list"
    ),
    pytest.param(lambda: S.half_life_to_decay(0), ValueError, "steps", id="hl-0"),
    pytest.param(lambda: S.half_life_to_decay(-5), ValueError, "steps", id="hl-neg"),
    pytest.param(lambda: S.half_life_to_decay(INF), ValueError, "steps", id="hl-inf"),
    pytest.param(lambda: S.half_life_to_decay(NAN), ValueError, "steps", id="hl-nan"),
    pytest.param(lambda: S.half_life_to_decay("5"), TypeError, "steps", id="hl-str"),
    pytest.param(lambda: S.decay_to_half_life(0.0), ValueError, "decay", id="dhl-0"),
    pytest.param(lambda: S.decay_to_half_life(1.0), ValueError, "decay", id="dhl-1"),
    pytest.param(lambda: S.decay_to_half_life(NAN), ValueError, "decay", id="dhl-nan"),
    pytest.param(lambda: S.decay_to_half_life(None), TypeError, "decay", id="dhl-none"),
    pytest.param(
        lambda: S.scale_decay(1.1, 1, 1), ValueError, "decay", id="scale-decay"
    ),
    pytest.param(
        lambda: S.scale_decay("0.9", 1, 1), TypeError, "decay", id="scale-decay-str"
    ),
    pytest.param(
        lambda: S.scale_decay(0.9, 0, 1), ValueError, "batch_size", id="scale-batch-0"
    ),
    pytest.param(
        lambda: S.scale_decay(0.9, 1, -1),
        ValueError,
        "reference_batch_size",
        id="scale-ref-neg",
    ),
    pytest.param(
        lambda: S.scale_decay(0.9, 1, INF),
        ValueError,
        "reference_batch_size",
        id="scale-ref-inf",
    ),
    pytest.param(
        lambda: S.scale_decay(0.9, None, 1),
        TypeError,
        "batch_size",
        id="scale-batch-none",
    ),
    # Steps, k and dtype.
    pytest.param(lambda: S.Constant(0.9)(0), ValueError, "step", id="step-0"),
    pytest.param(lambda: S.Constant(0.9)(-3), ValueError, "step", id="step-neg"),
    pytest.param(lambda: S.Constant(0.9)(1.5), TypeError, "step", id="step-float"),
    pytest.param(lambda: S.Constant(0.9)(True), TypeError, "step", id="step-bool"),
    pytest.param(lambda: S.Constant(0.9)("1"), TypeError, "step", id="step-str"),
    pytest.param(
        lambda: S.Constant(0.9)(tensor(1.0)),
        TypeError,
        "step",
        id="step-float-tensor",
    ),
    pytest.param(
        lambda: S.Constant(0.9)(1, dtype="int32"), ValueError, "dtype", id="dtype-int"
    ),
    pytest.param(lambda: S.Constant(0.9).decay_over(5, 0), ValueError, "k", id="k-0"),
    pytest.param(
        lambda: S.Constant(0.9).decay_over(5, -1), ValueError, "k", id="k-neg"
    ),
    pytest.param(
        lambda: S.Constant(0.9).decay_over(5, 2.0), TypeError, "k", id="k-float"
    ),
    pytest.param(
        lambda: S.Constant(0.9).decay_over(5, True), TypeError, "k", id="k-bool"
    ),
    pytest.param(
        lambda: S.Constant(0.9).decay_over(5, tensor(2)),
        TypeError,
        "k",
        id="k-tensor",
    ),
    pytest.param(
        lambda: S.Debiased(0.9).decay_over(2, 3), ValueError, "step", id="step-below-k"
    ),
]


@pytest.mark.parametrize("fn,exc,match", BAD_INPUTS)
def test_bad_inputs_raise(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_numpy_scalars_accepted():
    assert S.Constant(np.float32(0.5)).decay == 0.5
    assert isinstance(S.Constant(np.float64(0.25)).decay, float)
    assert S.PowerWarmup(np.float64(0.9), inv_gamma=np.int32(2)).inv_gamma == 2.0
    assert S.PowerFunction(gamma=np.int64(7)).gamma == 7.0
    assert float(S.Constant(0.5).decay_over(np.int32(4), np.int64(2), "float64")) == (
        0.25
    )


def test_small_decays_keep_relative_accuracy():
    # d must not be computed as 1 - (1 - d), which rounds tiny decays to 0.
    tiny = 1e-30
    assert float(S.Debiased(tiny)(2, "float64")) == pytest.approx(
        (tiny - tiny**2) / (1 - tiny**2), rel=1e-12
    )
    assert float(S.PowerFunction(gamma=1.0)(10**6, "float64")) == pytest.approx(
        (1 - 1e-6) ** 2, rel=1e-12
    )
    d = float(S.PowerWarmup(0.9, inv_gamma=1e6, power=1.0)(1, "float64"))
    assert d == pytest.approx(1 - (1 + 1e-6) ** -1.0, rel=1e-9)
