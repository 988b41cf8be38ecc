"""The ``fastsrt`` command.

    fastsrt demo                      SRT on a generated image; writes a PCA picture
    fastsrt extract IMAGES... --out DIR   raw + SRT features (safetensors) and pictures
    fastsrt fit IMAGES... --out DIR       DVT stage 1: (raw, clean, artifact) per image (safetensors)
    fastsrt train-denoiser PAIRS_DIR --out CKPT   train the DVT denoiser (resumable, torchrun for DDP)
    fastsrt export CKPT --out DIR         the denoiser (or ViT + denoiser) as ONNX / TensorRT engine
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from fastsrt.checks import Unavailable

DEFAULT_MODEL = "vit_small_patch14_dinov2.lvd142m"


PRETRAINED = {"auto": "auto", "yes": True, "no": False}
DTYPES = {"float32": None, "bfloat16": "bfloat16", "float16": "float16"}


def _add_model_options(parser: argparse.ArgumentParser, model_help: str = "timm model name") -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default: %(default)s)")
    parser.add_argument("--pretrained", choices=list(PRETRAINED), default="auto",
                        help="auto: pretrained weights when the network or cache has them, else random (default)")


def _view_batch(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _add_srt_options(parser: argparse.ArgumentParser, size: int | None, output: bool = True) -> None:
    _add_model_options(parser)
    parser.add_argument("--shifts", type=int, default=3, help="shift radius d: 1 + (2d+1)^2 views (default: 3, 50 views)")
    parser.add_argument("--layer", type=int, default=-1, help="block index, negative from the end (default: -1)")
    parser.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest")
    parser.add_argument("--padding", choices=["zeros", "replicate", "reflect"], default="zeros")
    parser.add_argument("--reduce", choices=["mean", "median"], default="mean")
    parser.add_argument("--ignore-padding", action="store_true", help="average only over views covering a pixel")
    if output:
        parser.add_argument("--output", choices=["pixel", "token"], default="pixel")
    parser.add_argument("--impl", choices=["auto", "reference", "fused", "chunked"], default="auto")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="backbone precision (autocast)")
    parser.add_argument("--view-batch", type=_view_batch, default="auto",
                        help="images per backbone forward, or auto: what fits the GPU (32 on a CPU; default)")
    parser.add_argument("--size", type=int, default=size, help="shorter image side, rounded to the patch (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _device(args) -> str:
    """--device, else this process's GPU (cuda:LOCAL_RANK under torchrun), else the CPU."""
    import torch

    from fastsrt.dvt.distributed import local_rank

    return args.device or (f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")


def _backbone(args):
    from fastsrt.backbone import Backbone

    return Backbone(args.model, pretrained=PRETRAINED[args.pretrained]).eval()


def _build_srt(args, output: str | None = None):
    import torch

    from fastsrt.srt import SRT

    dtype = DTYPES[args.dtype] and getattr(torch, DTYPES[args.dtype])
    return SRT(_backbone(args).to(_device(args)), args.shifts, layer=args.layer, upsample=args.upsample,
               padding=args.padding, reduce=args.reduce, ignore_padding=args.ignore_padding,
               output=output or args.output, impl=args.impl, view_batch=args.view_batch, dtype=dtype)


def run_extract(args) -> int:
    from fastsrt.extract import extract

    srt = _build_srt(args)
    report = extract(args.inputs, args.out, srt, short_side=args.size, overwrite=args.overwrite, picture=not args.no_png)
    return _print_report("extract", report, args.out)


def _print_report(command: str, report, out_dir) -> int:
    print(f"fastsrt {command}: {report.summary(out_dir)}")
    for _, reason in report.failed:
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
        print(f"  {step:<28} {seconds:8.2f} s")
    print(f"  SRT ran: {srt.impl_used}")
    print(f"picture:  {out / 'demo.png'}\nfeatures: {out / 'demo.safetensors'}")
    return 0


def run_fit(args) -> int:

    from fastsrt.dvt.decomposition import DecomposeConfig
    from fastsrt.dvt.encoding import GridEncodingConfig
    from fastsrt.dvt.runner import fit_folder

    device = _device(args)
    encoding = GridEncodingConfig(levels=args.levels, features=args.features, log2_table_size=args.log2_table_size,
                                  base_resolution=args.base_resolution, max_resolution=args.max_resolution)
    config = DecomposeConfig(views=args.views, iterations=args.iterations, size=args.size,
                             tokens_per_step=args.tokens_per_step, encoding=encoding, cache_dtype=args.cache_dtype,
                             view_batch=args.view_batch)
    report = fit_folder(args.inputs, args.out, args.model, config, layer=args.layer, images_per_fit=args.batch,
                        seed=args.seed, overwrite=args.overwrite, device=device, impl=args.impl,
                        pretrained=PRETRAINED[args.pretrained])
    return _print_report("fit", report, args.out)


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="output folder: one <image stem>.safetensors per image")
    _add_model_options(parser)
    parser.add_argument("--layer", type=int, default=-1, help="block index, negative from the end (default: -1)")
    parser.add_argument("--size", type=int, default=518, help="image and view side, a patch multiple (default: 518)")
    parser.add_argument("--views", type=int, default=769, help="the full image + random crops (default: 769)")
    parser.add_argument("--iterations", type=int, default=20000, help="fitting steps, half per phase (default: 20000)")
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="tokens sampled per step (default: 2048)")
    parser.add_argument("--batch", type=int, default=1, help="images fitted together (default: 1)")
    parser.add_argument("--levels", type=int, default=16, help="grid-encoding levels (default: 16)")
    parser.add_argument("--features", type=int, default=8, help="features per level (default: 8)")
    parser.add_argument("--log2-table-size", type=int, default=20, help="log2 table rows per level (default: 20)")
    parser.add_argument("--base-resolution", type=int, default=16, help="coarsest level resolution (default: 16)")
    parser.add_argument("--max-resolution", type=int, default=1024, help="finest level resolution (default: 1024)")
    parser.add_argument("--cache-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="precision of the cached raw tokens (default: float16)")
    parser.add_argument("--view-batch", type=int, default=32, help="views per backbone forward (default: 32)")
    parser.add_argument("--impl", choices=["auto", "extension", "reference"], default="auto", help="grid encoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")


def run_train_denoiser(args) -> int:

    from fastsrt.dvt.distributed import rank_and_world_size
    from fastsrt.dvt.train import PairFolder, SRTTargets, TrainConfig, train_denoiser

    if args.srt_targets:
        source = SRTTargets(args.source, _build_srt(args, output="token"), size=args.size)
    else:
        source = PairFolder(args.source, target=args.target)
    options = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "min_lr": args.min_lr,
               "warmup": args.warmup, "weight_decay": args.weight_decay, "amp": args.amp, "num_blocks": args.blocks,
               "seed": args.seed, "save_every": args.save_every, "num_workers": args.workers}
    config = TrainConfig(**{name: value for name, value in options.items() if value is not None})  # None: default
    result = train_denoiser(source, args.out, config, device=_device(args), resume=not args.restart,
                            stop_after=args.stop_after)
    if rank_and_world_size()[0] != 0:  # under torchrun, rank 0 reports
        return 0
    if result.finished:
        print(f"fastsrt train-denoiser: {result.step} steps, final loss {result.losses[-1]:.4f} -> {args.out}")
    else:
        print(f"fastsrt train-denoiser: stopped at step {result.step} of {result.total_steps}; rerun to continue")
    return 0


def run_export(args) -> int:
    import torch

    from fastsrt.deploy import FixedSizePipeline, compile_module
    from fastsrt.dvt.denoiser import Denoiser

    device = torch.device(_device(args))
    denoiser = Denoiser.load(args.checkpoint, backbone=args.model)
    if args.model:
        backbone = _backbone(args)
        size = args.image_size or denoiser.grid[0] * backbone.patch_size
        module = FixedSizePipeline(backbone, denoiser, size)
        input_shape, name = (3, *module.image_size), f"{args.model}-dvt-{size}"
    else:
        grid = tuple(args.grid) if args.grid else denoiser.grid
        module = denoiser.at_grid(grid)
        input_shape, name = (denoiser.dim, *grid), f"denoiser-{grid[0]}x{grid[1]}"
    module = module.to(device).eval()
    inputs = torch.randn(args.batch, *input_shape, device=device)
    with torch.no_grad():
        expected = module(inputs)  # eager float32, before any backend touches the module
    try:
        compiled = compile_module(module, input_shape, args.batch, args.backend, args.precision, device, args.cache_dir)
        actual = compiled(inputs)
    except RuntimeError as error:  # a backend that fails to build or run (TensorRT, onnxruntime, torch.compile)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Unavailable(f"the {args.backend} backend failed ({args.precision} on {device}): {first_line} "
                          "(rerun with another --backend or --precision)") from error
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, path in compiled.files.items():
        target = out / f"{name}-b{args.batch}{'-' + args.precision if kind == 'engine' else ''}{path.suffix}"
        target.write_bytes(path.read_bytes())
        written.append(target)

    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    times = []
    for _ in range(args.repeat + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        compiled(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    median_ms = sorted(times[3:])[len(times[3:]) // 2] * 1000
    print(f"fastsrt export: backend {compiled.backend} ({compiled.why}), {args.precision}, input (B<={args.batch}, "
          f"{', '.join(map(str, input_shape))}) on {device}")
    print(f"  relative error vs eager float32: {error:.2e}; median {median_ms:.3f} ms per call at batch {args.batch}")
    for path in written:
        print(f"  wrote {path}")
    if not written:
        print("  (the torch backend compiles in the process that uses it; nothing to write)")
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

    fit = commands.add_parser("fit", help="DVT stage 1 on images or folders -> raw/clean/artifact safetensors; "
                                          "shards under torchrun")
    _add_fit_options(fit)
    fit.set_defaults(run=run_fit)
    train = commands.add_parser("train-denoiser", help="train the DVT denoiser on stage-1 pairs or SRT targets")
    train.add_argument("source", help="folder of stage-1 pair files (<stem>.safetensors), or of images with --srt-targets")
    train.add_argument("--out", required=True, help="the denoiser to write (.safetensors; a .json config goes beside it)")
    train.add_argument("--target", default="clean", help="target tensor in the pair files (default: %(default)s)")
    train.add_argument("--srt-targets", action="store_true",
                       help="SOURCE is an image folder: targets are SRT token features computed on the fly")
    _add_srt_options(train, size=None, output=False)  # the SRT of --srt-targets (--size default: 37 tokens)
    # None leaves TrainConfig's default (the paper's setting) in place
    train.add_argument("--epochs", type=int, help="(default: 10, the paper's)")
    train.add_argument("--batch-size", type=int, help="global batch over all processes (default: 64, the paper's)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 * sqrt(batch / 256))")
    train.add_argument("--min-lr", type=float, help="end of the cosine schedule (default: 1e-6)")
    train.add_argument("--warmup", type=float, help="linear warm-up, fraction of all steps (default: 0.15)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 1e-5)")
    train.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"],
                       help="mixed precision (default auto: bf16 on CUDA, none on the CPU)")
    train.add_argument("--blocks", type=int, help="transformer blocks in the denoiser (default: 1)")
    train.add_argument("--seed", type=int, help="(default: 0)")
    train.add_argument("--save-every", type=int, help="steps between resumable training states (default: 200)")
    train.add_argument("--workers", type=int, help="data-loading processes (default: 0)")
    train.add_argument("--stop-after", type=int, default=None, help="stop after this many steps in all (rerun continues)")
    train.add_argument("--restart", action="store_true", help="ignore a saved training state and start over")
    train.set_defaults(run=run_train_denoiser)

    export = commands.add_parser("export", help="compile the denoiser (or ViT + denoiser) for deployment")
    export.add_argument("checkpoint", help="a denoiser checkpoint (fastsrt .safetensors or the authors' .pth)")
    export.add_argument("--out", required=True, help="folder for the ONNX file (and TensorRT engine)")
    export.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"), help="token grid (default: the trained one)")
    export.add_argument("--batch", type=int, default=1, help="largest batch (default: %(default)s)")
    export.add_argument("--backend", choices=["auto", "tensorrt", "torch", "onnxruntime"], default="auto")
    export.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    _add_model_options(export, model_help="timm model: export ViT + denoiser end to end")
    export.set_defaults(model=None)
    export.add_argument("--image-size", type=int, default=None, help="with --model (default: the trained grid x patch)")
    export.add_argument("--cache-dir", default=None, help="ONNX/engine cache (default: $FASTSRT_CACHE or ~/.cache/fastsrt)")
    export.add_argument("--repeat", type=int, default=20, help="timed calls after the parity check (default: %(default)s)")
    export.add_argument("--device", default=None)
    export.set_defaults(run=run_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"fastsrt: warning: {message}\n"
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, ImportError) as error:
        print(f"fastsrt: error: {error}", file=sys.stderr)
        return 2
    except Unavailable as error:  # what was asked for cannot run here
        print(f"fastsrt: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastsrt: interrupted; finished outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
