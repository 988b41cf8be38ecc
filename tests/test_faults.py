"""Faults injected for real into the CLI, run as `python -m fastsrt.cli` subprocesses: SIGKILL at
seeded random moments, writes that fail (a file-size limit, a read-only folder, a parent that is a
file), two runs on one folder at once. Outputs are compared bit for bit with an uninterrupted run
of the same command, made in this process on one thread like the subprocesses: random weights are
seeded (--seed), so equal commands give equal outputs (docs/traps.md, "Determinism")."""
import contextlib
import ctypes
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastsrt.backbone import load_timm_model
from fastsrt.cli import main
from fastsrt.dvt import Denoiser
from fastsrt.io import atomic_path, load_metadata, load_tensors, remove_stale_temporaries, save_tensors

CHECKOUT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds, for any one subprocess
STEMS = "abcdef"
EXTRACT = ["--model", "vit_small_patch14_dinov2", "--pretrained", "no", "--shifts", "1", "--size", "28"]
FIT = ["--model", "vit_small_patch14_dinov2", "--pretrained", "no", "--size", "28", "--views", "2",
       "--iterations", "60", "--tokens-per-step", "8", "--levels", "2", "--features", "2", "--log2-table-size", "6",
       "--base-resolution", "2", "--max-resolution", "4", "--impl", "reference", "--device", "cpu"]
TRAIN = ["--epochs", "60", "--batch-size", "4", "--lr", "2e-3", "--save-every", "7", "--device", "cpu"]


def cli(*arguments) -> list[str]:
    return [sys.executable, "-m", "fastsrt.cli", *map(str, arguments)]


def child_env() -> dict[str, str]:
    """This checkout first on the path; one CPU thread, as in the reference runs (a float sum
    split over another number of threads rounds differently)."""
    path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def start(command: list[str], preexec=None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            preexec_fn=preexec)


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_run(arguments) -> None:
    """The uninterrupted run: the same command, in this process."""
    with one_thread():
        assert main(list(map(str, arguments))) == 0


def finished(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, modification time) of every finished output: the .safetensors files and the files
    sharing their stem (extract's pictures, the denoiser's .json), all written before them."""
    stems = {p.stem for p in out.glob("*.safetensors")}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.stem in stems}


def assert_untouched(before: dict, out: Path) -> None:
    """No output finished before a run was written again by it."""
    assert {name: finished(out).get(name) for name in before} == before


def assert_equal_outputs(out: Path, reference: Path, names) -> None:
    """The files ``names`` hold the same tensors and metadata (safetensors: the header's order of
    metadata keys differs from process to process) or the same bytes."""
    for name in names:
        if name.endswith(".safetensors"):
            ours, theirs = load_tensors(out / name), load_tensors(reference / name)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
            assert load_metadata(out / name) == load_metadata(reference / name), name
        else:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def progress(log: Path, marker: str) -> int | None:
    """The count that the progress bar ``marker`` last showed in the log; None before it shows."""
    shown = [part for part in re.split(r"[\r\n]", log.read_text(errors="replace")) if marker in part]
    count = re.search(r"(\d+)/\d+", shown[-1]) if shown else None
    return int(count[1]) if count else None


def kill_and_resume(command: list[str], marker: str, total: int, out: Path, seed: int, log: Path):
    """Runs the CLI ``command`` and SIGKILLs it at a seeded random moment, three times, each run
    resuming the last; then runs it to completion. The moment: when its progress bar (``marker``,
    counting to ``total``) reaches a count drawn over the first three quarters of what the run has
    left, plus up to 0.05 s. No run may rewrite an output finished before it. Returns the completed
    run's stdout, the outputs finished before it, and how many .safetensors files each kill left."""
    moments = random.Random(seed)
    counts = []
    for _ in range(3):
        before = finished(out) if out.is_dir() else {}
        already = len(list(out.glob("*.safetensors")))
        with open(log, "w") as errors:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=child_env())
        deadline, target = time.monotonic() + TIMEOUT, None
        while process.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            shown = progress(log, marker)
            if shown is not None and target is None:  # training's bar starts where it resumes, extract's at 0
                start = min(max(shown, already), total)
                target = moments.randint(start, start + 3 * (total - start) // 4)  # leaves work after it
            if shown is not None and shown >= target:
                break
            time.sleep(0.005)
        time.sleep(moments.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)  # nothing happens if it has finished already
        assert process.wait(timeout=TIMEOUT) in (0, -signal.SIGKILL), log.read_text()[-3000:]
        counts.append(len(list(out.glob("*.safetensors"))))
        if out.is_dir():
            assert_untouched(before, out)
    before = finished(out)
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert_untouched(before, out)
    return done.stdout, before, counts


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six images; a's SRT features (28 x 28) fill a smaller file than b's (28 x 56)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for stem, size in zip(STEMS, [(28, 28), (28, 56), (40, 40), (30, 60), (56, 28), (36, 36)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    return folder


@pytest.fixture(scope="module")
def extracted(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extracted")
    reference_run(["extract", images, "--out", out, *EXTRACT])
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Sixteen stage-1 pair files: smooth clean fields; raw = clean + one position pattern + noise."""
    folder = tmp_path_factory.mktemp("pairs")
    generator = torch.Generator().manual_seed(0)
    pattern = 2 * torch.randn(64, 5, 5, generator=generator)
    for i in range(16):
        clean = F.avg_pool2d(torch.randn(1, 64, 7, 7, generator=generator), 3, stride=1)[0]
        raw = clean + pattern + 0.05 * torch.randn(64, 5, 5, generator=generator)
        save_tensors(folder / f"{i:02d}.safetensors", {"raw": raw, "clean": clean}, {"layer": -1})
    return folder


def test_seeded_random_weights_are_reproducible_and_leave_the_callers_random_state_alone():
    def weights(seed):
        model = load_timm_model("vit_small_patch14_dinov2", pretrained=False, seed=seed, depth=1, embed_dim=32,
                                num_heads=2)
        return torch.cat([p.flatten() for p in model.state_dict().values()])

    state = torch.get_rng_state()
    first, again, other = weights(0), weights(0), weights(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's draws go on as if nothing happened
    torch.manual_seed(0)
    assert not torch.equal(weights(None), weights(None))  # None: torch's generator as it stands


def test_the_cli_seed_chooses_the_random_weights(images, extracted, tmp_path):
    reference_run(["extract", images / "a.png", "--out", tmp_path, "--no-png", "--seed", "1", *EXTRACT])
    other, default = (load_tensors(folder / "a.safetensors") for folder in (tmp_path, extracted))
    assert other["raw"].shape == default["raw"].shape and not torch.equal(other["raw"], default["raw"])


def test_extract_killed_three_times_then_resumed_equals_an_uninterrupted_run(images, extracted, tmp_path):
    out = tmp_path / "out"
    stdout, before, counts = kill_and_resume(cli("extract", images, "--out", out, *EXTRACT), "extract:",
                                             len(STEMS), out, seed=0, log=tmp_path / "log")
    assert min(counts) < len(STEMS)  # at least one kill cut the job short
    done = len([name for name in before if name.endswith(".safetensors")])
    assert f"{len(STEMS) - done} written, {done} already done" in stdout  # nothing finished was redone
    assert temporaries(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in extracted.iterdir())
    assert_equal_outputs(out, extracted, [p.name for p in extracted.iterdir()])


def test_fit_killed_three_times_then_resumed_equals_an_uninterrupted_run(images, tmp_path):
    reference_run(["fit", images, "--out", tmp_path / "reference", *FIT])
    out = tmp_path / "out"
    stdout, before, counts = kill_and_resume(cli("fit", images, "--out", out, *FIT), "DVT stage 1",
                                             len(STEMS), out, seed=1, log=tmp_path / "log")
    assert min(counts) < len(STEMS)
    assert f"{len(STEMS) - len(before)} written, {len(before)} already done" in stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.safetensors" for stem in STEMS]  # no temporaries
    assert_equal_outputs(out, tmp_path / "reference", [f"{stem}.safetensors" for stem in STEMS])


def test_train_denoiser_killed_three_times_then_resumed_ends_with_the_same_weights(pairs, tmp_path):
    reference_run(["train-denoiser", pairs, "--out", tmp_path / "reference" / "den.safetensors", *TRAIN])
    out = tmp_path / "out"
    stdout, before, counts = kill_and_resume(cli("train-denoiser", pairs, "--out", out / "den.safetensors", *TRAIN),
                                             "train denoiser", 240, out, seed=2, log=tmp_path / "log")
    assert min(counts) == 0  # at least one kill cut the training short
    assert "240 steps" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["den.json", "den.safetensors", "den.train-state.pt"]
    assert_equal_outputs(out, tmp_path / "reference", ["den.safetensors", "den.json"])
    trained, uninterrupted = (Denoiser.load(folder / "den.safetensors") for folder in (out, tmp_path / "reference"))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), uninterrupted.state_dict().values()))


WRITER = """
import sys
from fastsrt.io import atomic_path

with atomic_path(sys.argv[1]) as temporary:
    temporary.write_bytes(b"the first half of a file")
    print(temporary.name, flush=True)
    if sys.stdin.readline() == "fail\\n":
        raise SystemExit("the writer gave up")
"""


def test_a_rerun_removes_the_temporaries_of_killed_writers_and_no_others(images, extracted, tmp_path):
    """Two writers of a.safetensors stop halfway through: one is SIGKILLed, one lives on. The
    rerun removes the dead one's temporary only; the living one's goes when it gives up."""
    out = tmp_path / "out"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out / "a.safetensors")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=child_env()) for _ in range(2)]
    dead, alive = (writer.stdout.readline().strip() for writer in writers)
    writers[0].send_signal(signal.SIGKILL)
    writers[0].communicate(timeout=TIMEOUT)
    assert writers[0].returncode == -signal.SIGKILL
    assert temporaries(out) == sorted([dead, alive])
    remove_stale_temporaries(out / "b.safetensors")  # another output's sweep leaves them alone
    assert temporaries(out) == sorted([dead, alive])

    reference_run(["extract", images / "a.png", "--out", out, *EXTRACT])
    assert temporaries(out) == [alive]
    writers[1].communicate("fail\n", timeout=TIMEOUT)
    assert writers[1].returncode == 1 and temporaries(out) == []
    assert_equal_outputs(out, extracted, ["a.png", "a.safetensors"])


def test_an_error_that_is_not_the_file_systems_passes_through_and_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="a bug"), atomic_path(tmp_path / "out.bin") as temporary:
        temporary.write_bytes(b"half")
        raise TypeError("a bug in a writer")
    assert list(tmp_path.iterdir()) == []


def limit_file_size(size: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))  # a write beyond it fails with EFBIG
    return limit


def check_one_line_error(process: subprocess.Popen, out: Path, expected: str) -> None:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert process.returncode == 1 and errors == [f"fastsrt: error: {expected}"], stderr[-3000:]
    assert "Traceback" not in stderr and temporaries(out) == []


def test_writes_beyond_a_file_size_limit_stop_with_one_line_and_leave_no_partial_file(images, extracted, pairs,
                                                                                      tmp_path):
    """Two runs at once: extract under a limit between a's and b's feature files, train-denoiser
    under a limit below its training state."""
    limited, training = tmp_path / "limited", tmp_path / "training"
    a, b = ((extracted / f"{stem}.safetensors").stat().st_size for stem in "ab")
    extract = start(cli("extract", images, "--out", limited, *EXTRACT), limit_file_size((a + b) // 2))
    train = start(cli("train-denoiser", pairs, "--out", training / "den.safetensors", *TRAIN), limit_file_size(1000))
    check_one_line_error(extract, limited, f"cannot write {str(limited / 'b.safetensors')!r}: File too large")
    check_one_line_error(train, training, f"cannot write {str(training / 'den.train-state.pt')!r}: File too large")
    # the outputs before the failed one are intact: a's picture and features, b's picture
    assert sorted(p.name for p in limited.iterdir()) == ["a.png", "a.safetensors", "b.png"]
    assert_equal_outputs(limited, extracted, ["a.png", "a.safetensors", "b.png"])
    assert list(training.iterdir()) == []


def without_permission_override():
    """Drops CAP_DAC_OVERRIDE, with which root ignores permission bits, from the bounding set: the
    command exec'd next runs without it, root or not."""
    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def can_drop_capabilities() -> bool:
    """Whether this process may change its capability bounding set (CAP_SETPCAP, bit 8)."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff")), 16)
    return bool(effective >> 8 & 1)


def test_a_read_only_output_folder_stops_with_one_line(images, extracted, tmp_path):
    as_root = os.geteuid() == 0
    if as_root and not can_drop_capabilities():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be enforced on a child")
    out = tmp_path / "read-only"
    out.mkdir()
    (out / "a.safetensors").write_bytes((extracted / "a.safetensors").read_bytes())  # an earlier output
    out.chmod(0o555)
    try:
        preexec = without_permission_override if as_root else None
        process = start(cli("extract", images, "--out", out, *EXTRACT), preexec)
        check_one_line_error(process, out, f"cannot write {str(out / 'b.png')!r}: Permission denied")
    finally:
        out.chmod(0o755)
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors"]
    assert_equal_outputs(out, extracted, ["a.safetensors"])


@pytest.mark.parametrize("blocked", ["file", "file/below"])
def test_an_output_folder_that_is_a_file_is_one_line(images, tmp_path, capsys, blocked):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / blocked
    assert main(["extract", str(images / "a.png"), "--out", str(out), *EXTRACT]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"fastsrt: error: cannot write {str(out / 'a.png')!r}: "
                     f"{str(tmp_path / 'file')!r} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_missing_parents_of_the_output_folder_are_made(images, extracted, tmp_path):
    out = tmp_path / "missing" / "parents"
    reference_run(["extract", images / "a.png", "--out", out, *EXTRACT])
    assert_equal_outputs(out, extracted, ["a.png", "a.safetensors"])


def test_two_extract_runs_on_one_folder_at_once_write_every_output_whole(images, extracted, tmp_path):
    out = tmp_path / "out"
    command = cli("extract", images, "--out", out, *EXTRACT)
    processes = [start(command) for _ in range(2)]
    results = [process.communicate(timeout=TIMEOUT) for process in processes]
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0 and "0 failed" in stdout, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in extracted.iterdir())  # no temporaries
    assert_equal_outputs(out, extracted, [p.name for p in extracted.iterdir()])
