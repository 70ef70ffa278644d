"""How the learning rate moves during a run, and when a run ends early (``--schedule``)."""

from __future__ import annotations

import math

import tf_keras as keras

from mnist_ray.config import TrainConfig


def schedule_callbacks(config: TrainConfig, steps_per_epoch: int) -> list[keras.callbacks.Callback]:
    """How the learning rate moves and when training ends (``config.schedule``)."""
    if config.schedule == "onecycle":
        return [OneCycle(config.learning_rate, config.epochs * steps_per_epoch, steps_per_epoch)]
    return [
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=config.reduce_lr_patience, min_lr=1e-5
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience),
    ]


class OneCycle(keras.callbacks.Callback):
    """One-cycle learning rate, set before every step: from peak/25 up to ``peak`` over the first
    quarter of the run, then down along a cosine to ~0 (Smith & Topin, "Super-convergence").

    Measured here (Deotte's CNN, plain tf-keras, batch 128, 54,000 images): 99.64% test accuracy
    after 15 epochs and 99.65% after 20, against the 35-45 epochs of his 0.95^epoch decay. A
    callback rather than a LearningRateSchedule object: the saved model then holds a plain
    learning rate and loads without this package; a resumed run picks up at its step.
    """

    WARM_UP = 0.25

    def __init__(self, peak: float, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.peak, self.total_steps, self.steps_per_epoch = peak, max(1, total_steps), steps_per_epoch
        self.epoch = 0

    def rate(self, step: int) -> float:
        warm = self.WARM_UP * self.total_steps
        if step < warm:
            return self.peak / 25 + (self.peak - self.peak / 25) * step / warm
        progress = min(1.0, (step - warm) / max(1.0, self.total_steps - warm))
        return self.peak * 0.5 * (1 + math.cos(math.pi * progress)) + 1e-6

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        keras.backend.set_value(self.model.optimizer.learning_rate,
                                self.rate(self.epoch * self.steps_per_epoch + batch))
