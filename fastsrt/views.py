"""View schedules: lists of integer (dy, dx) shifts, and the anytime order SRT runs a grid in.

Convention everywhere in fastsrt: the view of a shift (dy, dx) is
``view(y, x) = image(y - dy, x - dx)``, i.e. the content moves down by dy and right by dx.
"""
from __future__ import annotations

import functools
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


def is_grid(shifts: Sequence[Shift]) -> bool:
    """Whether ``shifts`` is ``paper_grid(d)`` or ``grid(d)`` for some d, in that order: the views SRT
    runs in ``anytime_order``."""
    side = round(len(shifts) ** 0.5)
    d = (side - 1) // 2
    return list(shifts) in (grid(d), paper_grid(d))


def anytime_order(shifts: Sequence[Sequence[int]], patch_size: int) -> list[Shift]:
    """``shifts`` reordered so that every prefix is as close as it can be to the whole set (docs/method.md,
    "SRT", "Anytime order"): the identity first (where present), then greedily the view that most lowers
    the prefix's model error under ``view_kernel``; among views equal for that kernel, the one that most
    lowers it under ``shift_kernel``, then the earliest in ``shifts``. Deterministic; computed in integers.

    The model error of a prefix P of the N views is the squared distance between the kernel means of
    P and of all N views: (1/k^2) sum_{P,P} K - (2/(k N)) sum_{P,all} K + (1/N^2) sum_{all,all} K.
    """
    shifts = as_shifts(shifts)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
    return [shifts[i] for i in _greedy_order(tuple(shifts), patch_size)]


def view_kernel(shifts: Sequence[Shift], patch_size: int) -> torch.Tensor:
    """K(s, t) for every pair of ``shifts`` ((N, N) int64): p^4 times the expected correlation of what
    views s and t give a pixel, averaged over the pixel's place within its token, for a linear patch
    embedding of white noise. Per axis, with r = (s - t) mod p, the two views read patch windows that
    overlap by p - r with probability (p - r) / p and by r with probability r / p: the factor is
    (p - r)^2 + r^2. It depends on the offsets modulo the patch only, and is symmetric in the sign."""
    offsets = torch.tensor(shifts, dtype=torch.int64)
    remainder = (offsets[:, None, :] - offsets[None, :, :]).remainder(patch_size)
    return ((patch_size - remainder) ** 2 + remainder**2).prod(-1)


def shift_kernel(shifts: Sequence[Shift]) -> torch.Tensor:
    """prod over y, x of (L - |s - t|), L the span of the shifts along that axis plus one ((N, N) int64):
    its model error is the mean squared discrepancy of the boxes of the shift grid anchored at a corner
    (every sign), which tells apart views a patch apart that ``view_kernel`` counts as equal."""
    offsets = torch.tensor(shifts, dtype=torch.int64)
    span = offsets.amax(0) - offsets.amin(0) + 1
    return (span - (offsets[:, None, :] - offsets[None, :, :]).abs()).prod(-1)


@functools.lru_cache(maxsize=64)
def _greedy_order(shifts: tuple[Shift, ...], patch_size: int) -> tuple[int, ...]:
    """The indices of ``anytime_order``. Adding view x to a prefix of k - 1 views changes the model error
    by (2 a(x) + K(x, x)) / k^2 - 2 m(x) / (k N) plus terms that do not depend on x, with a(x) the sum
    of K(x, .) over the prefix and m(x) over all views: ``score`` is that times N k^2, an integer."""
    kernels = (view_kernel(shifts, patch_size), shift_kernel(shifts))
    count = len(shifts)
    to_all = [kernel.sum(1) for kernel in kernels]
    to_self = [kernel.diagonal() for kernel in kernels]
    to_prefix = [torch.zeros(count, dtype=torch.int64) for _ in kernels]
    taken = torch.zeros(count, dtype=torch.bool)
    order = []
    for size in range(1, count + 1):
        if size == 1 and (0, 0) in shifts:
            chosen = shifts.index((0, 0))
        else:
            candidates = ~taken
            for a, m, diagonal in zip(to_prefix, to_all, to_self):
                score = count * (2 * a + diagonal) - 2 * size * m
                best = score[candidates].min()
                candidates &= score == best
            chosen = int(candidates.nonzero()[0])  # the earliest in ``shifts`` of the equal ones
        order.append(chosen)
        taken[chosen] = True
        for a, kernel in zip(to_prefix, kernels):
            a += kernel[chosen]
    return tuple(order)
