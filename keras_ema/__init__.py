"""keras_ema: the exponential moving average of model weights for Keras 3."""

from keras_ema import schedules
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.batchnorm import recompute_batchnorm
from keras_ema.callbacks import EMACheckpoint, EMASwap
from keras_ema.export import ema_weights, export_saved_model
from keras_ema.optimizer import EMAOptimizer

__all__ = [
    "EMACheckpoint",
    "EMAOptimizer",
    "EMASwap",
    "ExponentialMovingAverage",
    "ema_weights",
    "export_saved_model",
    "recompute_batchnorm",
    "schedules",
]
__version__ = "0.1.0"
