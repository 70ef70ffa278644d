"""--placement-strategy: from the command line to the ScalingConfig Ray Train places workers with.

Where the workers then really run is tested on two Ray nodes in test_multinode.py.
"""

from __future__ import annotations

import pytest

from mnist_ray.cli import train_config, train_parser


def scaling_for(*argv: str):
    from mnist_ray.train.loop import scaling_config

    return scaling_config(train_config(train_parser().parse_args(list(argv))))


def test_workers_are_packed_by_default():
    assert scaling_for().placement_strategy == "PACK"


@pytest.mark.parametrize("strategy", ["SPREAD", "STRICT_SPREAD"])
def test_the_flag_reaches_ray_train(strategy: str):
    scaling = scaling_for("--placement-strategy", strategy, "--num-workers", "3", "--cpus-per-worker", "2")
    assert scaling.placement_strategy == strategy
    assert scaling.num_workers == 3
    assert scaling.resources_per_worker == {"CPU": 2}


def test_an_unknown_strategy_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_parser().parse_args(["--placement-strategy", "STRICT_PACK"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'STRICT_PACK'" in capsys.readouterr().err
