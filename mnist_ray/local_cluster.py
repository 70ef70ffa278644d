"""A real Ray cluster on this machine: a head and, optionally, more nodes on 127.0.0.1.

What the tests and benchmarks run jobs against (``ray job submit``, ``--address``), and a
way to try a multi-node setup by hand. Each node is a ``ray start --block`` process in its
own session, with its own ports and temp dir, so it neither collides with another Ray on
this machine nor outlives its owner: ``stop()`` kills the whole session. Token
authentication is on, as on a real Ray 2.60 cluster. Imports nothing of this package.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


# Ports handed out by this process, never handed out twice: the OS may return the same free
# port to two bind-and-close probes in a row, and Ray refuses to start when two of its
# components are given one port (seen in CI: the node manager's and the dashboard agent's).
_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now that this process has not handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def _worker_ports() -> range:
    """100 ports for a node's workers, apart from every other node's and below Linux's default
    ephemeral range (32768-60999), where no free_port() falls."""
    while True:
        ports = range(base := random.randrange(10_000, 32_000, 100), base + 100)
        if _GIVEN.isdisjoint(ports):
            _GIVEN.update(ports)
            return ports


def _node_ports() -> list[str]:
    workers = _worker_ports()
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--min-worker-port={workers.start}",
        f"--max-worker-port={workers.stop - 1}",
    ]


def _session_members(session: int) -> list[int]:
    """Live (not zombie) processes of the session ``session``, read from /proc (Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue  # ended while read
        if int(sid) == session and state != "Z":
            members.append(int(stat.parent.name))
    return members


class LocalRayCluster:
    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        token = secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # The job driver runs `python` from the PATH of the node that starts it.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"})
        # Ray's processes find their own cluster through the state API with no address given
        # (Ray Train's PlacementGroupCleaner does), which fails while another Ray runs on this
        # machine (the test session's): name this cluster to every process it starts.
        env["RAY_ADDRESS"] = self.gcs_address
        self.env = env

    @property
    def gcs_address(self) -> str:
        """The address a driver (``ray.init``, a job's ``--address``) connects to."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for `ray job submit` and scripts that talk to this cluster."""
        return self.env | {"RAY_ADDRESS": self.dashboard_url}

    def start_head(self, timeout: float = 120) -> None:
        self._start_node(
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        )
        self._wait_for_jobs_api(timeout)

    def add_node(self, num_cpus: int | None = None) -> None:
        self._start_node(f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1",
                         num_cpus=num_cpus)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Wait until ``count`` nodes are alive (a node started by add_node takes seconds to join)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(self.list_state("nodes", "state=ALIVE")) >= count:
                    return
            except RuntimeError:
                pass  # the head's state API is still starting
            time.sleep(2)
        raise TimeoutError(f"{count} Ray nodes did not come up in {timeout}s: {self.head_log()}")

    def _start_node(self, *args: str, num_cpus: int | None = None) -> None:
        temp_dir = tempfile.mkdtemp(prefix="mr", dir="/tmp")  # short: Unix socket paths are limited
        self.temp_dirs.append(temp_dir)
        log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (lives as long as the node)
        self.processes.append(
            subprocess.Popen(
                [RAY, "start", "--block", *args, *_node_ports(), f"--num-cpus={num_cpus or self.num_cpus}",
                 f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )

    def _wait_for_jobs_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"ray head exited: {self.head_log()}")
            probe = self.cli("job", "list", "--address", self.dashboard_url)
            if probe.returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"the Ray head's job API did not come up in {timeout}s: {self.head_log()}")

    def head_log(self) -> str:
        path = Path(self.temp_dirs[0]) / "ray_start.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` as a client of this cluster (its address and token in the environment)."""
        return subprocess.run(
            [RAY, *args], env=self.client_env, capture_output=True, text=True, timeout=timeout
        )

    def list_state(self, kind: str, *filters: str) -> list[dict]:
        """Ray's state API (`ray list <kind> --detail`): e.g. ``list_state("actors", "class_name=X")``.

        Dead actors and nodes are listed too (Ray keeps them for a while), with their node ids.
        """
        args = ["list", kind, "--detail", "--format", "json", "--limit", "10000"]
        for condition in filters:
            args += ["--filter", condition]
        listing = self.cli(*args)
        if listing.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed: {listing.stderr[-2000:]}")
        # An empty listing is a sentence, not JSON.
        return json.loads(listing.stdout) if listing.stdout.lstrip().startswith("[") else []

    def submit(
        self, *entrypoint: str, working_dir: Path, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir ... -- <entrypoint>`, waiting for the job to end."""
        return self.cli("job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir),
                        "--", *entrypoint, timeout=timeout)

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index`` (in the order started: 0 is the head) whole: its ``ray start``, raylet,
        agents and every worker on it, as a machine that loses power takes them.

        Ray is told nothing: it finds out as it would on a real cluster (its health checks).
        """
        proc = self.processes[index]
        while pids := self.node_pids(index):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.poll()  # reaps ``ray start``: a zombie would still count as the node's
            time.sleep(0.1)

    def node_pids(self, index: int) -> list[int]:
        """The live processes of node ``index``. The node is its session, not its process group: the
        raylet puts each worker in a group of its own (seen with Ray 2.60 in ``ps -o pid,pgid,sid``),
        which a kill of the group would miss."""
        return _session_members(self.processes[index].pid)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        # One 10 s grace period for all nodes together, not 10 s each.
        deadline = time.monotonic() + 10
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                # Agents share the group; take down any that lingered.
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # Workers have groups of their own, in the node's session.
            for pid in _session_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
