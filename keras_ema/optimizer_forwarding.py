"""What `EMAOptimizer` forwards to the optimizer it wraps."""

from __future__ import annotations


class InnerOptimizerForwarding:
    """Forwards the wrapped optimizer's configuration through the wrapper.

    `EMAOptimizer` applies its `inner_optimizer`'s update, so everything that
    configures that update (learning rate, clipping, weight decay and its
    exclusions, ...) must reach the inner optimizer, whichever of the two the
    user configures.
    """

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)
