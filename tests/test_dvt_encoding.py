import shutil
import warnings

import pytest
import torch
from utils import rel_err, requires_cuda

import fastsrt.dvt
from fastsrt import errors
from fastsrt.dispatch import names
from fastsrt.errors import Unavailable
from fastsrt.ops.grid_encoding import (
    IMPLEMENTATIONS,
    GridEncodingConfig,
    choose_encoding,
    grid_encode,
    grid_encode_reference,
)
from fastsrt.ops.grid_encoding import extension as extension_module
from fastsrt.ops.grid_encoding.dispatch import ExtensionEncoding
from fastsrt.options import ENCODING_IMPLS

# 5 levels, resolutions 4, 8, 16, 32, 64 with 256 rows: two dense levels, three that hash
MIXED = GridEncodingConfig(levels=5, features=3, log2_table_size=8, base_resolution=4, max_resolution=64)
DENSE = GridEncodingConfig(levels=3, features=2, log2_table_size=16, base_resolution=3, max_resolution=20)
PAPER = GridEncodingConfig()


@pytest.fixture(scope="module")
def cuda_extension(extension):
    """The extension with its CUDA kernels (the tests using it are marked requires_cuda)."""
    if not extension.has_cuda():
        pytest.skip("the extension was built without CUDA kernels (no nvcc or GPU at build time)")
    return extension


def random_inputs(config, batch=2, points=300, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, points, 2, generator=generator, dtype=dtype)
    table = torch.randn(batch, config.table_rows, config.features, generator=generator, dtype=dtype)
    return coords, table


def border_coords(config, batch=2):
    """0, 1, every cell border of every level, and points just beside them."""
    values = {0.0, 1.0}
    for resolution in config.resolutions:
        values.update(k / resolution for k in range(resolution + 1))
    values = torch.tensor(sorted(values))
    values = torch.cat([values, (values + 1e-7).clamp(max=1), (values - 1e-7).clamp(min=0)])
    xs, ys = values, values.roll(7)  # pair borders with other borders
    return torch.stack([xs, ys], -1).expand(batch, -1, -1).contiguous()


def naive_encode(coords, table, config):
    """Point by point in Python floats, straight from the definition in fastsrt/ops/grid_encoding/reference.py."""
    batch, points, _ = coords.shape
    out = torch.zeros(batch, points, config.output_dim, dtype=torch.float64)
    for b in range(batch):
        for n in range(points):
            x, y = coords[b, n].tolist()
            offset = 0
            for level, (resolution, rows) in enumerate(zip(config.resolutions, config.level_rows)):
                cells = [min(max(int(c * resolution // 1), 0), resolution - 1) for c in (x, y)]
                fx, fy = x * resolution - cells[0], y * resolution - cells[1]
                for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
                    vx, vy = cells[0] + dx, cells[1] + dy
                    if (resolution + 1) ** 2 <= rows:
                        row = vy * (resolution + 1) + vx
                    else:
                        row = ((vx ^ (vy * 2654435761)) % 2**32) % rows
                    weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
                    features = slice(level * config.features, (level + 1) * config.features)
                    out[b, n, features] += weight * table[b, offset + row].double()
                offset += rows
    return out


def test_config_levels_match_the_paper():
    assert PAPER.resolutions[0] == 16 and PAPER.resolutions[-1] == 1024 and len(PAPER.resolutions) == 16
    assert PAPER.hashed == [False] * 15 + [True]  # only the finest level (1025^2 vertices) exceeds 2^20 rows
    assert PAPER.output_dim == 128
    assert PAPER.level_rows[-1] == 2**20 and PAPER.level_rows[0] == 17**2
    assert MIXED.hashed == [False, False, True, True, True]
    table = MIXED.level_table()
    assert table[:, 1].tolist() == [0, 25, 106, 362, 618] and int(table[:, 2].sum()) == MIXED.table_rows


@pytest.mark.parametrize("bad", [dict(levels=0), dict(levels=33), dict(features=1.5), dict(log2_table_size=31),
                                 dict(base_resolution=64, max_resolution=32), dict(levels=True)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GridEncodingConfig(**bad)


@pytest.mark.parametrize("config", [MIXED, DENSE], ids=["mixed", "dense"])
def test_reference_matches_the_definition(config):
    coords, table = random_inputs(config, points=20, dtype=torch.float64)
    coords[0, :4] = torch.tensor([[0, 0], [1, 1], [0, 1], [0.5, 0.25]], dtype=torch.float64)
    assert rel_err(grid_encode_reference(coords, table, config), naive_encode(coords, table, config)) < 1e-12


def test_reference_gradcheck_float64():
    coords, table = random_inputs(MIXED, points=6, dtype=torch.float64)
    coords.requires_grad_()
    table.requires_grad_()
    assert torch.autograd.gradcheck(lambda c, t: grid_encode_reference(c, t, MIXED), (coords, table), fast_mode=True)


@pytest.mark.parametrize("config", [MIXED, DENSE, PAPER], ids=["mixed", "dense", "paper"])
def test_extension_forward_matches_reference(extension, config):
    coords, table = random_inputs(config)
    coords = torch.cat([coords, border_coords(config)], 1)
    out = torch.full((2, coords.shape[1], config.output_dim), float("nan"))  # poisoned: unwritten elements show
    extension.forward(coords, table, config.level_table(), out)
    # the same float32 inputs (at resolution 1024 float32 itself limits the fraction to ~1e-5)
    expected = grid_encode_reference(coords, table, config)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) <= 1e-6


@pytest.mark.parametrize("config", [MIXED, DENSE], ids=["mixed", "dense"])
@pytest.mark.parametrize("where", ["random", "borders"])
def test_extension_backward_matches_reference(extension, config, where):
    coords, table = random_inputs(config)
    if where == "borders":
        coords = border_coords(config)
    grad_out = torch.randn(2, coords.shape[1], config.output_dim, generator=torch.Generator().manual_seed(1))
    grad_table = torch.zeros_like(table)
    grad_coords = torch.full_like(coords, float("nan"))  # poisoned: must be overwritten entirely
    extension.backward(grad_out, coords, table, config.level_table(), grad_table, grad_coords)

    # the reference in float32 picks the same cells as the extension at the borders
    coords_ref, table_ref = coords.clone().requires_grad_(), table.clone().requires_grad_()
    grid_encode_reference(coords_ref, table_ref, config).backward(grad_out)
    assert rel_err(grad_table, table_ref.grad) <= 1e-6
    assert torch.isfinite(grad_coords).all()
    assert rel_err(grad_coords, coords_ref.grad) <= 1e-5


def test_extension_autograd_function_float64_gradcheck(extension):
    coords, table = random_inputs(MIXED, points=6, dtype=torch.float64)
    coords.requires_grad_()
    table.requires_grad_()
    encode = lambda c, t: grid_encode(c, t, MIXED, impl="extension")
    assert torch.autograd.gradcheck(encode, (coords, table), fast_mode=True)


def test_grid_encode_extension_equals_reference_through_autograd(extension):
    coords, table = random_inputs(MIXED, points=500, seed=3)
    results = []
    for impl in ("extension", "reference"):
        c, t = coords.clone().requires_grad_(), table.clone().requires_grad_()
        out = grid_encode(c, t, MIXED, impl=impl)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), c.grad, t.grad))
    for fast, reference in zip(*results):
        assert rel_err(fast, reference) <= 1e-5


@requires_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("config", [MIXED, DENSE, PAPER], ids=["mixed", "dense", "paper"])
def test_cuda_forward_matches_reference(cuda_extension, config, dtype, tolerance):
    coords, table = random_inputs(config, dtype=dtype)
    coords = torch.cat([coords, border_coords(config).to(dtype)], 1).cuda()
    table = table.cuda()
    out = torch.full((2, coords.shape[1], config.output_dim), float("nan"), dtype=dtype, device="cuda")  # poisoned
    cuda_extension.forward(coords, table, config.level_table(), out)
    assert torch.isfinite(out).all()
    assert rel_err(out, grid_encode_reference(coords, table, config)) <= tolerance


@requires_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("config", [MIXED, DENSE], ids=["mixed", "dense"])
@pytest.mark.parametrize("where", ["random", "borders"])
def test_cuda_backward_matches_reference(cuda_extension, config, where, dtype, tolerance):
    coords, table = random_inputs(config, dtype=dtype)
    if where == "borders":
        coords = border_coords(config).to(dtype)
    coords, table = coords.cuda(), table.cuda()
    grad_out = torch.randn(2, coords.shape[1], config.output_dim, generator=torch.Generator().manual_seed(1),
                           dtype=dtype).cuda()
    grad_table = torch.zeros_like(table)  # accumulated into (atomics over points sharing a row)
    grad_coords = torch.full_like(coords, float("nan"))  # poisoned: must be overwritten entirely
    cuda_extension.backward(grad_out, coords, table, config.level_table(), grad_table, grad_coords)
    coords_ref, table_ref = coords.clone().requires_grad_(), table.clone().requires_grad_()
    grid_encode_reference(coords_ref, table_ref, config).backward(grad_out)
    assert torch.isfinite(grad_coords).all()
    assert rel_err(grad_table, table_ref.grad) <= tolerance
    assert rel_err(grad_coords, coords_ref.grad) <= tolerance


@requires_cuda
def test_cuda_autograd_function_float64_gradcheck(cuda_extension):
    coords, table = random_inputs(MIXED, points=6, dtype=torch.float64)
    coords, table = coords.cuda().requires_grad_(), table.cuda().requires_grad_()
    encode = lambda c, t: grid_encode(c, t, MIXED, impl="extension")
    assert torch.autograd.gradcheck(encode, (coords, table), fast_mode=True)


def test_extension_rejects_bad_buffers(extension):
    coords, table = random_inputs(MIXED)
    with pytest.raises(RuntimeError, match="out must have shape"):
        extension.forward(coords, table, MIXED.level_table(), torch.empty(2, 300, 7))
    with pytest.raises(RuntimeError, match="rows"):
        extension.forward(coords, table[:, :-1].contiguous(), MIXED.level_table(), torch.empty(2, 300, 15))


def test_grid_encode_checks_inputs():
    coords, table = random_inputs(MIXED)
    with pytest.raises(ValueError, match="coords"):
        grid_encode(coords[..., :1], table, MIXED)
    with pytest.raises(ValueError, match="table must have shape"):
        grid_encode(coords, table[:1], MIXED)
    with pytest.raises(TypeError, match="dtype"):
        grid_encode(coords.double(), table, MIXED)
    with pytest.raises(ValueError, match="impl"):
        grid_encode(coords, table, MIXED, impl="fast")


@pytest.fixture
def fresh_warnings(monkeypatch):
    """warn_once as in a new process: warnings given by earlier tests come up again."""
    monkeypatch.setattr(errors, "_warned", set())


def test_no_compiler_warns_once_and_falls_back(monkeypatch, fresh_warnings):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    module, problem = extension_module.build_extension.__wrapped__()
    assert module is None and "no C++ compiler 'c++'" in problem

    monkeypatch.setattr(extension_module, "build_extension", lambda: (None, problem))
    coords, table = random_inputs(MIXED, points=10)
    with pytest.warns(UserWarning, match="no C.. compiler") as record:
        out = grid_encode(coords, table, MIXED)  # auto: the reference, with one warning saying why
    assert len(record) == 1 and "'reference'" in str(record[0].message)
    assert torch.equal(out, grid_encode_reference(coords, table, MIXED))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(grid_encode(coords, table, MIXED), out)  # once
    with pytest.raises(Unavailable, match="unavailable: no C.. compiler"):
        grid_encode(coords, table, MIXED, impl="extension")


def test_disabled_by_environment(monkeypatch, fresh_warnings):
    monkeypatch.setenv("FASTSRT_NO_EXTENSION", "1")
    assert extension_module.why_unavailable() == "FASTSRT_NO_EXTENSION is set"
    with pytest.raises(Unavailable, match="FASTSRT_NO_EXTENSION"):
        extension_module.load_extension()
    coords, table = random_inputs(MIXED, points=10)
    with pytest.raises(Unavailable, match="FASTSRT_NO_EXTENSION"):
        grid_encode(coords, table, MIXED, impl="extension")
    with pytest.warns(UserWarning, match="FASTSRT_NO_EXTENSION"):
        assert choose_encoding(coords, table, MIXED).name == "reference"
    monkeypatch.setenv("FASTSRT_NO_EXTENSION", "0")
    assert "FASTSRT_NO_EXTENSION" not in extension_module.why_unavailable()  # read at every call


def test_implementations_are_the_options():
    assert sorted(names(IMPLEMENTATIONS)) == sorted(ENCODING_IMPLS)
    assert fastsrt.dvt.grid_encode is grid_encode and fastsrt.dvt.GridEncodingConfig is GridEncodingConfig


def test_auto_chooses_the_extension_where_it_runs(extension):
    coords, table = random_inputs(MIXED, points=10)
    assert choose_encoding(coords, table, MIXED).name == "extension"
    assert choose_encoding(coords, table, MIXED, impl="reference").name == "reference"
    assert choose_encoding(coords.double(), table.double(), MIXED).name == "extension"


def test_other_dtypes_and_devices_take_the_reference(fresh_warnings):
    coords, table = random_inputs(MIXED, points=10)
    half_coords, half_table = coords.half(), table.half()
    assert "not torch.float16" in " ".join(ExtensionEncoding().not_supported_reasons(half_coords, half_table, MIXED))
    with pytest.raises(Unavailable, match="float32 or float64, not torch.float16"):
        grid_encode(half_coords, half_table, MIXED, impl="extension")
    with pytest.warns(UserWarning, match="float16"):
        out = grid_encode(half_coords, half_table, MIXED)
    assert out.dtype == torch.float16 and torch.equal(out, grid_encode_reference(half_coords, half_table, MIXED))
    meta_coords, meta_table = coords.to("meta"), table.to("meta")
    assert "not meta" in " ".join(ExtensionEncoding().not_supported_reasons(meta_coords, meta_table, MIXED))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto does not consider the extension on other devices: no warning
        assert choose_encoding(meta_coords, meta_table, MIXED).name == "reference"


def test_extension_source_folder_is_the_top_level_csrc():
    folder = extension_module.source_folder()
    assert folder == extension_module.Path(fastsrt.__file__).resolve().parents[1] / "csrc"
    assert all((folder / name).is_file() for name in extension_module.SOURCES)


def test_build_key_follows_the_gpu_architectures(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    capabilities = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    assert extension_module.cuda_architectures() == "8.0;9.0"
    a100_h100 = extension_module.build_key(with_cuda=True)
    capabilities[1] = (8, 0)
    assert extension_module.cuda_architectures() == "8.0"
    assert extension_module.build_key(with_cuda=True) != a100_h100
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert extension_module.build_key(with_cuda=True) not in (a100_h100, extension_module.build_key(with_cuda=False))
    cpu = extension_module.build_key(with_cuda=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert extension_module.build_key(with_cuda=False) == cpu  # a CPU build does not depend on GPUs
