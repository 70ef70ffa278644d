"""The model lifecycle on a real MLflow over a real SQLite store: tracking, versions, the gate, scoring
by alias, and the MLflow UI in a real Chromium.

Every test that changes the registry works on its own copy of one empty store (its migrations
run once per session: tests/conftest.py). The models are real: the tiny MLP of tests/conftest.py,
trained on more or fewer images to be better or worse, exported to ONNX as training exports it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mnist_ray import artifacts
from mnist_ray.cli import promote_main, score_main
from mnist_ray.config import DataConfig, RunSettings, TrainConfig
from mnist_ray.errors import InputError
from mnist_ray.registry import gate, tracking, versions
from mnist_ray.registry.tracking import Tracking
from tests.helpers import score, write_kaggle_csv

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Training images and epochs of the three runs: more of both, a better model (seen here: about
# 78 %, 90 % and 94 % on the 10,000 MNIST test images).
RUNS = {"worse": (300, 1), "good": (3000, 2), "better": (9000, 3)}


# --- fixtures ---------------------------------------------------------------------------------------


def train_run(run_dir: Path, mnist_arrays, images: int, epochs: int, *, limit: int | None = None) -> Path:
    """A finished run directory of the tiny MLP fitted on ``images`` training images for ``epochs``:
    config.json, model.keras, model.onnx (verified) and its int8 copy, metadata.json and history.json
    as a run's."""
    import tf_keras as keras

    from mnist_ray.evaluation import classification_metrics
    from mnist_ray.model import build_model, compile_model
    from mnist_ray.train.export import export_onnx
    from mnist_ray.train.quantize import write_int8_copy

    keras.utils.set_random_seed(0)
    model = compile_model(build_model("mlp", dropout=0.1), learning_rate=1e-3)
    fit = model.fit(mnist_arrays["x_train"][:images], mnist_arrays["y_train"][:images], epochs=epochs,
                    batch_size=64, verbose=0)
    run_dir.mkdir(parents=True)
    model.save(run_dir / artifacts.MODEL_FILE)
    settings = RunSettings(train=TrainConfig(model="mlp", epochs=epochs), data=DataConfig(limit=limit),
                           storage_path=str(run_dir / "ray_train"), run_name=run_dir.name)
    artifacts.write_settings(run_dir / artifacts.CONFIG_FILE, settings)
    history = [{"epoch": k + 1, "loss": fit.history["loss"][k], "accuracy": fit.history["accuracy"][k]}
               for k in range(epochs)]
    artifacts.write_history(run_dir, history)
    x, y = mnist_arrays["x_test"][:1000], mnist_arrays["y_test"][:1000]
    metrics = classification_metrics(y, model.predict(x, verbose=0).argmax(axis=1))
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, metrics)
    data = {"data": ["bundled"], "fingerprint": "sha256:test",
            "rows": {"train": images, "val": 0, "test": 1000},
            "train_class_counts": np.bincount(mnist_arrays["y_train"][:images], minlength=10).tolist()}
    metadata = artifacts.build_metadata(config=settings, data=data, metrics=metrics,
                                        best_epoch={"epoch": epochs})
    metadata["onnx"] = export_onnx(model, run_dir / artifacts.ONNX_FILE, x)
    metadata["onnx_int8"] = write_int8_copy(run_dir, x, y)
    metadata["wall_seconds"] = 12.5  # what a real run records of its wall time
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_arrays) -> dict[str, Path]:
    """The worse, good and better runs (full runs: no --limit), and ``partial``: the better model's
    copy whose settings say it was trained with --limit 2000. Read-only."""
    root = tmp_path_factory.mktemp("lifecycle_runs")
    made = {name: train_run(root / name, mnist_arrays, images, epochs)
            for name, (images, epochs) in RUNS.items()}
    partial = root / "partial"
    shutil.copytree(made["better"], partial)
    for name in (artifacts.CONFIG_FILE, artifacts.METADATA_FILE):
        payload = artifacts.read_json(partial / name)
        (payload["config"] if name == artifacts.METADATA_FILE else payload)["data"]["limit"] = 2000
        artifacts.write_json(partial / name, payload)
    made["partial"] = partial
    return made


@pytest.fixture
def store(mlflow_store_template, tmp_path) -> Tracking:
    """A fresh store of this test's own: a copy of the session's empty, migrated one."""
    path = tmp_path / "store" / "mlflow.db"
    path.parent.mkdir()
    shutil.copyfile(mlflow_store_template, path)
    return Tracking(f"sqlite:///{path}")


def promote(store: Tracking, *args: str) -> tuple[int, str, str]:
    """jobs/promote.py in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = promote_main([*args, "--tracking-uri", store.uri])
        except SystemExit as exc:  # a usage error, as argparse reports one
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def champion(store: Tracking) -> str | None:
    from mnist_ray.registry.job import current_champion

    found = current_champion(tracking.client(store), store.registered_model)
    return str(found.version) if found else None


def decisions(store: Tracking) -> list[dict]:
    return gate.read_decisions(tracking.client(store), store.registered_model)


# --- tracking and registration ------------------------------------------------------------------------


def test_a_finished_run_is_logged_and_registered_as_challenger(store, runs, capsys):
    run_dir = runs["good"]
    assert versions.register_training_run(run_dir, store) == "mnist-digits/1"
    line = capsys.readouterr().out.strip()
    assert line.startswith("tracking: MLflow run ")
    assert line.endswith("registered as mnist-digits/1 (alias challenger)"), line

    client = tracking.client(store)
    version = client.get_model_version_by_alias("mnist-digits", "challenger")
    metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
    assert version.tags["run_dir"] == str(run_dir)
    assert version.tags["data_fingerprint"] == "sha256:test"
    assert float(version.tags["test_accuracy"]) == metadata["test_metrics"]["accuracy"]
    assert float(version.tags["test_macro_f1"]) == metadata["test_metrics"]["macro_f1"]
    assert version.tags["onnx_sha256"] == metadata["onnx"]["sha256"]
    assert json.loads(version.tags["input_contract"]) == artifacts.INPUT_CONTRACT
    assert version.tags["partial"] == "false"
    assert version.source.endswith("/artifacts/model")

    run = client.get_run(version.run_id)
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.info.end_time - run.info.start_time == 12_500  # the training's span, not the logging's
    assert run.data.params["train.epochs"] == "2" and run.data.params["data.limit"] == "null"
    assert run.data.metrics["test_accuracy"] == metadata["test_metrics"]["accuracy"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.tags["git_commit"] == str(metadata["git_commit"])
    model_files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "model")}
    assert model_files == {"model.onnx", "model.int8.onnx", "model.keras", "metadata.json"}
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "metadata.json", "history.csv", "model"} <= top
    # The store's files are beside it, not in ./mlruns of wherever the job ran.
    assert Path(run.info.artifact_uri).is_relative_to(tracking.sqlite_path(store.uri).parent / "mlartifacts")

    # The same model again: the version it already is, no new one.
    assert versions.register_training_run(run_dir, store) == "mnist-digits/1"
    assert "already registered as mnist-digits/1" in capsys.readouterr().out
    assert len(client.search_model_versions("name = 'mnist-digits'")) == 1


def test_a_search_is_a_parent_run_with_a_child_run_per_trial(store, tmp_path, capsys):
    """The search hook on real Tune-shaped results (a real search is tests/test_tuning.py's)."""
    from mnist_ray.config import SearchSettings
    from mnist_ray.tune import results

    rows = [results.TrialRow("t1", 0.2, 1e-3, 0.91, 2, 2, results.RAN_ALL_EPOCHS, 30.0),
            results.TrialRow("t2", 0.5, 1e-2, 0.85, 1, 1, results.STOPPED_BY_ASHA, 12.0)]
    frame = results.leaderboard(rows)
    best = results.best_config(frame, TrainConfig(epochs=2))
    results.write_results(tmp_path, frame, best)
    histories = {"t1": pd.DataFrame({"epoch": [1, 2], "val_accuracy": [0.88, 0.91], "loss": [0.5, 0.3],
                                     "time_total_s": [15.0, 30.0]}),
                 "t2": pd.DataFrame({"epoch": [1], "val_accuracy": [0.85], "loss": [0.7],
                                     "time_total_s": [12.0]})}
    trials = [tracking.Trial(row.trial, {"dropout": row.dropout, "learning_rate": row.learning_rate},
                             histories[row.trial], row.stopped_early, failed=False) for row in rows]
    settings = SearchSettings(train=TrainConfig(epochs=2), data=DataConfig())
    tracking.log_search(tmp_path, settings, best, trials, store)
    assert "tracking: search logged as MLflow run" in capsys.readouterr().out

    client = tracking.client(store)
    experiment = client.get_experiment_by_name(tracking.TUNING_EXPERIMENT)
    found = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in found
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"t1", "t2"}
    assert parent.data.metrics["best_val_accuracy"] == 0.91 and parent.data.params["num_samples"] == "8"
    assert children["t2"].data.params == {"dropout": "0.5", "learning_rate": "0.01"}
    assert children["t2"].data.tags["stopped_early"] == results.STOPPED_BY_ASHA
    history = client.get_metric_history(children["t1"].info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.88), (2, 0.91)]
    assert "leaderboard.csv" in {f.path for f in client.list_artifacts(parent.info.run_id)}


# --- the gate -----------------------------------------------------------------------------------------------


def test_a_better_run_is_promoted_and_scoring_by_champion_uses_it(store, runs, tmp_path, mnist_arrays):
    code, out, _ = promote(store, str(runs["good"]))
    assert code == 0, out
    assert "decision 1: promoted: mnist-digits/1 is the champion (the first champion)" in out
    assert champion(store) == "1"

    code, out, _ = promote(store, str(runs["better"]))
    assert code == 0, out
    lines = out.splitlines()
    figures = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "mnist-digits/1" in figures["champion"] and "mnist-digits/2" in figures["candidate"]
    better, good = (gate_accuracy(runs[name], mnist_arrays) for name in ("better", "good"))
    assert f"{better:.2%}" in figures["candidate"] and f"{good:.2%}" in figures["champion"]
    assert f"difference {(better - good) * 100:+.2f} points" in out
    assert "McNemar's exact test: b = " in out
    assert lines[-1].startswith("decision 2: promoted: mnist-digits/2 is the champion (was mnist-digits/1)")
    assert champion(store) == "2"
    recorded = decisions(store)[-1]
    assert recorded["mcnemar_b"] + recorded["mcnemar_c"] > 0 and recorded["mcnemar_p"] < 0.05
    assert recorded["candidate_accuracy"] == pytest.approx(better)

    # The night scores with the champion, and says so in every record it leaves.
    csv = write_kaggle_csv(tmp_path / "night.csv", mnist_arrays["x_test"][:300], mnist_arrays["y_test"][:300])
    code, stdout = score("--input", str(csv), "--output", str(tmp_path / "out"), "--executor", "local",
                         "--tracking-uri", store.uri)  # --model champion is the default
    assert code == 0, stdout
    predictions = pd.read_parquet(tmp_path / "out" / "predictions")
    assert set(predictions["model_version"]) == {"mnist-digits/2"}
    assert set(predictions["model_id"]) == {artifacts.model_id(runs["better"])}
    (summary_path,) = (tmp_path / "out" / "batches").glob("*/summary.json")
    assert artifacts.read_json(summary_path)["model_version"] == "mnist-digits/2"
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "_manifest.jsonl").read_text().splitlines()]
    assert entry["model_version"] == "mnist-digits/2"
    assert "(mnist-digits/2)" in stdout and "tracking: batch logged as MLflow run" in stdout
    client = tracking.client(store)
    scoring = client.get_experiment_by_name(tracking.SCORING_EXPERIMENT).experiment_id
    (batch_run,) = client.search_runs([scoring])
    assert batch_run.data.tags["model_version"] == "mnist-digits/2"
    assert batch_run.data.metrics["scored"] == 300 and 0.8 < batch_run.data.metrics["accuracy"] <= 1


def gate_accuracy(run_dir: Path, mnist_arrays) -> float:
    from mnist_ray.onnx_model import predict, read_checked, session

    model = session(read_checked(run_dir / "model.onnx").data, threads=None)
    probs = predict(model, mnist_arrays["x_test"], 1024)
    return float((probs.argmax(axis=1) == mnist_arrays["y_test"]).mean())


def test_a_worse_run_is_refused_and_the_champion_stays(store, runs, tmp_path, mnist_arrays):
    assert promote(store, str(runs["good"]))[0] == 0
    code, out, _ = promote(store, str(runs["worse"]))
    assert code == 3, out
    last = out.splitlines()[-1]
    assert last.startswith("decision 2: refused: mnist-digits/2 is not promoted; "
                           "mnist-digits/1 stays the champion: ")
    assert last.endswith("points against the champion, beyond the tolerance of 0.00 points"), last
    assert champion(store) == "1"
    refused = decisions(store)[-1]
    assert (refused["action"], refused["champion_before"], refused["champion_after"]) == ("refused", "1", "1")
    client = tracking.client(store)
    assert client.get_model_version("mnist-digits", "2").tags["gate.decision"].startswith(
        "refused (decision 2")
    assert str(client.get_model_version_by_alias("mnist-digits", "challenger").version) == "2"

    # On a gate set of the user's own, with a tolerance wide enough, the same run passes.
    gate_csv = write_kaggle_csv(tmp_path / "gate.csv", mnist_arrays["x_test"][-500:],
                                mnist_arrays["y_test"][-500:])
    code, out, _ = promote(store, str(runs["worse"]), "--gate-data", str(gate_csv), "--tolerance", "0.5")
    assert code == 0, out
    assert "gate set: 1 CSV file(s): " in out and "(500 labelled images)" in out
    assert champion(store) == "2"


def test_a_partial_run_is_refused_unless_allowed(store, runs):
    assert promote(store, str(runs["worse"]))[0] == 0
    code, out, _ = promote(store, str(runs["partial"]))
    assert code == 3, out
    assert "trained on a subset: --limit 2000 (or --smoke-test): --allow-partial lets the gate" in out
    assert champion(store) == "1"
    assert tracking.client(store).get_model_version("mnist-digits", "2").tags["partial"] == "true"
    code, out, _ = promote(store, str(runs["partial"]), "--allow-partial")
    assert code == 0, out
    assert champion(store) == "2"


def test_force_and_rollback_are_recorded(store, runs):
    assert promote(store, str(runs["better"]))[0] == 0
    code, out, _ = promote(store, str(runs["worse"]), "--force", "--reason",
                           "the better one mislabels 7s in prod")
    assert code == 0, out
    assert "forced by" in out.splitlines()[-1] and "the better one mislabels 7s in prod" in out
    assert champion(store) == "2"
    code, out, _ = promote(store, "--rollback", "--reason", "7s were fine after all")
    assert code == 0, out
    assert out.strip() == ("decision 3: rolled back: mnist-digits/1 is the champion again "
                           "(was mnist-digits/2): 7s were fine after all")
    assert champion(store) == "1"
    recorded = decisions(store)
    assert [d["action"] for d in recorded] == ["promoted", "forced", "rolled back"]
    assert recorded[1]["reason"] == "the better one mislabels 7s in prod" and recorded[1]["user"]
    assert (recorded[2]["champion_before"], recorded[2]["champion_after"]) == ("2", "1")
    tags = tracking.client(store).get_registered_model("mnist-digits").tags
    recorded_keys = sorted(k for k in tags if k.startswith("decision."))
    assert recorded_keys == ["decision.0001", "decision.0002", "decision.0003"]
    # The first champion has none before it; the history stays as it was.
    code, _, err = promote(store, "--rollback")
    assert code == 2 and "mnist-digits/1 is the first champion on record" in err
    assert champion(store) == "1" and len(decisions(store)) == 3


def test_what_the_gate_refuses_to_look_at_exits_2(store, runs, tmp_path):
    for args, message in [
        ([str(runs["good"]), "--force"], "--force needs --reason"),
        ([], "RUN_DIR is required"),
        (["--rollback", str(runs["good"])], "--rollback takes no RUN_DIR"),
        ([str(runs["good"]), "--tolerance", "2"], "--tolerance: must be a fraction"),
    ]:
        code, _, err = promote(store, *args)
        assert code == 2 and message in err, (args, err)
    changed = tmp_path / "changed"
    shutil.copytree(runs["good"], changed)
    shutil.copyfile(runs["worse"] / "model.onnx", changed / "model.onnx")
    code, _, err = promote(store, str(changed))
    assert code == 2 and "not the" in err and "metadata.json recorded" in err
    other = tmp_path / "other_contract"
    shutil.copytree(runs["good"], other)
    metadata = artifacts.read_json(other / artifacts.METADATA_FILE)
    metadata["input_contract"]["input"]["range"] = [0, 1]
    artifacts.write_json(other / artifacts.METADATA_FILE, metadata)
    code, _, err = promote(store, str(other))
    assert code == 2 and "input contract" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("label,colour\n3,red\n")
    code, _, err = promote(store, str(runs["good"]), "--gate-data", str(bad))
    assert code == 2 and "bad.csv" in err
    assert tracking.client(store).search_model_versions("name = 'mnist-digits'") == []  # nothing registered


# --- references --------------------------------------------------------------------------------------


def test_a_store_given_as_a_bare_path_is_a_usage_error_naming_what_to_write(tmp_path, capsys, monkeypatch):
    # MLflow would take it for its file store (deprecated in MLflow 3), warning on every call.
    for env, flags in ((None, ["--tracking-uri", "none"]), ("mlruns", [])):
        if env:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        with pytest.raises(SystemExit) as info:
            promote_main([str(tmp_path), *flags])
        assert info.value.code == 2
        assert "is not a store's URI: a database (sqlite:///path/mlflow.db)" in capsys.readouterr().err


def test_scoring_with_no_champion_exits_2_saying_how_to_promote(store, tmp_path, mnist_arrays, capsys):
    csv = write_kaggle_csv(tmp_path / "night.csv", mnist_arrays["x_test"][:10])
    for uri in (store.uri, f"sqlite:///{tmp_path / 'nothing_here' / 'mlflow.db'}"):
        code = score_main(["--input", str(csv), "--output", str(tmp_path / "out"), "--tracking-uri", uri])
        assert code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: --model champion") and line.endswith(
            "promote a run first: python jobs/promote.py RUN_DIR"), line
    assert not (tmp_path / "nothing_here").exists()  # a read does not create a store
    assert not (tmp_path / "out").exists()


def test_references_resolve_to_checked_cached_files(store, runs):
    from mnist_ray.serve.app import app_builder, resolve_model

    assert promote(store, str(runs["good"]))[0] == 0
    assert versions.register_training_run(runs["better"], store) == "mnist-digits/2"
    by_alias = versions.resolve("champion", store)
    assert (by_alias.version, by_alias.registered) == ("mnist-digits/1", True)
    assert sorted(p.name for p in by_alias.path.iterdir()) == [
        "metadata.json", "model.int8.onnx", "model.onnx"]
    assert (by_alias.path / "model.onnx").read_bytes() == (runs["good"] / "model.onnx").read_bytes()
    assert versions.resolve("models:/mnist-digits@champion", store).path == by_alias.path
    assert versions.resolve("challenger", store).version == "mnist-digits/2"
    assert versions.resolve("models:/mnist-digits/2", store).version == "mnist-digits/2"
    run = versions.resolve(str(runs["good"]), store)
    assert (run.path, run.version, run.registered) == (runs["good"], str(runs["good"]), False)
    application = app_builder({"model": "champion", "tracking_uri": store.uri})  # cluster/serve.yaml's way
    assert application._bound_deployment.init_args[1].startswith("mnist-digits/1@")
    model, served = resolve_model("champion", store)
    assert served == f"mnist-digits/1@{artifacts.model_id(runs['good'])}" and model[:4] == (
        runs["good"] / "model.onnx").read_bytes()[:4]
    int8 = (runs["good"] / artifacts.ONNX_INT8_FILE).read_bytes()
    assert resolve_model("champion", store, int8=True) == (
        int8, f"mnist-digits/1 int8@{artifacts.content_id(int8)}")

    # The cache is re-used while it holds the recorded file, and fetched again when it does not.
    cached = by_alias.path / "model.onnx"
    stamp = cached.stat().st_mtime_ns
    assert versions.resolve("champion", store).path == by_alias.path and cached.stat().st_mtime_ns == stamp
    cached.write_bytes(b"tampered")
    versions.resolve("champion", store)
    assert cached.read_bytes() == (runs["good"] / "model.onnx").read_bytes()
    (by_alias.path / artifacts.ONNX_INT8_FILE).unlink()  # a cache from before versions had int8 copies
    versions.resolve("champion", store)
    assert (by_alias.path / artifacts.ONNX_INT8_FILE).read_bytes() == int8
    # A file changed in the store is refused, not scored.
    client = tracking.client(store)
    stored = Path(client.get_model_version_download_uri("mnist-digits", "1")) / "model.onnx"
    stored.write_bytes((runs["worse"] / "model.onnx").read_bytes())
    cached.write_bytes(b"tampered")
    with pytest.raises(InputError, match="the stored file was changed"):
        versions.resolve("champion", store)
    for ref, message in [("models:/mnist-digits/9", "has no version 9"), ("models:/x", "models:/NAME@ALIAS"),
                         ("models:/mnist-digits@staging", "has no alias staging")]:
        with pytest.raises(InputError, match=message):
            versions.resolve(ref, store)


def test_int8_of_a_version_registered_without_a_copy_says_so(store, runs, tmp_path):
    from mnist_ray.serve.app import resolve_model

    old = tmp_path / "registered_before_int8"
    shutil.copytree(runs["good"], old)
    (old / artifacts.ONNX_INT8_FILE).unlink()
    metadata = artifacts.read_json(old / artifacts.METADATA_FILE)
    del metadata["onnx_int8"]
    artifacts.write_json(old / artifacts.METADATA_FILE, metadata)
    assert versions.register_training_run(old, store) == "mnist-digits/1"
    message = ("--int8: mnist-digits/1 has no int8 copy (it was registered before runs had one): score or "
               "serve it without --int8, or promote a run trained since")
    with pytest.raises(InputError) as info:
        resolve_model("models:/mnist-digits/1", store, int8=True)
    assert str(info.value) == message
    resolve_model("models:/mnist-digits/1", store)  # without --int8, the version serves as before


# --- a store that cannot be reached ------------------------------------------------------------------


def test_an_unreachable_store_costs_one_warning_and_the_job_succeeds(tmp_path, runs, mnist_arrays,
                                                                     monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    csv = write_kaggle_csv(tmp_path / "night.csv", mnist_arrays["x_test"][:50], mnist_arrays["y_test"][:50])
    result = subprocess.run(
        [sys.executable, "jobs/score.py", "--model", str(runs["good"]), "--input", str(csv), "--output",
         str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{a_file}/mlflow.db"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("warning: tracking: batch "), line
    assert f"not logged to sqlite:///{a_file}/mlflow.db: " in line, line
    (batch,) = (tmp_path / "out" / "batches").iterdir()
    assert (batch / "_SUCCESS").is_file() and (batch / "report.html").is_file()
    assert set(pd.read_parquet(tmp_path / "out" / "predictions")["model_version"]) == {str(runs["good"])}

    # A server that is down: the training hook gives up after MLflow's bounded retries (none here).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # bound, never listening: connections are refused
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            down = Tracking(f"http://127.0.0.1:{closed}")
            assert versions.register_training_run(runs["good"], down) is None
    (line,) = err.getvalue().strip().splitlines()
    assert line.startswith(f"warning: tracking: run {runs['good']} not logged to http://127.0.0.1:{closed}: ")


# --- the MLflow UI -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Tracking, log: Path):
    """``mlflow server`` (what ``mlflow ui`` starts) on 127.0.0.1 over ``store``, stopped at the end."""
    mlflow = Path(sys.executable).with_name("mlflow")
    port = free_port()
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", store.uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_and_the_champion_in_chromium(store, runs, tmp_path, mnist_arrays):
    import importlib.util

    # mlflow-skinny has the `mlflow` command too, but not the UI's files nor Flask to serve them.
    if not os.access(CHROMIUM, os.X_OK) or importlib.util.find_spec("flask") is None:
        problem = f"needs Chromium at {CHROMIUM} and the full mlflow package (pip install -e '.[ui]')"
        warnings.warn(f"THE MLFLOW UI IS NOT TESTED: {problem}", stacklevel=1)
        pytest.skip(f"THE MLFLOW UI IS NOT TESTED: {problem}")
    from playwright.sync_api import sync_playwright

    assert promote(store, str(runs["good"]))[0] == 0
    csv = write_kaggle_csv(tmp_path / "night.csv", mnist_arrays["x_test"][:100], mnist_arrays["y_test"][:100])
    assert score("--input", str(csv), "--output", str(tmp_path / "out"), "--executor", "local",
                 "--tracking-uri", store.uri)[0] == 0
    client = tracking.client(store)
    training = client.get_experiment_by_name(tracking.TRAINING_EXPERIMENT).experiment_id
    screenshot = Path(tempfile.gettempdir()) / "mnist-ray-mlflow-ui.png"
    with mlflow_server(store, tmp_path / "mlflow-server.log") as url, \
            tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        try:
            page = browser.new_page()
            page.goto(f"{url}/#/experiments/{training}/runs")
            # The run's name, in the experiment's table of runs.
            page.get_by_text(runs["good"].name).first.wait_for(timeout=120_000)
            page.goto(f"{url}/#/models/mnist-digits")
            page.get_by_text("champion").first.wait_for(timeout=60_000)
            assert page.get_by_text("decision.0001").count() >= 1
            page.goto(f"{url}/#/experiments/{training}/runs")
            page.get_by_text(runs["good"].name).first.wait_for(timeout=60_000)
            page.screenshot(path=str(screenshot))
            print(f"screenshot of mlflow ui: {screenshot}")
        finally:
            browser.close()
