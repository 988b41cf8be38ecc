"""fp16/bf16 ONNX graphs (fastsrt.deploy.precision, ModelOpt AutoCast) of the denoiser and of ViT + denoiser:
parity with eager float32 in ONNX Runtime on the CPU, reduced precision where it should be and float32 where
it must stay, and every node within TensorRT's ONNX operator list (fastsrt/deploy/tensorrt_onnx_ops.json).

ONNX Runtime's CPU kernels run the fp16 graphs but have no bf16 arithmetic (Add, MatMul, ...). A bf16 graph
is evaluated as ``emulate_bfloat16`` rewrites it: its bf16 weights become float32 tensors holding the same
(bf16) values, and every Cast to bf16 becomes a Cast to bf16 and back to float32, so values are rounded to
bf16 wherever the graph rounds them; the arithmetic between two casts runs in float32 instead of bf16.
"""
import numpy as np
import pytest
import torch
from utils import rel_err, tiny_vit

from fastsrt import deploy
from fastsrt.deploy.precision import KEPT_FLOAT32, convert_precision, graph_precision
from fastsrt.deploy.tensorrt_ops import tensor_types, tensorrt_operators, unsupported_by_tensorrt
from fastsrt.dvt import Denoiser

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.onnx.autocast", reason="the converter is not installed (pip install fastsrt[autocast])")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

NAME = "vit_small_patch14_dinov2.lvd142m"
LOW = {"fp16": "FP16", "bf16": "BF16"}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """{model: (eager float32 module, input shape, {precision: ONNX path})} for the denoiser and ViT + denoiser."""
    folder = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    denoiser = Denoiser(128, grid=(4, 4), backbone=NAME).eval()
    pipeline = deploy.FixedSizePipeline(tiny_vit(embed_dim=128), Denoiser(128, grid=(2, 2), backbone=NAME).eval(), 28)
    result = {}
    for name, module, shape in [("denoiser", denoiser, (128, 4, 4)), ("vit+denoiser", pipeline, (3, 28, 28))]:
        paths = {"fp32": deploy.export_onnx(module, shape, folder / f"{name}.onnx", max_batch=4)}
        for precision in LOW:
            paths[precision] = convert_precision(paths["fp32"], folder / f"{name}-{precision}.onnx", precision)
        result[name] = (module, shape, paths)
    return result


def emulate_bfloat16(model):
    """The bf16 graph with bf16 weights as float32 of the same values and each Cast to bf16 followed by a Cast
    back to float32 (see the module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.BFLOAT16:
            values = numpy_helper.to_array(init).astype(np.float32)  # exact: every bf16 is a float32
            graph.initializer[index].CopyFrom(numpy_helper.from_array(values, init.name))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == TensorProto.BFLOAT16:
            rounded = node.output[0]
            node.output[0] = f"{rounded}__bf16"
            nodes.append(helper.make_node("Cast", [node.output[0]], [rounded], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # the types inferred for the bf16 graph no longer hold
    return model


def run(model, inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def evaluate(path, precision: str, inputs: torch.Tensor) -> torch.Tensor:
    model = onnx.load(str(path))
    return run(emulate_bfloat16(model) if precision == "bf16" else model, inputs)


def float32_violations(model) -> list[str]:
    """The nodes of an operator in KEPT_FLOAT32 with an input or output that is not float32."""
    types = tensor_types(model)
    return [f"{node.name} ({node.op_type}): {tensor} is {types[tensor]}" for node in model.graph.node
            if node.op_type in KEPT_FLOAT32 for tensor in [*node.input, *node.output]
            if tensor in types and types[tensor] != "FP32"]


@pytest.mark.parametrize("name", ["denoiser", "vit+denoiser"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_graphs_match_eager_float32(graphs, name, precision):
    module, shape, paths = graphs[name]
    torch.manual_seed(1)
    inputs = torch.randn(3, *shape)
    with torch.no_grad():
        expected = module(inputs)
    assert rel_err(evaluate(paths["fp32"], "fp32", inputs), expected) <= 1e-5
    error = rel_err(evaluate(paths[precision], precision, inputs), expected)
    assert 1e-5 < error <= 1e-2, error  # rounded (so reduced precision ran), and within tolerance


@pytest.mark.parametrize("name", ["denoiser", "vit+denoiser"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_weights_and_matmuls_are_reduced_and_the_norms_float32(graphs, name, precision):
    model = onnx.load(str(graphs[name][2][precision]))
    assert graph_precision(model) == precision
    weights = [init for init in model.graph.initializer if len(init.dims) == 2]  # the Linear layers' matrices
    assert weights and all(init.data_type == getattr(TensorProto, {"fp16": "FLOAT16", "bf16": "BFLOAT16"}[precision])
                           for init in weights)
    types = tensor_types(model)
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    assert matmuls and all(types[tensor] == LOW[precision] for node in matmuls for tensor in node.input)
    kept = [node for node in model.graph.node if node.op_type in ("LayerNormalization", "Softmax")]
    assert {node.op_type for node in kept} == {"LayerNormalization", "Softmax"}
    assert float32_violations(model) == []
    ends = [*model.graph.input, *model.graph.output]
    assert [end.type.tensor_type.elem_type for end in ends] == [TensorProto.FLOAT] * 2  # keep_io_types


def test_a_norm_converted_to_fp16_is_caught(graphs, tmp_path):
    from modelopt.onnx.autocast import convert_to_mixed_precision

    everything = convert_to_mixed_precision(str(graphs["denoiser"][2]["fp32"]), low_precision_type="fp16",
                                            keep_io_types=True, op_types_to_exclude=[], data_max=float("inf"))
    violations = float32_violations(everything)
    assert any("LayerNormalization" in line for line in violations)
    assert any("Softmax" in line for line in violations)


@pytest.mark.parametrize("name", ["denoiser", "vit+denoiser"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_every_node_is_in_tensorrts_operator_list(graphs, name, precision):
    model = onnx.load(str(graphs[name][2][precision]))
    assert unsupported_by_tensorrt(model) == []
    listed = tensorrt_operators()["operators"]
    assert {"MatMul", "LayerNormalization", "Softmax", "Erf"} <= {node.op_type for node in model.graph.node}
    assert all(LOW[p] in listed[op] for p in LOW for op in ("MatMul", "Add", "Mul", "Erf"))


def test_the_operator_check_rejects_what_tensorrt_lacks():
    listed = tensorrt_operators()
    assert listed["tensorrt"] and listed["source"].startswith("https://github.com/onnx/onnx-tensorrt")
    inputs = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2]),
              helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])]
    nodes = [helper.make_node("Add", ["x", "x"], ["doubled"], name="add_double"),  # Add lists no DOUBLE
             helper.make_node("Det", ["y"], ["det"], name="determinant"),  # Det: not supported
             helper.make_node("Relu", ["y"], ["relu"], name="relu")]  # fine
    outputs = [helper.make_tensor_value_info(name, elem, None)
               for name, elem in [("doubled", TensorProto.DOUBLE), ("det", TensorProto.FLOAT),
                                  ("relu", TensorProto.FLOAT)]]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)])
    problems = unsupported_by_tensorrt(model)
    assert len(problems) == 3 and "add_double (Add): x is DOUBLE" in problems[0] and "determinant (Det)" in problems[2]
    model.opset_import[0].version = listed["opsets"][1] + 1
    assert "outside" in unsupported_by_tensorrt(model)[0]
