"""Configs and the CLI protect the user: typos and bad values are one `medgen: error:` line (exit 2)
before anything is created, `--overwrite` never deletes what medgen did not write, failed runs
leave nothing behind, `demo --stages` keeps earlier outputs, files get the umask's modes."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgen import __version__
from medgen.cli import main
from medgen.config import load_config, schema_keys
from medgen.io import OUTPUT_MARKER
from medgen.train.schema import AutoencoderConfig, DiffusionConfig

REPO = Path(__file__).resolve().parents[1]
AE_2D = REPO / "configs" / "demo_autoencoder_2d.yaml"
PIXEL_2D = REPO / "configs" / "demo_diffusion_2d_pixel.yaml"
TINY_DIFFUSION = ["model.channels=[16,32]", "model.num_res_blocks=1", "model.attention_levels=[false,true]",
                  "model.head_channels=16", "model.norm_groups=8", "train.batch_size=4", "train.max_steps=1",
                  "sample.steps=2", "sample.n_preview=2", "train.tracker=none"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("medgen: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- config schema


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=5", "unknown config key train.max_stepz; did you mean train.max_steps?"),
    ("trian.max_steps=2", "unknown config key trian.max_steps; did you mean train.max_steps?"),
    ("loss.adversarial_wieght=0.5", "unknown config key loss.adversarial_wieght; did you mean loss.adversarial_weight?"),
    ("data.intensity.moed=ct", "unknown config key data.intensity.moed; did you mean data.intensity.mode?"),
    ("train.batch_size=abc", "train.batch_size=abc: expected an integer >= 1"),
    ("train.max_steps=abc", "train.max_steps=abc: expected an integer >= 1"),
    ("train.lr=abc", "train.lr=abc: expected a number > 0"),
    ("train.lr=-1", "train.lr=-1.0: expected a number > 0"),
    ("train.batch_size=0", "train.batch_size=0: expected an integer >= 1"),
    ("data.shape=abc", "data.shape=abc: expected a list of integers >= 1 or null"),
    ("train.mixed_precision=fp32", "train.mixed_precision=fp32: expected one of no, fp16, bf16"),
    ("data.shape=[32,32", "data.shape=[32,32: cannot read the value of data.shape (while parsing a flow sequence: did not "
                          "find expected ',' or ']'); write lists as data.shape=[1,2] and quote text with spaces or special characters"),
    ("data.shape=a: b", "data.shape={a: b}: expected a list of integers >= 1 or null"),
])
def test_bad_override_is_one_error_line_and_creates_nothing(override, message, capsys, tmp_path):
    code, _, err = run(capsys, "train", "autoencoder", "--config", AE_2D, "--out", tmp_path / "run",
                       f"data.path={tmp_path}", override)
    assert (code, error_line(err)) == (2, f"medgen: error: {message}")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_a_file(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(AE_2D.read_text().replace("  max_steps: 200", "  max_stepz: 5"))
    code, _, err = run(capsys, "train", "autoencoder", "--config", config, "--out", tmp_path / "run", f"data.path={tmp_path}")
    assert (code, error_line(err)) == (2, f"medgen: error: {config}: unknown config key train.max_stepz; did you mean train.max_steps?")
    assert not (tmp_path / "run").exists()


def test_yaml_errors_give_the_line_and_a_folder_is_not_a_config(capsys, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  max_steps: 5\n bad: 1\n")
    code, _, err = run(capsys, "train", "autoencoder", "--config", config, "--out", tmp_path / "run", f"data.path={tmp_path}")
    assert (code, error_line(err)) == (2, f"medgen: error: {config}:3:2: not valid YAML: while parsing a block mapping: "
                                          "did not find expected key")
    code, _, err = run(capsys, "train", "autoencoder", "--config", tmp_path, "--out", tmp_path / "run", f"data.path={tmp_path}")
    assert (code, error_line(err)) == (2, f"medgen: error: config file {tmp_path} is a folder; pass a YAML file "
                                          "(e.g. configs/demo_autoencoder_2d.yaml)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]


def test_yaml_no_is_the_choice_no(tmp_path):
    """`mixed_precision: no` (YAML 1.1 reads false) and `train.mixed_precision=no` mean "no"."""
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  mixed_precision: no\n")
    assert load_config(config, [], AutoencoderConfig).train.mixed_precision == "no"
    assert load_config(AE_2D, ["train.mixed_precision=no"], AutoencoderConfig).train.mixed_precision == "no"
    assert load_config(AE_2D, ["train.mixed_precision=bf16"], AutoencoderConfig).train.mixed_precision == "bf16"


def test_every_config_loads_and_every_key_read_is_declared():
    """The shipped configs fit their schema, and every `cfg.<section>.<key>` / `cfg_get(..., "key")`
    the trainers read is a schema key (an undeclared key would be an error for the user)."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        schema = AutoencoderConfig if any(k in path.name for k in ("autoencoder", "vae", "vqgan")) else DiffusionConfig
        load_config(path, [], schema)
    for module, schema in (("autoencoder", AutoencoderConfig), ("diffusion", DiffusionConfig)):
        source = (REPO / "medgen" / "train" / f"{module}.py").read_text()
        keys = set(schema_keys(schema))
        aliases = {"tcfg": "train", "lcfg": "loss", "loss_cfg": "loss", "model_cfg": "model", "disc_cfg": "discriminator"}
        read = {f"{a}.{b}" for a, b in re.findall(r"\bcfg\.(\w+)\.(\w+)", source)}
        read |= {f"{a}.{b}" for a, b in re.findall(r"cfg_get\(cfg\.(\w+), \"(\w+)\"", source)}
        for alias, sect in aliases.items():
            read |= {f"{sect}.{k}" for k in re.findall(rf"\b{alias}\.(\w+)\b(?!\()", source)}
            read |= {f"{sect}.{k}" for k in re.findall(rf"cfg_get\({alias}, \"(\w+)\"", source)}
        assert read and read <= keys, sorted(read - keys)


def test_config_show_lists_every_key_and_version(capsys):
    code, out, _ = run(capsys, "config", "show", "diffusion", "--config", PIXEL_2D, "train.max_steps=7")
    assert code == 0
    shown, stack = [], []
    for line in out.splitlines():  # rebuild the dotted keys from the indentation
        m = re.match(r"( *)(\w+):", line)
        depth = len(m.group(1)) // 2
        stack[depth:] = [m.group(2)]
        shown.append(".".join(stack))
    assert shown == [k for k in schema_keys(DiffusionConfig) if not k.startswith("data.intensity.")]  # null in PIXEL_2D
    assert "  max_steps: 7  # an integer >= 1; optimizer steps of the whole run" in out
    assert "  mixed_precision: 'no'  # one of no, fp16, bf16" in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"medgen {__version__}"


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_refuses_foreign_files_and_the_current_directory(capsys, tmp_path, monkeypatch):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "important.txt").write_text("mine")
    synth = ["data", "synth-brain", "--n", "2", "--dims", "2", "--size", "16", "--overwrite", "--out"]
    code, _, err = run(capsys, *synth, out)
    assert (code, error_line(err)) == (2, f"medgen: error: --overwrite replaces only what medgen wrote, but {out} holds "
                                          "1 entry it did not write: important.txt; move it away or choose another --out")
    assert (out / "important.txt").read_text() == "mine"

    (out / "important.txt").unlink()
    assert run(capsys, *synth, out)[0] == 0  # an empty folder is fine; medgen's own folder is replaced
    assert run(capsys, *synth, out)[0] == 0
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("mine")
    (out / "important.txt").write_text("mine")
    code, _, err = run(capsys, *synth, out)
    assert error_line(err).endswith("holds 2 entries it did not write: important.txt, sub/; move them away or choose another --out")

    monkeypatch.chdir(out)  # from inside the folder: never deleted, whatever the marker says
    for target in (".", str(out), ".."):
        code, _, err = run(capsys, *synth, target)
        assert (code, error_line(err)) == (2, f"medgen: error: --out {target} is the current directory or holds it; the "
                                              "cohort folder is written as a new folder and medgen never replaces the "
                                              "folder you are in: choose another --out")
    code, _, err = run(capsys, "eval", "--real", out, "--fake", out, "--out", ".", "--overwrite")
    assert code == 2 and "--out . is the current directory or holds it" in error_line(err)
    assert (out / "important.txt").read_text() == "mine" and (out / "sub" / "notes.txt").is_file()
    assert (out / "sub-0000.png").is_file() and (out / OUTPUT_MARKER).is_file()


def test_missing_inputs_are_named_before_anything_else(capsys, tmp_path):
    code, _, err = run(capsys, "audit", "--train", "/nonexistent", "--holdout", tmp_path, "--synthetic", tmp_path,
                       "--out", tmp_path / "au")
    assert (code, error_line(err)) == (2, "medgen: error: --train /nonexistent: no such file or folder")
    code, _, err = run(capsys, "eval", "--real", tmp_path, "--fake", tmp_path, "--out", tmp_path / "r",
                       "--features", "/nonexistent.pt")
    assert (code, error_line(err)) == (2, "medgen: error: --features /nonexistent.pt: no such file or folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_eval_refuses_different_sizes_unless_asked(capsys, tmp_path):
    for name, size in (("real", 16), ("fake", 8)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((size, size), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    code, _, err = run(capsys, "eval", "--real", tmp_path / "real", "--fake", tmp_path / "fake", "--out", tmp_path / "r")
    assert (code, error_line(err)) == (2, f"medgen: error: real images are 16x16 ({tmp_path / 'real'}) but synthetic ones "
                                          f"are 8x8 ({tmp_path / 'fake'}); the extractor would resize both and hide the "
                                          f"difference. Sample at the real size, or pass --allow-size-mismatch to compare anyway")
    assert not (tmp_path / "r").exists()
    from medgen.metrics.report import report_markdown

    inputs = {"real": {"dir": "R", "shape": [1, 16, 16]}, "fake": {"dir": "F", "shape": [1, 8, 8]}}
    md = report_markdown({"recipe": {"inputs": inputs, "n_real": 2, "n_fake": 2, "bootstrap": 0, "seed": 0, "device": "cpu"},
                          "metrics": {}, "notes": [], "versions": {}})
    assert "synthetic: `F` (2 images, shape [1, 8, 8]) - different sizes: the feature extractor resized both." in md


# ----------------------------------------------------------------------------- failed runs, file modes


def test_failed_run_leaves_no_folder_and_files_get_umask_modes(capsys, tmp_path, cohort_2d):
    run_dir = tmp_path / "run"
    base = ["train", "diffusion", "--config", PIXEL_2D, "--out", run_dir, *TINY_DIFFUSION]
    # caught before the folder is made
    code, _, err = run(capsys, *base, f"data.path={cohort_2d}", "autoencoder.run=/nonexistent")
    assert (code, error_line(err)) == (2, "medgen: error: autoencoder.run: /nonexistent does not exist")
    assert not run_dir.exists()
    # caught while reading the data, after the folder was made: removed again
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted(cohort_2d.glob("*.png"))[:4]:
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "broken.png").write_bytes(b"not a png")
    code, _, err = run(capsys, *base, f"data.path={bad}")
    assert code == 2 and error_line(err).startswith(f"medgen: error: {bad / 'broken.png'}: could not be read")
    assert not run_dir.exists()

    old = os.umask(0o022)
    try:  # the corrected command needs no --resume
        assert run(capsys, *base, f"data.path={cohort_2d}")[0] == 0
    finally:
        os.umask(old)
    for name in ("config.yaml", "split.json", "model/config.json", "model/model.safetensors",
                 "checkpoints/step_1/extra.json", "checkpoints/step_1/model.safetensors"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name
    for name in ("", "model", "checkpoints/step_1"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o755, name


def test_atomic_outputs_get_umask_modes(tmp_path):
    from medgen.io import atomic_dir, atomic_write_json

    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "report") as tmp:
            atomic_write_json(tmp / "report.json", {"a": 1})
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report" / "report.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "report").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "report" / "sub").stat().st_mode) == 0o750
    assert json.loads((tmp_path / "report" / OUTPUT_MARKER).read_text())["entries"] == ["report.json", "sub/"]


# ----------------------------------------------------------------------------- demo --stages


def _stage(name: str):
    def stage(ctx) -> None:
        (ctx.out / name).mkdir()
        (ctx.out / name / "out.txt").write_text(f"{name} saw {sorted(ctx.state)}")
        ctx.state[f"{name}_dir"] = ctx.out / name
        if name == "cohort":
            ctx.cohort = ctx.out / name
    return stage


def test_demo_stages_keep_earlier_outputs(capsys, tmp_path, monkeypatch):
    import medgen.demo as demo

    names = ["cohort", "train", "report"]
    monkeypatch.setattr(demo, "STAGES", [(n, f"{__name__}:{n}_stage") for n in names])
    for n in names:
        monkeypatch.setitem(globals(), f"{n}_stage", _stage(n))
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--out", out, "--stages", "cohort,bogus")
    assert (code, error_line(err)) == (2, "medgen: error: --stages bogus: unknown stage; the stages are cohort,train,report")
    code, _, err = run(capsys, "demo", "--out", out, "--stages", "report")
    assert (code, error_line(err)) == (2, f"medgen: error: --stages report continues an earlier demo, but {out} holds "
                                          f"none; run `medgen demo` first or add cohort to --stages")
    assert run(capsys, "demo", "--out", out)[0] == 0
    cohort_file, train_file = out / "cohort" / "out.txt", out / "train" / "out.txt"
    before = (cohort_file.stat().st_ino, train_file.stat().st_ino)
    (out / "report" / "out.txt").write_text("stale")

    assert run(capsys, "demo", "--out", out, "--stages", "report")[0] == 0
    assert (cohort_file.stat().st_ino, train_file.stat().st_ino) == before  # untouched
    assert (out / "report" / "out.txt").read_text() == "report saw ['cohort_dir', 'train_dir']"  # as if run after them
    summary = json.loads((out / "demo.json").read_text())
    assert summary["outputs"] == {"cohort": ["cohort/"], "train": ["train/"], "report": ["report/"]}

    (out / "train" / "mine.txt").write_text("user file")  # a re-run stage never deletes what medgen did not write
    code, _, err = run(capsys, "demo", "--out", out, "--stages", "train")
    assert code == 2 and "train/mine.txt" in error_line(err)
    code, _, err = run(capsys, "demo", "--out", out)
    assert code == 2 and "holds 1 entry it did not write: train/mine.txt" in error_line(err)
    assert (out / "train" / "mine.txt").is_file() and train_file.is_file()


# ----------------------------------------------------------------------------- data


def test_resize_keeps_the_field_of_view_and_cropping_is_reported(tmp_path, caplog):
    from medgen.data import DataConfig, check_samples, load, preprocess, scan_dataset
    from medgen.data.preprocess import output_spacing

    img = np.zeros((64, 64), np.uint8)
    img[:4, :], img[-4:, :], img[:, :4], img[:, -4:] = 255, 255, 255, 255  # a frame at the border
    Image.fromarray(img).save(tmp_path / "a.png")
    loaded = load(tmp_path / "a.png")
    resized = preprocess(loaded, DataConfig(shape=[32, 32], resize=True))
    cropped = preprocess(loaded, DataConfig(shape=[32, 32]))
    assert resized.shape == cropped.shape == (1, 32, 32)
    assert resized[0, 0].max() > 0.5 and resized[0, 16, 16] < -0.9  # frame kept, centre dark
    assert cropped.max() < -0.9  # the central crop loses the frame
    assert output_spacing(loaded, DataConfig(shape=[32, 32], resize=True)) == (2.0, 2.0)
    with caplog.at_level(logging.WARNING, logger="medgen.data.dataset"):
        _, _, summary = check_samples(scan_dataset(tmp_path), DataConfig(shape=[32, 32]))
    assert summary["cropped"] == 0.5
    assert f"data.shape [32, 32] crops {tmp_path / 'a.png'} (64x64) to its central 50% along an axis; set " \
           "data.resize=true to resize instead, or data.shape to the image size" in caplog.text
    caplog.clear()
    check_samples(scan_dataset(tmp_path), DataConfig(shape=[60, 60]))  # a small margin is not worth a warning
    assert "crops" not in caplog.text


def test_dicom_messages(tmp_path, capfd):
    import pydicom
    from pydicom.data import get_testdata_file

    from medgen.data import load
    from medgen.errors import DataError

    (tmp_path / "notes.dcm").write_text("hello")
    with pytest.raises(DataError) as e:
        load(tmp_path / "notes.dcm")
    assert str(e.value) == f"{tmp_path / 'notes.dcm'}: not a DICOM file (no DICOM header, no pixel data); remove it or fix its name"
    series = tmp_path / "series"
    series.mkdir()
    uid = pydicom.uid.generate_uid()
    for k in range(3):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
        ds.ImagePositionPatient, ds.InstanceNumber = [0.0, 0.0, float(k)], k
        ds.save_as(series / f"s{k}.dcm")
    assert load(series).shape[-1] == 3
    data = (series / "s1.dcm").read_bytes()
    (series / "s1.dcm").write_bytes(data[: len(data) // 2])  # GDCM would silently drop this slice
    capfd.readouterr()
    with pytest.raises(DataError, match=r"series: DICOM series with 1 unreadable or foreign file\(s\): s1.dcm"):
        load(series)
    assert "WARNING" not in capfd.readouterr().err  # no ITK warnings on the terminal


def test_progress_is_logged_in_lines_when_not_a_terminal(capsys):
    from medgen.train.common import ProgressLog

    bar = ProgressLog(total=2100, initial=100, desc="diffusion")  # resumed at step 100
    for _ in range(2000):
        bar.set_postfix(loss="0.1234")
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 100 and lines[0].startswith("diffusion: step 120/2100 (6%), ")  # every 1%: 20 steps
    assert re.fullmatch(r"diffusion: step 2100/2100 \(100%\), [\d.]+ step/s, ETA 0:00:00, loss=0.1234", lines[-1])
    ProgressLog(total=5, desc="short").update(5)  # short runs: every 10 steps, and the last one
    assert capsys.readouterr().err.startswith("short: step 5/5 (100%)")


def test_regional_compilation_keeps_outputs_and_weights():
    """`train.compile` compiles the UNet's repeated blocks in place: same outputs, same state_dict keys."""
    import torch

    from medgen.models.unet import ResBlock, UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, channels=[16, 32], num_res_blocks=1, attention_levels=[False, True],
               head_channels=16, norm_groups=8)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        for m in net.modules():  # the zero-initialised output convs would hide any difference
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0, 0.1)
        expected = net(x, t)
    keys = list(net.state_dict())
    net.compile_blocks(backend="eager")  # dynamo capture without inductor: fast, same math
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), expected)
    assert list(net.state_dict()) == keys
