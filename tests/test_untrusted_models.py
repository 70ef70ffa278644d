"""Untrusted run directories: a model file must not run code when scoring loads it, and a model
whose recorded input contract is not this code's is refused before anything is scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mnist_ray import artifacts
from mnist_ray.cli import score_main
from tests.helpers import write_kaggle_csv


def code_carrying_run(tiny_run: Path, run_dir: Path, marker: Path) -> Path:
    """A copy of ``tiny_run`` whose model has a Lambda layer that creates ``marker`` when it runs."""
    import tf_keras as keras

    # Source text, so that the path is a constant in the lambda's bytecode (what Keras marshals).
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    inputs = keras.Input((28, 28), dtype="uint8")
    scaled = keras.layers.Lambda(payload)(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(scaled))
    shutil.copytree(tiny_run, run_dir)
    keras.Model(inputs, outputs).save(run_dir / artifacts.MODEL_FILE)
    marker.unlink(missing_ok=True)  # building the model ran the lambda once
    return run_dir


def test_a_model_that_carries_code_is_refused_without_running_it(
    ray_session, tiny_run, tmp_path, capsys, mnist_arrays
):
    import tf_keras as keras

    marker = tmp_path / "code_ran"
    run_dir = code_carrying_run(tiny_run, tmp_path / "run", marker)
    with pytest.raises(ValueError, match="Lambda"):
        artifacts.load_model(run_dir)
    assert not marker.exists()
    data = write_kaggle_csv(tmp_path / "x.csv", mnist_arrays["x_test"][:3])
    code = score_main(["--model", str(run_dir), "--input", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    (message,) = [line for line in err.splitlines() if line.startswith("error")]
    assert "cannot be loaded" in message and "Lambda" in message, err
    assert not marker.exists(), "loading the model ran the code inside it"
    assert not (tmp_path / "out" / "predictions").exists()
    # The control: the same file loaded the unsafe way does run the code, so the test can fail.
    keras.models.load_model(run_dir / artifacts.MODEL_FILE, safe_mode=False)
    assert marker.exists()


@pytest.mark.parametrize("edit", ["missing", "other shape", "not a dict"])
def test_a_run_without_this_input_contract_is_refused(tiny_run, tmp_path, edit):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    metadata = json.loads((run_dir / artifacts.METADATA_FILE).read_text())
    if edit == "missing":
        del metadata["input_contract"]
    elif edit == "other shape":
        metadata["input_contract"]["input"]["shape"] = [32, 32, 3]
    else:
        metadata["input_contract"] = "28x28"
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    with pytest.raises(artifacts.RunDirError, match="input contract") as info:
        artifacts.check_scoring_run(run_dir)
    assert str(run_dir) in str(info.value) and "retrain" in str(info.value)
