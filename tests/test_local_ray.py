"""A Ray that a job starts for itself listens on 127.0.0.1 only, and its output is the job's lines.

The listening sockets are read from /proc (the kernel's own account), for every process of
the job's Ray while it scores: its GCS, raylet, dashboard and agents, workers and actors.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_ray.data.csv_reader import write_kaggle_csv
from tests.helpers import our_lines
from tests.test_signals import REPO, job_env, no_ray_left, processes_under, ray_tmp  # noqa: F401

pytestmark = pytest.mark.slow


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = str(fd.readlink()) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue  # the process ended meanwhile
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = local.split(":")
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            words = [bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, width, 8)]
            found.append((str(ipaddress.ip_address(b"".join(words))), int(hex_port, 16), inodes[inode]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_a_jobs_own_ray_listens_on_loopback_only(tiny_run, tmp_path, ray_tmp, mnist_arrays):  # noqa: F811
    csv = tmp_path / "night.csv"
    write_kaggle_csv(csv, mnist_arrays["x_train"][:40_000], mnist_arrays["y_train"][:40_000])
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "score.py"), "--model", str(tiny_run), "--input", str(csv),
         "--output", str(tmp_path / "out"), "--executor", "ray", "--batch-size", "64"],
        env=job_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    for line in proc.stdout:
        if "inference: Ray Data" in line:
            break
    time.sleep(3)  # the actors are up and scoring
    pids = {proc.pid} | {int(p.split(":")[0]) for p in processes_under(ray_tmp)}
    sockets = listening_sockets(pids)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert len(sockets) >= 5, sockets  # GCS, raylet, dashboard, agents, workers: Ray was up
    assert [s for s in sockets if not is_loopback(s[0])] == [], sockets
    assert no_ray_left(ray_tmp) == []


def test_a_smoke_training_prints_only_our_lines(tmp_path, ray_tmp):  # noqa: F811
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--smoke-test", "--output-dir",
         str(tmp_path / "run")],
        env=job_env(ray_tmp), capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert our_lines(result.stderr) == []
    lines = our_lines(result.stdout)
    ours = ("smoke test:", "data:", "worker ", "data path:", "epoch ", "selected epoch", "test accuracy",
            "|", "model.int8.onnx:", "run directory:", "report:", "tracking:")
    assert [line for line in lines if not line.startswith(ours)] == [], result.stdout
    assert no_ray_left(ray_tmp) == []
    # The run is in the session's MLflow store (tests/conftest.py), a version marked partial.
    (tracked,) = [line for line in lines if line.startswith("tracking:")]
    assert "(alias challenger)" in tracked, tracked
    from mnist_ray.registry.tracking import Tracking, client

    found = [v for v in client(Tracking.from_env()).search_model_versions("name = 'mnist-digits'")
             if v.tags["run_dir"] == str(tmp_path / "run")]
    assert len(found) == 1 and found[0].tags["partial"] == "true", found


def test_a_small_scoring_run_prints_only_our_lines(tiny_run, tmp_path, ray_tmp, mnist_arrays):  # noqa: F811
    csv = tmp_path / "night.csv"
    write_kaggle_csv(csv, mnist_arrays["x_test"][:500], mnist_arrays["y_test"][:500])
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "score.py"), "--model", str(tiny_run), "--input", str(csv),
         "--output", str(tmp_path / "out")],
        env=job_env(ray_tmp), capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert our_lines(result.stderr) == []
    ours = re.compile(
        r"batch |inference:|  \[1/1\]|\s+rows in|\s+\d|accuracy |[\d,]+ rows/s|report:|tracking:")
    assert [line for line in our_lines(result.stdout) if not ours.match(line)] == [], result.stdout
