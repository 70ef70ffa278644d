"""Serve a trained model over HTTP with Ray Serve until stopped: ``python jobs/serve.py --help``.

Runs the same on one machine (Ray starts locally) and against a cluster (``--address``);
for a cluster's own Serve, see cluster/serve.yaml and cluster/kuberay/rayservice-serve.yaml.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is not installed, only
# uploaded: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import serve_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(serve_main())
