"""Compiles every fastsrt Triton kernel for NVIDIA GPUs, without a GPU, in the configurations the
fused launchers use on one (fastsrt/ops/*/fused.py), with the installed Triton's own LLVM and
bundled ptxas, and prints ptxas' registers and spills per kernel. Exits 1 on a compile error or a
register spill.

Needs only Triton: the kernel modules (plain ``@triton.jit`` files that import only triton) are
loaded from their files, so it runs in an environment without torch, e.g. one with another Triton.
The tiles come from the same rules the launchers use (``gpu_tiles``, ``per_pixel_tile``).

    python scripts/check_triton_kernels.py                # sm_80 and sm_90
    python scripts/check_triton_kernels.py --arch 90 --ops patch_embed
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsrt.compile_report import parse_ptxas_log  # noqa: E402
from fastsrt.options import PADDINGS  # noqa: E402  (torch-free, like fastsrt.compile_report)

OPS = ("patch_embed", "warp_aggregate")
SELECT_MAX_VIEWS = 16  # fastsrt/ops/warp_aggregate/fused.py: rank selection up to 16 padded views, a sort above


def load_kernels(relative: str):
    """A kernel module from its file, without importing its package (which imports torch)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"fastsrt_compile_check.{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cases(ops, arch: int):
    """(label, kernel, pointer types, constexprs, options, needs tensor cores) per configuration of
    the ``ops`` on compute capability ``arch`` (90: sm_90): the tiles the launchers choose for it
    (the kernel modules' tile rules), bilinear + ignore_padding + token output where they add
    code; the other parameters are int32 scalars."""
    if "patch_embed" in ops:
        yield from _patch_embed_cases(load_kernels("fastsrt/ops/patch_embed/kernels.py"), arch // 10)
    if "warp_aggregate" in ops:
        yield from _warp_aggregate_cases(load_kernels("fastsrt/ops/warp_aggregate/kernels.py"), arch // 10)


def _patch_embed_cases(patch, major):
    tl = patch.tl
    for out, operand in [("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)]:
        *tile, warps = patch.gpu_tiles(operand, major)
        pointers = dict(images_ptr="*fp32", shifts_ptr="*i32", weight_ptr="*fp32", bias_ptr="*fp32",
                        out_ptr=f"*{out}")
        constexprs = dict(PATCH=14, PADDING=PADDINGS.index("reflect"), HAS_BIAS=True, OPERAND=operand,
                          BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2])
        yield (f"patch_embed {out} {'x'.join(map(str, tile))}", patch.shift_patch_embed_kernel, pointers, constexprs,
               {"num_warps": warps}, out != "fp32")


def _warp_aggregate_cases(warp, major):
    tl = warp.tl
    # the grouped mean: patch 14 -> P_PAD 16, up to 8 token columns, then as many planes as fit
    every = dict(IGNORE_PADDING=True, BILINEAR=True, TOKEN_OUTPUT=True)
    paper = dict(IGNORE_PADDING=False, BILINEAR=False, TOKEN_OUTPUT=False)
    for dtype, acc, flags in [("bf16", tl.float32, every), ("fp32", tl.float32, paper), ("fp64", tl.float64, every)]:
        pointers = dict(tokens_ptr=f"*{dtype}", out_ptr=f"*{dtype}", order_ptr="*i32", dx_ptr="*i32",
                        group_dy_ptr="*i32", group_start_ptr="*i32")
        tile = warp.grouped_mean_tile(acc == tl.float64)
        tokens_w = min(tile // (16 * 16), 8)
        constexprs = dict(BLOCK_C=max(1, tile // (16 * 16 * tokens_w)), P_PAD=16, TOKENS_W=tokens_w, ACC=acc, **flags)
        label = f"grouped_mean {dtype} {'bilinear' if flags['BILINEAR'] else 'nearest'}"
        yield label, warp.grouped_mean_kernel, pointers, constexprs, {}, False
    # the per-pixel median and std: BLOCK_C planes (up to 4) x BLOCK_P outputs x K_PAD views per tile,
    # up to 256 views (a 7-shift grid has 226); float64 up to 64 (docs/traps.md)
    for dtype, acc, k_pad in [("fp32", tl.float32, 16), ("fp32", tl.float32, 64), ("bf16", tl.float32, 64),
                              ("fp32", tl.float32, 128), ("fp32", tl.float32, 256), ("fp64", tl.float64, 16),
                              ("fp64", tl.float64, 64)]:
        pointers = dict(tokens_ptr=f"*{dtype}", out_ptr=f"*{dtype}", std_ptr=f"*{dtype}", dy_ptr="*i32",
                        dx_ptr="*i32")
        tile = warp.per_pixel_tile(major, acc == tl.float64, k_pad)
        block_c = max(1, min(4, tile // k_pad))  # as fused.py, for many planes and outputs
        block_p = max(1, tile // (block_c * k_pad))
        constexprs = dict(MEDIAN=True, RETURN_STD=True, BLOCK_C=block_c, BLOCK_P=block_p, K_PAD=k_pad,
                          SELECT_MAX=SELECT_MAX_VIEWS, ACC=acc, **every)
        label = f"per_pixel {dtype} K<={k_pad} ({'rank selection' if k_pad <= SELECT_MAX_VIEWS else 'sort'})"
        yield label, warp.per_pixel_kernel, pointers, constexprs, {}, False


def compile_case(kernel, pointers, constexprs, options, arch):
    """(compiled kernel, ptxas' report) for one configuration."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in names}
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas' -v report
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, log.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = sm_80)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="the ops whose kernels to compile")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted, kernels
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with tempfile.TemporaryDirectory(prefix="fastsrt-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a cached kernel would skip ptxas and its report
        import triton

        print(f"Triton {triton.__version__} ({Path(triton.__file__).parent}), Python {sys.version.split()[0]}")
        print(f"{'arch':<6} {'regs':>4} {'spill st/ld (B)':>15} {'smem (B)':>8} {'s':>5}  kernel")
        failures = []
        count = 0
        for arch in args.arch:
            for label, kernel, pointers, constexprs, options, tensor_cores in cases(args.ops, arch):
                start = time.perf_counter()
                try:
                    compiled, log = compile_case(kernel, pointers, constexprs, options, arch)
                except Exception as error:  # a compile error of any kind is a finding, reported per kernel
                    failures.append(f"sm_{arch} {label}: {type(error).__name__}: {str(error).strip()[-1500:]}")
                    print(f"sm_{arch:<3} compile error  {label}")
                    continue
                count += 1
                reports = [r for r in parse_ptxas_log(log) if r.name == kernel.fn.__name__]
                if not reports:
                    failures.append(f"sm_{arch} {label}: no ptxas report for {kernel.fn.__name__}")
                    continue
                report = reports[-1]
                spill = f"{report.spill_stores}/{report.spill_loads}"
                print(f"sm_{arch:<3} {report.registers:>4} {spill:>15} {compiled.metadata.shared:>8} "
                      f"{time.perf_counter() - start:>5.1f}  {label}", flush=True)
                if report.spills:
                    failures.append(f"sm_{arch} {label}: spills {spill} bytes (stores/loads)")
                if tensor_cores and "mma" not in compiled.asm["ptx"]:
                    failures.append(f"sm_{arch} {label}: no tensor-core (mma) instruction for 16-bit operands")
    for failure in failures:
        print(f"FAILED {failure}")
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    if failures:
        print(f"Triton {triton.__version__}: {len(failures)} problem(s) in {count} compiled kernels for {archs}")
        return 1
    print(f"Triton {triton.__version__}: {count} kernels compiled for {archs}, no register spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
