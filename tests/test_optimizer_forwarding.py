"""EMAOptimizer passes the wrapped optimizer's configuration through.

Whatever configures the update (weight decay and its exclusions, clipping,
gradient accumulation, Keras's own `use_ema`) must reach the wrapped
optimizer, set on either of the two, or be refused with an error that says
where to set it. The reference is the wrapped optimizer alone: the raw
weights after each of ten `fit` steps must be those of the same model
compiled with the unwrapped optimizer. The wrapper runs the very same update
ops (the average's update only reads the weights), so on this CPU the two
trajectories are equal bit for bit and are compared exactly.
"""

import keras
import numpy as np
import pytest
from helpers import RecordWeights, make_data, make_model, max_error

import keras_ema

STEPS = 10
X, Y = make_data(n=8 * STEPS)


def trajectory(optimizer, configure=None):
    """The trainable weights after each of the STEPS steps of one epoch;
    `configure(optimizer, model)` runs after compile, before `fit`."""
    model = make_model(seed=3)
    model.compile(optimizer=optimizer, loss="mse")
    if configure is not None:
        configure(optimizer, model)
    record = RecordWeights()
    model.fit(
        X, Y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[record]
    )
    assert len(record.weights) == STEPS
    return record.weights


def assert_same(got, expected):
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"step {step + 1}")


def differ(a, b, tolerance=1e-6):
    return max(max_error(x, y) for x, y in zip(a, b)) > tolerance


def biases(weights_per_step):
    # make_model's trainable variables: hidden kernel, hidden bias, out
    # kernel, out bias.
    return [[w[1], w[3]] for w in weights_per_step]


def adamw():
    # A strong decay, so that decaying the biases or not shows in ten steps.
    return keras.optimizers.AdamW(1e-2, weight_decay=0.5)


def exclude_biases_by_name(optimizer, model):
    optimizer.exclude_from_weight_decay(var_names=["bias"])


def exclude_biases_by_variable(optimizer, model):
    bias_variables = [v for v in model.trainable_variables if "bias" in v.path]
    assert len(bias_variables) == 2
    optimizer.exclude_from_weight_decay(var_list=bias_variables)


@pytest.mark.parametrize(
    "exclude", [exclude_biases_by_name, exclude_biases_by_variable]
)
def test_exclude_from_weight_decay_on_wrapper_reaches_inner(exclude):
    """Issue "flow 8": called on the wrapper, the exclusions used to land on
    the wrapper, and the wrapped AdamW decayed the biases all the same."""
    expected = trajectory(adamw(), exclude)
    got = trajectory(keras_ema.EMAOptimizer(adamw(), decay=0.9), exclude)
    assert_same(got, expected)
    # The exclusions matter: the biases decayed follow another path.
    decayed = trajectory(adamw())
    assert differ(biases(expected), biases(decayed))


def test_exclude_from_weight_decay_returns_inner_result():
    class Recording(keras.optimizers.AdamW):
        def exclude_from_weight_decay(self, var_list=None, var_names=None):
            super().exclude_from_weight_decay(var_list, var_names)
            self.excluded = (var_list, var_names)
            return "inner result"

    inner = Recording(1e-2, weight_decay=0.1)
    optimizer = keras_ema.EMAOptimizer(inner)
    assert optimizer.exclude_from_weight_decay(var_names=["bias"]) == "inner result"
    assert inner.excluded == (None, ["bias"])


OPTIMIZERS = {
    "adamw": adamw,
    "lion": lambda: keras.optimizers.Lion(1e-3),
    "adafactor": lambda: keras.optimizers.Adafactor(1e-2),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam_clipnorm": lambda: keras.optimizers.Adam(1e-2, clipnorm=0.01),
    "adam_global_clipnorm": lambda: keras.optimizers.Adam(1e-2, global_clipnorm=0.01),
    "adam_clipvalue": lambda: keras.optimizers.Adam(1e-2, clipvalue=0.001),
    "sgd_accumulation": lambda: keras.optimizers.SGD(
        0.1, gradient_accumulation_steps=2
    ),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_raw_trajectory_equals_unwrapped(make):
    expected = trajectory(make())
    got = trajectory(keras_ema.EMAOptimizer(make(), decay=0.9))
    assert_same(got, expected)
    assert differ(expected[0], expected[-1])  # it trained


# (unwrapped optimizer, attributes written on the wrapper after construction)
WRITES = {
    "clipnorm": (lambda **kw: keras.optimizers.SGD(0.1, **kw), {"clipnorm": 0.01}),
    "global_clipnorm": (
        lambda **kw: keras.optimizers.SGD(0.1, **kw),
        {"global_clipnorm": 0.01},
    ),
    "clipvalue": (lambda **kw: keras.optimizers.SGD(0.1, **kw), {"clipvalue": 0.001}),
    "weight_decay": (
        lambda **kw: keras.optimizers.Adam(1e-2, **kw),
        {"weight_decay": 0.5},
    ),
    "gradient_accumulation_steps": (
        lambda **kw: keras.optimizers.SGD(0.1, **kw),
        {"gradient_accumulation_steps": 2},
    ),
    # Keras's own average, copied over the weights every third step inside
    # the train step, so that it shows in the raw trajectory.
    "use_ema": (
        lambda **kw: keras.optimizers.Adam(1e-2, **kw),
        {"use_ema": True, "ema_momentum": 0.5, "ema_overwrite_frequency": 3},
    ),
}


@pytest.mark.parametrize("make,writes", WRITES.values(), ids=WRITES.keys())
def test_attribute_written_on_wrapper_reaches_inner(make, writes):
    """`wrapper.clipnorm = 0.01` trains like `SGD(clipnorm=0.01)`."""
    inner = make()
    optimizer = keras_ema.EMAOptimizer(inner, decay=0.9)
    for name, value in writes.items():
        setattr(optimizer, name, value)
        assert getattr(inner, name) == value
        assert getattr(optimizer, name) == value
    expected = trajectory(make(**writes))
    assert_same(trajectory(optimizer), expected)
    # The setting matters in these ten steps.
    assert differ(expected, trajectory(make()))


def test_reads_come_from_inner_and_wrapper_builds_no_state_of_its_own():
    inner = keras.optimizers.SGD(
        0.1,
        weight_decay=0.01,
        clipvalue=0.5,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=5,
        gradient_accumulation_steps=3,
    )
    optimizer = keras_ema.EMAOptimizer(inner)
    for name in (
        "weight_decay",
        "clipnorm",
        "global_clipnorm",
        "clipvalue",
        "use_ema",
        "ema_momentum",
        "ema_overwrite_frequency",
        "gradient_accumulation_steps",
    ):
        assert getattr(optimizer, name) == getattr(inner, name), name
    # Keras's build creates use_ema averages and gradient accumulators from
    # these settings: the inner optimizer's, not a second set on the wrapper.
    model = make_model()
    optimizer.build(model.trainable_variables)
    assert len(optimizer._variables) == 2  # its iterations and learning rate
    assert not hasattr(optimizer, "_accumulated_gradients")
    assert not hasattr(optimizer, "_model_variables_moving_average")
    assert len(inner._accumulated_gradients) == 4
    assert len(inner._model_variables_moving_average) == 4


def test_forwards_past_a_wrapped_loss_scale_optimizer():
    """A LossScaleOptimizer applies none of these settings itself: they
    belong to the optimizer it wraps."""
    adam = keras.optimizers.Adam(1e-2)
    loss_scale = keras.optimizers.LossScaleOptimizer(adam)
    optimizer = keras_ema.EMAOptimizer(loss_scale)
    optimizer.clipnorm = 0.01
    assert adam.clipnorm == 0.01 and loss_scale.clipnorm is None
    assert optimizer.clipnorm == 0.01

    expected = trajectory(
        keras.optimizers.LossScaleOptimizer(adamw()),
        lambda o, m: o.inner_optimizer.exclude_from_weight_decay(var_names=["bias"]),
    )
    got = trajectory(
        keras_ema.EMAOptimizer(keras.optimizers.LossScaleOptimizer(adamw())),
        exclude_biases_by_name,
    )
    assert_same(got, expected)


def test_write_after_build_takes_effect_at_next_trace_like_unwrapped():
    """Keras reads clipping and weight decay when it traces the train step:
    a write after training started reaches the inner optimizer and takes
    effect once the step is traced again, as with the unwrapped one."""
    results = {}
    for run in ("unwrapped", "wrapped", "never_clipped"):
        inner = keras.optimizers.SGD(0.1)
        wrapped = run != "unwrapped"
        optimizer = keras_ema.EMAOptimizer(inner, decay=0.9) if wrapped else inner
        model = make_model(seed=3)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        if run != "never_clipped":
            optimizer.clipnorm = 0.01
            assert inner.clipnorm == 0.01
        model.make_train_function(force=True)
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        results[run] = model.get_weights()
    assert_same([results["wrapped"]], [results["unwrapped"]])
    assert differ(results["wrapped"], results["never_clipped"])


@pytest.mark.parametrize(
    "name,value",
    [("use_ema", True), ("gradient_accumulation_steps", 2)],
)
def test_build_time_settings_refused_after_build(name, value):
    """Keras creates the variables these need when it builds the optimizer
    (averages, gradient accumulators): changed later, it would fail or
    misbehave in the train step."""
    inner = keras.optimizers.Adam(1e-2)
    optimizer = keras_ema.EMAOptimizer(inner)
    optimizer.build(make_model().trainable_variables)
    with pytest.raises(ValueError, match=f"`{name}`.*before"):
        setattr(optimizer, name, value)
    assert not getattr(inner, name)
    setattr(optimizer, name, getattr(inner, name))  # no change is no error


def test_exclude_from_weight_decay_refused_after_build():
    """Keras documents it must be called before `build`; the wrapper says
    so instead of leaving a change that shows only after a retrace."""
    optimizer = keras_ema.EMAOptimizer(adamw())
    optimizer.build(make_model().trainable_variables)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.exclude_from_weight_decay(var_names=["bias"])


def test_weight_decay_variable_tracked_once():
    """A variable written through the wrapper belongs to the inner optimizer
    alone, so that `variables` (saved, restored) holds it once."""
    inner = keras.optimizers.Adam(1e-2)
    optimizer = keras_ema.EMAOptimizer(inner)
    weight_decay = keras.Variable(0.01, trainable=False, name="weight_decay")
    optimizer.weight_decay = weight_decay
    assert inner.weight_decay is weight_decay
    optimizer.build(make_model().trainable_variables)
    ids = [id(v) for v in optimizer.variables]
    assert ids.count(id(weight_decay)) == 1
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "inner_kwargs,name,value,match",
    [
        ({"clipvalue": 0.5}, "clipnorm", 1.0, "`clipvalue` to None"),
        ({"clipnorm": 0.5}, "global_clipnorm", 1.0, "`clipnorm` to None"),
        ({"global_clipnorm": 0.5}, "clipvalue", 1.0, "`global_clipnorm` to None"),
        ({}, "gradient_accumulation_steps", 1, ">= 2"),
        ({}, "ema_momentum", 1.5, r"\[0, 1\]"),
        ({}, "ema_overwrite_frequency", -1, ">= 1"),
    ],
    ids=[
        "clipnorm_over_clipvalue",
        "global_clipnorm_over_clipnorm",
        "clipvalue_over_global_clipnorm",
        "accumulation_1",
        "ema_momentum_1.5",
        "ema_overwrite_frequency_-1",
    ],
)
def test_bad_writes_refused(inner_kwargs, name, value, match):
    """Checked by the rules of Keras's constructor; two clipping settings
    would silently leave one of them unused."""
    inner = keras.optimizers.SGD(0.1, **inner_kwargs)
    optimizer = keras_ema.EMAOptimizer(inner)
    before = getattr(inner, name)
    with pytest.raises(ValueError, match=match):
        setattr(optimizer, name, value)
    assert getattr(inner, name) == before


def test_switching_clipping_kind():
    inner = keras.optimizers.SGD(0.1, clipvalue=0.5)
    optimizer = keras_ema.EMAOptimizer(inner)
    optimizer.clipvalue = None
    optimizer.clipnorm = 1.0
    assert (inner.clipnorm, inner.clipvalue) == (1.0, None)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: keras.optimizers.Adam(1e-2), "beta_1"),
        (lambda: keras.optimizers.SGD(0.1), "momentum"),
        (lambda: keras.optimizers.SGD(0.1), "nesterov"),
        (lambda: keras.optimizers.Adafactor(), "clip_threshold"),
    ],
    ids=["adam.beta_1", "sgd.momentum", "sgd.nesterov", "adafactor.clip_threshold"],
)
def test_inner_hyperparameter_set_on_wrapper_is_refused(make, name):
    """Set on the wrapper, the wrapped optimizer's own hyperparameters would
    be stored on the wrapper and never used."""
    inner = make()
    optimizer = keras_ema.EMAOptimizer(inner)
    before = getattr(inner, name)
    with pytest.raises(AttributeError, match=rf"inner_optimizer\.{name}"):
        setattr(optimizer, name, 0.5)
    assert getattr(inner, name) == before
    assert name not in vars(optimizer)


def test_wrapper_sets_its_own_attributes():
    """The guard leaves the wrapper's own attributes alone, also when the
    inner optimizer is an EMAOptimizer with the same ones."""
    inner = keras_ema.EMAOptimizer(keras.optimizers.SGD(0.1), decay=0.5)
    outer = keras_ema.EMAOptimizer(inner, decay=0.9, non_trainable="live")
    outer.name = "renamed"
    assert outer.name == "renamed" and inner.name != "renamed"
    assert outer.averager is not inner.averager


def trained_optimizer(seed):
    model = make_model(seed=seed)
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=0.9)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return optimizer


def test_set_weights_assigns_every_variable():
    """The wrapper's own variables, the inner optimizer's (Adam's moments,
    iterations) and the average's: Keras's base assigns only the first."""
    source = trained_optimizer(seed=3)
    target = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=0.9)
    target.build(make_model(seed=4).trainable_variables)
    weights = [v.numpy() for v in source.variables]
    assert len(weights) > 2 + 4 * 2 + 4  # own, Adam's m and v, the shadows
    target.set_weights(weights)
    for variable, weight in zip(target.variables, weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), weight)
    assert int(target.iterations.numpy()) == STEPS
    assert int(target.averager.step.numpy()) == STEPS


def test_set_weights_bad_input():
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2))
    with pytest.raises(ValueError, match="built"):
        optimizer.set_weights([])
    optimizer = trained_optimizer(seed=3)
    before = [v.numpy() for v in optimizer.variables]
    count = len(before)
    with pytest.raises(ValueError, match=f"{count} variables.*got {count - 1}"):
        optimizer.set_weights([np.zeros_like(w) for w in before[:-1]])
    wrong_shape = [np.zeros_like(w) for w in before]
    wrong_shape[-1] = np.zeros((3, 3), "float32")
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        optimizer.set_weights(wrong_shape)
    # Refused as a whole: nothing was assigned.
    for variable, value in zip(optimizer.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)
