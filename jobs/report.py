"""Render a run's or a scoring batch's report again from saved artifacts: ``python jobs/report.py --help``.

    python jobs/report.py runs/latest
    python jobs/report.py OUTPUT/batches/<batch_id>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import report_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(report_main())
