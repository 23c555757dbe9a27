"""keras_ema: the exponential moving average of model weights for Keras 3."""

from keras_ema import schedules
from keras_ema.averager import ExponentialMovingAverage
from keras_ema.optimizer import EMAOptimizer

__all__ = ["EMAOptimizer", "ExponentialMovingAverage", "schedules"]
__version__ = "0.1.0"
