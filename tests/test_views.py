import numpy as np
import pytest
import torch

from fastsrt.views import as_shifts, grid, paper_grid, random_shifts


def test_paper_grid_counts_identity_twice():
    shifts = paper_grid(3)
    assert len(shifts) == 50
    assert shifts[0] == (0, 0) and shifts.count((0, 0)) == 2
    assert set(shifts) == {(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)}
    assert len(paper_grid(1)) == 10


def test_grid_each_shift_once():
    shifts = grid(2)
    assert len(shifts) == 25 == len(set(shifts))
    assert max(max(abs(dy), abs(dx)) for dy, dx in shifts) == 2


def test_random_shifts_seeded_and_in_range():
    a, b, c = random_shifts(20, 5, seed=1), random_shifts(20, 5, seed=1), random_shifts(20, 5, seed=2)
    assert a == b and a != c
    assert a[0] == (0, 0) and len(a) == 20
    assert all(-5 <= v <= 5 for pair in a for v in pair)
    assert len(random_shifts(4, 2, include_identity=False)) == 4


def test_as_shifts_accepts_int_lists_tensors_numpy_and_duplicates():
    assert as_shifts(1) == paper_grid(1)
    assert as_shifts([(0, 0), (0, 0), (1, -2)]) == [(0, 0), (0, 0), (1, -2)]
    assert as_shifts(torch.tensor([[1, 2]])) == [(1, 2)]
    assert as_shifts(np.array([[3, -1]])) == [(3, -1)]
    assert as_shifts(np.int64(1)) == as_shifts(torch.tensor(1)) == paper_grid(1)


@pytest.mark.parametrize("bad", [[], "ab", [(1,)], [(1, 2, 3)], [(0.5, 1)], [(True, 0)], -1, 1.5])
def test_as_shifts_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        as_shifts(bad)
