"""SIGTERM (a scheduler's timeout) and SIGINT (Ctrl+C) stop every job cleanly.

Each job runs as a real process with a Ray of its own (in a temp dir of its own, so that the
test can find every process it started) and is signalled mid-work. It must print one line
saying what was interrupted and what the next run will do, exit 143 (SIGTERM) or 130
(SIGINT), leave no staging and no Ray process behind; a batch published before the signal
ends the job with the batch's own exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mnist_ray.data.csv_reader import write_kaggle_csv
from mnist_ray.score.audit import audit
from tests.helpers import our_lines

REPO = Path(__file__).resolve().parents[1]


def job_env(ray_tmp: Path) -> dict[str, str]:
    """The job's own Ray, its processes marked by their temp dir; no cluster from the environment."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}


def processes_under(ray_tmp: Path) -> list[str]:
    """Command lines of the live processes that mention ``ray_tmp`` (a Ray's GCS, raylet, agents, workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(ray_tmp) in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def no_ray_left(ray_tmp: Path, timeout: float = 30) -> list[str]:
    """What is still running of the job's Ray after ``timeout`` seconds (Ray's processes take a
    moment to exit after the driver's shutdown)."""
    deadline = time.monotonic() + timeout
    while (left := processes_under(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def interrupt_when(args: list[str], env: dict[str, str], marker: str, signum: int,
                   timeout: float = 600) -> tuple[int, str, str]:
    """Run ``args``; send ``signum`` once ``marker`` appears in its output. (code, stdout, stderr)."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    out = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        out.append(line)
        if marker in line:
            time.sleep(0.5)
            proc.send_signal(signum)
            break
        assert time.monotonic() < deadline, "".join(out)[-3000:]
    rest, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(out) + rest, err


@pytest.fixture
def ray_tmp():
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as directory:  # short: socket paths
        yield Path(directory)
        left = processes_under(Path(directory))
        for line in left:  # do not leak into the next test whatever happened
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory, mnist_arrays) -> Path:
    """60,000 rows: long enough to be signalled mid-scoring."""
    path = tmp_path_factory.mktemp("signals") / "night.csv"
    write_kaggle_csv(path, mnist_arrays["x_train"], mnist_arrays["y_train"])
    return path


def score_args(tiny_run: Path, csv: Path, output: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "score.py"), "--model", str(tiny_run), "--input", str(csv),
            "--output", str(output), "--batch-size", "64", *flags]


def check_unpublished(code: int, err: str, output: Path, expected_code: int, signame: str) -> None:
    assert code == expected_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = our_lines(err)
    assert line.startswith(f"interrupted ({signame}): batch ") and "was not published" in line, line
    assert "the next run scores these inputs" in line
    assert not list(output.glob("_staging/*")), "staging left behind"
    assert not list(output.glob("predictions/**/*.parquet"))
    assert not (output / "_manifest.jsonl").exists()
    assert audit(output) == []  # only the lock file: an output with nothing in it yet


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_scoring_in_process_stops_cleanly(tiny_run, big_csv, tmp_path, ray_tmp, signum, code):
    args = score_args(tiny_run, big_csv, tmp_path / "out", "--executor", "local")
    returned, out, err = interrupt_when(args, job_env(ray_tmp), "inference: in this process", signum)
    check_unpublished(returned, err, tmp_path / "out", code, signal.Signals(signum).name)


@pytest.mark.slow
def test_scoring_on_its_own_ray_stops_cleanly_and_leaves_no_ray_behind(tiny_run, big_csv, tmp_path, ray_tmp):
    args = score_args(tiny_run, big_csv, tmp_path / "out", "--executor", "ray")
    code, out, err = interrupt_when(args, job_env(ray_tmp), "inference: Ray Data", signal.SIGTERM)
    check_unpublished(code, err, tmp_path / "out", 143, "SIGTERM")
    assert no_ray_left(ray_tmp) == []


# Sends the job SIGTERM while it writes the report of a batch it has just published.
SIGTERM_AFTER_PUBLISHING = """
import os, signal, sys
from mnist_ray.score import job
job.write_report = lambda batch_dir: os.kill(os.getpid(), signal.SIGTERM)
from mnist_ray.cli import score_main
sys.exit(score_main(sys.argv[1:]))
"""


def test_a_job_interrupted_after_publishing_says_so_and_exits_as_its_batch(tiny_run, tmp_path, ray_tmp,
                                                                          mnist_arrays):
    csv = tmp_path / "small.csv"
    write_kaggle_csv(csv, mnist_arrays["x_test"][:50], mnist_arrays["y_test"][:50])
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_AFTER_PUBLISHING, "--model", str(tiny_run), "--input", str(csv),
         "--output", str(output), "--executor", "local"],
        env=job_env(ray_tmp) | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]  # the batch's own code: every row scored
    (line,) = our_lines(result.stderr)
    assert line.startswith("interrupted (SIGTERM), after batch ") and "was published" in line, line
    assert (output / "_manifest.jsonl").is_file()
    assert len(list(output.glob("batches/*/_SUCCESS"))) == 1
    assert audit(output) == []


@pytest.mark.slow
def test_training_stops_cleanly_and_says_how_to_resume(tmp_path, ray_tmp):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(REPO / "jobs" / "train.py"), "--limit", "600", "--epochs", "30",
            "--batch-size", "32", "--output-dir", str(run_dir)]
    code, out, err = interrupt_when(args, job_env(ray_tmp), "epoch   1/30", signal.SIGTERM)
    assert code == 143, (out + err)[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = our_lines(err)
    assert line == f"interrupted (SIGTERM): continue the run with: python jobs/train.py --resume {run_dir}"
    assert no_ray_left(ray_tmp) == []


@pytest.mark.slow
def test_a_search_stops_cleanly_and_says_how_to_resume(tmp_path, ray_tmp):
    out_dir = tmp_path / "search"
    args = [sys.executable, str(REPO / "jobs" / "tune.py"), "--limit", "600", "--epochs", "20",
            "--num-samples", "2", "--workers-per-trial", "1", "--batch-size", "32",
            "--output-dir", str(out_dir)]
    code, out, err = interrupt_when(args, job_env(ray_tmp), "started (1/2", signal.SIGTERM)
    assert code == 143, (out + err)[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = our_lines(err)
    resume = f"python jobs/tune.py --resume {out_dir}"
    assert lines[-1] == f"interrupted (SIGTERM): continue the search with: {resume}"
    assert no_ray_left(ray_tmp) == []
