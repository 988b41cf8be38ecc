"""The process layout torchrun sets in the environment: RANK, WORLD_SIZE and LOCAL_RANK."""
from __future__ import annotations

import os


def rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The given values, else the RANK and WORLD_SIZE environment variables torchrun sets, else 0 and 1."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def local_rank() -> int:
    """This process's index on its machine (LOCAL_RANK), which picks its GPU; 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0))
