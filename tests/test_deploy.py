"""Deployment: ONNX export + ONNX Runtime vs eager, the ViT + denoiser path, the engine cache key,
backend choice, input checks; TensorRT and CUDA graphs where a GPU (and TensorRT) are present."""
import copy
import importlib.util
import os
import sys

import pytest
import torch
from utils import rel_err, requires_cuda, tiny_vit

import fastsrt
from fastsrt import deploy
from fastsrt.cli import main
from fastsrt.deploy import cache_key, choose_backend, module_hash
from fastsrt.deploy.backends import IMPLEMENTATIONS, OnnxRuntimeBackend, TensorRTBackend
from fastsrt.deploy.ort import require_onnxruntime
from fastsrt.deploy.tensorrt_engine import require_tensorrt
from fastsrt.dispatch import Implementation, names
from fastsrt.dvt import Denoiser
from fastsrt.errors import Unavailable
from fastsrt.integrity import record_path
from fastsrt.options import BACKENDS

NAME = "vit_small_patch14_dinov2.lvd142m"
requires_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                                       reason="TensorRT is not installed (pip install tensorrt; needs a CUDA GPU)")


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    den = Denoiser(128, grid=(4, 4), backbone=NAME).eval()
    with torch.no_grad():
        den.pos_embed.normal_()  # large, so that a wrong resampling shows
    return den


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy-cache")


def test_onnxruntime_matches_eager_at_another_grid_and_batches(denoiser, cache):
    compiled = deploy.compile(denoiser, grid=(3, 6), batch=4, backend="onnxruntime", cache_dir=cache)
    assert compiled.backend == "onnxruntime" and compiled.files["onnx"].is_file()
    for batch in (1, 4):
        tokens = torch.randn(batch, 128, 3, 6)
        with torch.no_grad():
            expected = denoiser(tokens)  # eager resamples the positional embedding on the fly
        assert rel_err(compiled(tokens), expected) <= 1e-4


def test_export_uses_operators_tensorrt_parses(denoiser, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = deploy.export_onnx(denoiser.at_grid((4, 4)), (128, 4, 4), tmp_path / "den.onnx", max_batch=4)
    model = onnx.load(str(path))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    operators = {node.op_type for node in model.graph.node}
    assert "Gelu" not in operators and "LayerNormalization" in operators and "Erf" in operators


def test_vit_plus_denoiser_exports_at_a_fixed_image_size(denoiser, cache):
    model = tiny_vit(embed_dim=128)
    compiled = deploy.compile_pipeline(model, denoiser, (56, 84), batch=2, backend="onnxruntime", cache_dir=cache)
    images = torch.randn(2, 3, 56, 84)
    expected = fastsrt.DVT(model, denoiser)(images)
    assert rel_err(compiled(images), expected) <= 1e-4
    with pytest.raises(ValueError, match="multiple of the patch"):
        deploy.FixedSizePipeline(model, denoiser, 50)
    with pytest.raises(ValueError, match="does not belong"):
        deploy.FixedSizePipeline(tiny_vit(embed_dim=64), denoiser, 56)


def test_compile_reuses_the_cached_export_until_the_weights_change(denoiser, tmp_path):
    first = deploy.compile(denoiser, grid=(4, 4), batch=2, backend="onnxruntime", cache_dir=tmp_path)
    stamp = first.files["onnx"].stat().st_mtime_ns
    again = deploy.compile(denoiser, grid=(4, 4), batch=2, backend="onnxruntime", cache_dir=tmp_path)
    assert again.files["onnx"] == first.files["onnx"] and again.files["onnx"].stat().st_mtime_ns == stamp

    changed = copy.deepcopy(denoiser)
    with torch.no_grad():
        changed.denoiser.attn.proj.weight[0, 0] += 0.5
    other = deploy.compile(changed, grid=(4, 4), batch=2, backend="onnxruntime", cache_dir=tmp_path)
    assert other.files["onnx"] != first.files["onnx"] and first.files["onnx"].stat().st_mtime_ns == stamp
    built = [first.files["onnx"], other.files["onnx"]]  # and the digest recorded after each build
    assert sorted((tmp_path / "onnx").iterdir()) == sorted(built + [record_path(path) for path in built])
    tokens = torch.randn(1, 128, 4, 4)
    with torch.no_grad():  # each file holds its own weights
        assert rel_err(other(tokens), changed(tokens)) <= 1e-4 and rel_err(first(tokens), denoiser(tokens)) <= 1e-4


def test_cache_key_follows_weights_shapes_precision_and_version(denoiser):
    same = Denoiser(128, grid=(4, 4), backbone=NAME)
    same.load_state_dict(denoiser.state_dict())
    assert module_hash(same) == module_hash(denoiser)
    changed = Denoiser(128, grid=(4, 4), backbone=NAME)
    changed.load_state_dict(denoiser.state_dict())
    with torch.no_grad():
        changed.denoiser.mlp.fc2.bias[5] += 1e-3
    assert module_hash(changed) != module_hash(denoiser)
    heads = Denoiser(128, grid=(4, 4), num_heads=4, backbone=NAME)  # same weight shapes, other computation
    heads.load_state_dict(denoiser.state_dict())
    assert module_hash(heads) != module_hash(denoiser)

    base = dict(weights=module_hash(denoiser), input_shape=(128, 4, 4), batch=(1, 8, 8), precision="fp16",
                runtime="tensorrt-10.3.0", device="NVIDIA H100 sm90")
    key = cache_key(**base)
    assert key == cache_key(**base)
    for field, value in [("weights", module_hash(changed)), ("input_shape", (128, 4, 5)), ("batch", (1, 16, 16)),
                         ("precision", "bf16"), ("runtime", "tensorrt-10.4.0"), ("device", "NVIDIA H200 sm90")]:
        assert cache_key(**{**base, field: value}) != key, field


def test_backend_choice_and_messages():
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu, "fp32")[0] == "onnxruntime"
    assert choose_backend("auto", cpu, "bf16")[0] == "torch"
    with pytest.raises(Unavailable, match="needs a CUDA device"):
        choose_backend("tensorrt", cpu, "fp32")
    with pytest.raises(Unavailable, match="fp32 only"):
        choose_backend("onnxruntime", cpu, "fp16")
    with pytest.raises(ValueError, match="backend"):  # wrong everywhere
        choose_backend("openvino", cpu, "fp32")
    with pytest.raises(ValueError, match="precision"):
        choose_backend("torch", cpu, "int8")
    if importlib.util.find_spec("tensorrt") is None:  # on a GPU machine without TensorRT: one clear warning
        with pytest.warns(UserWarning, match="pip install tensorrt"):
            backend, why = choose_backend("auto", torch.device("cuda"), "fp32")
        assert backend == "torch" and "not installed" in why
        with pytest.raises(Unavailable, match="pip install tensorrt"):
            choose_backend("tensorrt", torch.device("cuda"), "fp32")


def test_backends_follow_the_dispatch_convention(denoiser, cache):
    assert set(names(IMPLEMENTATIONS)) == set(BACKENDS) and deploy.BACKENDS == BACKENDS
    assert all(isinstance(backend, Implementation) for backend in IMPLEMENTATIONS)
    cpu = torch.device("cpu")
    assert TensorRTBackend().not_supported_reasons(cpu, "fp32") == ["needs a CUDA device"]
    assert OnnxRuntimeBackend().not_supported_reasons(cpu, "fp16") == ["runs fp32 only, not fp16"]
    assert OnnxRuntimeBackend().not_supported_reasons(cpu, "fp32") == []  # onnx and onnxruntime are installed here
    with pytest.raises(Unavailable, match=r"impl='tensorrt' cannot run here: needs a CUDA device"):
        deploy.compile(denoiser, grid=(4, 4), backend="tensorrt", device="cpu", cache_dir=cache)

    fp32 = deploy.compile(denoiser, grid=(4, 4), backend="auto", device="cpu", cache_dir=cache)
    assert fp32.backend == "onnxruntime" and fp32.why == "onnxruntime runs float32 faster than eager torch on the CPU"
    assert set(fp32.files) == {"onnx"}
    with pytest.warns(UserWarning, match="'onnxruntime' cannot run .*fp32 only.*runs 'torch'"):
        fp16 = deploy.compile(denoiser, grid=(4, 4), backend="auto", precision="fp16", device="cpu", cache_dir=cache)
    assert fp16.backend == "torch" and fp16.why.startswith("not onnxruntime: runs fp32 only, not fp16; torch")
    assert fp16.files == {} and repr(fp16).startswith("CompiledModule(backend='torch'")
    tokens = torch.randn(1, 128, 4, 4)
    with torch.no_grad():
        expected = denoiser(tokens)
    assert rel_err(fp32(tokens), expected) <= 1e-4 and 0 < rel_err(fp16(tokens), expected) <= 2e-2


def test_missing_packages_are_unavailable_naming_what_to_install(monkeypatch, tmp_path):
    for package in ("tensorrt", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(Unavailable, match="pip install tensorrt"):
        require_tensorrt()
    with pytest.raises(Unavailable, match="pip install onnxruntime"):
        require_onnxruntime()
    with pytest.raises(Unavailable, match="onnxscript is not installed"):
        deploy.export_onnx(torch.nn.Linear(2, 2), (2,), tmp_path / "linear.onnx")
    reasons = OnnxRuntimeBackend().not_supported_reasons(torch.device("cpu"), "fp32")
    assert len(reasons) == 2 and "pip install onnxruntime" in reasons[0] and "onnxscript" in reasons[1]
    assert choose_backend("auto", torch.device("cpu"), "fp32")[0] == "torch"


def test_compiled_input_checks(denoiser, cache):
    compiled = deploy.compile(denoiser, grid=(4, 4), batch=2, backend="torch", cache_dir=cache)
    tokens = torch.randn(2, 128, 4, 4)
    with torch.no_grad():
        assert rel_err(compiled(tokens), denoiser(tokens)) <= 1e-6
    for bad in (torch.randn(2, 128, 4, 5), torch.randn(2, 64, 4, 4), torch.randn(3, 128, 4, 4), torch.randn(128, 4, 4)):
        with pytest.raises(ValueError, match=r"takes \(B, 128, 4, 4\) with 1 <= B <= 2"):
            compiled(bad)
    with pytest.raises(TypeError):
        compiled(tokens.long())


def test_cli_export(denoiser, tmp_path, capsys):
    path = denoiser.save(tmp_path / "den.safetensors")
    arguments = ["export", str(path), "--out", str(tmp_path / "out"), "--grid", "5", "5", "--batch", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--repeat", "2", "--device", "cpu"]  # auto: onnxruntime
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "backend onnxruntime" in printed and (tmp_path / "out" / "denoiser-5x5-b2.onnx").is_file()
    error = float(printed.split("relative error vs eager float32: ")[1].split(";")[0])
    assert error <= 1e-4
    assert main(arguments + ["--backend", "tensorrt", "--device", "cpu"]) == 1  # Unavailable here
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "needs a CUDA device" in error and "backend failed" not in error


def test_cli_export_torch_bf16_leaves_the_eager_check_in_float32(denoiser, tmp_path, capsys):
    path = denoiser.save(tmp_path / "den.safetensors")
    arguments = ["export", str(path), "--out", str(tmp_path / "out"), "--backend", "torch", "--precision", "bf16",
                 "--device", "cpu", "--repeat", "1"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "backend torch" in printed
    assert float(printed.split("relative error vs eager float32: ")[1].split(";")[0]) <= 2e-2


def test_torch_backend_runs_a_copy(denoiser):
    den = Denoiser(128, grid=(4, 4), backbone=NAME)
    den.load_state_dict(denoiser.state_dict())
    compiled = deploy.compile_module(den, (128, 4, 4), 2, backend="torch", precision="bf16", device="cpu")
    assert all(p.dtype == torch.float32 and p.requires_grad for p in den.parameters())  # the caller's module as it was
    tokens = torch.randn(2, 128, 4, 4)
    with torch.no_grad():
        expected = den(tokens)
    actual = compiled(tokens)
    assert actual.dtype == torch.float32 and 0 < rel_err(actual, expected) <= 2e-2


def test_torch_backend_rejects_nested_cuda_graphs(denoiser):
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="captures CUDA graphs itself"):
            deploy.compile(denoiser, grid=(4, 4), backend="torch", device="cpu", compile=True, cuda_graph=True,
                           compile_mode=mode)


def test_cli_export_reports_a_failing_backend_in_one_line(denoiser, tmp_path, capsys, monkeypatch):
    def broken_backend(*args, **kwargs):
        raise RuntimeError("TensorRT cannot parse model.onnx: unsupported node\n  (a long log follows)")

    monkeypatch.setattr(deploy, "compile_module", broken_backend)
    path = denoiser.save(tmp_path / "den.safetensors")
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "backend failed" in error and "cannot parse model.onnx" in error
    assert not (tmp_path / "out").exists()


@requires_cuda
def test_torch_backend_cuda_graph_matches_eager(denoiser, cache):
    den = copy.deepcopy(denoiser).to("cuda")  # the module-scoped fixture stays on the CPU
    compiled = deploy.compile(den, grid=(4, 4), batch=4, backend="torch", device="cuda", cache_dir=cache)
    for batch in (4, 1):
        tokens = torch.randn(batch, 128, 4, 4, device="cuda")
        with torch.no_grad():
            assert rel_err(compiled(tokens), den(tokens)) <= 1e-4
    compiled = deploy.compile(den, grid=(4, 4), batch=2, backend="torch", precision="bf16", device="cuda")
    tokens = torch.randn(2, 128, 4, 4, device="cuda")
    with torch.no_grad():
        assert rel_err(compiled(tokens), den(tokens)) <= 2e-2


@requires_cuda
@requires_tensorrt
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 2e-2), ("bf16", 3e-2)])
def test_tensorrt_matches_eager(denoiser, tmp_path, precision, tolerance):
    den = copy.deepcopy(denoiser).to("cuda")  # the module-scoped fixture stays on the CPU
    compiled = deploy.compile(den, grid=(4, 4), batch=4, backend="tensorrt", precision=precision, device="cuda",
                              cache_dir=tmp_path)
    assert compiled.files["engine"].is_file()
    for batch in (1, 3):
        tokens = torch.randn(batch, 128, 4, 4, device="cuda")
        with torch.no_grad():
            assert rel_err(compiled(tokens), den(tokens)) <= tolerance
    stamp = os.stat(compiled.files["engine"]).st_mtime_ns
    again = deploy.compile(den, grid=(4, 4), batch=4, backend="tensorrt", precision=precision, device="cuda",
                           cache_dir=tmp_path)
    assert os.stat(again.files["engine"]).st_mtime_ns == stamp  # served from the engine cache


def test_cli_export_of_vit_plus_denoiser(tmp_path, capsys):
    torch.manual_seed(0)
    den = Denoiser(384, grid=(2, 2), backbone=NAME)
    path = den.save(tmp_path / "den.safetensors")
    arguments = ["export", str(path), "--out", str(tmp_path / "out"), "--model", "vit_small_patch14_dinov2",
                 "--pretrained", "no", "--cache-dir", str(tmp_path / "cache"), "--repeat", "1", "--device", "cpu"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "vit_small_patch14_dinov2-dvt-28-b1.onnx").is_file()
    assert float(printed.split("relative error vs eager float32: ")[1].split(";")[0]) <= 1e-4
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--model", "vit_base_patch16_224"]) == 2
    assert "not for vit_base_patch16_224" in capsys.readouterr().err
