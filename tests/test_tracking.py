"""Trackers (medgen.tracking): TensorBoard and wandb, offline, read back from the files they wrote.

TensorBoard's event files are read with its own EventAccumulator; wandb's offline run is read from
its transaction log (`run-*.wandb`: LevelDB log blocks of protobuf `Record`s, what `wandb sync`
uploads). Nothing is mocked: each test trains or evaluates for real and reads what was logged.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgen.cli import main as cli
from medgen.config import load_config
from medgen.errors import ConfigError
from medgen.train.common import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_DIFFUSION = ["model.channels=[8,16]", "model.num_res_blocks=1", "model.attention_levels=[false,false]",
                  "model.head_channels=8", "model.norm_groups=4", "sample.steps=2", "sample.n_preview=2"]
TINY_AUTOENCODER = ["model.channels=[8,16]", "model.downsample=2", "model.num_codes=16", "model.norm_groups=4",
                    "discriminator.enabled=false", "train.val_every=1000"]
# two steps, a preview and a metrics line at each, CPU
STEPS = ["train.max_steps=2", "train.preview_every=1", "train.log_every=1", "train.checkpoint_every=2",
         "train.batch_size=4", "train.cpu=true"]


def _pixels(png) -> np.ndarray:
    with Image.open(png if isinstance(png, Path) else io.BytesIO(png)) as image:
        return np.asarray(image)


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of the one offline run under `run_dir/wandb`, in order. The file is a
    LevelDB log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type: full / first /
    middle / last), each record the concatenation of its chunks."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def _history(records) -> list[dict]:
    """wandb history rows as {"a/b": value}; an image is {"a/b/path": ..., "a/b/width": ...}."""
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def _image_rows(history: list[dict], tag: str) -> dict[int, dict]:
    return {row["_step"]: {k[len(tag) + 1:]: v for k, v in row.items() if k.startswith(tag + "/")}
            for row in history if f"{tag}/path" in row}


def test_tensorboard_training_run_logs_its_metrics_and_previews(cohort_2d, tmp_path):
    """Diffusion training with train.tracker=tensorboard: metrics.jsonl's numbers as scalars at their
    steps, each preview PNG as an image at its step, pixel for pixel."""
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    cfg = load_config(REPO / "configs" / "demo_diffusion_2d_pixel.yaml",
                      [f"data.path={cohort_2d}", "train.tracker=tensorboard", *TINY_DIFFUSION, *STEPS], DEFAULTS)
    run = train_diffusion(cfg, tmp_path / "run")
    events = _tensorboard(run / "tensorboard" / "medgen")
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert "step" not in events.Tags()["scalars"]  # the step is the x axis, not a curve
    images = events.Images("samples/generated")
    assert [i.step for i in images] == [1, 2]
    for image in images:
        expected = _pixels(run / "samples" / f"step_{image.step}.png")
        assert (image.height, image.width) == expected.shape[:2]
        np.testing.assert_array_equal(_pixels(image.encoded_image_string), expected)


def test_wandb_training_run_logs_previews_and_the_model_artifact(cohort_2d, tmp_path, monkeypatch):
    """Autoencoder training with train.tracker=wandb, offline: the reconstruction previews at their
    steps with their sizes, the losses, and the final model as a `model` artifact whose files are
    model/ and config.yaml byte for byte (md5 digests), without optimizer state."""
    from medgen.train import autoencoder as ae_train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # wandb stages artifact files here
    cfg = load_config(REPO / "configs" / "demo_autoencoder_2d.yaml",
                      [f"data.path={cohort_2d}", "train.tracker=wandb", *TINY_AUTOENCODER, *STEPS], ae_train.DEFAULTS)
    run = ae_train.train_autoencoder(cfg, tmp_path / "run")
    records = _wandb_records(run)
    history = _history(records)

    previews = _image_rows(history, "samples/reconstruction")
    assert sorted(previews) == [1, 2]
    for step, image in previews.items():
        height, width = _pixels(run / "samples" / f"recon_step_{step}.png").shape[:2]
        assert (image["height"], image["width"]) == (height, width) and image["_type"] == "image-file"
        assert (next((run / "wandb").glob("offline-run-*")) / "files" / image["path"]).is_file()
    losses = {row["_step"]: row["loss/total"] for row in history if "loss/total" in row}
    assert losses == {r["step"]: pytest.approx(r["loss/total"]) for r in read_metrics(run) if "loss/total" in r}

    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and artifact.name == "run-model"
    files = {"model/model.safetensors": run / "model" / "model.safetensors",
             "model/config.json": run / "model" / "config.json", "config.yaml": run / "config.yaml"}
    assert {c.path: c.digest for c in artifact.manifest.contents} == {
        name: base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode() for name, path in files.items()}


def test_eval_logs_its_figures_and_numbers_to_tensorboard(cohort_2d, tmp_path):
    """`medgen eval --tracker tensorboard`: every figure of the report folder as an image, every
    number of report.json's metrics as a scalar, report.md as text."""
    out = tmp_path / "eval"
    assert cli(["eval", "--real", str(cohort_2d), "--fake", str(cohort_2d), "--out", str(out), "--features", "pca",
                "--metrics", "fid,prdc", "--bootstrap", "0", "--tracker", "tensorboard"]) == 0
    events = _tensorboard(out / "tensorboard" / "eval")
    report = json.loads((out / "report.json").read_text())
    scalars = {tag: events.Scalars(tag)[0] for tag in events.Tags()["scalars"]}
    expected = {f"eval/metrics/{name}/value": m["value"] for name, m in report["metrics"].items()}
    assert expected and all(scalars[tag].value == pytest.approx(v) and scalars[tag].step == 0 for tag, v in expected.items())
    assert not [tag for tag in scalars if "/recipe/" in tag or "/versions/" in tag]  # how, not what: not logged
    figures = sorted(out.glob("*.png"))
    assert figures and sorted(events.Tags()["images"]) == [f"eval/{png.stem}" for png in figures]
    for png in figures:
        np.testing.assert_array_equal(_pixels(events.Images(f"eval/{png.stem}")[0].encoded_image_string), _pixels(png))
    text = events.Tensors("eval/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == (out / "report.md").read_text()


def test_wandb_report_holds_figures_numbers_and_tables(tmp_path, monkeypatch):
    """`log_report` to wandb offline: figures as images, numbers (setup sections left out) in the
    run summary, lists of rows as tables with every column."""
    from medgen.tracking import log_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    report_dir = tmp_path / "probe_report"
    report_dir.mkdir()
    report = {"results": [{"method": "tv", "psnr": 30.5}, {"method": "dps", "psnr": 28.0, "ssim": 0.9}],
              "summary": {"drop_db": 1.25, "n": 24, "verdict": "no evidence"}, "setup": {"steps": 100}}
    (report_dir / "report.json").write_text(json.dumps(report))
    Image.fromarray(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)).save(report_dir / "curves.png")
    log_report(report_dir, "wandb", tmp_path / "tracking", job="probe")

    records = _wandb_records(tmp_path / "tracking")
    summary = {"/".join(u.nested_key) or u.key: json.loads(u.value_json)
               for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert summary["probe/summary/drop_db"] == 1.25 and summary["probe/summary/n"] == 24
    assert not [k for k in summary if k.startswith("probe/setup")]
    (row,) = _history(records)
    assert (row["probe/curves/height"], row["probe/curves/width"]) == (12, 20)
    assert row["probe/results/_type"] == "table-file" and row["probe/results/nrows"] == 2 and row["probe/results/ncols"] == 3
    table = json.loads((next((tmp_path / "tracking" / "wandb").glob("offline-run-*")) / "files"
                        / row["probe/results/path"]).read_text())
    assert table["columns"] == ["method", "psnr", "ssim"] and table["data"] == [["tv", 30.5, None], ["dps", 28.0, 0.9]]


def test_tracker_choice_and_missing_package(tmp_path, monkeypatch):
    """train.tracker takes tensorboard; a tracker whose package is missing is a ConfigError naming
    the setting and the pip command; a report command defaults to its run's train.tracker."""
    from medgen.tracking import check_tracker, report_tracker
    from medgen.train.common import build_accelerator
    from medgen.train.diffusion import DEFAULTS

    cfg = load_config(REPO / "configs" / "demo_diffusion_2d_pixel.yaml", ["train.tracker=tensorboard"], DEFAULTS)
    assert cfg.train.tracker == "tensorboard"
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(REPO / "configs" / "demo_diffusion_2d_pixel.yaml", ["train.tracker=mlflow"], DEFAULTS)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"train.tracker=tensorboard needs the tensorboard package: pip install tensorboard"):
        build_accelerator(cfg.train, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--tracker=tensorboard needs"):
        check_tracker("tensorboard", "--tracker")

    run = tmp_path / "trained"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  tracker: wandb\n")
    assert report_tracker(None, run) == "wandb" and report_tracker("none", run) == "none"
    assert report_tracker(None, None) == "none" and report_tracker(None, tmp_path / "no_run") == "none"
