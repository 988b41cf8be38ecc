"""The warm-up + cosine learning-rate schedule shared by DVT's two stages."""
import math

import pytest

from fastsrt.dvt import DecomposeConfig
from fastsrt.dvt.schedule import warmup_cosine


def test_warmup_then_cosine_to_the_minimum_at_the_last_step():
    total, warmup, peak, low = 101, 10, 1e-2, 1e-3
    rates = [warmup_cosine(step, total, peak, low, warmup) for step in range(total)]
    assert rates[:10] == pytest.approx([peak * (s + 1) / 10 for s in range(10)])  # linear, peak at step 9
    assert rates[10] == pytest.approx(peak) and rates[-1] == pytest.approx(low)
    middle = 10 + 45  # halfway through the 91 cosine steps 10 .. 100
    assert rates[middle] == pytest.approx((peak + low) / 2)
    assert rates[10 + 15] == pytest.approx(low + (peak - low) * 0.5 * (1 + math.cos(math.pi * 15 / 90)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and min(rates[10:]) == rates[-1]


def test_edge_cases():
    assert warmup_cosine(0, 5, 1.0, 0.1, 0) == pytest.approx(1.0)  # no warm-up: the cosine starts at the peak
    assert warmup_cosine(4, 5, 1.0, 0.1, 0) == pytest.approx(0.1)
    assert warmup_cosine(0, 1, 1.0, 0.1, 0) == pytest.approx(1.0)  # a single step runs at the peak
    # warm-up capped at total - 1
    assert [warmup_cosine(s, 2, 1.0, 0.1, 5) for s in range(2)] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="outside"):
        warmup_cosine(5, 5, 1.0, 0.1, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 5, 1.0, 0.1, -1)


def test_both_stages_use_it():
    config = DecomposeConfig(iterations=1000, warmup=0.1)
    expected = [warmup_cosine(s, 1000, 1e-2, 1e-3, 100) for s in range(1000)]
    assert [config.learning_rate(s) for s in range(1000)] == expected
    import fastsrt.dvt.train as train

    assert train.warmup_cosine is warmup_cosine and not hasattr(train, "learning_rate")
