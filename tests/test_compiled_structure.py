"""The structure of the compiled train step: what XLA runs for the average.

Speed is measured in benchmarks/overhead.py; these tests pin down the
compiled code behind it (optimized HLO on this machine's CPU backend), so a
change that adds a pass over memory fails here, not in a timing:

- no array copies beyond those of the plain optimizer's step, whether or not
  the update is due (a conditional that passes buffers through makes XLA copy
  every shadow on the steps it skips);
- one fused elementwise loop per variable for the update itself (the HLO
  excerpts in benchmarks/README.md show it reading the weight the optimizer
  has just written).
"""

import re

import keras
import numpy as np
import pytest

import keras_ema

LAYERS = 3  # Dense layers: 2 variables each


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((32,))] + [keras.layers.Dense(32) for _ in range(LAYERS)]
    )


def _array_copies(hlo: str) -> list[str]:
    """The shapes of the non-scalar `copy` instructions, e.g. f32[32,32]."""
    return sorted(re.findall(r"= (\w+\[[\d,]+\])\{[\d,]*\} copy\(", hlo))


def _array_loop_fusions(hlo: str) -> int:
    """The number of elementwise loops over arrays (not scalars)."""
    return len(re.findall(r"= \w+\[[\d,]+\]\{[\d,]*\} fusion\(.*kind=kLoop", hlo))


def _tensorflow_step_hlo(optimizer) -> str:
    import tensorflow as tf

    model = _model()
    optimizer.build(model.trainable_variables)
    x = tf.random.normal((4, 32))

    @tf.function(jit_compile=True)
    def train_step(xb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb, training=True) - xb) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    return train_step.experimental_get_compiler_ir(x)(stage="optimized_hlo")


def _jax_step_hlo(optimizer) -> str:
    import jax

    model = _model()
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(4, 32)).astype("float32")
    model.train_on_batch(x, x)  # builds the optimizer and its variables
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    step = jax.jit(model.train_step, donate_argnums=0)
    return step.lower(state, (x, x)).compile().as_text()


def _step_hlo(optimizer) -> str:
    if keras.backend.backend() == "jax":
        return _jax_step_hlo(optimizer)
    return _tensorflow_step_hlo(optimizer)


def _sgd():
    return keras.optimizers.SGD(1e-3)


def _entry(hlo: str) -> str:
    """The entry computation: what runs at every step."""
    return hlo[hlo.index("\nENTRY") :]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"update_every": 10},
        {"start_step": 5},
        {"init": "first_step"},
        {"update_every": 4, "init": "first_step"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "every_step",
)
def test_no_copies_beyond_the_plain_step(options):
    plain = _step_hlo(_sgd())
    hlo = _step_hlo(keras_ema.EMAOptimizer(_sgd(), decay=0.99, **options))
    # Copying the weights into the shadows (before `start_step`, or at the
    # first step with `init="first_step"`) is a select in the update's loop.
    assert _array_copies(hlo) == _array_copies(plain)


def test_one_fused_loop_per_variable():
    plain = _array_loop_fusions(_step_hlo(_sgd()))
    hlo = _step_hlo(keras_ema.EMAOptimizer(_sgd(), decay=0.99))
    assert _array_loop_fusions(hlo) - plain == 2 * LAYERS
    assert "conditional(" not in hlo and " while(" not in hlo


def test_several_averages_one_condition_one_loop_each():
    """Three averages: one loop per average and variable, no copies, and
    with `update_every` a single condition around all of them."""
    plain = _step_hlo(_sgd())
    decays = [0.9, 0.99, 0.999]
    hlo = _step_hlo(keras_ema.EMAOptimizer(_sgd(), decay=decays))
    extra = _array_loop_fusions(hlo) - _array_loop_fusions(plain)
    assert extra == len(decays) * 2 * LAYERS
    assert _array_copies(hlo) == _array_copies(plain)
    assert "conditional(" not in hlo and " while(" not in hlo
    entry = _entry(
        _step_hlo(keras_ema.EMAOptimizer(_sgd(), decay=decays, update_every=10))
    )
    assert entry.count("conditional(") + entry.count(" while(") == 1


def test_skipped_steps_run_no_loop_over_the_weights():
    """With `update_every=10` the per-variable loops are in a branch or a
    loop of at most one iteration, not in the step's own body."""
    plain = _step_hlo(_sgd())
    hlo = _step_hlo(keras_ema.EMAOptimizer(_sgd(), decay=0.99, update_every=10))
    entry = _entry(hlo)
    assert _array_loop_fusions(entry) == _array_loop_fusions(_entry(plain))
    assert "conditional(" in entry or " while(" in entry
