"""Training the DVT denoiser on (raw, target) token-grid pairs (docs/method.md, "DVT stage 2").

Defaults are the paper's: loss mse + (1 - cosine), AdamW (0.9, 0.999) with weight decay 1e-5,
lr 2e-4 * sqrt(batch / 256), 15% linear warm-up then cosine to 1e-6, 10 epochs of batch 64.
Targets come from stage 1's runner (``PairFolder``) or from SRT on the fly (``SRTTargets``, the
SRT paper's distillation path). Training is resumable: the full state (weights, optimiser, step)
is written atomically every ``save_every`` steps and a rerun continues from it, exactly. Under
torchrun (WORLD_SIZE > 1) it runs data-parallel (DDP); the batch size is the global one.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fastsrt.backbone import model_name
from fastsrt.checks import check_choice
from fastsrt.dvt.denoiser import Denoiser, timm_name
from fastsrt.dvt.distributed import local_rank, rank_and_world_size
from fastsrt.dvt.schedule import warmup_cosine
from fastsrt.io import (
    atomic_path,
    check_max_pixels,
    list_images,
    load_image,
    load_metadata,
    load_tensors,
    normalize,
    tensor_shapes,
)
from fastsrt.options import AMPS, MAX_PIXELS, torch_dtype
from fastsrt.srt import SRT

# config fields that change the result: a resumed run must agree on them
_RESULT_FIELDS = ("epochs", "batch_size", "lr", "min_lr", "warmup", "weight_decay", "betas", "amp", "num_blocks",
                  "seed")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # global batch, split evenly over DDP ranks
    lr: float | None = None  # None: 2e-4 * sqrt(batch_size / 256)
    min_lr: float = 1e-6
    warmup: float = 0.15  # fraction of all steps with a linear warm-up
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, none on the CPU
    num_blocks: int = 1
    seed: int = 0
    save_every: int = 200  # optimiser steps between resumable checkpoints
    num_workers: int = 0  # DataLoader workers

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 * math.sqrt(self.batch_size / 256)

    def check(self) -> None:
        check_choice("amp", self.amp, AMPS)
        for name in ("epochs", "batch_size", "num_blocks", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")


@dataclass
class TrainResult:
    denoiser: Denoiser
    losses: list[float]  # one per optimiser step, from the first step of the first run
    step: int
    total_steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def denoiser_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mse + (1 - cosine similarity over channels, averaged over tokens), in float32."""
    prediction, target = prediction.float(), target.float()
    return F.mse_loss(prediction, target) + (1 - F.cosine_similarity(prediction, target, dim=1).mean())


# what to do about a damaged pair file
_REMEDY = "delete it and rerun the command that wrote it (it redoes missing files), then rerun training (it resumes)"


class PairFolder(Dataset):
    """Stage 1's output: one ``<stem>.safetensors`` per image holding float32 "raw" and "clean"
    (C, K, K) token grids (``target`` names another key, e.g. "srt" of ``fastsrt extract
    --output token``). Every file's header is checked up front (a truncated file fails there);
    tensors load per item, checked against the sha256 their writer recorded (an altered file fails
    there). A damaged file stops training with an error naming it rather than being skipped: a
    skipped pair would silently change the data, the batches and what a resumed run computes.
    Delete it and rerun the command that wrote it (which recomputes missing files only), then
    rerun training, which resumes from its last saved state."""

    def __init__(self, folder: str | os.PathLike, target: str = "clean"):
        folder = Path(folder)
        if folder.is_file():
            raise ValueError(f"{str(folder)!r} is a file; training takes the folder of pair files that holds it")
        if not folder.is_dir():
            raise FileNotFoundError(f"no such folder of training pairs: {str(folder)!r}")
        self.files = sorted(folder.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"{str(folder)!r} holds no .safetensors pair files")
        self.target = target
        shape = None
        for path in self.files:
            try:
                shapes = tensor_shapes(path)
            except Exception as error:  # safetensors raises several types for a damaged header
                raise ValueError(f"cannot read pair file {str(path)!r}: {error}; {_REMEDY}") from None
            for key in ("raw", target):
                if key not in shapes:
                    raise ValueError(f"pair file {str(path)!r} has no {key!r} tensor (it has {sorted(shapes)})")
            if len(shapes["raw"]) != 3 or shapes["raw"] != shapes[target]:
                raise ValueError(f"pair file {str(path)!r}: raw {shapes['raw']} and {target} {shapes[target]} "
                                 "must be equal (C, K, K) token grids")
            if shape is not None and shapes["raw"] != shape:
                raise ValueError(f"pair file {str(path)!r} holds {shapes['raw']} grids, the others {shape}")
            shape = shapes["raw"]
        self.dim, self.grid = shape[0], tuple(shape[1:])
        metadata = load_metadata(self.files[0])
        # unknown (None) unless a timm name: earlier runner files held the model's class name there
        self.backbone = timm_name(metadata.get("model", metadata.get("backbone")))
        self.layer = metadata.get("layer", -1)
        if not isinstance(self.layer, int):
            raise ValueError(f"pair files must come from one layer; {self.files[0].name} says layer={self.layer!r}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index]
        try:
            tensors = load_tensors(path)
        except ValueError as error:  # altered since it was written; load_tensors names the file
            raise ValueError(f"{error}; {_REMEDY}") from None
        except Exception as error:  # truncated since the header check
            raise ValueError(f"cannot read pair file {str(path)!r}: {error}; {_REMEDY}") from None
        raw, target = tensors["raw"].float(), tensors[self.target].float()
        if not (torch.isfinite(raw).all() and torch.isfinite(target).all()):
            raise ValueError(f"pair file {str(path)!r} contains NaN or infinite values")
        return raw, target

    def make_pairs(self, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        raw, target = batch
        return raw.to(device, non_blocking=True), target.to(device, non_blocking=True)


class SRTTargets(Dataset):
    """A folder of images; each batch's pairs are made on the fly: the backbone's single-forward
    tokens (raw) and SRT's token-resolution features (target). Images are resized (bicubic,
    antialiased) to ``size`` x ``size``, by default the 37 x 37 token grid of the paper. An image that
    cannot be read (``load_image``; more than ``max_pixels`` pixels, ...) ends the training with an
    ImageReadError naming it: skipping it would change the data set that a resumed run must agree on."""

    def __init__(self, images: str | os.PathLike, srt: SRT, size: int | None = None, max_pixels: int = MAX_PIXELS):
        if srt.output != "token":
            raise ValueError(f"SRT targets need output='token', got output={srt.output!r}")
        if not isinstance(srt.layer, int):
            raise ValueError(f"SRT targets take one layer, got layer={srt.layer!r}")
        check_max_pixels(max_pixels)
        self.max_pixels = max_pixels
        self.paths = list_images([images])
        if not self.paths:
            raise ValueError(f"{str(images)!r} holds no images")
        self.srt = srt.eval()
        patch = srt.patch_size
        self.size = size or 37 * patch
        if self.size % patch:
            raise ValueError(f"size {self.size} is not a multiple of the patch size {patch}")
        self.grid = (self.size // patch, self.size // patch)
        self.dim = getattr(srt.backbone, "embed_dim", None) or self._probe_channels()
        self.backbone, self.layer = model_name(srt.backbone), srt.layer

    def _probe_channels(self) -> int:
        device = next(self.srt.parameters(), torch.empty(0)).device
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.srt.patch_size, self.srt.patch_size, device=device)
            return self.srt.backbone(probe, self.srt.layer).tokens[0].shape[1]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = load_image(self.paths[index], self.max_pixels)
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bicubic", antialias=True)[0].clamp(0, 1)
        return normalize(image, self.srt.backbone.mean, self.srt.backbone.std)

    def make_pairs(self, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.srt.to(device)
        images = images.to(device, non_blocking=True)
        with torch.no_grad():
            raw = self.srt.backbone(images, self.srt.layer).tokens[0]
            return raw, self.srt(images)


def _fingerprint(config: TrainConfig, source) -> dict:
    settings = asdict(config)
    return {**{k: settings[k] for k in _RESULT_FIELDS}, "betas": list(config.betas), "pairs": len(source),
            "dim": source.dim, "grid": list(source.grid)}


def state_path_for(out: str | os.PathLike) -> Path:
    """Where the resumable training state of the denoiser ``out`` lives."""
    out = Path(out)
    return out.with_name(f"{out.stem}.train-state.pt")


def train_denoiser(
    source: PairFolder | SRTTargets,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    denoiser: Denoiser | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains a denoiser on ``source`` and saves it to ``out`` (.safetensors + .json).

    A state file beside ``out`` (``<stem>.train-state.pt``) is written every ``save_every`` steps;
    with ``resume`` a rerun continues from it and ends with the same weights as an uninterrupted
    run. ``stop_after`` stops after that many steps in all (state saved), e.g. to split a long run.
    ``denoiser`` fine-tunes an existing one instead of a fresh one (seeded by ``config.seed``).
    """
    config = config or TrainConfig()
    config.check()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the denoiser is written as .safetensors, got --out {str(out)!r}")
    rank, world = rank_and_world_size()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes")
    steps_per_epoch = len(source) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(source)} training pairs are fewer than one batch ({config.batch_size}); "
                         "lower batch_size")
    total = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup * total)

    if device is None:
        device = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank to the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = config.amp if config.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    autocast_dtype = None if amp == "none" else torch_dtype(amp)

    if denoiser is None:
        torch.manual_seed(config.seed)
        denoiser = Denoiser(source.dim, source.grid, num_blocks=config.num_blocks, backbone=source.backbone,
                            layer=source.layer)
    elif denoiser.dim != source.dim:
        raise ValueError(f"the denoiser takes {denoiser.dim} channels, the training pairs have {source.dim}")
    denoiser.to(device).train()
    model = denoiser
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(denoiser, device_ids=device_ids)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=config.base_lr(), betas=config.betas,
                                  weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    step, losses = 0, []
    state_path = state_path_for(out)
    fingerprint = _fingerprint(config, source)
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{str(state_path)!r} belongs to a run with other settings or data "
                             f"({state['fingerprint']}); delete it or pass resume=False (--restart)")
        denoiser.load_state_dict(state["denoiser"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, losses = state["step"], list(state["losses"])
    resumed_at = step

    def save_state() -> None:
        if rank == 0:
            state = {"denoiser": denoiser.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "losses": losses, "fingerprint": fingerprint}
            # through a Python file, whose OSError (disk full, say) torch's RuntimeError then carries
            with atomic_path(state_path) as temporary, open(temporary, "wb") as file:
                torch.save(state, file)

    last = min(total, stop_after) if stop_after is not None else total
    bar = tqdm(total=total, initial=step, desc="train denoiser", unit="step", disable=not progress or rank != 0)
    while step < last:
        epoch, first = divmod(step, steps_per_epoch)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(source), generator=generator)
        batches = [order[s * config.batch_size : (s + 1) * config.batch_size][rank::world].tolist()
                   for s in range(first, min(steps_per_epoch, first + last - step))]
        loader = DataLoader(source, batch_sampler=batches, num_workers=config.num_workers,
                            pin_memory=device.type == "cuda")
        for batch in loader:
            raw, target = source.make_pairs(batch, device)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total, config.base_lr(), config.min_lr, warmup_steps)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                prediction = model(raw)
            loss = denoiser_loss(prediction, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % config.save_every == 0 or step == last:
                save_state()
    bar.close()
    if step >= total and rank == 0 and (step > resumed_at or not out.is_file()):  # a finished run is not redone
        denoiser.save(out)
    if own_group:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(denoiser.eval(), losses, step, total)
