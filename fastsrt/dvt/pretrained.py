"""The DVT authors' released checkpoints, by backbone name (docs/method.md, "DVT stage 2").

The release is the Hugging Face model repository ``jjiaweiyang/DVT``: one folder per kind and
training set, one file per backbone, ``<folder>/<timm name>.pth``:

- ``*_denoised``: the stage-2 denoiser alone, a dict whose "denoiser" entry holds ``denoiser.*``
  and ``pos_embed`` (``fastsrt.dvt.Denoiser.from_pretrained``);
- ``*_distilled``: the whole ViT fine-tuned to give the denoised features itself (stage 3), a
  dict whose "model" entry holds the timm model's state with a ``model.`` prefix on every name
  (``distilled_backbone``).

``imgnet_*`` were trained on ImageNet-1k, ``voc_*`` on PASCAL VOC; this module's variant names are
"imagenet" and "voc" (``fastsrt.options.DVT_VARIANTS``). ``RELEASE`` is the one list of what exists.

Files are fetched with ``huggingface_hub.hf_hub_download`` into its own cache, so its settings
apply: ``HF_HOME`` / ``HF_HUB_CACHE`` place the cache, ``HF_HUB_OFFLINE=1`` reads the cache only.
Where the hub cannot be reached the cache is read without retries (as for timm's weights).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from fastsrt.backbone import _hub_offline_unless_reachable, load_timm_model
from fastsrt.errors import Unavailable
from fastsrt.integrity import file_digest
from fastsrt.options import DVT_VARIANTS

REPO_ID = "jjiaweiyang/DVT"
KINDS = ("denoiser", "distilled")
FOLDER_PREFIX = {"imagenet": "imgnet", "voc": "voc"}  # variant -> the release's folder prefix
FOLDER_SUFFIX = {"denoiser": "denoised", "distilled": "distilled"}  # kind -> the release's folder suffix

_VOC_DISTILLED = (
    "vit_base_patch14_dinov2.lvd142m",
    "vit_base_patch14_reg4_dinov2.lvd142m",
    "deit3_base_patch16_224.fb_in1k",
    "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "vit_base_patch16_224.dino",
    "vit_base_patch16_224.mae",
    "eva02_base_patch16_clip_224.merged2b",
    "vit_base_patch16_384.augreg_in21k_ft_in1k",
)
# folder -> the timm names it holds a <name>.pth for
RELEASE = {
    "imgnet_denoised": ("vit_base_patch14_dinov2.lvd142m",),
    "imgnet_distilled": ("vit_base_patch14_dinov2.lvd142m",),
    "voc_denoised": (
        "vit_small_patch14_dinov2.lvd142m",
        "vit_large_patch14_dinov2.lvd142m",
        "vit_small_patch14_reg4_dinov2.lvd142m",
        "vit_large_patch14_reg4_dinov2.lvd142m",
        *_VOC_DISTILLED,
    ),
    "voc_distilled": _VOC_DISTILLED,
}


def _folder(kind: str, variant: str) -> str:
    return f"{FOLDER_PREFIX[variant]}_{FOLDER_SUFFIX[kind]}"


def released_variants(name: str, kind: str = "denoiser") -> tuple[str, ...]:
    """The variants ("imagenet", "voc") released for the backbone ``name``, best first (empty if none)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return tuple(variant for variant in DVT_VARIANTS if name in RELEASE[_folder(kind, variant)])


def known_names(kind: str = "denoiser") -> list[str]:
    """Every backbone with a released checkpoint of this kind."""
    return sorted({name for variant in DVT_VARIANTS for name in RELEASE[_folder(kind, variant)]})


def release_file(name: str, kind: str = "denoiser", variant: str | None = None) -> str:
    """The file's path in the release repository, e.g. "voc_denoised/vit_base_patch16_224.dino.pth".
    ``variant`` None takes the ImageNet-trained one where it was released, else the VOC one."""
    variants = released_variants(name, kind)
    if not variants:
        what = "denoiser" if kind == "denoiser" else "distilled backbone"
        raise ValueError(f"no released DVT {what} for {name!r}; known names: {', '.join(known_names(kind))}")
    if variant is None:
        variant = variants[0]
    elif variant not in DVT_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(DVT_VARIANTS)}, got {variant!r}")
    elif variant not in variants:
        raise ValueError(f"the DVT release has no {variant!r} {kind} for {name}; it has: {', '.join(variants)}")
    return f"{_folder(kind, variant)}/{name}.pth"


def download(filename: str, force_download: bool = False) -> Path:
    """The local path of ``filename`` of the release, from the Hugging Face cache or downloaded into
    it, checked against the sha256 the hub published for it (the name of its cached blob)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE  # asked for by the user, before the hub's reachability is tested
    with _hub_offline_unless_reachable() as reachable:
        try:
            path = Path(hf_hub_download(REPO_ID, filename, force_download=force_download))
        except LocalEntryNotFoundError:
            why = "HF_HUB_OFFLINE is set" if offline else \
                "the hub did not answer" if reachable else f"{constants.ENDPOINT} cannot be reached"
            raise Unavailable(
                f"{REPO_ID}/{filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
                f"download it once where the network is reachable (`hf download {REPO_ID} {filename}`, with "
                "the same HF_HOME / HF_HUB_CACHE), or give the downloaded file's path instead of the name"
            ) from None
        except HfHubHTTPError as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise Unavailable(f"cannot download {REPO_ID}/{filename}: {first_line}") from None
    _check_cached_copy(path, filename)
    return path


def _check_cached_copy(path: Path, filename: str) -> None:
    """Raises a ValueError if the cached file's bytes are not the ones the hub published. The cache
    names a large (LFS) file's blob after its sha256; other layouts (no symlinks) are not checked."""
    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and file_digest(blob) != blob.name:
        raise ValueError(f"the cached copy of {REPO_ID}/{filename} is damaged (its sha256 is not the published "
                         f"one): delete {path} and {blob}, or pass force_download=True, to fetch it again")


def distilled_backbone(name: str, variant: str | None = None, force_download: bool = False,
                       **timm_kwargs) -> nn.Module:
    """The timm ViT ``name`` with the DVT authors' distilled weights (the whole ViT fine-tuned to
    give denoised features itself), ImageNet- or VOC-trained (``variant``; None: ImageNet where
    released). Usable as the ``model`` of fastsrt.SRT, fastsrt.DVT and Backbone."""
    path = download(release_file(name, "distilled", variant), force_download=force_download)
    return load_distilled(path, name, **timm_kwargs)


def load_distilled(path: str | os.PathLike, name: str, **timm_kwargs) -> nn.Module:
    """The timm ViT ``name`` (built as fastsrt builds timm models: ``load_timm_model``) with the
    weights of an authors' distilled checkpoint file: a dict whose "model" entry holds the model's
    state with a ``model.`` prefix on every name."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise ValueError(f"cannot read distilled checkpoint {str(path)!r}: {error}") from None
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{str(path)!r} is not a distilled checkpoint (no 'model' state dict in it)")
    unprefixed = sorted(key for key in state if not key.startswith("model."))
    if unprefixed:
        raise ValueError(f"{str(path)!r}: distilled weights are named 'model.*'; found {', '.join(unprefixed[:3])}")
    model = load_timm_model(name, pretrained=False, seed=0, **timm_kwargs)  # seeded: leaves the caller's RNG alone
    try:
        model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    except RuntimeError as error:
        first_lines = " ".join(str(error).strip().splitlines()[:2])
        raise ValueError(f"{str(path)!r} does not hold the weights of a {name}: {first_lines}") from None
    return model.eval()
