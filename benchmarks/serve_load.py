"""Serving load: jobs/serve.py (Ray Serve) against a plain single-process server, on 127.0.0.1.

    python benchmarks/serve_load.py --model runs/latest [--requests 400] [--clients 1 8 32]

Both servers run the same model with onnxruntime (1 thread) and the same request rules
(mnist_ray.serve.api); the plain one is Starlette + uvicorn in one process, no batching. For
each server and each number of concurrent clients (Python threads in this process), it sends
``--requests`` single-image ``POST /predict`` requests (a new connection per request, as the
issue's measurement did; ``--keep-alive`` reuses one per client) and reports requests/s and
p50/p99 latency, with the errors (any answer but 200). Then it measures:

* the time from starting ``jobs/serve.py`` to its first answered request (Ray's start included);
* the CPU time per request of each process (from ``/proc/<pid>/stat``, over each load phase):
  the ingress (HAProxy, the job's default, and its manager actor; Serve's Python proxy actor),
  the replica(s), the controller, the job's driver, Ray's raylet, GCS and the rest, this
  process (the clients), and the plain server (``--python-proxy-too`` also measures the job
  with Serve's Python proxy as the ingress, as before HAProxy was its default);
* a fuzz phase: ``--fuzz`` malformed bodies (random bytes, valid bodies with bytes changed or cut
  short, wrong types, out-of-range pixels, too many images, deep nesting) that must each get a
  4xx, after which the service must still answer a valid request.

It stops by itself, stops both servers (jobs/serve.py with SIGTERM, as Kubernetes would), prints
tables and writes JSON to benchmarks/results/serve_load.json. It asserts nothing; ``--tiny``
runs every phase in a few seconds (tests/test_benchmarks.py), too short to mean anything.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import describe, machine, write_results  # noqa: E402

from mnist_ray.data.sources import BUNDLED_MNIST  # noqa: E402
from mnist_ray.local_cluster import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 300
WARM_UP_REQUESTS = 20
PLAIN = "plain Starlette + uvicorn"
SERVE = "jobs/serve.py (Ray Serve)"
SERVE_PYTHON_PROXY = "jobs/serve.py, Python proxy"
# A Ray process's role from its command line (workers retitle themselves ray::<actor class>).
ROLES = (("ray::ServeReplica", "replica"), ("bin/haproxy", "haproxy"), ("ray::HAProxyMan", "haproxy manager"),
         ("ray::ProxyActor", "proxy"), ("ray::ServeController", "controller"), ("jobs/serve.py", "driver"),
         ("/raylet", "raylet"), ("/gcs_server", "gcs"))
PLAIN_SERVER = """
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from mnist_ray.onnx_model import predict, read_checked, session
from mnist_ray.serve.api import RequestError, error_body, parse_predict_body, predictions
model, port = read_checked(sys.argv[1]), int(sys.argv[2])
onnx = session(model.data, threads=1)
async def answer(request):
    try:
        images = parse_predict_body(await request.body())
    except RequestError as exc:
        return Response(error_body(exc.message), exc.status, media_type="application/json")
    body = json.dumps(predictions(predict(onnx, images, 1024), "plain")).encode()
    return Response(body, media_type="application/json")
app = Starlette(routes=[Route("/predict", answer, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/latest", help="a run directory with model.onnx")
    parser.add_argument("--requests", type=int, default=400, help="requests per load phase (default: 400)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--fuzz", type=int, default=300, help="malformed bodies in the fuzz phase")
    parser.add_argument("--keep-alive", action="store_true", help="one connection per client, reused")
    parser.add_argument("--python-proxy-too", action="store_true",
                        help="also measure jobs/serve.py with Serve's Python proxy as its ingress "
                        "(RAY_SERVE_ENABLE_HA_PROXY=0), as before HAProxy was its default")
    parser.add_argument("--tiny", action="store_true", help="a few seconds per phase: checks the benchmark")
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/serve_load.json")
    args = parser.parse_args()
    if args.tiny:
        args.requests, args.fuzz = 48, 30
    model = Path(args.model).resolve()
    info = machine()
    print(describe(info), flush=True)
    with np.load(BUNDLED_MNIST) as npz:
        images = npz["x_test"][:100]
    bodies = [json.dumps({"images": [image.tolist()]}).encode() for image in images]

    plain = start_plain(model)
    try:
        phases = [load_phase(PLAIN, plain.port, bodies, clients, args, {PLAIN: [plain.process.pid]})
                  for clients in args.clients]
    finally:
        plain.process.terminate()
        plain.process.wait(timeout=30)
    services = {SERVE: {}} | ({SERVE_PYTHON_PROXY: {"RAY_SERVE_ENABLE_HA_PROXY": "0"}}
                              if args.python_proxy_too else {})
    runs, fuzz = {}, None
    for name, env in services.items():
        serve = start_serve(model, env)
        try:
            print(f"{name}: first answer {serve.first_answer_s:.1f} s after the job started", flush=True)
            for clients in args.clients:
                phases.append(load_phase(name, serve.port, bodies, clients, args, ray_roles(serve.temp_dir)))
            fuzz = fuzz or fuzz_phase(serve.port, bodies[0], args.fuzz)
        finally:
            stop_s = serve.stop()
        runs[name] = {"start_to_first_answer_s": serve.first_answer_s, "sigterm_to_exit_s": stop_s,
                      "exit_code": serve.process.returncode}
    print_tables(phases, fuzz, args)
    payload = {"machine": info, "model": str(model), "requests_per_phase": args.requests,
               "keep_alive": args.keep_alive, "tiny": args.tiny, **runs[SERVE], "services": runs,
               "phases": phases, "fuzz": fuzz}
    print(f"results: {write_results('serve_load', payload, args.json)}")
    return 0


class Server:
    def __init__(self, process: subprocess.Popen, port: int, temp_dir: str = "") -> None:
        self.process, self.port, self.temp_dir = process, port, temp_dir
        self.first_answer_s = 0.0

    def stop(self) -> float:
        """SIGTERM, as Kubernetes stops a pod; the seconds until the job exited."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return time.monotonic() - start


def start_plain(model: Path) -> Server:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(model / "model.onnx"), str(port)],
                               cwd=REPO, start_new_session=True)
    server = Server(process, port)
    server.first_answer_s = wait_for_answer(server)
    return server


def start_serve(model: Path, extra_env: dict[str, str]) -> Server:
    port, temp_dir = free_port(), tempfile.mkdtemp(prefix="mrb", dir="/tmp")
    # Its own Ray temp dir: every process of that Ray carries it (environment or command line).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_TMPDIR": temp_dir}
    env |= extra_env
    process = subprocess.Popen([sys.executable, "jobs/serve.py", "--model", str(model), "--port", str(port)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    server = Server(process, port, temp_dir)
    server.first_answer_s = wait_for_answer(server)
    return server


def wait_for_answer(server: Server) -> float:
    """Seconds from the server's start until it first answered a valid request with 200."""
    start, body = time.monotonic(), json.dumps({"images": [[0] * 784]}).encode()
    while time.monotonic() - start < START_TIMEOUT_S:
        if server.process.poll() is not None:
            raise SystemExit(f"the server exited with {server.process.returncode} before answering")
        try:
            if post(http.client.HTTPConnection("127.0.0.1", server.port, timeout=5), body)[0] == 200:
                return time.monotonic() - start
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"no answer within {START_TIMEOUT_S} s")


def post(connection: http.client.HTTPConnection, body: bytes, close: bool = True) -> tuple[int, bytes]:
    try:
        connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        if close:
            connection.close()


def load_phase(server: str, port: int, bodies: list[bytes], clients: int, args: argparse.Namespace,
               roles: dict[str, list[int]]) -> dict:
    """``args.requests`` requests from ``clients`` threads; throughput, latency and CPU per request."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock, next_request = threading.Lock(), iter(range(args.requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60) if args.keep_alive else None
        for k in next_request:  # an iterator shared by the threads: each request is sent once
            start = time.perf_counter()
            try:
                status, _ = post(connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60),
                                 bodies[k % len(bodies)], close=not args.keep_alive)
            except OSError:
                status = 0  # no answer at all
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1

    roles = {**roles, "clients (this process)": [os.getpid()]}
    for k in range(WARM_UP_REQUESTS):  # first requests of a phase set up connections, caches, pools
        post(http.client.HTTPConnection("127.0.0.1", port, timeout=60), bodies[k % len(bodies)])
    before, start = cpu_seconds(roles), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = cpu_seconds(roles)
    ms = np.array(latencies) * 1000
    phase = {"server": server, "clients": clients, "requests": len(latencies), "seconds": wall,
             "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
             "p99_ms": float(np.percentile(ms, 99)),
             "errors": sum(n for s, n in statuses.items() if s != 200),
             "statuses": {str(s): n for s, n in sorted(statuses.items())},
             "cpu_ms_per_request": {role: 1000 * cpu_between(before[role], after[role]) / len(latencies)
                                    for role in roles}}
    print(f"{server:<28} {clients:>3} clients: {phase['requests_per_s']:7.0f} req/s  "
          f"p50 {phase['p50_ms']:7.1f} ms  p99 {phase['p99_ms']:7.1f} ms  errors {phase['errors']}",
          flush=True)
    return phase


def ray_roles(temp_dir: str) -> dict[str, list[int]]:
    """The processes of the Ray whose RAY_TMPDIR is ``temp_dir``, by role."""
    roles: dict[str, list[int]] = {}
    marker = f"RAY_TMPDIR={temp_dir}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = next((name for key, name in ROLES if key in command), "other Ray processes")
        roles.setdefault(role, []).append(int(proc.name))
    return roles


def cpu_seconds(roles: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """User + system CPU seconds so far of each role's processes (those still running), by pid."""
    found: dict[str, dict[int, float]] = {}
    for role, pids in roles.items():
        found[role] = {}
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            found[role][pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (stat's 14, 15)
    return found


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds of the processes that ran through the whole phase: HAProxy replaces its process
    when its configuration changes, and a process gone by the end would count negative."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def fuzz_bodies(valid: bytes, count: int) -> list[bytes]:
    """Malformed requests, seeded: each one is a 4xx by the API's rules."""
    rng, ok = random.Random(0), json.loads(valid)["images"][0]
    fixed = [b"", b"{", b"[]", b"null", b'{"images": 7}', b'{"images": []}', b'{"images": [[1, 2]]}',
             *(json.dumps({"images": [ok[:-1] + [bad]]}).encode() for bad in (256, -1, 1.5, "7", True, None)),
             json.dumps({"images": [ok] * 257}).encode(),
             b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b'{"images": [[' + b"9" * 5000 + b"]]}"]
    found = fixed[:count]
    while len(found) < count:
        kind = rng.randrange(3)
        if kind == 0:
            found.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        elif kind == 1:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.choice(b'{}[],:"-.e0x\xff')
            if bytes(data) != valid:
                found.append(bytes(data))
        else:
            found.append(valid[:rng.randrange(1, len(valid) - 1)])
    return found


def fuzz_phase(port: int, valid: bytes, count: int) -> dict:
    """Send malformed bodies one at a time; count the answers; check the service still answers."""
    statuses: dict[int, int] = {}
    for data in fuzz_bodies(valid, count):
        try:
            status = post(http.client.HTTPConnection("127.0.0.1", port, timeout=60), data)[0]
        except OSError:
            status = 0
        statuses[status] = statuses.get(status, 0) + 1
    alive = post(http.client.HTTPConnection("127.0.0.1", port, timeout=60), valid)[0] == 200
    result = {"bodies": count, "statuses": {str(s): n for s, n in sorted(statuses.items())},
              "not_4xx": sum(n for s, n in statuses.items() if not 400 <= s < 500), "still_answers": alive}
    print(f"fuzz: {count} malformed bodies → {result['statuses']}; not 4xx: {result['not_4xx']}; "
          f"valid request answered afterwards: {alive}", flush=True)
    return result


def print_tables(phases: list[dict], fuzz: dict, args: argparse.Namespace) -> None:
    print()
    print(f"{'server':<28} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}   "
          "CPU ms per request")
    for p in phases:
        cpu = ", ".join(f"{role} {ms:.2f}" for role, ms in p["cpu_ms_per_request"].items())
        print(f"{p['server']:<28} {p['clients']:>7} {p['requests_per_s']:>7.0f} {p['p50_ms']:>7.1f} "
              f"{p['p99_ms']:>7.1f} {p['errors']:>6}   {cpu}")
    by = {(p["server"], p["clients"]): p for p in phases}
    if all((s, c) in by for s in (PLAIN, SERVE) for c in (8, 32)):
        serve8, serve32, plain8 = by[SERVE, 8], by[SERVE, 32], by[PLAIN, 8]
        print(f"\nSERVE at 32 clients: {serve32['requests_per_s'] / serve8['requests_per_s']:.2f}× its "
              f"throughput at 8 (target ≥ 1), p99 {serve32['p99_ms']:.0f} ms (target ≤ 200)")
        ratio = serve8["requests_per_s"] / plain8["requests_per_s"]
        print(f"SERVE at 8 clients: {ratio:.2f}× the plain server's throughput (target ≥ 0.3), "
              f"p99 {serve8['p99_ms']:.0f} ms (target ≤ 50)")
        hops = serve8["cpu_ms_per_request"]
        per_request = sum(ms for role, ms in hops.items() if role != "clients (this process)")
        # The ingress is HAProxy when the job enabled it (its default), else Serve's Python proxy.
        ingress = "haproxy" if "haproxy" in hops else "proxy"
        front, replica = hops.get(ingress, 0.0), hops.get("replica", 0.0)
        plain_cpu = plain8["cpu_ms_per_request"][PLAIN]
        print(f"CPU per request through Serve at 8 clients: {per_request:.2f} ms ({ingress} {front:.2f}, "
              f"replica {replica:.2f}); the plain server: {plain_cpu:.2f} ms. A node of C cores serves at "
              f"most C / {per_request:.2f} ms requests/s, and one replica at most 1 / {replica:.2f} ms "
              "(its event loop is one thread).")
    print(f"fuzz: {fuzz['not_4xx']} of {fuzz['bodies']} malformed bodies got something else than a 4xx")
    if args.tiny:
        print("(--tiny: too few requests for the figures to mean anything)")


if __name__ == "__main__":
    sys.exit(main())
