"""View schedules: lists of integer (dy, dx) shifts.

Convention everywhere in fastsrt: the view of a shift (dy, dx) is
``view(y, x) = image(y - dy, x - dx)``, i.e. the content moves down by dy and right by dx.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

Shift = tuple[int, int]


def paper_grid(d: int) -> list[Shift]:
    """The SRT authors' schedule: the identity view, then every (dy, dx) with |dy|, |dx| <= d.

    The identity view therefore appears twice: 1 + (2d + 1)^2 views (d = 3 gives 50).
    """
    return [(0, 0)] + grid(d)


def grid(d: int) -> list[Shift]:
    """Every (dy, dx) with |dy|, |dx| <= d, row-major, each once: (2d + 1)^2 views."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
        raise ValueError(f"shift radius d must be an int >= 0, got {d!r}")
    return [(dy, dx) for dy in range(-d, d + 1) for dx in range(-d, d + 1)]


def random_shifts(count: int, max_shift: int, seed: int = 0, include_identity: bool = True) -> list[Shift]:
    """``count`` shifts drawn uniformly from [-max_shift, max_shift]^2 with a seeded generator.

    With ``include_identity`` the first view is (0, 0) and ``count - 1`` are drawn.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(-max_shift, max_shift + 1, (count - int(include_identity), 2), generator=generator)
    shifts = [(int(dy), int(dx)) for dy, dx in drawn.tolist()]
    return [(0, 0)] + shifts if include_identity else shifts


def as_shifts(shifts: int | Sequence[Sequence[int]]) -> list[Shift]:
    """Normalise a user's ``shifts``: an int d means ``paper_grid(d)``; otherwise a non-empty
    sequence of integer (dy, dx) pairs, duplicates allowed."""
    if not isinstance(shifts, bool):
        try:
            return paper_grid(operator.index(shifts))  # an int, numpy integer or 0-d integer tensor
        except TypeError:
            pass
    if hasattr(shifts, "tolist"):  # a tensor or numpy array of shape (K, 2)
        shifts = shifts.tolist()
    if not isinstance(shifts, Sequence) or isinstance(shifts, str) or len(shifts) == 0:
        raise ValueError(f"shifts must be an int d or a non-empty sequence of (dy, dx) int pairs, got {shifts!r}")
    return [_as_int_pair(pair) for pair in shifts]


def _as_int_pair(pair) -> Shift:
    try:
        if isinstance(pair, (str, bytes)) or len(pair) != 2 or any(isinstance(v, bool) for v in pair):
            raise TypeError
        return operator.index(pair[0]), operator.index(pair[1])
    except TypeError:
        raise ValueError(f"each shift must be a pair of ints (dy, dx), got {pair!r}") from None
