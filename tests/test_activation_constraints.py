"""The Flux blocks' sharding constraints (`parallel.gather_fsdp`, `parallel.constrain_batch`) change no value:
on 8 simulated devices (data=2, fsdp=2, tensor=2) the constrained forward equals the unconstrained one."""

import pytest

from tests.helpers import device_report


@pytest.fixture(scope="module")
def report():
    return device_report("tests.helpers.constrained_forward", 8, timeout=300)


def test_constrained_flux_forward_equals_unconstrained(report):
    # Every row: a partitioner that mixes devices' samples shows up as whole rows off by O(1).
    r = report["flux"]
    assert max(r["row_max_diff"]) <= 1e-5 * max(1.0, r["scale"]), r


@pytest.mark.xfail(strict=True, reason="XLA SPMD miscompile (jaxlib 0.10.2): rows of devices 2-5 mixed; "
                   "parallel.gather_fsdp works around it. An XPASS means XLA fixed it.")
def test_xla_batch_constraint_in_scan_keeps_values(report):
    r = report["xla"]
    assert max(r["row_max_diff"]) <= 1e-4 * max(1.0, r["scale"]), r
