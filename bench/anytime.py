"""Anytime SRT: how close the result after k views is to the full result, per view order.

For the paper's 50 views (``shifts=3``: the identity twice, then the 7 x 7 grid), the relative
distance ||F_k - F_50|| / ||F_50|| of the mean over the first k views to the mean over all 50,
k = 1..50, for
    raster   the paper's order (``paper_grid(3)``: the identity, then row-major)
    random   the identity, then the other 49 views shuffled (several seeds: mean, min and max)
    anytime  ``fastsrt.views.anytime_order``, what SRT runs for a grid
on two backbones with spatial structure, random weights:
    synthetic  a fixed random patch embedding (a strided convolution), tanh, a random 1x1 mixing
    vit        timm's vit_small_patch14_dinov2, pretrained=False
The images: the generated scene of ``fastsrt.sample`` in its 8 orientations (rotations and mirror
images), so that the content favours no shift direction; the distance is over the whole batch.
Paper settings otherwise (nearest, zero padding, unmasked mean, pixel output). F_50 is SRT's own
full result; each F_k is the views' running mean, checked against ``SRT(max_views=k)``.

    python bench/anytime.py [--size 112] [--seeds 8] [--out bench/results]

writes anytime-<device>.json, .md (the k at which each order comes within 5% and 1% of F_50,
and the command) and .png (the curves).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fastsrt and bench from this checkout, not installed

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastsrt  # noqa: E402
from bench import harness  # noqa: E402
from fastsrt.ops.warp_aggregate import warp_aggregate  # noqa: E402
from fastsrt.sample import sample_image  # noqa: E402
from fastsrt.views import anytime_order, paper_grid  # noqa: E402

RADIUS = 3  # the paper's 50 views
THRESHOLDS = (0.05, 0.01)
PATCH = 14
SYNTHETIC_CHANNELS = 64
CHECKED_K = (1, 2, 7, 25)  # where F_k is checked against SRT(max_views=k)


class SyntheticBackbone(nn.Module):
    """A fixed random patch embedding, tanh, a random 1x1 mixing: tokens that depend on the image."""

    def __init__(self, channels: int = SYNTHETIC_CHANNELS, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Conv2d(3, channels, PATCH, stride=PATCH)
        self.mix = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            for conv, fan_in in ((self.embed, 3 * PATCH * PATCH), (self.mix, channels)):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 2 / fan_in**0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.embed(images)))


def backbone(name: str) -> nn.Module:
    if name == "synthetic":
        return SyntheticBackbone().eval()
    return fastsrt.load_timm_model("vit_small_patch14_dinov2", pretrained=False, seed=0,
                                   dynamic_img_size=True).eval()


def oriented_scenes(size: int) -> torch.Tensor:
    """The generated scene in its 8 orientations, normalised to about [-1, 1]: (8, 3, size, size)."""
    scene = sample_image(size) * 2 - 1
    turns = [torch.rot90(scene, quarter, (-2, -1)) for quarter in range(4)]
    return torch.stack(turns + [turn.flip(-1) for turn in turns])


def orders(seeds: int) -> dict[str, list[tuple[int, int]]]:
    """raster, random-<seed> and anytime orders of the paper's views."""
    raster = paper_grid(RADIUS)
    found = {"raster": raster}
    for seed in range(seeds):
        rest = torch.randperm(len(raster) - 1, generator=torch.Generator().manual_seed(seed)) + 1
        found[f"random-{seed}"] = [raster[0]] + [raster[i] for i in rest.tolist()]
    found["anytime"] = anytime_order(raster, PATCH)
    return found


@torch.no_grad()
def distance_curves(model: nn.Module, images: torch.Tensor, seeds: int) -> dict[str, list[float]]:
    """{order: [||F_k - F_50|| / ||F_50|| for k = 1..50]}. The views' tokens are computed once, by SRT in
    its anytime order; an order's F_k is the running mean of the views' warped token grids."""
    srt = fastsrt.SRT(model, RADIUS, patch_size=PATCH if isinstance(model, SyntheticBackbone) else None,
                      pretrained=False)
    full = srt.run(images)
    tokens = srt.view_tokens(srt.backbone.prepare(images)).tokens[0]  # (50, B, C, h, w), anytime order
    index = {shift: i for i, shift in enumerate(srt.shifts)}  # both identity views give the same tokens
    curves, all_orders = {}, orders(seeds)
    assert srt.shifts == all_orders["anytime"], "SRT does not run the grid in the anytime order"
    for name, order in all_orders.items():
        total, curve = torch.zeros_like(full.features, dtype=torch.float64), []
        for k, shift in enumerate(order, 1):
            view = tokens[index[shift]].unsqueeze(0)
            total += warp_aggregate(view, [shift], srt.patch_size)[0].double()
            curve.append(((total / k - full.features.double()).norm() / full.features.double().norm()).item())
            if name == "anytime" and k in CHECKED_K:
                check_max_views(srt, images, k, total / k)
        curves[name] = curve
    return curves


def check_max_views(srt: fastsrt.SRT, images: torch.Tensor, k: int, expected: torch.Tensor) -> None:
    """SRT(max_views=k) is the mean of the first k views of the anytime order."""
    srt.max_views = k
    try:
        out = srt.run(images)
    finally:
        srt.max_views = None
    error = ((out.features.double() - expected).norm() / expected.norm()).item()
    if out.views_done != k or error > 1e-5:
        raise AssertionError(f"SRT(max_views={k}): {out.views_done} views, relative error {error:.2e} to the "
                             "running mean of the first k views")


def first_within(curve: list[float], threshold: float) -> int:
    """The smallest k from which the curve stays within ``threshold``."""
    k = len(curve)
    while k > 1 and curve[k - 2] <= threshold:
        k -= 1
    return k


def summarise(curves: dict[str, list[float]]) -> dict[str, dict]:
    """Per order (the random seeds together): the curve (random: mean, min, max) and the k within each threshold."""
    randoms = [curve for name, curve in curves.items() if name.startswith("random-")]
    table = {}
    for name in ("raster", "random", "anytime"):
        if name == "random":
            columns = list(zip(*randoms))
            row = {"curve": [sum(c) / len(c) for c in columns], "min": [min(c) for c in columns],
                   "max": [max(c) for c in columns], "seeds": len(randoms),
                   "within": {f"{t:.0%}": [first_within(c, t) for c in randoms] for t in THRESHOLDS}}
        else:
            row = {"curve": curves[name], "within": {f"{t:.0%}": first_within(curves[name], t) for t in THRESHOLDS}}
        table[name] = row
    anytime, raster = table["anytime"]["curve"], table["raster"]["curve"]
    table["anytime"]["beats_raster_at"] = [k for k in range(2, len(raster)) if anytime[k - 1] < raster[k - 1]]
    return table


def markdown(results: dict) -> str:
    lines = [f"# Anytime SRT: distance to the full {len(paper_grid(RADIUS))}-view result", "",
             f"Device: {results['device']}. Command: `{results['command']}`", "",
             "k at which each order comes, and stays, within 5% and 1% of the full result F_50 "
             "(||F_k - F_50|| / ||F_50||); random: each seed's k, identity first then the other views shuffled.",
             "", "| backbone | order | 5% | 1% | distance at k = 2, 5, 10, 25, 49 |", "|---|---|---|---|---|"]
    for backbone_name, table in results["backbones"].items():
        for name, row in table.items():
            within = [", ".join(map(str, v)) if isinstance(v, list) else str(v) for v in row["within"].values()]
            at = " / ".join(f"{row['curve'][k - 1]:.3f}" for k in (2, 5, 10, 25, 49))
            lines.append(f"| {backbone_name} | {name} | {within[0]} | {within[1]} | {at} |")
    lines.append("")
    for backbone_name, table in results["backbones"].items():
        wins = table["anytime"]["beats_raster_at"]
        missing = [k for k in range(2, len(table["raster"]["curve"])) if k not in wins]
        verdict = "every k in 2..49" if not missing else f"k in 2..49 except {missing}"
        lines.append(f"- {backbone_name}: the anytime order is closer than raster at {verdict} "
                     "(k = 1 is the identity view in both).")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, len(results["backbones"]), figsize=(6 * len(results["backbones"]), 4.5))
    for axis, (backbone_name, table) in zip(axes, results["backbones"].items()):
        last = len(table["raster"]["curve"]) - 1  # k = 50 is F_50 itself: 0 up to rounding, off a log scale
        ks = range(1, last + 1)
        axis.plot(ks, table["raster"]["curve"][:last], label="raster (paper)", color="tab:red")
        axis.plot(ks, table["random"]["curve"][:last], color="tab:gray",
                  label=f"random ({table['random']['seeds']} seeds: mean, min-max)")
        axis.fill_between(ks, table["random"]["min"][:last], table["random"]["max"][:last], color="tab:gray",
                          alpha=0.25)
        axis.plot(ks, table["anytime"]["curve"][:last], label="anytime", color="tab:blue")
        for threshold in THRESHOLDS:
            axis.axhline(threshold, color="black", linewidth=0.5, linestyle=":")
        axis.set(yscale="log", xlabel="views k", ylabel="||F_k - F_50|| / ||F_50||", title=backbone_name)
        axis.legend()
    figure.suptitle(f"SRT after k of 50 views, {results['size']} px, random weights")
    figure.tight_layout()
    harness.save_figure(path, figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=112, help="image side in pixels, a multiple of 14")
    parser.add_argument("--seeds", type=int, default=8, help="random orders")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = oriented_scenes(args.size)
    device, slug = harness.device_name(torch.device("cpu"))
    results = {"device": device, "size": args.size, "versions": harness.versions(),
               "command": "python bench/anytime.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "backbones": {}}
    for name in ("synthetic", "vit"):
        results["backbones"][name] = summarise(distance_curves(backbone(name), images, args.seeds))
        print(markdown(results))
    stem = args.out / f"anytime-{slug}"
    harness.save_text(stem.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    harness.save_text(stem.with_suffix(".md"), markdown(results))
    plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
