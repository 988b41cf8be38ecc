"""Reading images and writing results: image folders, model-ready tensors, atomic safetensors."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from fastsrt.integrity import tensors_digest
from fastsrt.options import MAX_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = 1.0  # transparent pixels are composited on white, as a viewer or a web page shows them
# The white level of the modes that are not 8 bits a channel. Pillow widens 16-bit PGM/PPM to mode "I" with
# values 0..65535, so "I" is read as 16-bit data; values outside 0..65535 (a 32-bit or signed image, whose white
# is unknown) are refused rather than clipped, as are float values outside [0, 1].
WHITE_LEVELS = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
DIGEST_KEY = "fastsrt.tensors_sha256"  # the metadata entry save_tensors writes and load_tensors checks


@dataclass
class JobReport:
    """What a folder job did with each input image."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # output already there (resume)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable or failed, with the reason

    def fail(self, path: Path, error: Exception) -> None:
        """Records that ``path`` failed, with a one-line reason naming the file, and says so at once."""
        if isinstance(error, ImageReadError):
            reason = str(error)
        else:
            first_line = (str(error).strip().splitlines() or [""])[0]
            reason = f"cannot process {str(path)!r}: {type(error).__name__}: {first_line}"
        self.failed.append((path, reason))
        tqdm.write(f"fastsrt: skipped: {reason}")

    def summary(self, out_dir) -> str:
        return (f"{len(self.written)} written, {len(self.skipped)} already done (skipped), "
                f"{len(self.failed)} failed -> {out_dir}")


class ImageReadError(ValueError):
    """An image (or video) file that cannot be read; names the file and the reason."""

    def __init__(self, path, reason: str, kind: str = "image"):
        super().__init__(f"cannot read {kind} {str(path)!r}: {reason}")
        self.path = Path(path)


# What reading or computing one image raises because of that image: ImageReadError, or running out of memory
# on its size (torch's OutOfMemoryError and its CPU allocator's failures are RuntimeErrors). A folder job records
# these as that image's failure (JobReport.fail) and goes on. Anything else would fail every image the same way
# and ends the job: what cannot run here (Unavailable, though a RuntimeError), a bad setting (ValueError), a bug,
# a failed write, Ctrl-C.
IMAGE_FAILURES = (ImageReadError, RuntimeError, MemoryError)


class WriteError(OSError):
    """An output file that cannot be written (disk full, a file-size limit, a read-only or unusable
    folder); names the file and the reason. It stops a job: the next writes would fail alike."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {str(path)!r}: {reason}")
        self.path = Path(path)


def list_images(inputs: Iterable[str | os.PathLike], extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                kind: str = "images") -> list[Path]:
    """Image files (or files of other ``extensions``, ``kind`` naming them in errors) named directly
    or found (sorted, not recursively) in the folders named. A folder's symbolic links that lead
    nowhere (broken, or a loop) are listed, so that reading them reports them; a folder holding no
    such file is an error, as is a named link that leads nowhere."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.iterdir() if p.suffix.lower() in extensions
                            and (p.is_file() or (p.is_symlink() and not p.exists())))
            if not images:
                raise ValueError(f"{str(item)!r} holds no {kind} ({', '.join(extensions)})")
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


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image file as a (3, H, W) float32 RGB tensor in [0, 1], as a viewer shows it: turned upright by
    its EXIF orientation, converted from any mode by ``to_rgb_tensor`` (the first frame of an animated or
    multi-page file; colour profiles are not applied: values are taken as sRGB). An image of more than
    ``max_pixels`` pixels is refused from its header, before decoding. Raises ImageReadError (naming the
    file and the reason) for anything that cannot be read: a missing, truncated or non-image file, a
    refused size, values outside the mode's range."""
    check_max_pixels(max_pixels)
    try:
        with _only_fastsrt_limit(), Image.open(path) as image:  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(path, f"{width} x {height} = {width * height} pixels is over the limit of "
                                           f"{max_pixels} pixels (max_pixels, --max-pixels); not decoded")
            image.load()  # decodes: a truncated file raises OSError here
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb_tensor(image)
    except ImageReadError:
        raise
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, struct.error, EOFError...)
        raise ImageReadError(path, f"{type(error).__name__}: {error}") from None


def check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be an int >= 1, got {max_pixels!r}")


_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def _only_fastsrt_limit():
    """Pillow's own decompression-bomb check off while fastsrt reads, since load_image checks max_pixels:
    Pillow warns above Image.MAX_IMAGE_PIXELS and fails above twice that (89.5M and 179M pixels by default),
    which would overrule a larger max_pixels. Pillow reads that limit from a module global: the lock keeps two threads
    from restoring each other's value."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode as a (3, H, W) float32 RGB tensor in [0, 1]: 8-bit modes (1, L, P, RGB,
    CMYK, YCbCr...) through Pillow's conversion to RGB, divided by 255; 16-bit and float modes divided by
    their white level (WHITE_LEVELS), never clipped; alpha (RGBA, LA, PA, P or L with a transparent colour)
    composited on BACKGROUND. Raises ValueError for values outside the mode's range."""
    if image.mode in WHITE_LEVELS:
        values = np.asarray(image)
        low, high = (values.min().item(), values.max().item()) if values.size else (0, 0)
        white = WHITE_LEVELS[image.mode]
        if not 0 <= low <= high <= white:  # also refuses NaN (every comparison is false)
            raise ValueError(f"mode {image.mode} values span [{low}, {high}], outside [0, {white}]")
        grey = values.astype(np.float32)
        grey /= white
        if "transparency" in image.info:  # a transparent grey level (16-bit PNG's tRNS)
            grey[values == image.info["transparency"]] = BACKGROUND
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    elif image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgba /= 255
        alpha = rgba[..., 3:]
        rgb = rgba[..., :3] * alpha + BACKGROUND * (1 - alpha)
    else:  # every copy counts here: a large photo takes 12 bytes a pixel as float32
        rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.float32)
        rgb /= 255
    return torch.from_numpy(rgb).permute(2, 0, 1)


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
        try:
            save_file(tensors, str(temporary), metadata=meta)
        except SafetensorError as error:  # an I/O error names its OS error only in the message
            code = re.search(r"os error (\d+)", str(error))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from error


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
    step, on failure it is removed: a reader never sees a half-written file, and of two processes
    writing one file the last to finish wins. Temporaries of ``path`` that killed writers left
    behind are removed first (remove_stale_temporaries). A failure of the file system (an OSError
    in the exception's chain: disk full, file-size limit, read-only folder) raises WriteError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        handle, temporary = _locked_temporary(path)
    except OSError as error:
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{str(blocking)!r} is a file, not a folder" if blocking else error.strerror or str(error)
        raise WriteError(path, reason) from error
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is None:
            raise
        raise WriteError(path, cause.strerror or str(cause)) from error
    finally:
        os.close(handle)  # releases the lock, once the temporary is renamed or removed


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Removes the temporaries of ``path`` (atomic_path's ``.<name>.<random>.tmp``) whose writer
    died mid-write (SIGKILL, power cut): those that no living process holds locked."""
    path = Path(path)
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            handle = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK)  # never waits (a FIFO of that name)
        except OSError:  # removed meanwhile, or not ours to read
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_file_of(handle, candidate) and candidate.is_file():
                candidate.unlink()
        except BlockingIOError:  # its writer is alive
            pass
        finally:
            os.close(handle)


def _locked_temporary(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, open and locked (flock) for as long as this process
    writes it: the lock, which the kernel drops when the process dies, tells other processes'
    remove_stale_temporaries that it is in use (on local file systems; NFS emulates flock with
    locks that closing any handle of the file releases)."""
    while True:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _is_file_of(handle, name):
            return handle, Path(name)
        os.close(handle)  # another process removed it as stale before the lock was taken: draw again


def _is_file_of(handle: int, name) -> bool:
    """Whether the open file ``handle`` is still the file called ``name`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(handle), os.stat(name))
    except FileNotFoundError:
        return False


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error``: itself or one in its chain (torch.save, say, raises a
    RuntimeError while handling the OSError of its file object); None if there is none."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


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
