"""Typed settings: one way in and out of JSON, and a file that does not fit is refused by name."""

from __future__ import annotations

import json

import pytest

from mnist_ray.config import (
    DataConfig,
    RunSettings,
    SearchSettings,
    SearchSpace,
    SettingsError,
    TrainConfig,
    from_json,
    to_json,
)
from mnist_ray.errors import InputError


def a_run() -> RunSettings:
    return RunSettings(train=TrainConfig(cpus_per_worker=2), data=DataConfig(limit=600),
                       storage_path="/tmp/x", run_name="r1")


def test_settings_survive_a_round_trip_through_json_text():
    for settings in (a_run(), SearchSettings(train=TrainConfig(), data=DataConfig(),
                                             space=SearchSpace(dropout=(0.2, 0.3)))):
        text = json.dumps(to_json(settings))
        assert from_json(type(settings), json.loads(text), "x.json") == settings


def test_an_unknown_key_is_an_error_not_dropped():
    value = to_json(a_run())
    value["train"]["learning_rte"] = 0.1
    with pytest.raises(SettingsError, match=r"config.json.train: unknown key\(s\) learning_rte"):
        from_json(RunSettings, value, "config.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda v: v.pop("run_name"), r"config.json: missing key\(s\) run_name"),
        (lambda v: v["train"].update(epochs="20"), r"config.json.train.epochs: expected int, found '20'"),
        (lambda v: v["train"].update(augment=1), r"config.json.train.augment: expected bool, found 1"),
        (lambda v: v.update(data=["bundled"]), r"config.json.data: expected an object, found list"),
        (lambda v: v["data"].update(data="bundled"), r"config.json.data.data: expected a list"),
    ],
)
def test_a_key_missing_or_of_the_wrong_type_is_named(edit, message):
    value = to_json(a_run())
    edit(value)
    with pytest.raises(SettingsError, match=message) as info:
        from_json(RunSettings, value, "config.json")
    assert isinstance(info.value, InputError)  # the jobs report it as bad input, exit code 2


def test_json_numbers_fit_either_python_number_type():
    value = to_json(a_run())
    value["train"]["learning_rate"] = 1  # an int where a float is expected
    value["train"]["epochs"] = 20.0  # an integral float where an int is expected
    settings = from_json(RunSettings, value, "config.json")
    assert settings.train.learning_rate == 1.0 and isinstance(settings.train.learning_rate, float)
    assert settings.train.epochs == 20 and isinstance(settings.train.epochs, int)
