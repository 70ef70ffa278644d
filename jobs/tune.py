"""Search dropout and learning rate with Ray Tune: ``python jobs/tune.py --help``.

Runs the same on one machine (Ray starts locally) and on a cluster:
``ray job submit --working-dir . -- python jobs/tune.py``.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is not installed, only
# uploaded: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import tune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(tune_main())
