"""The ``fastsrt`` command.

    fastsrt demo                      SRT on a generated image; writes a PCA picture
    fastsrt extract IMAGES... --out DIR   raw + SRT features (safetensors) and pictures
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

DEFAULT_MODEL = "vit_small_patch14_dinov2.lvd142m"


def _add_srt_options(parser: argparse.ArgumentParser, size: int) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (default: %(default)s)")
    parser.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto",
                        help="auto: pretrained weights when the network or cache has them, else random (default)")
    parser.add_argument("--shifts", type=int, default=3, help="shift radius d: 1 + (2d+1)^2 views (default: 3, 50 views)")
    parser.add_argument("--layer", type=int, default=-1, help="block index, negative from the end (default: -1)")
    parser.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest")
    parser.add_argument("--padding", choices=["zeros", "replicate", "reflect"], default="zeros")
    parser.add_argument("--reduce", choices=["mean", "median"], default="mean")
    parser.add_argument("--ignore-padding", action="store_true", help="average only over views covering a pixel")
    parser.add_argument("--output", choices=["pixel", "token"], default="pixel")
    parser.add_argument("--impl", choices=["auto", "reference", "fused"], default="auto")
    parser.add_argument("--view-batch", type=int, default=32, help="images per backbone forward (default: 32)")
    parser.add_argument("--size", type=int, default=size, help="shorter image side, rounded to the patch (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _build_srt(args):
    import torch

    from fastsrt.backbone import Backbone
    from fastsrt.srt import SRT

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pretrained = {"auto": "auto", "yes": True, "no": False}[args.pretrained]
    backbone = Backbone(args.model, pretrained=pretrained).eval().to(device)
    return SRT(backbone, args.shifts, layer=args.layer, upsample=args.upsample, padding=args.padding,
               reduce=args.reduce, ignore_padding=args.ignore_padding, output=args.output, impl=args.impl,
               view_batch=args.view_batch)


def run_extract(args) -> int:
    from fastsrt.extract import extract

    srt = _build_srt(args)
    report = extract(args.inputs, args.out, srt, short_side=args.size, overwrite=args.overwrite, picture=not args.no_png)
    print(f"fastsrt extract: {len(report.written)} written, {len(report.skipped)} already done (skipped), "
          f"{len(report.failed)} failed -> {args.out}")
    for path, reason in report.failed:
        print(f"  failed: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def run_demo(args) -> int:
    from fastsrt.extract import comparison_picture, features_of
    from fastsrt.io import load_image, save_png, save_tensors
    from fastsrt.sample import sample_image

    start = time.perf_counter()
    srt = _build_srt(args)
    steps = {"load model": time.perf_counter() - start}
    image = load_image(args.image) if args.image else sample_image(args.size)
    result = features_of(srt, image, args.size)
    steps.update(result.seconds)
    start = time.perf_counter()
    out = Path(args.out)
    save_png(out / "demo.png", comparison_picture(result))
    save_tensors(out / "demo.safetensors", {"raw": result.raw, "srt": result.srt, "noise": result.noise}, {"model": args.model})
    steps["write picture and features"] = time.perf_counter() - start
    height, width = result.image.shape[-2:]
    print(f"fastsrt demo: {args.model}, {height}x{width} image, raw {tuple(result.raw.shape)} -> SRT {tuple(result.srt.shape)}")
    for step, seconds in steps.items():
        print(f"  {step:<32} {seconds:8.2f} s")
    print(f"picture:  {out / 'demo.png'}\nfeatures: {out / 'demo.safetensors'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsrt", description="Fine-grained, clean ViT features (SRT, DVT).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="SRT on a sample image; writes a PCA picture raw vs SRT")
    _add_srt_options(demo, size=224)
    demo.add_argument("--image", help="an image file instead of the generated sample")
    demo.add_argument("--out", default="fastsrt_out", help="output folder (default: %(default)s)")
    demo.set_defaults(run=run_demo)

    extract = commands.add_parser("extract", help="raw + SRT features of images or folders -> safetensors + PNG")
    extract.add_argument("inputs", nargs="+", help="image files or folders of images")
    extract.add_argument("--out", required=True, help="output folder")
    extract.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    extract.add_argument("--no-png", action="store_true", help="skip the PCA pictures")
    _add_srt_options(extract, size=448)
    extract.set_defaults(run=run_extract)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"fastsrt: warning: {message}\n"
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as error:
        print(f"fastsrt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsrt: interrupted; finished outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
