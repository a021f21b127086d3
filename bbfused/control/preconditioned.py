"""The default rate control for a preconditioned step (``BB(preconditioner="adam")``): the safeguard's rules with
the constants an Adam-scaled step needs.

The measuring pass already takes BB's estimate in the preconditioner's metric (``bbfused.preconditioner``); what
differs is how fast the rate may move, where it starts, what counts as a rise in the first epoch and one divergence
test. The measurements behind the constants: ``benchmarks/results/2026-12-05_cpu_preconditioned_prototype.md``, and
for the first epoch's rises ``benchmarks/results/2026-12-05_cpu_preconditioner_adam.md``.
"""

from __future__ import annotations

import math

from .safeguard import RISE_ROLLBACK, SafeguardControl


class PreconditionedControl(SafeguardControl):
    """:class:`SafeguardControl` for an Adam-scaled step."""

    # An Adam step moves every weight by about the rate, whatever its gradient: from a rate past 1e-3 one period can
    # kill a network (an autoencoder's ReLUs at 0.1) before any test sees it, so the run starts at most here.
    FIRST_RATE_LIMIT = 1e-3
    # Its momentum averages d / D, not the d that g averages: g cannot start from it, so it averages every step.
    AVERAGE_WINDOW = None
    # Under gradient noise the estimate in Adam's metric grows with the rate itself, well past the rates that train
    # well, so the rate may only climb slowly: a fast search overshot into rates that train slowly without a rise
    # large enough to roll back.
    SEARCH_GROWTH = 2.0
    SEARCH_LIMIT = 2.0
    RATE_GROWTH_LIMIT = 1.25
    # Once an earlier first-epoch period's mean fell below 0.95 times the first step's loss, every rise of a period's
    # mean brakes, not only one past 10 %: the estimate sits above the rate whatever the rate, so a rise is the only
    # sign that the search went past the rates that train well (a deep tanh MLP rose 7 % and then climbed to twelve
    # times its best rate). Before that, a small rise is noise: on lstm-digits a period on the initial plateau rises
    # 0.08 %, and braking there caps the rate at 7e-4 for the whole run.
    FIRST_EPOCH_RISE_AFTER_PROGRESS = 0.0
    # A first-epoch rise is rolled back only past the later epochs' factor: rolling back at the first epoch's
    # tolerance was measured with the SGD step only.
    FIRST_EPOCH_RISE_ROLLBACK = RISE_ROLLBACK
    # No "stuck at chance" test: it reads weights that moved 10 % without the loss falling 5 % as a rate too large,
    # and an Adam step moves small networks' weights that far at 1e-3 while they learn.
    STUCK_MOVEMENT = math.inf
    # No dead-unit test: on the deep ReLU settings where it saves the SGD step this policy already ends near the best
    # reference (2026-12-05_cpu_dead_units.md), and its measurements hold without it.
    DEAD_UNIT_SHARE = 0.0
