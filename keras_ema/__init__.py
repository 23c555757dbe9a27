"""keras_ema: the exponential moving average of model weights for Keras 3."""

from keras_ema import posthoc, schedules, stateless
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.batchnorm import recompute_batchnorm
from keras_ema.callbacks import EMACheckpoint, EMASwap
from keras_ema.export import ema_weights, export_saved_model
from keras_ema.lawa import LAWA
from keras_ema.optimizer import EMAOptimizer
from keras_ema.posthoc import PostHocEMA

__all__ = [
    "EMACheckpoint",
    "EMAOptimizer",
    "EMASwap",
    "LAWA",
    "PostHocEMA",
    "ExponentialMovingAverage",
    "ema_weights",
    "export_saved_model",
    "posthoc",
    "recompute_batchnorm",
    "schedules",
    "stateless",
]
__version__ = "0.1.0"
