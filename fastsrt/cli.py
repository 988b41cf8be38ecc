"""The ``fastsrt`` command.

    fastsrt demo                      SRT on a generated image; writes a PCA picture
    fastsrt extract IMAGES... --out DIR   raw + SRT features (safetensors) and pictures
    fastsrt fit IMAGES... --out DIR       DVT stage 1: (raw, clean, artifact) per image (safetensors)
    fastsrt train-denoiser PAIRS_DIR --out CKPT   train the DVT denoiser (resumable, torchrun for DDP)
    fastsrt export CKPT|NAME --out DIR    the denoiser (or ViT + denoiser) as ONNX / TensorRT engine
    fastsrt build-extension [--arch "8.0;9.0"]   compile the C++/CUDA extension ahead of time

Choices come from ``fastsrt.options``; defaults from the config dataclasses and signatures that
own them (``defaults``). Neither imports torch, so ``--help`` answers at once.

User errors (a bad value, a missing file or optional package) print one line and exit with 2;
what cannot run here (``Unavailable``) and an output that cannot be written (``WriteError``) with 1.
Any other exception is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import os
import re
import sys
import time
import warnings
from pathlib import Path

from fastsrt.errors import Unavailable
from fastsrt.options import (
    AMPS,
    BACKENDS,
    DTYPE_NAMES,
    DVT_VARIANTS,
    ENCODING_IMPLS,
    MAX_PIXELS,
    OUTPUTS,
    PADDINGS,
    PRECISIONS,
    PRETRAINED,
    REDUCES,
    SRT_IMPLS,
    UPSAMPLES,
)

DEFAULT_MODEL = "vit_small_patch14_dinov2.lvd142m"


def defaults(source: str, name: str) -> dict[str, object]:
    """The literal default values of ``name`` in fastsrt's source file ``source``: a dataclass's
    fields, or a function's (for a class, its ``__init__``'s) arguments. Read from the source, not
    imported: those modules import torch, which ``--help`` must not (tests/test_cli.py checks the
    values against the imported objects)."""
    tree = ast.parse((Path(__file__).parent / source).read_text())
    node = next(n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:  # a dataclass
            fields = [n for n in node.body if isinstance(n, ast.AnnAssign) and n.value is not None]
            return _literals((field.target.id, field.value) for field in fields)
        node = init
    arguments = node.args
    positional = arguments.posonlyargs + arguments.args
    with_defaults = [*zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults),
                     *zip(arguments.kwonlyargs, arguments.kw_defaults)]
    return _literals((argument.arg, value) for argument, value in with_defaults if value is not None)


def _literals(pairs) -> dict[str, object]:
    """name -> value for the pairs (name, expression) whose expression is a literal."""
    values = {}
    for name, expression in pairs:
        with contextlib.suppress(ValueError):  # e.g. encoding=GridEncodingConfig(): not a literal
            values[name] = ast.literal_eval(expression)
    return values


def _add_model_options(parser: argparse.ArgumentParser, model_help: str = "timm model name") -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default: %(default)s)")
    parser.add_argument("--pretrained", choices=list(PRETRAINED), default="auto",
                        help="auto: pretrained weights when the network or cache has them, else random (default)")
    parser.add_argument("--distilled", choices=DVT_VARIANTS, default=None,
                        help="instead: the DVT authors' distilled weights of --model (the ViT fine-tuned to give "
                             "denoised features), ImageNet- or VOC-trained, from the Hugging Face cache or hub")


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="refuse images of more pixels, from their header, before decoding (default: %(default)s)")


def _add_seed_option(parser: argparse.ArgumentParser, default: int = 0, draws: str = "") -> None:
    parser.add_argument("--seed", type=int, default=default,
                        help=f"seeds random weights (--pretrained no, or auto without weights){draws}; the same "
                             "command then gives the same outputs, resumed or not (default: %(default)s)")


def _view_batch(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _add_srt_options(parser: argparse.ArgumentParser, size: int | None, output: bool = True) -> None:
    srt = defaults("srt.py", "SRT")
    _add_model_options(parser)
    parser.add_argument("--shifts", type=int, default=srt["shifts"],
                        help="shift radius d: 1 + (2d+1)^2 views (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=srt["layer"],
                        help="block index, negative from the end (default: %(default)s)")
    parser.add_argument("--upsample", choices=UPSAMPLES, default=srt["upsample"], help="(default: %(default)s)")
    parser.add_argument("--padding", choices=PADDINGS, default=srt["padding"], help="(default: %(default)s)")
    parser.add_argument("--reduce", choices=REDUCES, default=srt["reduce"], help="(default: %(default)s)")
    parser.add_argument("--ignore-padding", action="store_true", help="average only over views covering a pixel")
    if output:
        parser.add_argument("--output", choices=OUTPUTS, default=srt["output"], help="(default: %(default)s)")
    parser.add_argument("--impl", choices=SRT_IMPLS, default=srt["impl"], help="(default: %(default)s)")
    # SRT's dtype=None runs the backbone in float32, without autocast
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="backbone precision (autocast; default: %(default)s)")
    parser.add_argument("--view-batch", type=_view_batch, default=srt["view_batch"],
                        help="images per backbone forward, or auto: what fits the GPU, 32 on a CPU "
                             "(default: %(default)s)")
    parser.add_argument("--max-views", type=int, default=srt["max_views"],
                        help="run only the first N views (a grid runs in the anytime order; default: all)")
    parser.add_argument("--budget-ms", type=float, default=srt["budget_ms"],
                        help="time budget for one call's views in ms: views run in chunks of --view-batch while "
                             "the next chunk fits, at least one (default: none)")
    parser.add_argument("--size", type=int, default=size,
                        help="shorter image side, rounded to the patch (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_max_pixels(parser)


def _device(args) -> str:
    """--device, else this process's GPU (cuda:LOCAL_RANK under torchrun), else the CPU."""
    import torch

    from fastsrt.dvt.distributed import local_rank

    return args.device or (f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")


def _backbone(args):
    from fastsrt.backbone import Backbone

    if args.distilled:
        from fastsrt.dvt.pretrained import distilled_backbone

        return Backbone(distilled_backbone(args.model, args.distilled)).eval()
    return Backbone(args.model, pretrained=PRETRAINED[args.pretrained], seed=args.seed).eval()


def _denoiser(source: str, variant: str | None, backbone: str | None):
    """The denoiser of a checkpoint file, or the DVT authors' released one for a backbone name."""
    from fastsrt.dvt.denoiser import Denoiser, same_backbone
    from fastsrt.dvt.pretrained import known_names, released_variants

    path = Path(source)
    if path.exists() or path.suffix in (".pth", ".pt", ".safetensors") or len(path.parts) > 1:
        if variant:
            raise ValueError(f"--variant picks a released denoiser by its name; {source!r} is a file")
        return Denoiser.load(path, backbone=backbone)
    if not released_variants(source):
        raise FileNotFoundError(f"{source!r} is neither a denoiser checkpoint file nor the name of a released DVT "
                                f"denoiser ({', '.join(known_names())})")
    if not same_backbone(source, backbone):
        raise ValueError(f"the released denoiser {source} is for {source}, not for --model {backbone}")
    return Denoiser.from_pretrained(source, variant)


def _add_variant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=DVT_VARIANTS, default=None,
                        help="of a released denoiser: trained on ImageNet or VOC (default: imagenet where released, "
                             "else voc)")


def _add_denoiser_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--denoiser", default=None, metavar="FILE|NAME",
                        help="denoise every view with a DVT denoiser before SRT aggregates them (fastsrt.DVT with "
                             "shifts): a checkpoint file, or a backbone's name for the DVT authors' released one; "
                             "the denoiser's layer is used")
    _add_variant_option(parser)


def _build_srt(args, output: str | None = None):
    from fastsrt.options import torch_dtype
    from fastsrt.srt import SRT

    dtype = None if args.dtype == "float32" else torch_dtype(args.dtype)
    backbone, layer, denoiser = _backbone(args).to(_device(args)), args.layer, None
    if getattr(args, "denoiser", None):
        denoiser = _denoiser(args.denoiser, args.variant, args.model).to(_device(args)).eval()
        if layer != defaults("srt.py", "SRT")["layer"] and backbone.layer_indices(layer) != \
                backbone.layer_indices(denoiser.layer):
            raise ValueError(f"--layer {layer} is not the layer the denoiser was trained on ({denoiser.layer})")
        layer = denoiser.layer
    return SRT(backbone, args.shifts, layer=layer, upsample=args.upsample, padding=args.padding, reduce=args.reduce,
               ignore_padding=args.ignore_padding, output=output or args.output, impl=args.impl,
               view_batch=args.view_batch, dtype=dtype, token_transform=denoiser,
               max_views=args.max_views, budget_ms=args.budget_ms)


def run_extract(args) -> int:
    from fastsrt.extract import extract, gather_reports
    from fastsrt.video_extract import VideoSettings

    video = VideoSettings(every=args.every, fps=args.fps, output=args.video_output, store_dtype=args.store_dtype,
                          frame_batch=args.frame_batch, preview=not args.no_preview, max_bytes=args.max_bytes)
    srt = _build_srt(args)
    report = extract(args.inputs, args.out, srt, short_side=args.size, overwrite=args.overwrite,
                     picture=not args.no_png, max_pixels=args.max_pixels, video=video)
    report = gather_reports(report)  # under torchrun: all processes' on rank 0, None on the others
    return 0 if report is None else _print_report("extract", report, args.out)


def _add_video_options(parser: argparse.ArgumentParser) -> None:
    video = defaults("video_extract.py", "VideoSettings")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--every", type=int, default=video["every"],
                        help="videos: keep every N-th frame (default: %(default)s)")
    frames.add_argument("--fps", type=float, default=video["fps"],
                        help="videos: keep about F frames per second of video (default: every frame)")
    parser.add_argument("--video-output", choices=OUTPUTS, default=video["output"],
                        help="videos: SRT features at the token grid or at the frame's pixels (default: %(default)s)")
    parser.add_argument("--store-dtype", choices=DTYPE_NAMES, default=video["store_dtype"],
                        help="videos: precision of the stored features; --dtype is the backbone's "
                             "(default: %(default)s)")
    parser.add_argument("--frame-batch", type=_view_batch, default=video["frame_batch"],
                        help="videos: frames per SRT call, or auto: as many as fill --view-batch with their "
                             "views (default: %(default)s)")
    parser.add_argument("--no-preview", action="store_true", help="videos: skip the preview video")
    parser.add_argument("--max-bytes", type=int, default=video["max_bytes"],
                        help="videos: refuse one whose features would take more, said before computing them "
                             "(default: %(default)s)")


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
    image = load_image(args.image, args.max_pixels) if args.image else sample_image(args.size)
    result = features_of(srt, image, args.size)
    steps.update(result.seconds)
    start = time.perf_counter()
    out = Path(args.out)
    save_png(out / "demo.png", comparison_picture(result))
    save_tensors(out / "demo.safetensors", {"raw": result.raw, "srt": result.srt, "noise": result.noise},
                 {"model": args.model})
    steps["write picture and features"] = time.perf_counter() - start
    height, width = result.image.shape[-2:]
    print(f"fastsrt demo: {args.model}, {height}x{width} image, "
          f"raw {tuple(result.raw.shape)} -> SRT {tuple(result.srt.shape)}")
    for step, seconds in steps.items():
        print(f"  {step:<28} {seconds:8.2f} s")
    print(f"  SRT ran: {result.impl}")
    print(f"picture:  {out / 'demo.png'}\nfeatures: {out / 'demo.safetensors'}")
    return 0


def run_fit(args) -> int:
    from fastsrt.dvt.decomposition import DecomposeConfig
    from fastsrt.dvt.runner import fit_folder
    from fastsrt.ops.grid_encoding import GridEncodingConfig

    device = _device(args)
    encoding = GridEncodingConfig(levels=args.levels, features=args.features, log2_table_size=args.log2_table_size,
                                  base_resolution=args.base_resolution, max_resolution=args.max_resolution)
    config = DecomposeConfig(views=args.views, iterations=args.iterations, size=args.size,
                             tokens_per_step=args.tokens_per_step, encoding=encoding, cache_dtype=args.cache_dtype,
                             view_batch=args.view_batch)
    report = fit_folder(args.inputs, args.out, _backbone(args), config, layer=args.layer, images_per_fit=args.batch,
                        seed=args.seed, overwrite=args.overwrite, device=device, impl=args.impl,
                        max_pixels=args.max_pixels)
    return _print_report("fit", report, args.out)


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    config = defaults("dvt/decomposition.py", "DecomposeConfig")
    encoding = defaults("ops/grid_encoding/reference.py", "GridEncodingConfig")
    run = defaults("dvt/runner.py", "fit_folder")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="output folder: one <image stem>.safetensors per image")
    _add_model_options(parser)
    parser.add_argument("--layer", type=int, default=run["layer"],
                        help="block index, negative from the end (default: %(default)s)")
    parser.add_argument("--size", type=int, default=config["size"],
                        help="image and view side, a patch multiple (default: %(default)s)")
    parser.add_argument("--views", type=int, default=config["views"],
                        help="the full image + random crops (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=config["iterations"],
                        help="fitting steps, half per phase (default: %(default)s)")
    parser.add_argument("--tokens-per-step", type=int, default=config["tokens_per_step"],
                        help="tokens sampled per step (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=run["images_per_fit"],
                        help="images fitted together (default: %(default)s)")
    parser.add_argument("--levels", type=int, default=encoding["levels"],
                        help="grid-encoding levels (default: %(default)s)")
    parser.add_argument("--features", type=int, default=encoding["features"],
                        help="features per level (default: %(default)s)")
    parser.add_argument("--log2-table-size", type=int, default=encoding["log2_table_size"],
                        help="log2 table rows per level (default: %(default)s)")
    parser.add_argument("--base-resolution", type=int, default=encoding["base_resolution"],
                        help="coarsest level resolution (default: %(default)s)")
    parser.add_argument("--max-resolution", type=int, default=encoding["max_resolution"],
                        help="finest level resolution (default: %(default)s)")
    parser.add_argument("--cache-dtype", choices=DTYPE_NAMES, default=config["cache_dtype"],
                        help="precision of the cached raw tokens (default: %(default)s)")
    parser.add_argument("--view-batch", type=int, default=config["view_batch"],
                        help="views per backbone forward (default: %(default)s)")
    parser.add_argument("--impl", choices=ENCODING_IMPLS, default=run["impl"],
                        help="grid encoding (default: %(default)s)")
    _add_seed_option(parser, run["seed"], ", the crops and the fit")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    _add_max_pixels(parser)


def run_train_denoiser(args) -> int:
    from fastsrt.dvt.distributed import rank_and_world_size
    from fastsrt.dvt.train import PairFolder, SRTTargets, TrainConfig, train_denoiser

    if args.srt_targets:
        source = SRTTargets(args.source, _build_srt(args, output="token"), size=args.size, max_pixels=args.max_pixels)
    else:
        source = PairFolder(args.source, target=args.target)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                         warmup=args.warmup, weight_decay=args.weight_decay, amp=args.amp, num_blocks=args.blocks,
                         seed=args.seed, save_every=args.save_every, num_workers=args.workers)
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

    device = torch.device(_device(args))
    denoiser = _denoiser(args.checkpoint, args.variant, args.model)
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
    except Unavailable:  # the backend cannot run here: its own message says why
        raise
    except RuntimeError as error:  # a backend that fails to build or run (TensorRT, onnxruntime, torch.compile)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Unavailable(f"the {args.backend} backend failed ({args.precision} on {device}): {first_line} "
                          "(rerun with another --backend or --precision)") from error
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, path in compiled.files.items():  # an fp16/bf16 ONNX file is the converted graph the engine was built from
        tagged = kind == "engine" or args.precision != "fp32"
        target = out / f"{name}-b{args.batch}{'-' + args.precision if tagged else ''}{path.suffix}"
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
    if compiled.backend == "tensorrt":
        from fastsrt.deploy.precision import converter_version
        from fastsrt.deploy.tensorrt_engine import tensorrt_version

        how = "" if args.precision == "fp32" else \
            f" (a strongly typed network from the {args.precision} graph of {converter_version()})"
        print(f"  built with TensorRT {tensorrt_version()}{how}")
    for path in written:
        print(f"  wrote {path}")
    if not written:
        print("  (the torch backend compiles in the process that uses it; nothing to write)")
    return 0


def _arch_list(value: str) -> str:
    """A TORCH_CUDA_ARCH_LIST value: compute capabilities like "8.0;9.0" (also "9.0a", "9.0+PTX")."""
    archs = [a for a in re.split(r"[;\s,]+", value.strip()) if a]
    bad = [a for a in archs if not re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a)]
    if not archs or bad:
        raise argparse.ArgumentTypeError(f"{value!r}: give compute capabilities like \"8.0;9.0\" (9.0+PTX also "
                                         "embeds PTX for newer GPUs)")
    return ";".join(archs)


def run_build_extension(args) -> int:
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch  # read by the loader and by torch's build
    import torch

    from fastsrt.compile_report import parse_ptxas_log, resources_table
    from fastsrt.ops.grid_encoding import extension

    no_cuda = extension.why_no_cuda()
    if no_cuda and (args.arch or torch.version.cuda):  # CUDA kernels asked for, or expected from a CUDA torch
        raise Unavailable(f"cannot compile the CUDA kernels: {no_cuda}")
    module, problem = extension.build_extension()
    if module is None:
        raise Unavailable(f"the C++ grid-encoding extension could not be built: {problem}")
    library = Path(module.__file__)
    log = library.parent / extension.LOG_NAME
    text = log.read_text(errors="replace") if log.is_file() else ""
    if args.verbose:
        print(text or f"(no compiler output kept: {log} is missing)", end="" if text.endswith("\n") else "\n")
    archs = extension.cuda_architectures()
    print(f"fastsrt build-extension: {library}")
    print(f"  built for: {'CPU + CUDA ' + archs if module.has_cuda() else 'CPU only'} (torch {torch.__version__})")
    kernels = parse_ptxas_log(text)
    if kernels:
        print("  registers and spills per kernel (ptxas -v):")
        print("    " + resources_table(kernels).replace("\n", "\n    "))
    print(f"  the compiler's output: {log}")
    settings = f"TORCH_EXTENSIONS_DIR={library.parent.parent}"
    if module.has_cuda():
        settings += f' TORCH_CUDA_ARCH_LIST="{archs}"'
    print(f"  processes find this build with the same torch, sources and {settings}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsrt", description="Fine-grained, clean ViT features (SRT, DVT).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="SRT on a sample image; writes a PCA picture raw vs SRT")
    _add_srt_options(demo, size=224)
    demo.add_argument("--image", help="an image file instead of the generated sample")
    demo.add_argument("--out", default="fastsrt_out", help="output folder (default: %(default)s)")
    _add_seed_option(demo)
    demo.set_defaults(run=run_demo)

    extract = commands.add_parser("extract", help="raw + SRT features of images, videos or folders -> safetensors "
                                                  "+ PNG or preview video; shards under torchrun")
    extract.add_argument("inputs", nargs="+", help="image or video files, or folders of them")
    extract.add_argument("--out", required=True, help="output folder")
    extract.add_argument("--overwrite", action="store_true", help="redo inputs whose output exists")
    extract.add_argument("--no-png", action="store_true", help="skip the PCA pictures of images")
    _add_srt_options(extract, size=defaults("extract.py", "extract")["short_side"])
    _add_video_options(extract)
    _add_denoiser_option(extract)
    _add_seed_option(extract)
    extract.set_defaults(run=run_extract)

    fit = commands.add_parser("fit", help="DVT stage 1 on images or folders -> raw/clean/artifact safetensors; "
                                          "shards under torchrun")
    _add_fit_options(fit)
    fit.set_defaults(run=run_fit)
    train = commands.add_parser("train-denoiser", help="train the DVT denoiser on stage-1 pairs or SRT targets")
    train.add_argument("source",
                       help="folder of stage-1 pair files (<stem>.safetensors), or of images with --srt-targets")
    train.add_argument("--out", required=True,
                       help="the denoiser to write (.safetensors; a .json config goes beside it)")
    train.add_argument("--target", default="clean", help="target tensor in the pair files (default: %(default)s)")
    train.add_argument("--srt-targets", action="store_true",
                       help="SOURCE is an image folder: targets are SRT token features computed on the fly")
    _add_srt_options(train, size=None, output=False)  # the SRT of --srt-targets (--size default: 37 tokens)
    config = defaults("dvt/train.py", "TrainConfig")  # the paper's settings
    train.add_argument("--epochs", type=int, default=config["epochs"], help="(default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=config["batch_size"],
                       help="global batch over all processes (default: %(default)s)")
    train.add_argument("--lr", type=float, default=config["lr"],
                       help="peak learning rate (default: scaled with the batch size, TrainConfig.base_lr)")
    train.add_argument("--min-lr", type=float, default=config["min_lr"],
                       help="end of the cosine schedule (default: %(default)s)")
    train.add_argument("--warmup", type=float, default=config["warmup"],
                       help="linear warm-up, fraction of all steps (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=config["weight_decay"],
                       help="AdamW weight decay (default: %(default)s)")
    train.add_argument("--amp", choices=AMPS, default=config["amp"],
                       help="mixed precision; auto: bf16 on CUDA, none on the CPU (default: %(default)s)")
    train.add_argument("--blocks", type=int, default=config["num_blocks"],
                       help="transformer blocks in the denoiser (default: %(default)s)")
    _add_seed_option(train, config["seed"], ", the denoiser's initialisation")
    train.add_argument("--save-every", type=int, default=config["save_every"],
                       help="steps between resumable training states (default: %(default)s)")
    train.add_argument("--workers", type=int, default=config["num_workers"],
                       help="data-loading processes (default: %(default)s)")
    train.add_argument("--stop-after", type=int, default=defaults("dvt/train.py", "train_denoiser")["stop_after"],
                       help="stop after this many steps in all (rerun continues)")
    train.add_argument("--restart", action="store_true", help="ignore a saved training state and start over")
    train.set_defaults(run=run_train_denoiser)

    export = commands.add_parser("export", help="compile the denoiser (or ViT + denoiser) for deployment")
    export.add_argument("checkpoint", help="a denoiser checkpoint (fastsrt .safetensors or the authors' .pth), or "
                                           "a backbone's name for the DVT authors' released denoiser (--variant)")
    _add_variant_option(export)
    export.add_argument("--out", required=True, help="folder for the ONNX file (and TensorRT engine)")
    export.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"), help="token grid (default: the trained one)")
    compiled = defaults("deploy/runtime.py", "compile")
    export.add_argument("--batch", type=int, default=compiled["batch"], help="largest batch (default: %(default)s)")
    export.add_argument("--backend", choices=BACKENDS, default=compiled["backend"], help="(default: %(default)s)")
    export.add_argument("--precision", choices=PRECISIONS, default=compiled["precision"], help="(default: %(default)s)")
    _add_model_options(export, model_help="timm model: export ViT + denoiser end to end")
    export.set_defaults(model=None)
    export.add_argument("--image-size", type=int, default=None, help="with --model (default: the trained grid x patch)")
    export.add_argument("--cache-dir", default=None,
                        help="ONNX/engine cache (default: $FASTSRT_CACHE or ~/.cache/fastsrt)")
    export.add_argument("--repeat", type=int, default=20,
                        help="timed calls after the parity check (default: %(default)s)")
    export.add_argument("--device", default=None)
    _add_seed_option(export)
    export.set_defaults(run=run_export)

    build = commands.add_parser("build-extension", help="compile the C++/CUDA grid-encoding extension ahead of "
                                                        "time, GPU or not (container images)")
    build.add_argument("--arch", type=_arch_list, default=None,
                       help='GPU architectures for the CUDA kernels, e.g. "8.0;9.0" (default: $TORCH_CUDA_ARCH_LIST, '
                            "else the visible GPUs; neither: a CPU-only build on a CPU torch)")
    build.add_argument("--verbose", action="store_true", help="print the compiler's whole output")
    build.set_defaults(run=run_build_extension)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"fastsrt: warning: {message}\n"
    try:
        return args.run(args)
    except Unavailable as error:  # what was asked for cannot run here
        print(f"fastsrt: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as error:  # a bad value or path on the command line
        print(f"fastsrt: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output that cannot be written: a full disk, a file-size limit, a read-only folder
        from tqdm import tqdm

        from fastsrt.io import WriteError  # only here: fastsrt.io imports torch, which --help must not

        if not isinstance(error, WriteError):
            raise
        tqdm.write(f"fastsrt: error: {error}", file=sys.stderr)  # on a line of its own below a progress bar
        return 1
    except ImportError as error:  # a missing optional package; a broken import of fastsrt's own is a bug
        if (error.name or "").partition(".")[0] == "fastsrt":
            raise
        print(f"fastsrt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsrt: interrupted; finished outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
