"""The DVT denoiser against an independent float64 computation from an authors'-format state dict."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from utils import rel_err

from fastsrt.dvt import Denoiser

BLOCK_SHAPES = {  # timm Block parameter names -> shape, for dim C
    "norm1.weight": lambda c: (c,), "norm1.bias": lambda c: (c,),
    "attn.qkv.weight": lambda c: (3 * c, c), "attn.qkv.bias": lambda c: (3 * c,),
    "attn.proj.weight": lambda c: (c, c), "attn.proj.bias": lambda c: (c,),
    "norm2.weight": lambda c: (c,), "norm2.bias": lambda c: (c,),
    "mlp.fc1.weight": lambda c: (4 * c, c), "mlp.fc1.bias": lambda c: (4 * c,),
    "mlp.fc2.weight": lambda c: (c, 4 * c), "mlp.fc2.bias": lambda c: (c,),
}


def authors_state(dim, grid, blocks=1, seed=0):
    """A random state dict in the released checkpoints' naming: denoiser.<Block names>, pos_embed."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for b in range(blocks):
        prefix = "denoiser." if blocks == 1 else f"denoiser.{b}."
        for name, shape in BLOCK_SHAPES.items():
            shape = shape(dim)
            values = torch.randn(shape, generator=generator)
            if name.startswith("norm") and name.endswith("weight"):
                values = 1 + 0.2 * values
            elif name.endswith("weight"):
                values = values / math.sqrt(shape[1])
            else:
                values = 0.2 * values
            state[prefix + name] = values
    state["pos_embed"] = torch.randn(1, grid[0] * grid[1], dim, generator=generator)  # large: it must matter
    return state


def reference_block(x, state, prefix, heads):
    """A pre-norm ViT block written out in float64: LN(eps 1e-6) -> MHSA -> residual -> LN -> MLP(GELU)."""
    s = {k.removeprefix(prefix): v.double() for k, v in state.items() if k.startswith(prefix)}

    def norm(t, name):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * s[f"{name}.weight"] + s[f"{name}.bias"]

    def linear(t, name):
        return t @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    batch, tokens, dim = x.shape
    head = dim // heads
    q, k, v = linear(norm(x, "norm1"), "attn.qkv").view(batch, tokens, 3, heads, head).permute(2, 0, 3, 1, 4)
    attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), dim=-1)
    x = x + linear((attention @ v).transpose(1, 2).reshape(batch, tokens, dim), "attn.proj")
    hidden = linear(norm(x, "norm2"), "mlp.fc1")
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + linear(hidden, "mlp.fc2")


def reference_denoiser(tokens, state, trained_grid, heads, blocks=1):
    batch, dim, height, width = tokens.shape
    pos = state["pos_embed"].double().reshape(1, *trained_grid, dim).permute(0, 3, 1, 2)
    if (height, width) != tuple(trained_grid):
        pos = F.interpolate(pos, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    x = tokens.double().flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
    for b in range(blocks):
        x = reference_block(x, state, "denoiser." if blocks == 1 else f"denoiser.{b}.", heads)
    return x.transpose(1, 2).reshape(batch, dim, height, width)


@pytest.fixture
def authors_file(tmp_path):
    state = authors_state(128, (4, 4))
    path = tmp_path / "vit_small_patch14_dinov2.lvd142m.pth"
    torch.save({"denoiser": state}, path)
    return path, state


def test_authors_checkpoint_matches_independent_block(authors_file):
    path, state = authors_file
    denoiser = Denoiser.load(path)
    assert (denoiser.dim, denoiser.grid, denoiser.num_blocks, denoiser.num_heads) == (128, (4, 4), 1, 2)
    assert denoiser.backbone == "vit_small_patch14_dinov2.lvd142m"  # from the released file's name
    tokens = torch.randn(3, 128, 4, 4)
    expected = reference_denoiser(tokens, state, (4, 4), heads=2)
    assert rel_err(denoiser(tokens), expected) <= 1e-5


@pytest.mark.parametrize("grid", [(6, 9), (3, 2), (4, 7)])
def test_other_grids_resample_the_positional_embedding(authors_file, grid):
    path, state = authors_file
    denoiser = Denoiser.load(path)
    tokens = torch.randn(2, 128, *grid)
    expected = reference_denoiser(tokens, state, (4, 4), heads=2)
    assert rel_err(denoiser(tokens), expected) <= 1e-5
    assert rel_err(denoiser.at_grid(grid)(tokens), expected) <= 1e-5  # precomputed for export


def test_several_blocks_and_a_plain_state_dict(tmp_path):
    state = authors_state(64, (3, 3), blocks=2, seed=1)
    path = tmp_path / "two_blocks.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # a DDP-saved plain state dict
    denoiser = Denoiser.load(path)
    assert denoiser.num_blocks == 2 and denoiser.backbone is None
    tokens = torch.randn(2, 64, 3, 3)
    assert rel_err(denoiser(tokens), reference_denoiser(tokens, state, (3, 3), heads=1, blocks=2)) <= 1e-5


def test_vit_base_size_matches_the_paper():
    denoiser = Denoiser(768)
    block = sum(p.numel() for p in denoiser.denoiser.parameters())
    assert block == 7_087_872 and denoiser.pos_embed.numel() == 37 * 37 * 768  # 7.09M + 1.05M
    assert denoiser.num_heads == 12


def test_fastsrt_format_roundtrip(tmp_path):
    torch.manual_seed(0)
    denoiser = Denoiser(128, grid=(3, 5), backbone="vit_small_patch14_dinov2.lvd142m", layer=-2).eval()
    with torch.no_grad():
        denoiser.pos_embed.normal_()
    path = denoiser.save(tmp_path / "den.safetensors")
    config = json.loads((tmp_path / "den.json").read_text())
    assert config == {"format": "fastsrt.denoiser", "dim": 128, "grid": [3, 5], "num_blocks": 1, "num_heads": 2,
                      "pos_embed": True, "backbone": "vit_small_patch14_dinov2.lvd142m", "layer": -2}
    (tmp_path / "den.json").unlink()  # the safetensors metadata alone suffices
    loaded = Denoiser.load(path)
    assert loaded.config == denoiser.config
    tokens = torch.randn(2, 128, 3, 5)
    assert torch.equal(loaded(tokens), denoiser(tokens))
    # the authors' names: the same file loads as a state dict of their module layout
    from fastsrt.io import load_tensors

    assert set(load_tensors(path)) == {f"denoiser.{k}" for k in BLOCK_SHAPES} | {"pos_embed"}


def test_non_square_embedding_needs_a_grid(tmp_path):
    path = tmp_path / "d.pth"
    torch.save({"denoiser": authors_state(64, (2, 3))}, path)
    with pytest.raises(ValueError, match="not square"):
        Denoiser.load(path)
    assert Denoiser.load(path, grid=(2, 3)).grid == (2, 3)


def test_bad_input_is_named():
    denoiser = Denoiser(128, grid=(4, 4))
    with pytest.raises(ValueError, match="128-channel tokens.*64 channels"):
        denoiser(torch.randn(1, 64, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        denoiser(torch.randn(128, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        denoiser(torch.ones(1, 128, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_heads"):
        Denoiser(100, num_heads=3)


def test_bad_checkpoints_are_named(tmp_path, authors_file):
    path, _ = authors_file
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2.lvd142m, not for vit_base_patch16_224"):
        Denoiser.load(path, backbone="vit_base_patch16_224.augreg_in21k")
    assert Denoiser.load(path, backbone="vit_small_patch14_dinov2").dim == 128  # no tag: the architecture decides
    with pytest.raises(FileNotFoundError):
        Denoiser.load(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        Denoiser.load(garbage)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):
        Denoiser.load(tmp_path / "bad.safetensors")
    empty = tmp_path / "empty.pth"
    torch.save({"denoiser": {"something": torch.zeros(1)}}, empty)
    with pytest.raises(ValueError, match="no denoiser weights"), pytest.warns(UserWarning, match="something"):
        Denoiser.load(empty)
    with pytest.raises(ValueError, match=".safetensors"):
        Denoiser(64, grid=2).save(tmp_path / "den.pt")
