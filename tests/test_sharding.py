"""One VAE step, one flow step and one refiner step on 8 simulated devices (data=2, fsdp=2, tensor=2) equal the 1-device step."""

import pytest

from tests.helpers import device_report


@pytest.fixture(scope="module")
def report():
    return device_report("tests.helpers.sharded_step", 8, timeout=600)


@pytest.mark.parametrize("stage", ["vae", "flow", "refiner"])
def test_same_loss_and_update_as_one_device(report, stage):
    r = report[stage]
    assert abs(r["loss_1"] - r["loss_8"]) <= 1e-5 * max(1.0, abs(r["loss_1"]))
    assert abs(r["grad_norm_1"] - r["grad_norm_8"]) <= 1e-5 * max(1.0, r["grad_norm_1"])
    assert r["max_param_diff"] <= 1e-5


@pytest.mark.parametrize("stage", ["vae", "flow", "refiner"])
def test_parameters_and_optimizer_state_are_split(report, stage):
    # Each device holds a shard (not a full copy) of the large parameters and their Adam moments.
    assert report[stage]["split_leaves"] >= 3
