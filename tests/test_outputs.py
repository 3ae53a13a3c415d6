"""One output rule for every command (issue 22): a non-empty folder needs --overwrite, which
replaces only what medgen marked and never a sibling it did not create; no output inside an
input; a lock refuses a second writer; killed runs leave no staging folder, or one the next run
sweeps; a full or read-only disk is one error line before the work; exit codes mean one thing."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medgen.io as mio
from medgen.cli import EXIT_INTERNAL_ERROR, ISSUES_URL, main
from medgen.io import LOCK_SUFFIX, OUTPUT_MARKER, OWNER_FILE, atomic_dir, atomic_write_json, owner_alive, owner_record

REPO = Path(__file__).resolve().parents[1]
PIXEL_2D = REPO / "configs" / "demo_diffusion_2d_pixel.yaml"
TINY_RUN = ["model.channels=[8,16]", "model.attention_levels=[false,false]", "model.head_channels=8", "model.norm_groups=4",
            "train.batch_size=4", "train.max_steps=1", "train.checkpoint_every=1", "train.preview_every=1",
            "sample.steps=2", "sample.n_preview=1", "train.tracker=none"]
SYNTH = ["data", "synth-brain", "--dims", "2", "--size", "16"]


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("medgen: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def pixel_run(cohort_2d, tmp_path_factory) -> Path:
    """A 2D pixel-space diffusion run trained for one step on the cohort (32x32)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "diffusion", "--config", str(PIXEL_2D), "--out", str(out), f"data.path={cohort_2d}", *TINY_RUN]) == 0
    return out


def blank_images(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((32, 32), 90, np.uint8)).save(folder / f"sub-{i:02d}.png")
    return folder


def command_lines(pixel_run: Path, cohort: Path, tmp: Path) -> dict[str, list]:
    """One invocation per command whose output is `--out OUT`, with inputs that exist."""
    return {
        "sample": ["sample", "--run", pixel_run, "--n", "2", "--device", "cpu"],
        "eval": ["eval", "--real", cohort, "--fake", cohort, "--bootstrap", "0"],
        "audit": ["audit", "--train", cohort, "--holdout", cohort, "--synthetic", cohort],
        "encode": ["encode", "--autoencoder", pixel_run, "--data", cohort],
        "data synth-brain": [*SYNTH, "--n", "2"],
        "probe train-surrogate": ["probe", "train-surrogate", "--data", cohort],
        "probe mri": ["probe", "mri", "--prior", pixel_run, "--data", cohort],
        "release": ["release", "--run", pixel_run, "--n", "2"],
        "demo": ["demo", "--quick"],
    }


# ----------------------------------------------------------------------------- existing folders


@pytest.mark.parametrize("command", ["sample", "eval", "audit", "encode", "data synth-brain", "probe train-surrogate",
                                     "probe mri", "release", "demo"])
def test_every_command_refuses_a_non_empty_folder_and_keeps_foreign_files(command, pixel_run, cohort_2d, tmp_path, capsys):
    argv = command_lines(pixel_run, cohort_2d, tmp_path)[command]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run(capsys, *argv, "--out", out)
    assert code == 2 and error_line(err).endswith(f"{out} already holds files; pass --overwrite to replace it")
    code, err = run(capsys, *argv, "--out", out, "--overwrite")
    assert code == 2 and error_line(err).endswith("holds 1 entry it did not write: notes.txt; move it away or choose another --out")
    assert listing(out) == ["notes.txt"] and listing(tmp_path) == ["out", "out/notes.txt"]  # no lock or staging left


def test_demo_refuses_another_commands_folder_without_overwrite(capsys, tmp_path, monkeypatch):
    """Row 3: `medgen demo --out REL` on a finished release deleted it; the demo replaces only its own folder."""
    import medgen.demo as demo

    monkeypatch.setattr(demo, "STAGES", [("cohort", f"{__name__}:_cohort_stage")])
    release = tmp_path / "rel"
    with atomic_dir(release, what="release folder") as tmp:  # what `medgen release` leaves: marked by medgen
        (tmp / "DATA_CARD.md").write_text("# card")
        (tmp / "synthetic_00000.png").write_bytes(b"png")
    before = listing(release)
    code, err = run(capsys, "demo", "--quick", "--out", release)
    assert (code, error_line(err)) == (2, f"medgen: error: demo folder {release} already holds files; pass --overwrite to replace it")
    assert listing(release) == before
    code, err = run(capsys, "demo", "--quick", "--out", release, "--stages", "cohort")
    assert code == 2 and "already holds files" in error_line(err) and listing(release) == before

    demo_dir = tmp_path / "demo"
    assert run(capsys, "demo", "--quick", "--out", demo_dir)[0] == 0
    assert run(capsys, "demo", "--quick", "--out", demo_dir)[0] == 0  # its own earlier demo: no --overwrite needed
    assert run(capsys, "demo", "--quick", "--out", release, "--overwrite")[0] == 0
    assert listing(release) == listing(demo_dir)


def _cohort_stage(ctx) -> None:
    (ctx.out / "cohort").mkdir()
    (ctx.out / "cohort" / "a.txt").write_text("cohort")
    ctx.cohort = ctx.out / "cohort"


def test_overwrite_keeps_siblings_medgen_did_not_create(capsys, tmp_path):
    """Row 7: `.NAME.old` beside the output was removed by the swap."""
    out = tmp_path / "r26"
    (tmp_path / ".r26.old").mkdir()
    (tmp_path / ".r26.old" / "mine.txt").write_text("mine")
    (tmp_path / ".r26.mine.tmp").mkdir()  # even a name like a staging folder's, without medgen's owner file
    for _ in range(2):
        assert run(capsys, *SYNTH, "--n", "2", "--out", out, "--overwrite")[0] == 0
    assert (tmp_path / ".r26.old" / "mine.txt").read_text() == "mine" and (tmp_path / ".r26.mine.tmp").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r26.mine.tmp", ".r26.old", "r26"]


def test_train_surrogate_accepts_an_empty_folder_and_checks_before_training(cohort_2d, tmp_path, capsys, monkeypatch):
    """Row 10/11: a foreign file refused only after the surrogate trained; an existing empty folder refused."""
    import medgen.recon.surrogate as surrogate

    out = tmp_path / "s"
    out.mkdir()
    tiny = ["probe", "train-surrogate", "--data", cohort_2d, "--out", out, "--acceleration", "4", "--device", "cpu",
            "train.max_steps=2", "train.batch_size=2", "network.channels_per_scale=[4,8]"]
    assert run(capsys, *tiny)[0] == 0 and (out / "model.safetensors").is_file()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(surrogate, "train_surrogate", lambda *a, **k: pytest.fail("trained before checking --out"))
    code, err = run(capsys, *tiny, "--overwrite")
    assert code == 2 and "it did not write: notes.txt" in error_line(err)


# ----------------------------------------------------------------------------- inputs


def test_no_output_inside_an_input(pixel_run, cohort_2d, tmp_path, capsys):
    """Row 6: outputs inside the data (or a run) were written there; an input inside --out would be replaced."""
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(cohort_2d.glob("sub-*.png")):
        (data / p.name).write_bytes(p.read_bytes())
    before, run_before = listing(data), listing(pixel_run)
    cases = [
        (["probe", "mri", "--prior", pixel_run, "--data", data, "--out", data / "report"], f"--data input {data}"),
        (["train", "diffusion", "--config", PIXEL_2D, "--out", data / "run1", f"data.path={data}", *TINY_RUN],
         f"data.path input {data}"),
        (["sample", "--run", pixel_run, "--n", "2", "--out", pixel_run / "samples_x"], f"--run input {pixel_run}"),
        (["eval", "--real", data, "--fake", data, "--out", data / "eval"], f"--real input {data}"),
        (["audit", "--train", data, "--holdout", data, "--synthetic", data, "--out", data / "au"], f"--train input {data}"),
        (["encode", "--autoencoder", pixel_run, "--data", data, "--out", tmp_path, "--overwrite"], f"--data input {data}"),
    ]
    for argv, named in cases:
        code, err = run(capsys, *argv)
        assert code == 2 and named in error_line(err) and "input folders are never written to" in err, argv
    assert listing(data) == before and listing(pixel_run) == run_before


# ----------------------------------------------------------------------------- a second writer


def _start_writer(out: Path, *extra: str, n: int = 20000) -> subprocess.Popen:
    """`medgen data synth-brain` writing many subjects into `out` (a minute or more); returns once
    its staging folder holds files."""
    proc = subprocess.Popen([sys.executable, "-m", "medgen", *SYNTH, "--n", str(n), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as on a terminal
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(len(list(s.iterdir())) > 3 for s in staging(out)):
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the writer did not start: {proc.communicate()}")


def staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def test_a_second_writer_is_refused_naming_the_first(pixel_run, tmp_path, capsys):
    """Row 4: two `medgen sample --out S` started 2 s apart both succeeded, the second replacing the first."""
    out = tmp_path / "S"
    writer = _start_writer(out)
    try:
        code, err = run(capsys, "sample", "--run", pixel_run, "--n", "2", "--device", "cpu", "--out", out)
        line = error_line(err)
        assert code == 2 and line.startswith(f"medgen: error: sample folder {out} is being written by medgen process "
                                             f"{writer.pid} on {socket.gethostname()} (since ")
        assert line.endswith("); wait for it to finish, or choose another --out") and not out.exists()
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.communicate(timeout=60)
    assert writer.returncode == 143
    assert run(capsys, "sample", "--run", pixel_run, "--n", "2", "--device", "cpu", "--out", out)[0] == 0  # lock released
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S"]  # no lock file, no staging folder


HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": None, "time": time.time()}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_refused_training_run_leaves_the_other_writers_folder(cohort_2d, tmp_path, capsys, monkeypatch):
    """A run refused by the lock must not clean up a folder it found empty: the other writer fills it."""
    import medgen.train.common as common

    out = tmp_path / "run"
    out.mkdir()  # empty when the refused run starts
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / f".run{LOCK_SUFFIX}")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        real = common.claim_output

        def other_writer_meanwhile(path, *args, **kwargs):
            (out / "config.yaml").write_text("the other run's")
            return real(path, *args, **kwargs)

        monkeypatch.setattr(common, "claim_output", other_writer_meanwhile)
        code, err = run(capsys, "train", "diffusion", "--config", PIXEL_2D, "--out", out, f"data.path={cohort_2d}", *TINY_RUN)
        assert code == 2 and f"is being written by medgen process {holder.pid}" in error_line(err)
        assert (out / "config.yaml").read_text() == "the other run's"
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path, capsys):
    out = tmp_path / "c"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {**owner_record(), "pid": int(dead.stdout)}
    (tmp_path / f".c{LOCK_SUFFIX}").write_text(json.dumps(record))  # its flock went with the process
    assert run(capsys, *SYNTH, "--n", "2", "--out", out)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# ----------------------------------------------------------------------------- killed runs


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_terminated_run_removes_its_staging_folder(sig, code, tmp_path):
    """Row 13: SIGTERM (timeout, Slurm, docker stop) left the hidden staging folders behind."""
    out = tmp_path / "c"
    writer = _start_writer(out)
    writer.send_signal(sig)
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == code and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder, no lock file


def test_a_killed_runs_staging_folder_is_swept_by_the_next_run(tmp_path, capsys):
    """Row 13: what `kill -9` left is removed by the next run writing the same output, and only that."""
    out = tmp_path / "c"
    writer = _start_writer(out)
    writer.kill()
    writer.communicate(timeout=60)
    left = staging(out)
    assert len(left) == 1 and json.loads((left[0] / OWNER_FILE).read_text())["pid"] == writer.pid
    live = tmp_path / ".c.live.tmp"  # a staging folder of a live process (this one): never swept
    live.mkdir()
    atomic_write_json(live / OWNER_FILE, owner_record())
    foreign = tmp_path / ".c.user.tmp"  # no owner file: not medgen's
    foreign.mkdir()
    assert run(capsys, *SYNTH, "--n", "2", "--out", out)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.live.tmp", ".c.user.tmp", "c"]
    assert OWNER_FILE not in [p.name for p in out.iterdir()]


def test_owner_alive():
    me = owner_record()
    assert owner_alive(me)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not owner_alive({**me, "pid": int(dead.stdout)})
    assert not owner_alive({**me, "started": (me["started"] or 0) + 1})  # the pid now names another process
    other = {**me, "host": "another-node"}
    assert owner_alive(other)  # nothing can be checked on another machine: left alone...
    assert not owner_alive({**other, "time": time.time() - 8 * 24 * 3600})  # ...unless a week old


# ----------------------------------------------------------------------------- disks


def _read_only(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only for medgen (the tests run as root, which chmod does not stop)."""
    real = mio.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")).resolve() == folder.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(mio.tempfile, "mkstemp", mkstemp)


def _never(*args, **kwargs):
    pytest.fail("the work started before the output was checked")


def test_a_read_only_or_full_disk_is_one_error_before_the_work(pixel_run, cohort_2d, tmp_path, capsys, monkeypatch):
    import medgen.privacy.audit
    import medgen.sample.pipeline
    import medgen.train.diffusion

    monkeypatch.setattr(medgen.sample.pipeline, "load_pipeline", _never)
    monkeypatch.setattr(medgen.privacy.audit, "run_audit", _never)
    monkeypatch.setattr(medgen.train.diffusion, "build_accelerator", _never)
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    commands = {
        "sample folder": ["sample", "--run", pixel_run, "--n", "2", "--out", ro / "s"],
        "audit folder": ["audit", "--train", cohort_2d, "--holdout", cohort_2d, "--synthetic", cohort_2d, "--out", ro / "a"],
        "run directory": ["train", "diffusion", "--config", PIXEL_2D, "--out", ro / "r", f"data.path={cohort_2d}", *TINY_RUN],
    }
    for what, argv in commands.items():
        code, err = run(capsys, *argv)
        assert (code, error_line(err)) == (2, f"medgen: error: cannot write the {what} {argv[argv.index('--out') + 1]}: "
                                              f"Read-only file system ({ro}); choose an --out on a disk you can write to")
    monkeypatch.setattr(mio.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    for what, argv in commands.items():
        argv = [tmp_path / "full" if a == argv[argv.index("--out") + 1] else a for a in argv]
        code, err = run(capsys, *argv)
        assert code == 2 and error_line(err).endswith("1.0 MiB free on its disk, about 16.0 MiB needed; free some space "
                                                      "or choose an --out on another disk"), what
    assert listing(ro) == [] and not (tmp_path / "full").exists()


def test_sample_checks_room_for_every_file_before_sampling(pixel_run, tmp_path, capsys, monkeypatch):
    import medgen.sample.pipeline

    monkeypatch.setattr(medgen.sample.pipeline, "write_samples", _never)
    monkeypatch.setattr(mio.shutil, "disk_usage", lambda p: type("U", (), {"free": 50 << 20})())
    code, err = run(capsys, "sample", "--run", pixel_run, "--n", "100000", "--device", "cpu", "--out", tmp_path / "s")
    assert code == 2 and "50.0 MiB free on its disk, about 97.7 MiB needed" in error_line(err)  # 100000 x 32x32 8-bit PNG


@pytest.mark.parametrize("where", ["cohort", "train"])
def test_a_disk_full_while_writing_is_one_error_and_leaves_nothing(where, cohort_2d, tmp_path, capsys, monkeypatch):
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name in ("sub-0001.png", "config.yaml") or self.name.startswith(".config.yaml."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    def write_config(cfg, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "out"
    if where == "cohort":
        code, err = run(capsys, *SYNTH, "--n", "3", "--out", out)
        what = "cohort folder"
    else:
        import medgen.train.common

        monkeypatch.setattr(medgen.train.common, "save_config", write_config)
        code, err = run(capsys, "train", "diffusion", "--config", PIXEL_2D, "--out", out, f"data.path={cohort_2d}", *TINY_RUN)
        what = "run directory"
    line = error_line(err)
    assert code == 2 and line.startswith(f"medgen: error: could not write the {what} {out}: No space left on device (")
    assert line.endswith("); free some space or choose an --out on a disk you can write to")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- arguments and data


@pytest.mark.parametrize("option, message", [
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),  # used 25 steps, and the manifest said 25
    (["--n", "0"], "--n 0: expected an integer >= 1"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616: expected an integer from 0 to 18446744073709551614 "
                                         "(sample i uses seed + i, and seeds are unsigned 64-bit integers)"),
    (["--seed", "-1"], "--seed -1: expected an integer from 0 to 18446744073709551614 (sample i uses seed + i, and seeds "
                       "are unsigned 64-bit integers)"),
])
def test_sample_arguments_are_checked_before_the_model_loads(option, message, pixel_run, tmp_path, capsys, monkeypatch):
    import medgen.sample.pipeline

    monkeypatch.setattr(medgen.sample.pipeline, "load_pipeline", _never)
    argv = ["sample", "--run", pixel_run, "--n", "2", "--out", tmp_path / "s", *option]
    code, err = run(capsys, *argv)
    assert (code, error_line(err)) == (2, f"medgen: error: {message}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["eval", "--msssim-pairs", "0"], "--msssim-pairs 0: expected an integer >= 1"),  # an internal error after the features
    (["eval", "--slice-step", "0"], "--slice-step 0: expected an integer >= 1"),
    (["eval", "--bootstrap", "-1"], "--bootstrap -1: expected an integer >= 0"),
    (["encode", "--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
])
def test_counts_are_checked_before_the_work(argv, message, pixel_run, cohort_2d, tmp_path, capsys):
    inputs = {"eval": ["--real", cohort_2d, "--fake", cohort_2d], "encode": ["--autoencoder", pixel_run, "--data", cohort_2d]}
    code, err = run(capsys, *argv, *inputs[argv[0]], "--out", tmp_path / "out")
    assert (code, error_line(err)) == (2, f"medgen: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_samples(pixel_run, tmp_path, capsys):
    seed = 2**64 - 2
    assert run(capsys, "sample", "--run", pixel_run, "--n", "2", "--seed", seed, "--device", "cpu", "--out", tmp_path / "s")[0] == 0
    seeds = [line.split(",")[2] for line in (tmp_path / "s" / "manifest.csv").read_text().splitlines()[1:]]
    assert seeds == [str(seed), str(seed + 1)]


def test_blank_images_are_named_as_blank(pixel_run, tmp_path, capsys):
    """Row 8/11: a traceback for the surrogate; the probe said they "were used to train the prior"."""
    blank = blank_images(tmp_path / "blank")
    code, err = run(capsys, "probe", "train-surrogate", "--data", blank, "--out", tmp_path / "s", "--device", "cpu")
    line = error_line(err)
    assert code == 2 and line.startswith(f"medgen: error: all 4 training images of {blank} are blank (constant intensity, e.g. ")
    assert line.endswith("); the surrogate needs images with contrast: check --data and data.shape (a crop of the "
                         "background is blank)")
    code, err = run(capsys, "probe", "mri", "--prior", pixel_run, "--data", blank, "--out", tmp_path / "r", "--device", "cpu")
    assert (code, error_line(err)) == (2, f"medgen: error: all 6 images of {blank} are blank (constant intensity) after "
                                          "preprocessing (native size); the probe needs images with contrast")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank"]


def test_the_surrogate_steps_key_is_the_trainers(cohort_2d, caplog):
    """Row 11: `train.steps` for the surrogate, `train.max_steps` for the trainers; the old name still works."""
    from medgen.recon import surrogate

    surrogate._warned_renames.clear()
    with caplog.at_level("WARNING", logger="medgen.recon.surrogate"):
        old = surrogate.surrogate_config(["train.steps=7"], data={"path": str(cohort_2d)})
        again = surrogate.surrogate_config(["train.steps=9"], data={"path": str(cohort_2d)})
    assert (old["train"]["max_steps"], again["train"]["max_steps"]) == (7, 9) and "steps" not in old["train"]
    assert [r.getMessage() for r in caplog.records] == [
        "train.steps is now train.max_steps (as in every medgen trainer); the old name still works"]  # once
    assert surrogate.surrogate_config(["train.max_steps=5"], data={"path": str(cohort_2d)})["train"]["max_steps"] == 5


# ----------------------------------------------------------------------------- exit codes


def test_a_crash_is_an_internal_error_not_a_verdict(capsys, monkeypatch):
    """Row 9: every crash exited 1, like an audit that failed."""
    import medgen.data.commands

    def crash(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(medgen.data.commands, "_check", crash)
    code, err = run(capsys, "data", "check", ".")
    assert code == EXIT_INTERNAL_ERROR == 70 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("medgen:")] == [
        f"medgen: internal error: RuntimeError: boom (please report it at {ISSUES_URL}; rerun with --verbose for the traceback)"]
    code, err = run(capsys, "--verbose", "data", "check", ".")
    assert code == 70 and "Traceback" in err and err.splitlines()[-1].endswith(f"(please report it at {ISSUES_URL})")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'Issues = "{ISSUES_URL}"' in pyproject


def test_marker_names_the_writer(tmp_path):
    with atomic_dir(tmp_path / "x") as tmp:
        (tmp / "a").write_text("a")
    assert json.loads((tmp_path / "x" / OUTPUT_MARKER).read_text())["entries"] == ["a"]
    assert mio.written_by(tmp_path / "x") == "medgen" and mio.written_by(tmp_path) is None
