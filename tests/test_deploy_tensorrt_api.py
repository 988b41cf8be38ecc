"""build_engine against a small stand-in ``tensorrt`` module with only the Python API surface of TensorRT 10
or 11 (11: no BuilderFlag.FP16/BF16, no NetworkDefinitionCreationFlag.EXPLICIT_BATCH, STRONGLY_TYPED kept but
ignored). Its parser reads the real ONNX graph for the network's input and output types; everything else it
records. This checks how fastsrt calls TensorRT's API (network flags, no precision flags, the profile, float32
I/O, the cache keys), not TensorRT itself: the GPU tests in tests/test_deploy.py build and run real engines."""
import enum
import sys
import types

import pytest
import torch

from fastsrt.deploy import backends
from fastsrt.deploy.export import export_onnx
from fastsrt.deploy.precision import convert_precision
from fastsrt.deploy.tensorrt_engine import build_engine
from fastsrt.dvt import Denoiser
from fastsrt.errors import Unavailable

onnx = pytest.importorskip("onnx")
pytest.importorskip("modelopt.onnx.autocast", reason="the converter is not installed (pip install fastsrt[autocast])")

SHAPE = (64, 2, 2)


def stand_in_tensorrt(version: str):
    """A ``tensorrt`` module with TensorRT ``version``'s members (10.x or 11.x), recording calls in ``.calls``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    eleven = int(version.split(".")[0]) >= 11
    trt.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "INT64"])
    # the enum values of NvInfer.h: 10.x has kEXPLICIT_BATCH = 0, kSTRONGLY_TYPED = 1; 11.x dropped the former
    creation = {"STRONGLY_TYPED": 0} if eleven else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    builder_flags = ["REFIT", "SPARSE_WEIGHTS"] + ([] if eleven else ["FP16", "BF16", "TF32"])
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", builder_flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"])
    onnx_types = {onnx.TensorProto.FLOAT: trt.DataType.FLOAT, onnx.TensorProto.FLOAT16: trt.DataType.HALF,
                  onnx.TensorProto.BFLOAT16: trt.DataType.BF16}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs = flags, [], []

        def get_input(self, index):
            return self.inputs[index]

        def get_output(self, index):
            return self.outputs[index]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data: bytes) -> bool:
            graph = onnx.load_from_string(data).graph
            for ends, values in ((self.network.inputs, graph.input), (self.network.outputs, graph.output)):
                ends.extend(types.SimpleNamespace(name=v.name, dtype=onnx_types[v.type.tensor_type.elem_type])
                            for v in values)
            trt.calls.append(("parse", len(graph.node)))
            return True

    class Recorder:
        def __init__(self, kind):
            self.kind = kind

        def __getattr__(self, method):
            return lambda *args: trt.calls.append((f"{self.kind}.{method}", *args))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Recorder("config")

        def create_optimization_profile(self):
            return Recorder("profile")

        def build_serialized_network(self, network, config):
            trt.calls.append(("build_serialized_network",))
            return f"engine built with flags {network.flags}".encode()

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, OnnxParser, Builder
    return trt


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt-api")
    torch.manual_seed(0)
    denoiser = Denoiser(SHAPE[0], grid=SHAPE[1:], backbone="vit_small_patch14_dinov2.lvd142m").eval()
    paths = {"fp32": export_onnx(denoiser, SHAPE, folder / "den.onnx", max_batch=4)}
    for precision in ("fp16", "bf16"):
        paths[precision] = convert_precision(paths["fp32"], folder / f"den-{precision}.onnx", precision)
    return paths


@pytest.mark.parametrize("version", ["10.15.1", "11.0.0"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_build_engine_uses_strong_typing_and_no_precision_flags(graphs, tmp_path, monkeypatch, version, precision):
    trt = stand_in_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = build_engine(graphs[precision], tmp_path / "den.engine", SHAPE, (1, 2, 4), precision)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    flags = 0 if precision == "fp32" else strongly_typed
    assert path.read_bytes() == f"engine built with flags {flags}".encode()
    calls = [call[0] for call in trt.calls]
    assert calls == ["create_network", "parse", "config.set_memory_pool_limit", "profile.set_shape",
                     "config.add_optimization_profile", "build_serialized_network"]  # no config.set_flag
    assert trt.calls[0] == ("create_network", flags)
    assert trt.calls[3] == ("profile.set_shape", "input", (1, *SHAPE), (2, *SHAPE), (4, *SHAPE))


def test_build_engine_refuses_a_graph_of_another_precision_or_with_reduced_io(graphs, tmp_path, monkeypatch):
    from modelopt.onnx.autocast import convert_to_mixed_precision

    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt("11.0.0"))
    with pytest.raises(ValueError, match="holds a fp32 graph, not fp16"):
        build_engine(graphs["fp32"], tmp_path / "a.engine", SHAPE, (1, 1, 1), "fp16")
    with pytest.raises(ValueError, match="holds a bf16 graph, not fp16"):
        build_engine(graphs["bf16"], tmp_path / "a.engine", SHAPE, (1, 1, 1), "fp16")
    half_io = convert_to_mixed_precision(str(graphs["fp32"]), low_precision_type="fp16", keep_io_types=False)
    onnx.save(half_io, str(tmp_path / "half-io.onnx"))
    with pytest.raises(RuntimeError, match="input and output must be float32"):
        build_engine(tmp_path / "half-io.onnx", tmp_path / "a.engine", SHAPE, (1, 1, 1), "fp16")
    assert not (tmp_path / "a.engine").exists()
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt("9.3.0"))
    with pytest.raises(Unavailable, match="TensorRT 10 or later"):
        build_engine(graphs["fp32"], tmp_path / "a.engine", SHAPE, (1, 1, 1), "fp32")


def test_reduced_graphs_are_cached_by_precision_and_converter_version(tmp_path, monkeypatch):
    torch.manual_seed(0)
    denoiser = Denoiser(SHAPE[0], grid=SHAPE[1:], backbone="vit_small_patch14_dinov2.lvd142m").eval()
    weights = backends.module_hash(denoiser)
    paths = {p: backends.cached_onnx(denoiser, weights, SHAPE, 2, tmp_path, p) for p in ("fp32", "fp16", "bf16")}
    assert len(set(paths.values())) == 3
    stamp = paths["fp16"].stat().st_mtime_ns
    assert backends.cached_onnx(denoiser, weights, SHAPE, 2, tmp_path, "fp16") == paths["fp16"]
    assert paths["fp16"].stat().st_mtime_ns == stamp  # served from the cache
    monkeypatch.setattr(backends, "converter_version", lambda: "modelopt-autocast-99.0")
    assert backends.cached_onnx(denoiser, weights, SHAPE, 2, tmp_path, "fp16") != paths["fp16"]


def test_cli_export_names_the_tensorrt_version_and_converter(graphs, tmp_path, monkeypatch, capsys):
    import modelopt

    from fastsrt import deploy
    from fastsrt.cli import main
    from fastsrt.deploy.runtime import CompiledModule

    trt = stand_in_tensorrt("11.0.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)

    def tensorrt_compile(module, input_shape, batch, backend, precision, device, cache_dir):  # no GPU here
        engine = build_engine(graphs[precision], tmp_path / "den.engine", input_shape, (1, batch, batch), precision)
        files = {"onnx": graphs[precision], "engine": engine}
        return CompiledModule(module, "tensorrt", "asked for", input_shape, batch, device, precision, files)

    monkeypatch.setattr(deploy, "compile_module", tensorrt_compile)
    checkpoint = Denoiser(SHAPE[0], grid=SHAPE[1:], backbone="vit_small_patch14_dinov2.lvd142m").save(
        tmp_path / "den.safetensors")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--backend", "tensorrt",
                 "--precision", "fp16", "--device", "cpu", "--repeat", "1"]) == 0
    printed = capsys.readouterr().out
    assert (f"built with TensorRT 11.0.0 (a strongly typed network from the fp16 graph of "
            f"modelopt-autocast-{modelopt.__version__})") in printed
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"denoiser-2x2-b1-fp16.onnx",
                                                                    "denoiser-2x2-b1-fp16.engine"}
