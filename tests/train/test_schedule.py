"""Learning-rate schedules against their formulas, computed by hand."""

import math

import pytest

from mlc.commands.train.config import ScheduleSection
from mlc.commands.train.schedule import lr_factor


def test_warmup_is_linear_from_warmup_start_and_cosine_ends_at_min_ratio():
    s = ScheduleSection(kind="cosine", warmup_steps=4, warmup_start=0.0, min_lr_ratio=0.1)
    assert [lr_factor(i, 14, s) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # After warm-up: 0.1 + 0.9 * (1 + cos(pi * k / 10)) / 2 for k = 0..10 steps into the decay.
    for k in range(10):
        assert lr_factor(4 + k, 14, s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * k / 10)))
    assert lr_factor(14, 14, s) == pytest.approx(0.1)


def test_rewarming_starts_from_warmup_start():
    s = ScheduleSection(kind="constant", warmup_steps=2, warmup_start=0.5)
    assert [lr_factor(i, 10, s) for i in range(4)] == pytest.approx([0.75, 1.0, 1.0, 1.0])


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    s = ScheduleSection(kind="wsd", warmup_steps=2, min_lr_ratio=0.0, decay_fraction=0.2)
    got = [lr_factor(i, 20, s) for i in range(20)]
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert got[2:16] == pytest.approx([1.0] * 14)
    # The last 4 steps (20% of 20) go down to 0 in equal steps.
    assert got[16:] == pytest.approx([0.75, 0.5, 0.25, 0.0])
