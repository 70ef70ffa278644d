"""What every benchmark records beside its figures: the machine and the versions they were measured on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
RESULTS_DIR = REPO / "benchmarks" / "results"
STEAL = 7  # in /proc/stat: user nice system idle iowait irq softirq steal (guest time is in user)


def machine() -> dict:
    """Cores, memory, CPU model, load when measured, Python / Ray / TensorFlow versions, git commit."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    versions = subprocess.run(
        [sys.executable, "-c", "import ray, tensorflow; print(ray.__version__, tensorflow.__version__)"],
        capture_output=True, text=True, cwd=REPO,
    ).stdout.split()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1),
        "cpu_model": cpu_model,
        # A shared machine: the load when the run began says how much the figures can be trusted.
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "ray": versions[0] if versions else None,
        "tensorflow": versions[1] if len(versions) > 1 else None,
        "commit": commit or None,
    }


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far, in clock ticks, by kind (the first line of ``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:STEAL + 2]
    return [int(value) for value in fields]


def host_steal(before: list[int], after: list[int]) -> float:
    """The share of the machine's CPU time between two ``cpu_ticks()`` that its hypervisor gave
    to other guests (``steal``).

    A virtual machine's neighbours take whole CPUs away for moments at a time; a run that lost
    more of them than the runs it is compared with is slower for reasons that are not its own.
    """
    total = sum(after) - sum(before)
    return (after[STEAL] - before[STEAL]) / total if total else 0.0


def describe(info: dict) -> str:
    return (f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB; "
            f"load {info['load_average_1m']:.1f} at start; Python {info['python']}, Ray {info['ray']}, "
            f"TensorFlow {info['tensorflow']}; commit {info['commit']}")


def write_results(name: str, payload: dict, destination: Path | None = None) -> Path:
    """Write ``payload`` as ``benchmarks/results/<name>.json`` (or ``destination``); return the path."""
    path = destination or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def processes() -> dict[int, tuple[int, float]]:
    """Every process's (parent id, user + system CPU seconds), from /proc/<pid>/stat."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces; fields 4 (parent), 14 and 15 (CPU ticks)
            # follow its closing parenthesis.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return found


def trees(roots, found: dict[int, tuple[int, float]]) -> set[int]:
    """``roots`` and all their descendants among ``found`` (:func:`processes`)."""
    tree, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in found.items() if parent in frontier} - tree
        tree |= frontier
    return tree
