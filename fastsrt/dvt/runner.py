"""DVT stage 1 over a data set: every image of a folder -> ``OUT/<image stem>.safetensors``.

Each file holds float32 (C, K, K) tensors on the full image's K x K token grid:
"raw" (the image's raw features), "clean" (F, the stage-2 target) and "artifact" (G), and
metadata (format, model (the timm name "architecture.tag"; absent for a plain callable), layer,
image_size, patch_size, grid, views, iterations, seed, image_seed, source, source_size, final_loss,
encoding).
Stage 2 trains on the ("raw", "clean") pairs (``load_pair``, ``iter_pairs``).

The run never loses finished work: every file is written atomically, images whose file exists
are skipped (resume), images that fail are reported and skipped. Each image's random draws come
from a seed derived from the run's seed and its file stem (``image_seed``), so its result is the
same whatever images share its fit, its shard, or a resumed run's grouping. Under torchrun each process
takes the images ``rank::world_size`` of the sorted list (RANK and WORLD_SIZE from the
environment), so the shards cover every image exactly once.

An image fails when it cannot be read or fitting it runs out of memory (``IMAGE_FAILURES``); a group
of images fitted together that fails is fitted again one image at a time, so one image's failure never
costs the others. What would fail every image the same way ends the run: what cannot run here, a bad
setting, an error while writing to the output folder, Ctrl-C.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from fastsrt.backbone import model_name
from fastsrt.dvt.decomposition import (
    DecomposeConfig,
    backbone_for,
    extract_view_features,
    fit_decomposition,
)
from fastsrt.dvt.distributed import rank_and_world_size
from fastsrt.errors import Unavailable
from fastsrt.io import (
    IMAGE_FAILURES,
    ImageReadError,
    JobReport,
    check_max_pixels,
    check_unique_stems,
    list_images,
    load_image,
    load_metadata,
    load_tensors,
    save_tensors,
)
from fastsrt.options import MAX_PIXELS

FORMAT = "fastsrt.dvt.stage1/1"
KEYS = ("raw", "clean", "artifact")


def image_seed(seed: int, stem: str) -> int:
    """The seed of one image's fit: a hash of the run's seed and the image's file stem, so that an
    image's result does not depend on the images fitted with it, its shard or a resumed run."""
    digest = hashlib.sha256(f"{seed}/{stem}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def shard(paths: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of ``paths``: every world_size-th item from rank (see rank_and_world_size)."""
    rank, world_size = rank_and_world_size(rank, world_size)
    return paths[rank::world_size]


def fit_folder(inputs, out_dir: str | os.PathLike, model, config: DecomposeConfig | None = None, *, layer: int = -1,
               images_per_fit: int = 1, seed: int = 0, overwrite: bool = False, device=None, impl: str = "auto",
               patch_size: int | None = None, pretrained: bool | str = True, rank: int | None = None,
               world_size: int | None = None, progress: bool = True, max_pixels: int = MAX_PIXELS) -> JobReport:
    """DVT stage 1 on this shard's images of ``inputs`` (a folder or file, or a list of them),
    ``images_per_fit`` images fitted together; writes ``out_dir/<stem>.safetensors`` (module doc).
    Images of more than ``max_pixels`` pixels are refused (``load_image``)."""
    config = config or DecomposeConfig()
    check_max_pixels(max_pixels)
    if isinstance(images_per_fit, bool) or not isinstance(images_per_fit, int) or images_per_fit < 1:
        raise ValueError(f"images_per_fit must be an int >= 1, got {images_per_fit!r}")
    paths = list_images([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    check_unique_stems(paths)
    rank, world_size = rank_and_world_size(rank, world_size)
    paths = shard(paths, rank, world_size)
    backbone = backbone_for(model, patch_size=patch_size, pretrained=pretrained)
    if device is not None:
        backbone = backbone.to(device)
    out_dir = Path(out_dir)
    name = model_name(backbone) or (model if isinstance(model, str) else None)  # None: a plain callable
    metadata = {"format": FORMAT, **({"model": name} if name else {}), "layer": layer, "image_size": config.size,
                "patch_size": backbone.patch_size, "grid": config.size // backbone.patch_size, "views": config.views,
                "iterations": config.iterations, "seed": seed}
    report = JobReport()
    label = f"DVT stage 1 (rank {rank}/{world_size})" if world_size > 1 else "DVT stage 1"
    bar = tqdm(total=len(paths), desc=label, unit="image", disable=not progress)

    def fit_group(group: list[tuple[Path, torch.Tensor]]) -> None:
        seeds = [image_seed(seed, path.stem) for path, _ in group]
        try:
            features = extract_view_features([image for _, image in group], backbone, config, layer=layer,
                                             seed=seeds, device=device)
            results = fit_decomposition(features, config, seed=seeds, impl=impl, progress=progress)
        except Unavailable:
            raise
        except IMAGE_FAILURES as error:  # one image at a time: its seed gives it the same result alone
            if len(group) > 1:
                for item in group:
                    fit_group([item])
                return
            report.fail(group[0][0], error)
            bar.update()
            return
        for (path, image), result, one_seed in zip(group, results, seeds):
            tensors = {key: getattr(result, key) for key in KEYS}
            save_tensors(out_dir / f"{path.stem}.safetensors", tensors, {
                **metadata, "image_seed": one_seed, "source": str(path), "source_size": list(image.shape[-2:]),
                "final_loss": result.final_loss, "encoding": result.encoding})
            report.written.append(path)
            bar.update()

    group = []
    for path in paths:
        if (out_dir / f"{path.stem}.safetensors").exists() and not overwrite:
            report.skipped.append(path)
            bar.update()
            continue
        try:
            group.append((path, load_image(path, max_pixels)))
        except ImageReadError as error:  # load_image raises nothing else for a file it cannot read
            report.fail(path, error)
            bar.update()
            continue
        if len(group) == images_per_fit:
            fit_group(group)
            group = []
    if group:
        fit_group(group)
    bar.close()
    return report


def load_fit(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata (JSON values decoded) of one runner output file; a ValueError
    naming it where it is truncated or its tensors were altered since it was written."""
    if Path(path).is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a DVT stage-1 file (iter_pairs reads a folder)")
    try:
        return load_tensors(path), load_metadata(path)
    except ValueError:  # tensors altered since they were written; load_tensors names the file
        raise
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read DVT stage-1 file {str(path)!r}: {error}") from None


def load_pair(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, clean), each float32 (C, K, K), from one runner output file."""
    tensors, _ = load_fit(path)
    missing = [key for key in ("raw", "clean") if key not in tensors]
    if missing:
        raise ValueError(f"{str(path)!r} is not a DVT stage-1 file: no tensor {missing[0]!r}")
    raw, clean = tensors["raw"], tensors["clean"]
    if raw.dim() != 3 or raw.shape != clean.shape:
        raise ValueError(f"{str(path)!r}: raw {tuple(raw.shape)} and clean {tuple(clean.shape)} "
                         "must be equal (C, K, K)")
    return raw, clean


def iter_pairs(folder: str | os.PathLike) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(raw, clean) of every ``*.safetensors`` file of a runner output folder, in name order."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        yield load_pair(path)
