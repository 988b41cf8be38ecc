"""One dispatch convention for every op and backend (as xformers' ops do it).

Each implementation of an op is an ``Implementation``: a ``name``, the devices on which ``auto``
considers it, ``not_supported_reasons(*inputs)`` (an empty list when it can run on these inputs)
and, optionally, the ``fallback`` that runs in its place with one warning when it is asked for by
name and cannot run. ``choose`` picks one:

- ``impl="auto"``: the first implementation, in the op's order of preference, that ``auto``
  considers on the inputs' device and that states no reason. A preferred one that is skipped for
  a reason (Triton missing on a GPU, say) is named in one warning.
- a name: that implementation; when it cannot run, the first in its chain of ``fallback``s that
  can, with one warning, or ``Unavailable`` with the reasons.
- none can run: ``Unavailable`` listing every implementation's reasons.

The op then calls the chosen implementation and returns, with its result, the name of what ran.
"""
from __future__ import annotations

from collections.abc import Sequence

from fastsrt.errors import Unavailable, warn_once

ALL_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})


class Implementation:
    """One way of computing an op. Subclasses set ``name`` (and ``auto_devices``, ``fallback``)
    and define ``not_supported_reasons`` and ``__call__``; both take the op's inputs."""

    name: str = ""
    auto_devices: frozenset[str] = ALL_DEVICES  # where impl="auto" considers it
    fallback: str | None = None  # what runs instead, with a warning, when asked for by name and unable

    def not_supported_reasons(self, *args, **kwargs) -> list[str]:
        return []

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def names(implementations: Sequence[Implementation]) -> tuple[str, ...]:
    """The values ``impl`` takes for an op: "auto" and each implementation's name."""
    return ("auto", *(implementation.name for implementation in implementations))


def choose(op: str, implementations: Sequence[Implementation], impl: str, device_type: str, *args,
           **kwargs) -> Implementation:
    """The implementation of ``op`` that runs for ``impl`` on these inputs (see the module's
    docstring); ``device_type`` is the inputs' device ("cpu", "cuda", ...)."""
    by_name = {implementation.name: implementation for implementation in implementations}
    if impl != "auto" and impl not in by_name:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(repr(n) for n in names(implementations))}")
    if impl != "auto":
        chosen, reasons = by_name[impl], []
        while why := chosen.not_supported_reasons(*args, **kwargs):  # follow the fallbacks to one that can run
            reasons += [reason for reason in why if reason not in reasons]
            if chosen.fallback is None:
                raise Unavailable(f"{op}: impl={impl!r} cannot run here: {'; '.join(reasons)}")
            chosen = by_name[chosen.fallback]
        if chosen.name != impl:
            warn_once(f"{'; '.join(reasons)}: {op} falls back to {chosen.name!r} instead of {impl!r}", stacklevel=4)
        return chosen
    every_reason, skipped = [], []
    for implementation in implementations:
        if device_type not in implementation.auto_devices:
            every_reason.append(f"{implementation.name}: not chosen automatically on {device_type}")
            continue
        reasons = implementation.not_supported_reasons(*args, **kwargs)
        if not reasons:
            if skipped:
                warn_once(f"{'; '.join(skipped)}: {op} runs {implementation.name!r}", stacklevel=4)
            return implementation
        every_reason.append(f"{implementation.name}: {'; '.join(reasons)}")
        skipped.append(f"{implementation.name!r} cannot run ({'; '.join(reasons)})")
    raise Unavailable(f"{op}: no implementation can run here: {' | '.join(every_reason)}")
