"""mnist_ray: distributed training and batch scoring of a digit classifier on Ray.

Importing this package sets up how TensorFlow is imported, in every process that runs
our code (driver, Ray Train workers, Ray Data tasks): each imports this package first,
so this is the one place it is done. Nothing here imports TensorFlow (scoring never does).

* Legacy Keras (the ``tf-keras`` package), selected before TensorFlow is first imported:
  Keras 3 cannot train under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).
* TensorFlow's C++ start-up talk hidden: ``TF_CPP_MIN_LOG_LEVEL=3`` (errors included: a
  GPU that is asked for and missing is reported by our own checks), and the banner its
  libraries print while they load (oneDNN, CUDA stubs: six lines per process, seen with
  TensorFlow 2.21), which no log level reaches. Set ``TF_CPP_MIN_LOG_LEVEL`` below 3
  yourself (e.g. ``0``) to see all of it.
"""

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile

TENSORFLOW_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A lower level set by the user (inherited 3 is ours, from a parent process) shows everything.
_QUIET = os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"

__version__ = "0.1.0"


@contextlib.contextmanager
def _stderr_hidden():
    """File descriptor 2 goes to a temporary file for the duration; what it caught is shown only
    if the block raises. (Other threads' writes to stderr meanwhile are caught too.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            os.write(2, caught.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with stderr hidden."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _stderr_hidden():
            self._loader.exec_module(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as Python would, and loads it with stderr hidden."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


if _QUIET and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())
