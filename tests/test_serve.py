"""Online digit recognition: the API's rules, then one real service (jobs/serve.py, Ray Serve on
127.0.0.1, TensorFlow made unimportable) exercised over real HTTP and in a real Chromium, and
stopped with SIGTERM.

The service is started once for the module (Ray's start-up dominates); the SIGTERM test stops
it and therefore comes last in this file. The rules are checked on the pure functions first
(fast, many cases), then over HTTP (a few of each kind, and fuzzed bodies).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_ray.errors import EXIT_TERMINATED, InputError
from mnist_ray.serve.api import MAX_BODY_BYTES, MAX_IMAGES, RequestError, parse_predict_body

REPO = Path(__file__).resolve().parents[1]
# Debian's Chromium; $CHROMIUM names another build of it (Ubuntu's chromium-browser, say).
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A loaded 2-core machine took 40 s from the job's start to its first answer (seen here).
START_TIMEOUT_S = 240
BLOCK_TENSORFLOW = 'raise ImportError("TensorFlow is blocked here: the serve path must not import it")\n'


def body(*images) -> bytes:
    return json.dumps({"images": [np.asarray(image).tolist() for image in images]}).encode()


ZEROS = np.zeros((28, 28), np.uint8)


# --- the rules, without a server ---------------------------------------------------------------


def test_flat_and_nested_images_are_the_same_pixels(mnist_arrays):
    image = mnist_arrays["x_test"][0]
    flat = json.dumps({"images": [image.reshape(-1).tolist(), image.tolist()]}).encode()
    images = parse_predict_body(flat)
    assert images.dtype == np.uint8 and images.shape == (2, 28, 28)
    assert (images[0] == image).all() and (images[1] == image).all()


BAD_VALUES = {  # the value in image 1, pixel 100 → how the message shows it
    256: "256", -1: "-1", 7.5: "7.5", 7.0: "7.0", "7": '"7"', True: "true", None: "null", 2**70: str(2**70),
}


@pytest.mark.parametrize("value", list(BAD_VALUES), ids=[f"{v!r}" for v in BAD_VALUES])
def test_a_bad_pixel_names_the_image_pixel_and_value(value):
    bad = ZEROS.reshape(-1).tolist()
    bad[100] = value
    with pytest.raises(RequestError) as error:
        parse_predict_body(json.dumps({"images": [ZEROS.tolist(), bad]}).encode())
    assert error.value.status == 400
    assert error.value.message.startswith(f"image 1, pixel 100 (row 3, column 16): {BAD_VALUES[value]} ")


SHAPE_ERRORS = {
    b"": "not JSON", b"{": "not JSON", b"\xff\xfe\x00": "not", b"[]": "expected a JSON object",
    b'{"image": []}': "unknown key(s) 'image'", b"{}": "missing key 'images'",
    b'{"images": {}}': "must be a list", b'{"images": []}': "is empty",
    b'{"images": [7]}': "image 0: expected",
    b'{"images": [[1, 2, 3]]}': "image 0: a list of 3 values", b'{"images": [' + b"[" * 100_000 + b"]": "not",
}


@pytest.mark.parametrize("raw", list(SHAPE_ERRORS), ids=range(len(SHAPE_ERRORS)))
def test_malformed_bodies_are_400_saying_what_is_wrong(raw):
    with pytest.raises(RequestError) as error:
        parse_predict_body(raw)
    assert error.value.status == 400 and SHAPE_ERRORS[raw] in error.value.message


def test_a_short_row_is_named():
    rows = ZEROS.tolist()
    rows[5] = rows[5][:27]
    with pytest.raises(RequestError, match=r"image 0, row 5: has 27 values; expected 28"):
        parse_predict_body(json.dumps({"images": [rows]}).encode())


def test_too_many_images_or_bytes_are_413():
    with pytest.raises(RequestError) as error:
        parse_predict_body(body(*[ZEROS] * (MAX_IMAGES + 1)))
    assert error.value.status == 413 and f"at most {MAX_IMAGES}" in error.value.message
    with pytest.raises(RequestError) as error:
        parse_predict_body(b" " * (MAX_BODY_BYTES + 1))
    assert error.value.status == 413


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2000), st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=30) | st.dictionaries(st.sampled_from(["images", "x"]), inner),
    max_leaves=60).map(lambda value: json.dumps(value).encode())))
def test_any_body_is_either_images_or_a_4xx(raw):
    try:
        images = parse_predict_body(raw)
    except RequestError as error:
        assert 400 <= error.status < 500 and error.message
    else:
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28) and 1 <= len(images) <= MAX_IMAGES


def test_registry_names_without_a_champion_say_how_to_promote_one(tmp_path):
    """Served registry versions: tests/test_registry.py (test_references_resolve_to_checked_cached_files)."""
    from mnist_ray.artifacts import RunDirError
    from mnist_ray.registry.tracking import Tracking
    from mnist_ray.serve.app import resolve_model

    nowhere = Tracking(f"sqlite:///{tmp_path / 'no_store' / 'mlflow.db'}")
    for ref in ("champion", "models:/mnist-digits@champion"):
        with pytest.raises(InputError, match="promote a run first: python jobs/promote.py RUN_DIR"):
            resolve_model(ref, nowhere)
    with pytest.raises(RunDirError, match="not a run directory"):
        resolve_model(str(tmp_path))


def test_a_run_without_a_valid_onnx_model_is_refused(tiny_onnx_run, tmp_path):
    from mnist_ray import artifacts
    from mnist_ray.onnx_model import ModelFileError
    from mnist_ray.serve.app import resolve_model

    model, version = resolve_model(str(tiny_onnx_run))
    name, _, digest = version.partition("@")
    assert name == tiny_onnx_run.name and len(digest) == artifacts.MODEL_ID_CHARS
    run = tmp_path / "run"
    shutil.copytree(tiny_onnx_run, run)
    (run / artifacts.ONNX_FILE).write_bytes(model[:1000])
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        resolve_model(str(run))
    (run / artifacts.ONNX_FILE).unlink()
    with pytest.raises(artifacts.RunDirError, match="no model.onnx"):
        resolve_model(str(run))


def test_the_job_refuses_a_bad_model_before_starting_ray(tmp_path):
    result = subprocess.run([sys.executable, "jobs/serve.py", "--tracking-uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}"],  # --model champion, the default
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --model champion: no model registry at ")
    assert "promote a run first: python jobs/promote.py RUN_DIR" in result.stderr


# --- one real service for the rest of the module ---------------------------------------------------


@dataclass
class Service:
    process: subprocess.Popen
    port: int
    ray_temp_dir: str  # RAY_TMPDIR of the job: every Ray process it starts carries it
    blocker: Path
    model_name: str  # the run directory's name, the first part of the model version
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def request(self, method: str, path: str, data: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict | str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(text) if kind.startswith("application/json") else text

    def predict(self, data: bytes) -> tuple[int, dict]:
        return self.request("POST", "/predict", data)

    def log(self) -> str:
        return f"stdout: {self.stdout.read_text()[-2000:]}\nstderr: {self.stderr.read_text()[-4000:]}"


def ray_processes(temp_dir: str) -> dict[int, str]:
    """Processes (pid → command line) of the Ray whose RAY_TMPDIR is ``temp_dir``.

    Ray's daemons name the directory in their command lines; its workers rename themselves
    (``ray::ServeReplica…``, ``ray::IDLE``) but inherit RAY_TMPDIR in their environment.
    """
    found = {}
    marker = f"RAY_TMPDIR={temp_dir}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile, or not ours to read
        if temp_dir in command or marker in environ:
            found[int(proc.name)] = command
    return found


@pytest.fixture(scope="module")
def service(tiny_onnx_run, tmp_path_factory):
    from mnist_ray.local_cluster import free_port

    work = tmp_path_factory.mktemp("serve")
    blocker = work / "no_tensorflow"
    for package in ("tensorflow", "tf_keras"):
        (blocker / package).mkdir(parents=True)
        (blocker / package / "__init__.py").write_text(BLOCK_TENSORFLOW)
    temp_dir = tempfile.mkdtemp(prefix="mrs", dir="/tmp")  # short: Ray's Unix socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # SPT_NOENV: Ray's process titles may otherwise overwrite the environment block that
    # /proc/PID/environ shows (a DashboardAgent's read as NULs once in CI), and the test reads it.
    env.update({"RAY_TMPDIR": temp_dir, "PYTHONPATH": str(blocker), "RAY_USAGE_STATS_ENABLED": "0",
                "SPT_NOENV": "1"})
    port = free_port()
    out, err = work / "stdout.txt", work / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "jobs/serve.py", "--model", str(tiny_onnx_run), "--port", str(port)],
            cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    running = Service(process, port, temp_dir, blocker, tiny_onnx_run.name, out, err)
    try:
        wait_until_healthy(running)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for pid in ray_processes(temp_dir):  # only what this job started (its temp dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_until_healthy(running: Service) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            pytest.fail(f"jobs/serve.py exited with {running.process.returncode}\n{running.log()}")
        try:
            # Serve answers as soon as the replica is up; the job says so once serve.run returned.
            if running.request("GET", "/healthz")[0] == 200 and "serving model" in running.stdout.read_text():
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"jobs/serve.py did not answer /healthz within {START_TIMEOUT_S} s\n{running.log()}")


@pytest.fixture(scope="module")
def local_model(tiny_onnx_run):
    """The same model in this process (onnxruntime), to compare the service's answers with."""
    from mnist_ray.onnx_model import read_checked, session

    return session(read_checked(tiny_onnx_run / "model.onnx").data, threads=1)


@pytest.mark.slow
def test_healthz_names_the_model_and_the_job_says_where_it_serves(service):
    status, health = service.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    assert health["model_version"].startswith(f"{service.model_name}@")
    assert f"at {service.url} with 1 replica(s)" in service.stdout.read_text()


@pytest.mark.slow
def test_known_test_images_get_their_labels(service, mnist_arrays, local_model):
    from mnist_ray.onnx_model import predict

    images, labels = mnist_arrays["x_test"][:20], mnist_arrays["y_test"][:20]
    expected = predict(local_model, images, 20)
    status, answer = service.predict(body(*images))
    assert status == 200 and answer["model_version"].startswith(f"{service.model_name}@")
    found = np.array([p["probabilities"] for p in answer["predictions"]])
    assert np.abs(found - expected).max() < 1e-5
    assert [p["label"] for p in answer["predictions"]] == expected.argmax(axis=1).tolist()
    for p in answer["predictions"]:
        assert p["confidence"] == max(p["probabilities"]) and abs(sum(p["probabilities"]) - 1) < 1e-4
    # The first test image, a 7, sent alone as 784 integers: the label and a clear confidence.
    status, answer = service.predict(json.dumps({"images": [images[0].reshape(-1).tolist()]}).encode())
    assert status == 200 and answer["predictions"][0]["label"] == labels[0] == 7
    assert answer["predictions"][0]["confidence"] > 0.9


@pytest.mark.slow
def test_bad_requests_get_4xx_naming_the_problem(service):
    bad = ZEROS.tolist()
    bad[3][4] = 300
    cases = [
        (body(ZEROS, bad), 400, "image 1, pixel 88 (row 3, column 4): 300 is not an integer from 0 to 255"),
        (b'{"images": [[' + b"1.5, " * 783 + b"1.5]]}", 400, "image 0, pixel 0 (row 0, column 0): 1.5 "),
        (b'{"images": "7"}', 400, "'images' must be a list"),
        (b'{"images": [', 400, "the body is not JSON"),
        (body(*[ZEROS] * (MAX_IMAGES + 1)), 413, f"at most {MAX_IMAGES}"),
        (b" " * (MAX_BODY_BYTES + 1), 413, "larger than"),
    ]
    for data, code, message in cases:
        status, answer = service.predict(data)
        assert (status, message in answer["error"]) == (code, True), (data[:60], status, answer)
    assert service.request("GET", "/predict") == (405, {"error": "GET /predict: use POST with a JSON body"})
    assert service.request("POST", "/healthz", b"{}")[0] == 405
    assert service.request("GET", "/nothing/here")[0] == 404


@pytest.mark.slow
def test_fuzzed_bodies_get_4xx_and_never_stop_the_service(service, mnist_arrays):
    rng = random.Random(0)
    valid = body(mnist_arrays["x_test"][0])
    statuses = []
    for _ in range(150):
        kind = rng.randrange(3)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif kind == 1:  # a valid body with a few bytes changed
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:  # a valid body cut short
            data = valid[:rng.randrange(len(valid))]
        status, answer = service.predict(data)
        statuses.append(status)
        assert status < 500, (data[:80], status, answer)
    assert any(400 <= s < 500 for s in statuses)
    assert service.request("GET", "/healthz")[0] == 200
    assert service.predict(valid)[0] == 200


@pytest.mark.slow
def test_concurrent_clients_are_all_answered(service, mnist_arrays, local_model):
    from mnist_ray.onnx_model import predict

    images = mnist_arrays["x_test"][:40]
    expected = predict(local_model, images, 40).argmax(axis=1)
    results: dict[int, tuple[int, int]] = {}

    def client(first: int) -> None:
        for k in range(first, len(images), 8):
            status, answer = service.predict(body(images[k]))
            results[k] = (status, answer["predictions"][0]["label"] if status == 200 else -1)

    threads = [threading.Thread(target=client, args=(first,)) for first in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == list(range(len(images)))
    assert [results[k] for k in range(len(images))] == [(200, int(label)) for label in expected]


@pytest.mark.slow
def test_no_process_of_the_service_loads_tensorflow(service):
    processes = ray_processes(service.ray_temp_dir)
    replicas = [pid for pid, command in processes.items() if "ServeReplica" in command]
    assert replicas, f"no replica among {sorted(processes.values())}"
    for pid in [service.process.pid, *processes]:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue  # ended meanwhile (a short-lived Ray worker)
        if not environ:
            continue  # exiting: a zombie shows no environment (seen once here)
        assert "libtensorflow" not in maps, processes.get(pid, "the job")
        if environ.startswith("\0") and pid not in [service.process.pid, *replicas]:
            continue  # a process title overwrote the start of the block: the maps check stands
        # The blocker was in force there: any import of TensorFlow would have failed the service.
        assert f"PYTHONPATH={service.blocker}" in environ.split("\0"), processes.get(pid, "the job")


def strokes(image: np.ndarray, threshold: int = 128) -> list[tuple[int, int, int]]:
    """An image's ink as horizontal strokes ``(row, first column, last column)``."""
    found = []
    for y, row in enumerate(image):
        x = 0
        while x < len(row):
            if row[x] > threshold:
                start = x
                while x < len(row) and row[x] > threshold:
                    x += 1
                found.append((y, start, x - 1))
            x += 1
    return found


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium (Debian's) driven by Playwright, or a loud skip saying what is missing."""
    problem = None
    if not os.access(CHROMIUM, os.X_OK):
        problem = f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does), or set $CHROMIUM"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            problem = "the playwright package is missing: pip install -e '.[test]'"
    if problem:
        warnings.warn(f"THE SERVING PAGE IS NOT TESTED: {problem}", stacklevel=1)
        pytest.skip(f"THE SERVING PAGE IS NOT TESTED: {problem}")
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 900, "height": 620})
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.slow
def test_the_page_recognises_a_digit_drawn_in_chromium(chromium, service, mnist_arrays, tmp_path_factory):
    # Test image 18, a 3, replayed as strokes: its form changes (thicker strokes, rescaled,
    # recentred by the page), and the tiny model still reads a 3 (seen here: 86 %).
    image, label = mnist_arrays["x_test"][18], int(mnist_arrays["y_test"][18])
    page = chromium.new_page()
    page.goto(service.url)
    page.wait_for_function("document.getElementById('version').textContent.includes('@')")
    box = page.locator("#pad").bounding_box()
    cell = box["width"] / 28
    for y, first, last in strokes(image):
        page.mouse.move(box["x"] + (first + 0.5) * cell, box["y"] + (y + 0.5) * cell)
        page.mouse.down()
        page.mouse.move(box["x"] + (last + 0.5) * cell, box["y"] + (y + 0.5) * cell, steps=2)
        page.mouse.up()
    page.wait_for_function("window.digitPage.settled()", timeout=60_000)
    page.wait_for_timeout(300)  # the bars' transition, for the screenshot
    screenshot = tmp_path_factory.mktemp("page") / "serving-page.png"
    page.screenshot(path=str(screenshot))
    print(f"screenshot of the serving page: {screenshot}")
    assert page.inner_text("#status") == ""
    shown = page.inner_text("#label")
    assert shown == str(label), f"the page read {shown}; see {screenshot}"
    # What the page sent is MNIST's form of the drawing: close to the original image.
    sent = np.array(page.evaluate("Array.from(window.digitPage.pixels)"), dtype=float)
    assert sent.shape == (784,) and sent.max() == 255
    assert np.corrcoef(sent, image.reshape(-1))[0, 1] > 0.6
    seen = page.evaluate("Array.from(document.getElementById('seen').getContext('2d')"
                         ".getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))")
    assert seen == sent.astype(int).tolist()  # the small image beside the canvas is what was sent
    page.click("#clear")
    assert page.inner_text("#label") == "" and page.evaluate("window.digitPage.pixels") is None
    page.close()


@pytest.mark.slow
def test_sigterm_stops_the_service_and_its_ray(service):
    """Last in the module: it stops the module's service."""
    assert ray_processes(service.ray_temp_dir), "no Ray process found before the stop: the check is empty"
    service.process.send_signal(signal.SIGTERM)
    code = service.process.wait(timeout=90)
    assert code == EXIT_TERMINATED, service.log()
    lines = service.stderr.read_text().splitlines()
    expected = "interrupted (SIGTERM): Serve and the Ray this job started are shut down"
    assert lines[-1] == expected, service.log()
    deadline = time.monotonic() + 20  # workers notice their raylet's end within a few seconds
    while (left := ray_processes(service.ray_temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left running after the job ended: {left}"


@pytest.mark.slow
def test_on_a_running_cluster_stopping_deletes_only_the_application(ray_head, tiny_onnx_run):
    """With a cluster (RAY_ADDRESS, as under `ray job submit`), SIGTERM removes the application and
    leaves the cluster's Serve (controller, proxy) running for whatever else it serves."""
    from mnist_ray.local_cluster import free_port

    port = free_port()
    command = [sys.executable, "jobs/serve.py", "--model", str(tiny_onnx_run), "--port", str(port)]
    job = subprocess.Popen(command, cwd=REPO, env=ray_head.env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = job.stdout.readline()
        assert f"at http://127.0.0.1:{port}/ with 1 replica(s)" in line, job.stderr.read()[-3000:]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        connection.close()
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == EXIT_TERMINATED, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "interrupted (SIGTERM): the application was deleted from the cluster's Serve, which keeps running")
    alive = {actor["class_name"] for actor in ray_head.list_state("actors", "state=ALIVE")}
    assert {"ServeController", "ProxyActor"} <= alive
    assert not any("ServeReplica" in name for name in alive), alive
