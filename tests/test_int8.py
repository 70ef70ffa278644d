"""The int8 copy of a run's model (model.int8.onnx): written and measured with model.onnx, used by
scoring and serving only with --int8, and refused when it is not the file metadata.json records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from mnist_ray import artifacts, onnx_model
from mnist_ray.cli import export_onnx_main, score_main
from tests.helpers import score, write_kaggle_csv

PROBS = [f"prob_{k}" for k in range(10)]


def test_a_run_records_its_int8_copy_measured_against_the_float_model(tiny_run):
    metadata = artifacts.read_json(tiny_run / artifacts.METADATA_FILE)
    record = metadata["onnx_int8"]
    data = (tiny_run / artifacts.ONNX_INT8_FILE).read_bytes()
    assert record["sha256"] == onnx_model.check_onnx(data, "int8").sha256
    assert record["evaluated_on"] == 200 and record["calibrated_on"] == "1,000 bundled MNIST training images"
    proto = onnx.load_model_from_string(data)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in proto.graph.node}
    # The recorded accuracy is the float model's test accuracy, and the int8 copy's is close to it.
    assert record["accuracy_float"] == pytest.approx(metadata["test_metrics"]["accuracy"])
    assert abs(record["accuracy_int8"] - record["accuracy_float"]) <= 0.02
    assert record["argmax_agreement"] >= 0.95 and 0 < record["max_abs_difference"] < 0.2


def test_scoring_with_int8_uses_the_copy_and_says_what_it_costs(tiny_run, tmp_path, mnist_arrays):
    images = mnist_arrays["x_test"][:300]
    data = write_kaggle_csv(tmp_path / "digits.csv", images, mnist_arrays["y_test"][:300])
    code, stdout = score("--model", str(tiny_run), "--input", str(data), "--output", str(tmp_path / "out"),
                         "--int8", "--executor", "local")
    assert code == 0, stdout
    assert "int8: model.int8.onnx: test accuracy" in stdout
    rows = pd.read_parquet(tmp_path / "out" / "predictions").sort_values("row")
    int8 = (tiny_run / artifacts.ONNX_INT8_FILE).read_bytes()
    expected = onnx_model.predict(onnx_model.session(int8, threads=1), images, 1024)
    np.testing.assert_allclose(rows[PROBS].to_numpy(), expected, atol=1e-6)
    assert (rows["model_id"] == artifacts.content_id(int8)).all()
    assert (rows["model_id"] != artifacts.model_id(tiny_run)).all()  # another model than model.onnx
    assert (rows["model_version"] == f"{tiny_run} int8").all()
    summary = json.loads(next((tmp_path / "out" / "batches").glob("*/summary.json")).read_text())
    assert summary["model_version"] == f"{tiny_run} int8"


def test_int8_without_the_recorded_copy_exits_2_before_anything_is_written(tiny_run, tmp_path, mnist_arrays,
                                                                           capsys):
    data = write_kaggle_csv(tmp_path / "x.csv", mnist_arrays["x_test"][:3])
    missing = tmp_path / "missing"
    shutil.copytree(tiny_run, missing)
    (missing / artifacts.ONNX_INT8_FILE).unlink()
    changed = tmp_path / "changed"
    shutil.copytree(tiny_run, changed)
    shutil.copy(tiny_run / artifacts.ONNX_FILE, changed / artifacts.ONNX_INT8_FILE)  # a valid model, not it
    how = f"does not exist; write it (with model.onnx): python jobs/export_onnx.py {missing}"
    for run_dir, message in ((missing, how), (changed, "is not the file metadata.json records")):
        code = score_main(["--model", str(run_dir), "--input", str(data), "--output", str(tmp_path / "out"),
                           "--int8"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()
    # Without --int8 neither run is any different from the one it was copied from.
    code = score_main(["--model", str(missing), "--input", str(data), "--output", str(tmp_path / "out")])
    assert code == 0


def test_export_writes_model_onnx_and_its_int8_copy_into_an_old_run(tiny_run, tmp_path, capsys, mnist_arrays):
    run_dir = tmp_path / "old_run"
    shutil.copytree(tiny_run, run_dir)
    for name in (artifacts.ONNX_FILE, artifacts.ONNX_INT8_FILE):
        (run_dir / name).unlink()
    metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
    del metadata["onnx"], metadata["onnx_int8"]
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)

    assert export_onnx_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "verified on 10,000 MNIST test images" in out
    assert "model.int8.onnx: test accuracy" in out and "of 10,000 test images; score with it: --int8" in out
    metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
    images = mnist_arrays["x_test"][:100]
    exported, original = (onnx_model.predict(onnx_model.session((run / artifacts.ONNX_FILE).read_bytes(),
                                                                threads=1), images, 100)
                          for run in (run_dir, tiny_run))
    np.testing.assert_allclose(exported, original, atol=1e-5)
    assert metadata["onnx_int8"]["evaluated_on"] == 10_000
    onnx_model.read_run_model(run_dir, metadata, int8=True)  # the copy is the one recorded


def test_export_keeps_a_recorded_model_onnx_and_adds_the_int8_copy(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run_before_int8"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / artifacts.ONNX_INT8_FILE).unlink()
    metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
    del metadata["onnx_int8"]
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    model_id = artifacts.model_id(run_dir)

    assert export_onnx_main([str(run_dir)]) == 0
    assert f"model.onnx: kept, the file metadata.json records (sha256 {model_id}" in capsys.readouterr().out
    # Converting again would have made another file: the run keeps its model id (its inputs stay scored).
    assert artifacts.model_id(run_dir) == model_id
    metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
    assert metadata["onnx"] == artifacts.read_json(tiny_run / artifacts.METADATA_FILE)["onnx"]
    onnx_model.read_run_model(run_dir, metadata, int8=True)


def test_serving_with_int8_serves_the_copy(tiny_run):
    from mnist_ray.serve.app import app_builder, resolve_model

    model, version = resolve_model(str(tiny_run), int8=True)
    int8 = (tiny_run / artifacts.ONNX_INT8_FILE).read_bytes()
    assert model == int8
    assert version == f"{Path(tiny_run).name} int8@{artifacts.content_id(int8)}"
    assert resolve_model(str(tiny_run))[0] == (tiny_run / artifacts.ONNX_FILE).read_bytes()
    app_builder({"model": str(tiny_run), "int8": True})  # a Serve config may ask for it too
