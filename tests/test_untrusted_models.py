"""Untrusted run directories: no model file runs code when a job loads it, and a model whose
contract is not this code's is refused before anything is scored.

Scoring reads only model.onnx (no code, but only standard operators and the contract's
signature are accepted); the Keras file is loaded only by the ONNX export of old runs, in
safe mode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mnist_ray import artifacts
from mnist_ray.cli import export_onnx_main, score_main
from tests.helpers import write_kaggle_csv


def code_carrying_run(tiny_run: Path, run_dir: Path, marker: Path) -> Path:
    """A copy of ``tiny_run`` without model.onnx, whose model.keras has a Lambda layer that
    creates ``marker`` when it runs."""
    import tf_keras as keras

    # Source text, so that the path is a constant in the lambda's bytecode (what Keras marshals).
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    inputs = keras.Input((28, 28), dtype="uint8")
    scaled = keras.layers.Lambda(payload)(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(scaled))
    shutil.copytree(tiny_run, run_dir)
    (run_dir / artifacts.ONNX_FILE).unlink()
    keras.Model(inputs, outputs).save(run_dir / artifacts.MODEL_FILE)
    marker.unlink(missing_ok=True)  # building the model ran the lambda once
    return run_dir


def test_a_keras_model_that_carries_code_is_refused_without_running_it(tiny_run, tmp_path, capsys):
    import tf_keras as keras

    marker = tmp_path / "code_ran"
    run_dir = code_carrying_run(tiny_run, tmp_path / "run", marker)
    with pytest.raises(artifacts.RunDirError, match="Lambda"):
        artifacts.load_model(run_dir)
    assert not marker.exists()
    code = export_onnx_main([str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2
    (message,) = [line for line in err.splitlines() if line.startswith("error")]
    assert "cannot be loaded" in message and "Lambda" in message, err
    assert "safe_mode" not in message  # Keras's advice names an option no job of ours has
    assert not marker.exists(), "loading the model ran the code inside it"
    assert not (run_dir / artifacts.ONNX_FILE).exists()
    # The control: the same file loaded the unsafe way does run the code, so the test can fail.
    keras.models.load_model(run_dir / artifacts.MODEL_FILE, safe_mode=False)
    assert marker.exists()


def test_scoring_a_run_without_model_onnx_says_how_to_export_it(tiny_run, tmp_path, mnist_arrays, capsys):
    run_dir = tmp_path / "old_run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / artifacts.ONNX_FILE).unlink()
    data = write_kaggle_csv(tmp_path / "x.csv", mnist_arrays["x_test"][:3])
    code = score_main(["--model", str(run_dir), "--input", str(data), "--output", str(tmp_path / "out")])
    assert code == 2
    assert f"python jobs/export_onnx.py {run_dir}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def onnx_model(*, custom_domain: bool = False, input_dtype: int = 2, shape: tuple = (28, 28)) -> bytes:
    """A small ONNX model: Cast → Flatten → MatMul → Softmax, optionally through a custom operator."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((int(np.prod(shape)), 10), np.float32), "w")
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"]),
    ]
    opsets = [helper.make_opsetid("", 17)]
    if custom_domain:
        nodes.insert(3, helper.make_node("RunShell", ["logits"], ["logits2"], domain="com.example.evil"))
        nodes[-1] = helper.make_node("Softmax", ["logits2"], ["probs"])
        opsets.append(helper.make_opsetid("com.example.evil", 1))
    graph = helper.make_graph(
        nodes, "digits",
        [helper.make_tensor_value_info("pixels", input_dtype, ["n", *shape])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 10])],
        initializer=[weights],
    )
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: onnx_model(custom_domain=True), "custom domain(s) 'com.example.evil'"),
        (lambda: onnx_model(input_dtype=1), "takes pixels float32 (n, 28, 28)"),
        (lambda: onnx_model(shape=(32, 32)), "takes pixels uint8 (n, 32, 32)"),
        (lambda: b"\x08\x07garbage", "not an ONNX model"),
    ],
)
def test_an_onnx_file_off_the_contract_is_refused_with_exit_2(tiny_run, tmp_path, mnist_arrays, capsys,
                                                                model, message):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / artifacts.ONNX_FILE).write_bytes(model())
    data = write_kaggle_csv(tmp_path / "x.csv", mnist_arrays["x_test"][:3])
    code = score_main(["--model", str(run_dir), "--input", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("error")]
    assert message in line and str(run_dir / artifacts.ONNX_FILE) in line, line
    assert not (tmp_path / "out").exists()


def test_the_checks_pass_the_projects_own_export(tiny_run):
    from mnist_ray.onnx_model import read_checked

    checked = read_checked(tiny_run / artifacts.ONNX_FILE)
    assert checked.sha256 == artifacts.read_json(tiny_run / artifacts.METADATA_FILE)["onnx"]["sha256"]


@pytest.mark.parametrize("edit", ["missing", "other shape", "not a dict", "other labels", "not an object"])
def test_a_run_without_this_input_contract_is_refused(tiny_run, tmp_path, edit):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    metadata = json.loads((run_dir / artifacts.METADATA_FILE).read_text())
    if edit == "missing":
        del metadata["input_contract"]
    elif edit == "other shape":
        metadata["input_contract"]["input"]["shape"] = [32, 32, 3]
    elif edit == "not a dict":
        metadata["input_contract"] = "28x28"
    elif edit == "other labels":
        metadata["class_labels"] = ["zero", "one"]
    else:
        metadata = [metadata]
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    expected = {"other labels": "class_labels", "not an object": "not an object"}.get(edit, "input contract")
    with pytest.raises(artifacts.RunDirError, match=expected) as info:
        artifacts.check_scoring_run(run_dir)
    assert str(run_dir) in str(info.value)
    if expected == "input contract":
        assert "retrain" in str(info.value)
