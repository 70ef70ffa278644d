"""Export the model of a run trained before runs had model.onnx: ``python jobs/export_onnx.py --help``.

    python jobs/export_onnx.py runs/20261122-020200

Needs TensorFlow (the training dependencies); scoring the result does not.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import export_onnx_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_onnx_main())
