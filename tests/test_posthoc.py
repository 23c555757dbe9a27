"""Post-hoc EMA: profile math against numpy, reconstruction against averages
trained directly, exact update_every compensation, resumption, the CLI."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_python

import keras_ema
from keras_ema import posthoc

EVERY = 8
SNAPSHOTS = 32


def gamma_of(sigma_rel):
    """Karras et al.'s relation, solved numerically here (not via the code)."""
    grid = np.linspace(0.01, 200, 400001)
    sigma = np.sqrt((grid + 1) / ((grid + 2) ** 2 * (grid + 3)))
    return float(grid[np.argmin(np.abs(sigma - sigma_rel))])


def test_inner_product_matches_numerical_integration():
    rng = np.random.default_rng(0)
    for _ in range(10):
        t_a, t_b = rng.uniform(10, 1000, size=2)
        g_a, g_b = rng.uniform(0.5, 20, size=2)
        tau = np.linspace(0, min(t_a, t_b), 200001)
        p_a = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
        p_b = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
        numeric = np.trapezoid(p_a * p_b, tau)
        closed = posthoc.profile_inner_product(t_a, g_a, t_b, g_b)
        assert closed == pytest.approx(numeric, rel=1e-6)


def test_stored_profile_is_reconstructed_exactly():
    steps = np.repeat(np.arange(1, 9) * 100.0, 2)
    gammas = np.tile([gamma_of(0.05), gamma_of(0.10)], 8)
    x, error = posthoc.solve_coefficients(steps, gammas, 800.0, gammas[-1])
    assert x.sum() == pytest.approx(1.0)
    assert x[-1] == pytest.approx(1.0, abs=1e-6)
    assert error < 1e-6


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )


def make_data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, (np.sin(x[:, :1]) + 0.3 * rng.normal(size=(n, 1))).astype("float32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """256 steps with snapshots of sigma_rel 0.05 and 0.15 every 8 steps, and
    a power-function average of sigma_rel 0.10 trained directly alongside."""
    directory = str(tmp_path_factory.mktemp("phema"))
    model = make_model()
    direct = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(3e-3),
        decay=keras_ema.schedules.PowerFunction(sigma_rel=0.10),
    )
    model.compile(optimizer=direct, loss="mse")
    callback = keras_ema.PostHocEMA(
        directory, sigma_rels=(0.05, 0.15), every_n_steps=EVERY, dtype="float32"
    )
    x, y = make_data()
    model.fit(x, y, batch_size=8, epochs=32, verbose=0, callbacks=[callback])
    return model, direct, directory, callback


def relative_l2(a, b):
    a = np.concatenate([v.ravel() for v in a]).astype(np.float64)
    b = np.concatenate([v.ravel() for v in b]).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_snapshots_written(trained):
    _, _, directory, _ = trained
    snapshots = posthoc.list_snapshots(directory)
    assert len(snapshots) == 2 * SNAPSHOTS
    assert sorted({s[1] for s in snapshots}) == [EVERY * (i + 1) for i in range(32)]
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp")]
    assert os.path.exists(os.path.join(directory, posthoc.MODEL_FILE))


def test_reconstructing_a_stored_sigma_rel_returns_it(trained):
    model, _, directory, callback = trained
    weights, coefficients, error = posthoc.reconstruct(directory, 0.05)
    assert error < 1e-6
    assert max(coefficients, key=lambda row: row[2])[:2] == (0.05, 256)
    stored = callback.averagers[0]
    for path, shadow in stored.shadows_by_path.items():
        np.testing.assert_allclose(weights[path], shadow.numpy(), atol=1e-5)


def test_intermediate_sigma_rel_matches_the_average_trained_directly(trained):
    model, direct, directory, _ = trained
    weights, coefficients, error = posthoc.reconstruct(directory, 0.10)
    assert abs(sum(c for _, _, c in coefficients) - 1) < 1e-9
    reconstructed = [weights[p] for p in direct.averager.shadows_by_path]
    distance = relative_l2(reconstructed, [s.numpy() for s in direct.averager.shadows])
    raw = relative_l2(
        [v.numpy() for v in model.trainable_variables],
        [s.numpy() for s in direct.averager.shadows],
    )
    print(
        f"post-hoc 0.10 vs trained: rel L2 {distance:.2e} (raw vs trained {raw:.2e},"
        f" profile fit error {error:.2e})"
    )
    assert distance < 1e-3
    assert distance < raw / 10


def test_reconstruct_at_an_earlier_step_uses_earlier_snapshots(trained):
    _, _, directory, _ = trained
    _, coefficients, _ = posthoc.reconstruct(directory, 0.10, step=128)
    assert max(step for _, step, _ in coefficients) == 128


def test_update_every_realises_the_same_averaging_length():
    """Feeding one-hot weights (step tau sets coordinate tau) makes the
    shadow the realised profile. With update_every=k and the exact k-step
    decay its width matches k=1's; the per-step decay applied once per k
    steps (computed here in numpy) realises a very different one."""
    steps, k, sigma_rel = 240, 8, 0.10
    gamma = gamma_of(sigma_rel)

    def realised_sigma(profile):
        tau = np.arange(1, steps + 1) / steps
        mean = np.sum(profile * tau)
        return float(np.sqrt(np.sum(profile * (tau - mean) ** 2)))

    profiles = {}
    for every in (1, k):
        variable = keras.Variable(np.zeros(steps, "float32"))
        ema = keras_ema.ExponentialMovingAverage(
            keras_ema.schedules.PowerFunction(sigma_rel=sigma_rel), update_every=every
        )
        ema.build([variable])
        for tau in range(steps):
            variable.assign(np.eye(steps, dtype="float32")[tau])
            ema.update()
        profiles[every] = ema.shadows[0].numpy().astype(np.float64)
    naive = np.zeros(steps)
    for s in range(1, steps + 1):
        if s % k == 0:
            d = (1 - 1 / s) ** (gamma + 1)
            naive = d * naive + (1 - d) * np.eye(steps)[s - 1]
    target = realised_sigma(profiles[1])
    assert target == pytest.approx(sigma_rel, rel=0.05)
    assert realised_sigma(profiles[k]) == pytest.approx(target, rel=0.03)
    assert abs(realised_sigma(naive) - target) > 0.3 * target


def test_resume_continues_snapshots(tmp_path):
    x, y = make_data()
    uninterrupted = str(tmp_path / "a")
    model = make_model()
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05)), loss="mse"
    )
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=4,
        verbose=0,
        shuffle=False,
        callbacks=[
            keras_ema.PostHocEMA(uninterrupted, every_n_steps=EVERY, dtype="float32")
        ],
    )
    resumed = str(tmp_path / "b")
    model = make_model()
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05)), loss="mse"
    )
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[keras_ema.PostHocEMA(resumed, every_n_steps=EVERY, dtype="float32")],
    )
    model.save(tmp_path / "at16.keras")
    # A stale snapshot from beyond the checkpoint (the interrupted run went
    # on past it) is removed when training resumes at step 16.
    stale = os.path.join(resumed, posthoc.snapshot_name(0.05, 24))
    with open(stale, "wb") as file:
        file.write(b"stale")
    loaded = keras.models.load_model(tmp_path / "at16.keras")
    loaded.fit(
        x,
        y,
        batch_size=8,
        epochs=4,
        initial_epoch=2,
        verbose=0,
        shuffle=False,
        callbacks=[keras_ema.PostHocEMA(resumed, every_n_steps=EVERY, dtype="float32")],
    )
    a = posthoc.list_snapshots(uninterrupted)
    b = posthoc.list_snapshots(resumed)
    assert [(s, t) for s, t, _ in a] == [(s, t) for s, t, _ in b]
    for (_, _, pa), (_, _, pb) in zip(a, b):
        with np.load(pa) as one, np.load(pb) as two:
            for key in one.files:
                if key.startswith("w:"):
                    np.testing.assert_allclose(one[key], two[key], atol=1e-6)


def test_load_into_sweep_and_cli(trained, tmp_path):
    model, _, directory, _ = trained
    fresh = make_model(seed=5)
    coefficients, _ = posthoc.load_into(fresh, directory, 0.08)
    weights, _, _ = posthoc.reconstruct(directory, 0.08)
    np.testing.assert_array_equal(
        fresh.get_layer("out").kernel.numpy(), weights["out/kernel"]
    )
    x, y = make_data(seed=7)
    before = [v.numpy() for v in fresh.trainable_variables]

    def mse(m):
        return float(np.mean((m.predict(x, verbose=0) - y) ** 2))

    rows = posthoc.sweep(
        fresh, directory, [0.05, 0.08, 0.12], mse, plot=tmp_path / "sweep.png"
    )
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.08, 0.12]
    assert os.path.getsize(tmp_path / "sweep.png") > 1000
    for a, b in zip(fresh.trainable_variables, before):
        np.testing.assert_array_equal(a.numpy(), b)

    out = tmp_path / "export"
    result = run_python(
        "-m", "keras_ema", "posthoc", directory, "--sigma-rel", "0.08", "--out", out
    )
    assert result.returncode == 0, result.stderr[-2000:]
    served = tf.saved_model.load(str(out))
    np.testing.assert_allclose(
        served.serve(x).numpy(), fresh.predict(x, verbose=0), atol=1e-5
    )
    again = run_python(
        "-m", "keras_ema", "posthoc", directory, "--sigma-rel", "0.08", "--out", out
    )
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"directory": 3}, TypeError, "directory"),
        ({"sigma_rels": 0.1}, TypeError, "sigma_rels"),
        ({"sigma_rels": ()}, ValueError, "sigma_rels"),
        ({"sigma_rels": (0.1, 0.1)}, ValueError, "sigma_rels"),
        ({"sigma_rels": (0.5,)}, ValueError, "sigma_rel"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": 10, "update_every": 3}, ValueError, "multiple"),
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"max_disk_bytes": -1}, ValueError, "max_disk_bytes"),
    ],
)
def test_posthoc_callback_bad_inputs(kwargs, error, match, tmp_path):
    arguments = {"directory": str(tmp_path), **kwargs}
    with pytest.raises(error, match=match):
        keras_ema.PostHocEMA(**arguments)


def test_reconstruct_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        posthoc.reconstruct(str(tmp_path / "missing"), 0.1)
    with pytest.raises(ValueError, match="no PostHocEMA snapshot"):
        posthoc.reconstruct(str(tmp_path), 0.1)
    with pytest.raises(ValueError, match="sigma_rel"):
        posthoc.reconstruct(str(tmp_path), 0.5)
    with pytest.raises(TypeError, match="model"):
        posthoc.load_into("model", str(tmp_path), 0.1)
    with pytest.raises(TypeError, match="model"):
        posthoc.sweep("model", str(tmp_path), [0.1], lambda m: 0.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        posthoc.solve_coefficients([], [], target_step=10, target_gamma=5.0)
    with pytest.raises(ValueError, match="positive"):
        posthoc.solve_coefficients([0, 10], [5.0, 5.0], 10, 5.0)
    with pytest.raises(ValueError, match="positive"):
        posthoc.solve_coefficients([5, 10], [5.0, 5.0], -1, 5.0)


def test_disk_cap_refuses_before_training(tmp_path):
    model = make_model()
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.SGD(0.05)), loss="mse"
    )
    callback = keras_ema.PostHocEMA(str(tmp_path), every_n_steps=1, max_disk_bytes=100)
    with pytest.raises(ValueError, match="max_disk_bytes"):
        model.fit(*make_data(), batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert posthoc.list_snapshots(str(tmp_path)) == []


def test_second_fit_after_training_without_the_callback(tmp_path, capsys):
    """Post-hoc averages need every step. A model that trained before gets
    averages that start from its current weights (said in the output); a
    directory whose snapshots missed steps is refused in the user's terms."""
    from helpers import RecordWeights, make_data, make_model

    x, y = make_data(n=32)
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 steps, no callback
    weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    fresh = keras_ema.PostHocEMA(tmp_path / "fresh", sigma_rels=(0.1,), every_n_steps=4)
    record = RecordWeights()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[fresh, record])
    assert "trained 4 steps before this fit" in capsys.readouterr().out
    # One snapshot, at step 8, of a power-function average that took the
    # weights at step 4 for the average of the steps before.
    [(_, step, _)] = posthoc.list_snapshots(tmp_path / "fresh")
    assert step == 8
    gamma = keras_ema.schedules.sigma_rel_to_gamma(0.1)
    expected = weights
    for t, trained in enumerate(record.weights, start=5):
        d = (1.0 - 1.0 / t) ** (gamma + 1)
        expected = [d * a + (1 - d) * w for a, w in zip(expected, trained)]
    got = [s.numpy() for s in fresh.averagers[0].shadows]
    assert max(np.max(np.abs(a - b)) for a, b in zip(got, expected)) < 1e-6

    # A fit without the callback, then the same directory: refused.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    again = keras_ema.PostHocEMA(tmp_path / "fresh", sigma_rels=(0.1,), every_n_steps=4)
    with pytest.raises(ValueError, match="end at step 8, but the model is at step 12"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[again])
    # ...and the same callback object reused across such a gap too.
    with pytest.raises(ValueError, match="every fit of the run"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[fresh])
