"""Every golden trajectory (``tests/golden.py``) is reproduced bit for bit.

On a CPU or torch build whose float32 products round differently from the one that recorded them (a different
numerics fingerprint), the weights' bits cannot match; the rates, rollbacks and counts are then compared to 1e-5.
In bfloat16 (8 bits of mantissa) a rounding difference of the products moves the weights by whole steps, and the
estimate after a rollback follows: there the rates are compared up to the last rolled-back epoch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from golden import GOLDEN_FILE, numerics_fingerprint, scenarios

GOLDEN = json.loads(GOLDEN_FILE.read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(scenarios()))
def test_trajectory_is_unchanged(name):
    expected = GOLDEN["runs"][name]
    got = scenarios()[name]()
    assert got["rolled_back_epochs"] == expected["rolled_back_epochs"]
    if numerics_fingerprint() == GOLDEN["numerics"]:
        assert got == expected
        return
    rates, expected_rates = ([float.fromhex(v) for v in run["lr_history"]] for run in (got, expected))
    assert len(rates) == len(expected_rates)
    if name.startswith("bf16"):
        compared = max(expected["rolled_back_epochs"], default=-1) + 1
        assert rates[:compared] == [pytest.approx(v, rel=1e-5) for v in expected_rates[:compared]]
        return
    assert rates == [pytest.approx(v, rel=1e-5) for v in expected_rates]
    got_loss, expected_loss = float.fromhex(got["last_loss"]), float.fromhex(expected["last_loss"])
    # A run that ends non-finite (the paper's method from a huge rate) ends so on every CPU.
    assert (math.isnan(got_loss) and math.isnan(expected_loss)) or math.isclose(got_loss, expected_loss, rel_tol=1e-3)


def test_every_scenario_is_recorded():
    assert sorted(GOLDEN["runs"]) == sorted(scenarios())
