"""Check a scoring output directory end to end after an incident: ``python jobs/audit.py --help``.

    python jobs/audit.py /data/scored

Exit code 0 when it holds exactly what its manifest says; 1 and one line per problem otherwise.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import audit_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(audit_main())
