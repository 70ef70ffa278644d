"""Scoring never imports TensorFlow: the job, its Ray actors and its report run with it unimportable.

That is what lets scoring nodes be installed without TensorFlow (``pip install .``, no
``[train]`` extra): the ``tensorflow``, ``tf_keras`` and ``tf2onnx`` found first on the
path of every process (the job's, and Ray's workers, which inherit its environment) are
stand-ins that leave a mark and refuse to import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_kaggle_csv

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow", "tf_keras", "tf2onnx", "keras")


@pytest.fixture
def without_tensorflow(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose Python cannot import TensorFlow, and the directory its attempts mark."""
    blocker, marks = tmp_path / "blocker", tmp_path / "marks"
    marks.mkdir()
    for name in BLOCKED:
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(
            "import os, pathlib\n"
            f"pathlib.Path({str(marks)!r}, f'{name}-{{os.getpid()}}').touch()\n"
            f"raise ImportError('{name} is not installed here (tests/test_scoring_without_tensorflow.py)')\n"
        )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(REPO)])
    return env, marks


def score_without_tensorflow(env: dict[str, str], tmp_path: Path, tiny_run: Path, mnist_arrays,
                             executor: str) -> subprocess.CompletedProcess:
    images, labels = mnist_arrays["x_test"][:300], mnist_arrays["y_test"][:300]
    data = write_kaggle_csv(tmp_path / "night.csv", images, labels)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "score.py"), "--model", str(tiny_run), "--input", str(data),
         "--output", str(tmp_path / "out"), "--executor", executor],
        env=env, capture_output=True, text=True, timeout=600,
    )


def check_scored_without_tensorflow(result: subprocess.CompletedProcess, marks: Path, tmp_path: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "300 rows: 300 scored, 0 rejected" in result.stdout, result.stdout[-2000:]
    assert list((tmp_path / "out" / "batches").glob("*/report.html")), result.stdout[-2000:]
    assert sorted(p.name for p in marks.iterdir()) == [], "these processes tried to import TensorFlow"


def test_the_blocker_blocks(without_tensorflow):
    env, marks = without_tensorflow
    result = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 1 and "tensorflow is not installed here" in result.stderr
    assert len(list(marks.iterdir())) == 1


def test_scoring_in_process_never_imports_tensorflow(without_tensorflow, tmp_path, tiny_run, mnist_arrays):
    env, marks = without_tensorflow
    result = score_without_tensorflow(env, tmp_path, tiny_run, mnist_arrays, "local")
    check_scored_without_tensorflow(result, marks, tmp_path)


@pytest.mark.slow
def test_scoring_on_ray_never_imports_tensorflow(without_tensorflow, tmp_path, tiny_run, mnist_arrays):
    env, marks = without_tensorflow
    result = score_without_tensorflow(env, tmp_path, tiny_run, mnist_arrays, "ray")
    check_scored_without_tensorflow(result, marks, tmp_path)
    assert '"executor": "ray"' in next((tmp_path / "out" / "batches").glob("*/summary.json")).read_text()
