"""Reading images and writing results: image folders, model-ready tensors, atomic safetensors."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file

from fastsrt.integrity import tensors_digest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGEST_KEY = "fastsrt.tensors_sha256"  # the metadata entry save_tensors writes and load_tensors checks


@dataclass
class JobReport:
    """What a folder job did with each input image."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # output already there (resume)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable, with the reason

    def summary(self, out_dir) -> str:
        return (f"{len(self.written)} written, {len(self.skipped)} already done (skipped), "
                f"{len(self.failed)} failed -> {out_dir}")


class ImageReadError(ValueError):
    """An image file that cannot be read; names the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read image {str(path)!r}: {reason}")
        self.path = Path(path)


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (sorted, not recursively) in the folders named. A folder's
    symbolic links that lead nowhere (broken, or a loop) are listed, so that reading them reports
    them; a folder holding no image file is an error, as is a named link that leads nowhere."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                            and (p.is_file() or (p.is_symlink() and not p.exists())))
            if not images:
                raise ValueError(f"{str(item)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(images)
        elif item.is_file():
            found.append(item)
        elif item.is_symlink():
            raise FileNotFoundError(f"{str(item)!r} is a symbolic link that leads nowhere (broken, or a loop)")
        else:
            raise FileNotFoundError(f"no such file or folder: {str(item)!r}")
    return found


def check_unique_stems(paths: list[Path]) -> None:
    """Outputs are named by file stem: two inputs with one stem would overwrite each other."""
    seen = set()
    for path in paths:
        if path.stem in seen:
            raise ValueError(f"several inputs share the name {path.stem!r}; outputs are named by file stem")
        seen.add(path.stem)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image file as a (3, H, W) float32 tensor in [0, 1]."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, str(error) or type(error).__name__) from None
    return torch.from_numpy(array).permute(2, 0, 1)


def resize_to_patch_multiple(image: torch.Tensor, short_side: int, patch_size: int) -> torch.Tensor:
    """(3, H, W) -> (3, H', W'): the shorter side scaled to about ``short_side``, keeping the aspect
    ratio, and each side rounded to a multiple of the patch size (bicubic, antialiased)."""
    height, width = image.shape[-2:]
    scale = short_side / min(height, width)
    size = [max(patch_size, round(side * scale / patch_size) * patch_size) for side in (height, width)]
    resized = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized[0].clamp(0, 1)


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """[0, 1] RGB -> the model's normalised input: (x - mean) / std per channel."""
    mean = torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
    return (image - mean) / std


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Writes a safetensors file atomically: a reader never sees a half-written file, and an
    interrupted write leaves no file behind. Metadata values that are not strings are stored as JSON;
    the metadata also holds the sha256 of the tensors (``DIGEST_KEY``), which ``load_tensors`` checks."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta[DIGEST_KEY] = tensors_digest(tensors)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=meta)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a ValueError naming it where they do not match the sha256
    that ``save_tensors`` recorded (files written without one load unchecked)."""
    with safe_open(str(path), "pt") as file:
        recorded = (file.metadata() or {}).get(DIGEST_KEY)
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    if recorded is not None and recorded != tensors_digest(tensors):
        raise ValueError(f"{str(path)!r} is damaged or was altered: its tensors do not match the sha256 "
                         "recorded when it was written")
    return tensors


def save_png(path: str | os.PathLike, image: Image.Image) -> None:
    """Saves a PIL image atomically (see atomic_path)."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path`` to write; on success it replaces ``path`` in one
    step, on failure it is removed: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_json(path: str | os.PathLike, value) -> None:
    """Writes ``value`` as indented JSON atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2) + "\n")


def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a safetensors file, with the values save_tensors stored as JSON decoded
    (a value that is not valid JSON is returned as the string it is)."""
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata() or {}
    decoded = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only."""
    with safe_open(str(path), "pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
