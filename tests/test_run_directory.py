"""The run directory loader against any JSON, the way the CSV reader is fuzzed: a run whose
metadata.json or config.json holds anything at all is either usable or refused with one
``InputError`` (exit code 2) naming the file, never another exception.

And the paths a user names for output: one line, exit code 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_ray import artifacts
from mnist_ray.cli import score_main, train_main
from mnist_ray.config import DataConfig, RunSettings, SettingsError, TrainConfig, to_json
from mnist_ray.errors import InputError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def edits(document: dict) -> st.SearchStrategy:
    """A document with keys dropped, keys added and values replaced, at any depth of its objects."""

    @st.composite
    def edited(draw) -> object:
        def walk(value: object) -> object:
            if not isinstance(value, dict):
                return draw(JSON) if draw(st.integers(0, 9)) == 0 else value
            out = {}
            for key, item in value.items():
                if draw(st.integers(0, 9)) == 0:
                    continue  # dropped
                out[key] = walk(item)
            for _ in range(draw(st.integers(0, 1))):
                out[draw(st.text(max_size=6))] = draw(JSON)  # added
            return out

        return draw(JSON) if draw(st.integers(0, 19)) == 0 else walk(document)

    return edited()


@pytest.fixture(scope="module")
def metadata(tiny_run) -> dict:
    return json.loads((tiny_run / artifacts.METADATA_FILE).read_text())


@FUZZ
@given(data=st.data())
def test_any_metadata_is_usable_or_refused_by_name(tiny_run, tmp_path_factory, metadata, data):
    run_dir = tmp_path_factory.mktemp("run")
    for name in (artifacts.ONNX_FILE, artifacts.CONFIG_FILE):
        shutil.copy(tiny_run / name, run_dir / name)
    document = data.draw(edits(metadata))
    (run_dir / artifacts.METADATA_FILE).write_text(json.dumps(document))
    try:
        checked = artifacts.check_scoring_run(run_dir)
    except InputError as exc:
        assert str(run_dir) in str(exc) and "\n" not in str(exc)
        return
    assert isinstance(checked, dict) and checked["input_contract"] == artifacts.INPUT_CONTRACT


@FUZZ
@given(data=st.data())
def test_any_config_is_read_or_refused_by_name(tmp_path_factory, data):
    run = RunSettings(train=TrainConfig(), data=DataConfig(), storage_path="/s", run_name="r")
    settings_json = to_json(run)
    path = tmp_path_factory.mktemp("cfg") / artifacts.CONFIG_FILE
    path.write_text(json.dumps(data.draw(edits(settings_json))))
    try:
        artifacts.read_settings(path, RunSettings)
    except SettingsError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


def test_unreadable_metadata_is_refused(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / artifacts.METADATA_FILE).write_text("{not json")
    with pytest.raises(artifacts.RunDirError, match="not readable JSON"):
        artifacts.check_scoring_run(run_dir)


# --- output paths that cannot be written -------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--output", "--submission"])
def test_scoring_to_a_path_that_cannot_be_written_exits_2_writing_nothing(tiny_run, tmp_path, capsys,
                                                                         mnist_arrays, flag):
    from tests.helpers import write_kaggle_csv

    data = write_kaggle_csv(tmp_path / "x.csv", mnist_arrays["x_test"][:3])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    output = str(blocker / "out") if flag == "--output" else str(tmp_path / "out")
    args = ["--model", str(tiny_run), "--input", str(data), "--output", output]
    if flag == "--submission":
        args += ["--submission", str(blocker / "sub.csv")]
    with pytest.raises(SystemExit) as info:
        score_main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a directory" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_training_into_a_path_that_cannot_be_written_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as info:
        train_main(["--output-dir", str(blocker / "run"), "--smoke-test"])
    assert info.value.code == 2
    assert f"--output-dir {blocker / 'run'}: {blocker} is a file" in capsys.readouterr().err


def test_scoring_onto_a_read_only_file_system_exits_2(tiny_run, tmp_path, mnist_arrays):
    """A real read-only mount, in a mount namespace of the job's own (unshare: root not needed)."""
    import subprocess
    import sys

    from tests.helpers import write_kaggle_csv

    if shutil.which("unshare") is None:
        pytest.skip("LOUD SKIP: no unshare(1) here: the read-only file system case is not tested")
    data = write_kaggle_csv(tmp_path / "x.csv", mnist_arrays["x_test"][:3])
    read_only = tmp_path / "ro"
    read_only.mkdir()
    repo = Path(__file__).resolve().parents[1]
    script = (f"mount -t tmpfs -o ro tmpfs {read_only} && exec {sys.executable} {repo / 'jobs' / 'score.py'} "
              f"--model {tiny_run} --input {data} --output {read_only / 'out'}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                            timeout=300)
    if "mount:" in result.stderr and result.returncode != 2:
        pytest.skip(f"LOUD SKIP: no tmpfs mount in a user namespace here: {result.stderr[:200]}")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert f"--output {read_only / 'out'}: {read_only} cannot be written" in line
    assert "Traceback" not in result.stderr
