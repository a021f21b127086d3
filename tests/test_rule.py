"""The BB rule (eq. 11 and 13) against a plain-float statement of it, over arbitrary inputs."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from bbfused.rule import bb_learning_rate

finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)


def expected(sq_norm: float, dot: float, steps: int, epoch: int, tau0: float, tau_min: float, tau_max: float):
    with_errors_as_nan = sq_norm / (steps * abs(dot)) if dot != 0 else (math.inf if sq_norm > 0 else math.nan)
    divisor = epoch + 2
    if tau_min / divisor <= with_errors_as_nan <= tau_max / divisor:
        return with_errors_as_nan
    return tau0 / divisor


@given(
    sq_norm=st.one_of(st.floats(min_value=0, max_value=1e30), st.just(0.0), any_float),
    dot=st.one_of(finite, st.just(0.0), any_float),
    steps=st.integers(min_value=1, max_value=100_000),
    epoch=st.integers(min_value=1, max_value=1000),
    tau_min=st.floats(min_value=1e-3, max_value=1.0),
    spread=st.floats(min_value=1.0, max_value=1e3),
)
def test_rule_matches_plain_float_statement(sq_norm, dot, steps, epoch, tau_min, spread) -> None:
    tau_max, tau0 = tau_min * spread, 1.0
    sums = torch.tensor([sq_norm, dot], dtype=torch.float64)
    result = bb_learning_rate(sums, steps, epoch, tau0, tau_min, tau_max)
    assert result.dtype == torch.float64 and result.shape == ()
    value = float(result)
    assert math.isfinite(value) and value > 0
    want = expected(sq_norm, dot, steps, epoch, tau0, tau_min, tau_max)
    assert value == want or math.isclose(value, want, rel_tol=1e-15)


def test_rule_examples() -> None:
    # ‖Δθ‖² = 8, Δθᵀy = -2, T = 2: η = 8 / (2·2) = 2; at k = 1 the bounds are [0.1/3, 10/3]: inside.
    assert float(bb_learning_rate(torch.tensor([8.0, -2.0], dtype=torch.float64), 2, 1, 1.0, 0.1, 10.0)) == 2.0
    # at k = 4 the upper bound is 10/6 < 2: fallback τ0/6
    assert float(bb_learning_rate(torch.tensor([8.0, -2.0], dtype=torch.float64), 2, 4, 1.0, 0.1, 10.0)) == 1 / 6
    # 0/0 and x/0: fallback, never NaN or inf
    for sums in ([0.0, 0.0], [3.0, 0.0], [float("nan"), 1.0]):
        assert float(bb_learning_rate(torch.tensor(sums, dtype=torch.float64), 5, 2, 2.0, 0.1, 10.0)) == 0.5
