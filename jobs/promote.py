"""Promote a training run's model to champion through the gate: ``python jobs/promote.py --help``.

``python jobs/promote.py runs/20261122-101500`` evaluates the run and the current champion on
the same gate set and moves the alias ``champion`` only if the run is not less accurate;
``--rollback`` restores the previous champion. Exit codes: 0 promoted, 3 refused, 2 bad input.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is not installed, only
# uploaded: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import promote_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(promote_main())
