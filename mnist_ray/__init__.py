"""mnist_ray: distributed training and batch scoring of a digit classifier on Ray.

Importing this package selects legacy Keras (the ``tf-keras`` package) for
TensorFlow. It must happen before TensorFlow is first imported: Keras 3 cannot
train under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585). Every
process that runs our code (driver, Ray Train workers, Ray Data tasks) imports
this package first, so this is the one place the switch is made.
"""

import os

LEGACY_KERAS_ENV = {"TF_USE_LEGACY_KERAS": "1"}
os.environ.update(LEGACY_KERAS_ENV)
# Hides TensorFlow's C++ notices (CPU features); absl's start-up lines still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
