"""The values of every option, in one place and without torch, so the ``fastsrt`` command can list
its choices without importing torch. The modules that take an option check it against these
tuples; the command line takes its choices (and, through the config dataclasses, its defaults)
from here.
"""
from __future__ import annotations

UPSAMPLES = ("nearest", "bilinear")  # token grid -> pixels; "nearest" is the SRT paper's
PADDINGS = ("zeros", "replicate", "reflect")  # fill of a shifted view; "zeros" is the paper's
REDUCES = ("mean", "median")  # over views; "median" is the lower middle for an even count
OUTPUTS = ("pixel", "token")  # full resolution, or average-pooled back to the token grid
SRT_IMPLS = ("auto", "reference", "fused", "chunked")  # SRT's views + aggregation
ENCODING_IMPLS = ("auto", "reference", "extension")  # DVT's hash-grid encoding
BACKENDS = ("auto", "tensorrt", "torch", "onnxruntime")  # deployment of the denoiser
PRECISIONS = ("fp32", "fp16", "bf16")  # deployment precision
AMPS = ("auto", "bf16", "fp16", "none")  # mixed precision when training the denoiser
DVT_VARIANTS = ("imagenet", "voc")  # the DVT authors' released checkpoints: trained on ImageNet-1k or PASCAL VOC
PRETRAINED = {"auto": "auto", "yes": True, "no": False}  # the command line's word -> pretrained=
# Images with more pixels are refused from their header (fastsrt.io.load_image). The limit lies above every
# camera's photos (200 MP phone sensors: 16320 x 12240; 150 MP medium format) and keeps reading affordable, at
# about 20 bytes a pixel (4 GB at the limit); a decompression bomb (a PNG claiming 60000 x 60000, 72 GB to
# read) is never decoded.
MAX_PIXELS = 200_000_000

# dtype names -> torch dtype attribute names. A backbone dtype of "float32" means no autocast.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    """The torch dtype of a name in DTYPE_NAMES or PRECISIONS ("bfloat16", "bf16", ...)."""
    import torch

    name = PRECISION_DTYPES.get(name, name)
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES + tuple(PRECISION_DTYPES))}")
    return getattr(torch, name)
