"""BatchNorm statistics: averaged with the weights, or recomputed for them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ema

DECAY = 0.8


def dense_bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="dense"),
            keras.layers.BatchNormalization(momentum=0.9, name="bn"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )


def make_data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, (x[:, :1] * 2 + 0.5).astype("float32")


class RecordStatistics(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.means, self.variances = [], []

    def on_train_batch_end(self, batch, logs=None):
        bn = self.model.get_layer("bn")
        self.means.append(bn.moving_mean.numpy().copy())
        self.variances.append(bn.moving_variance.numpy().copy())


def reference_average(initial, trajectory):
    shadow = np.asarray(initial, np.float64)
    for value in trajectory:
        shadow = shadow - (1 - DECAY) * (shadow - value)
    return shadow


@pytest.mark.parametrize("jit_compile", [False, True])
def test_non_trainable_average(jit_compile):
    model = dense_bn_model()
    bn = model.get_layer("bn")
    mean0, var0 = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(1e-2), decay=DECAY, non_trainable="average"
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    record = RecordStatistics()
    model.fit(
        *make_data(),
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[record, keras_ema.EMASwap(on_train_end="raw")],
    )
    averager = optimizer.non_trainable_averager
    assert int(averager.step.numpy()) == 16
    expected_mean = reference_average(mean0, record.means)
    expected_var = reference_average(var0, record.variances)
    np.testing.assert_allclose(
        averager.average(bn.moving_mean).numpy(), expected_mean, atol=1e-6
    )
    np.testing.assert_allclose(
        averager.average(bn.moving_variance).numpy(), expected_var, atol=1e-6
    )
    live_mean = bn.moving_mean.numpy().copy()
    np.testing.assert_array_equal(live_mean, record.means[-1])
    with keras_ema.ema_weights(model):
        np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, atol=1e-6)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), live_mean)


def test_non_trainable_live_leaves_statistics_alone():
    model = dense_bn_model()
    optimizer = keras_ema.EMAOptimizer(keras.optimizers.Adam(1e-2), decay=DECAY)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(*make_data(), batch_size=8, epochs=1, verbose=0)
    bn = model.get_layer("bn")
    live = bn.moving_mean.numpy().copy()
    with keras_ema.ema_weights(model):
        np.testing.assert_array_equal(bn.moving_mean.numpy(), live)
    assert optimizer.non_trainable_averager is None


def test_non_trainable_average_save_load_and_export(tmp_path):
    model = dense_bn_model()
    optimizer = keras_ema.EMAOptimizer(
        keras.optimizers.Adam(1e-2), decay=DECAY, non_trainable="average"
    )
    model.compile(optimizer=optimizer, loss="mse")
    x, y = make_data()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[keras_ema.EMASwap(on_train_end="raw")],
    )
    bn = model.get_layer("bn")
    averaged_mean = optimizer.non_trainable_averager.average(bn.moving_mean).numpy()
    model.save(tmp_path / "bn.keras")
    loaded = keras.models.load_model(tmp_path / "bn.keras")
    with keras_ema.ema_weights(loaded):
        np.testing.assert_array_equal(
            loaded.get_layer("bn").moving_mean.numpy(), averaged_mean
        )
        expected = loaded.predict(x, verbose=0)
    keras_ema.export_saved_model(model, tmp_path / "export")
    served = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(served.serve(x).numpy(), expected, atol=1e-6)


def test_training_without_tracking_is_a_clear_error():
    model = dense_bn_model()
    model.compile(
        optimizer=keras_ema.EMAOptimizer(
            keras.optimizers.SGD(0.1), non_trainable="average"
        ),
        loss="mse",
    )
    if keras.backend.backend() == "jax":
        # Keras's JAX fit builds the optimizer before tracing its step: the
        # average is handed the non-trainable variables then.
        model.fit(*make_data(), batch_size=8, epochs=1, verbose=0)
        assert model.optimizer.non_trainable_averager.built
        return
    with pytest.raises(ValueError, match="track_non_trainable"):
        model.fit(*make_data(), batch_size=8, epochs=1, verbose=0)
    # The failed attempt broke nothing: with EMASwap it trains.
    model.fit(
        *make_data(),
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[keras_ema.EMASwap()],
    )


def test_recompute_batchnorm_is_the_cumulative_average_of_batch_statistics():
    model = dense_bn_model()
    x, _ = make_data(n=40)
    bn = model.get_layer("bn")
    momentum = bn.momentum
    used = keras_ema.recompute_batchnorm(model, x, batch_size=8, steps=4)
    assert used == 4
    dense = model.get_layer("dense")
    kernel, bias = (v.numpy().astype(np.float64) for v in dense.weights)
    batches = [x[i : i + 8].astype(np.float64) @ kernel + bias for i in range(0, 32, 8)]
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0), atol=1e-5
    )
    np.testing.assert_allclose(
        bn.moving_variance.numpy(),
        np.mean([b.var(0) for b in batches], 0),
        rtol=1e-4,
    )
    assert bn.momentum == momentum


def test_recompute_batchnorm_accepts_datasets_of_pairs():
    model = dense_bn_model()
    x, y = make_data(n=16)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    assert keras_ema.recompute_batchnorm(model, dataset) == 2


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"model": "model"}, TypeError, "model"),
        ({"data": 3}, TypeError, "data"),
        ({"data": "abc"}, TypeError, "data"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 1.5}, ValueError, "steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"data": np.zeros((0, 6), "float32")}, ValueError, "no batch"),
    ],
)
def test_recompute_batchnorm_bad_inputs(kwargs, error, match):
    model = dense_bn_model()
    arguments = {"model": model, "data": make_data()[0], **kwargs}
    with pytest.raises(error, match=match):
        keras_ema.recompute_batchnorm(**arguments)


def test_recompute_batchnorm_without_batchnorm():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="BatchNormalization"):
        keras_ema.recompute_batchnorm(model, make_data()[0])


def test_bad_non_trainable_mode():
    with pytest.raises(ValueError, match="non_trainable"):
        keras_ema.EMAOptimizer(keras.optimizers.SGD(), non_trainable="frozen")
    with pytest.raises(ValueError, match="track_non_trainable"):
        keras_ema.EMAOptimizer(keras.optimizers.SGD()).track_non_trainable([])


def test_recomputed_statistics_on_a_real_conv_net():
    """scikit-learn's handwritten digits, a small conv net with BatchNorm,
    trained with an average: evaluated on held-out digits, the averaged
    weights with recomputed statistics are at least as accurate as with the
    live statistics of the raw weights."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int32")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    train, test = order[:1400], order[1400:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(32, 3, strides=2, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras_ema.EMAOptimizer(keras.optimizers.Adam(3e-3), decay=0.99),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images[train], labels[train], batch_size=32, epochs=4, verbose=0)
    with keras_ema.ema_weights(model):
        live = model.evaluate(images[test], labels[test], verbose=0, return_dict=True)
        keras_ema.recompute_batchnorm(model, images[train], batch_size=64)
        recomputed = model.evaluate(
            images[test], labels[test], verbose=0, return_dict=True
        )
    print(
        f"averaged weights, live statistics {live['accuracy']:.4f}, "
        f"recomputed {recomputed['accuracy']:.4f}"
    )
    assert recomputed["accuracy"] >= live["accuracy"]
    assert recomputed["accuracy"] > 0.8
