"""TensorRT's ONNX operator support list (tensorrt_onnx_ops.json: onnx-tensorrt's docs/operators.md,
with the TensorRT version and opsets it lists) and the check of a graph against it: every node's
operator listed, every typed input and output of a node of a type listed for that operator, the
opset within the parser's range."""
from __future__ import annotations

import functools
import json
from pathlib import Path

OPERATOR_LIST = Path(__file__).with_name("tensorrt_onnx_ops.json")
# ONNX's TensorProto type names -> the names the list uses
TYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "INT32": "INT32",
              "INT64": "INT64", "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL"}


@functools.cache
def tensorrt_operators() -> dict:
    """The list as stored: {"tensorrt": version, "opsets": [lowest, highest], "source", "operators": {op: types}}."""
    return json.loads(OPERATOR_LIST.read_text())


def tensor_types(model) -> dict[str, str]:
    """{tensor name: list type name} for every tensor of the graph whose type ONNX's inference knows."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return {name: TYPE_NAMES.get(onnx.TensorProto.DataType.Name(code), onnx.TensorProto.DataType.Name(code))
            for name, code in types.items()}


def unsupported_by_tensorrt(model) -> list[str]:
    """What in the ONNX model (a ModelProto) TensorRT's list does not cover, one line each; empty when all is."""
    listed = tensorrt_operators()
    operators, (lowest, highest) = listed["operators"], listed["opsets"]
    version = listed["tensorrt"]
    problems = [f"opset {entry.version} is outside {lowest}-{highest}, what TensorRT {version}'s parser reads"
                for entry in model.opset_import if entry.domain in ("", "ai.onnx") and
                not lowest <= entry.version <= highest]
    types = tensor_types(model)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in operators:
            problems.append(f"{node.name} ({node.domain + '::' if node.domain else ''}{node.op_type}) is not in "
                            f"TensorRT {version}'s ONNX operator list")
            continue
        for tensor in dict.fromkeys([*node.input, *node.output]):  # each tensor once
            if tensor and tensor in types and types[tensor] not in operators[node.op_type]:
                problems.append(f"{node.name} ({node.op_type}): {tensor} is {types[tensor]}; TensorRT {version} "
                                f"lists {', '.join(operators[node.op_type])}")
    return problems
