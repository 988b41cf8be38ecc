"""Reduced precision written into the exported ONNX graph itself, for TensorRT's strongly typed networks.

TensorRT 11 removed the builder flags (``BuilderFlag.FP16``/``BF16``) that let it choose fp16 or bf16
kernels itself: the types must be in the graph. The conversion is NVIDIA ModelOpt's AutoCast
(``modelopt.onnx.autocast.convert_to_mixed_precision``), the route TensorRT's 10.x -> 11.x migration
guide names. It was chosen over onnxconverter-common's float16 converter because that one writes
fp16 only, no bf16. AutoCast needs nvidia-modelopt plus onnx-graphsurgeon, onnxslim, polygraphy
and lief (what its ONNX code imports), not its ``[onnx]`` extra, which pins onnxruntime-gpu and
cupy: the ``trt`` extra lists exactly these.

The converted graph: weights and activations in fp16/bf16; the operators in ``KEPT_FLOAT32`` in
float32 (LayerNorm after attention overflows in fp16, softmax's exponentials and the sums of
squares of an unfused norm likewise); inputs and outputs float32 (``keep_io_types``), so the engine
takes and returns float32 as the fp32 one does. AutoCast also keeps in float32 any node whose
values exceed 512 in magnitude on random inputs (its ``data_max``). bf16 graphs come out at opset
22, the first where ONNX types Conv and the other operators in bf16.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from fastsrt.checks import check_choice
from fastsrt.errors import Unavailable
from fastsrt.io import atomic_path

REDUCED_PRECISIONS = ("fp16", "bf16")
KEPT_FLOAT32 = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "Pow", "Sqrt")


def require_autocast():
    """ModelOpt's AutoCast module; Unavailable naming the packages where it does not import."""
    try:
        from modelopt.onnx import autocast
    except ImportError as error:
        raise Unavailable(f"fp16/bf16 ONNX graphs need NVIDIA ModelOpt's AutoCast ({error}): pip install "
                          "nvidia-modelopt onnx-graphsurgeon onnxslim polygraphy lief (or fastsrt[trt])") from None
    return autocast


def converter_version() -> str:
    """The converter and its version, e.g. "modelopt-autocast-0.47.0" (part of the cache keys)."""
    require_autocast()
    import modelopt

    return f"modelopt-autocast-{modelopt.__version__}"


def convert_precision(source: str | os.PathLike, target: str | os.PathLike, precision: str) -> Path:
    """Writes the float32 ONNX graph ``source`` converted to ``precision`` ("fp16" or "bf16") to
    ``target`` (atomically): see the module docstring for what stays float32."""
    check_choice("precision", precision, REDUCED_PRECISIONS)
    autocast = require_autocast()
    import onnx

    # AutoCast logs every step at INFO on loggers of its own (created by the import): only its warnings pass
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("modelopt")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        model = autocast.convert_to_mixed_precision(str(source), low_precision_type=precision, keep_io_types=True,
                                                    op_types_to_exclude=list(KEPT_FLOAT32))
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    with atomic_path(target) as temporary:
        onnx.save(model, str(temporary))
    return Path(target)


def graph_precision(model) -> str:
    """"bf16" or "fp16" where the ONNX model (a ModelProto) holds weights of that type, else "fp32"."""
    import onnx

    types = {init.data_type for init in model.graph.initializer}
    for precision, code in (("bf16", onnx.TensorProto.BFLOAT16), ("fp16", onnx.TensorProto.FLOAT16)):
        if code in types:
            return precision
    return "fp32"
