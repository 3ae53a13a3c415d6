"""Shared training machinery: atomic checkpoints, keep-last-N, resume, NaN guard, run dir, metrics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medgen.errors import RunError, TrainingError
from medgen.train.common import (
    CheckpointManager,
    EpochSampler,
    MetricsLogger,
    build_accelerator,
    check_finite,
    infinite_batches,
    load_inference_model,
    load_model_config,
    make_loader,
    prepare_run_dir,
    read_metrics,
    save_inference_model,
)

TRAIN = {"mixed_precision": "no", "seed": 3, "cpu": True}


def _setup(run_dir):
    acc = build_accelerator(TRAIN, run_dir)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _step(model, opt):
    loss = model(torch.ones(3, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_checkpoint_keep_last_and_resume_latest(tmp_path):
    acc, model, opt = _setup(tmp_path)
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    for step in range(1, 5):
        _step(model, opt)
        ckpt.save(acc, step, {"note": f"s{step}"})
    assert [s for s, _ in ckpt.list()] == [3, 4]  # keep-last-2
    assert ckpt.latest().name == "step_4"
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    next_loss = _step(model, opt)  # what the uninterrupted run does next

    acc2, model2, opt2 = _setup(tmp_path)  # fresh weights, fresh optimizer
    assert not torch.equal(model2.weight, saved["weight"])
    extra = CheckpointManager(tmp_path).resume(acc2, "latest")
    assert extra["step"] == 4 and extra["note"] == "s4"
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k])
    # Adam moments came back too: the next step is identical, not a fresh-optimizer step.
    assert _step(model2, opt2) == pytest.approx(next_loss, abs=0, rel=0)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    acc, model, opt = _setup(tmp_path)
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    _step(model, opt)
    good = ckpt.save(acc, 1)
    before = sorted(p.name for p in good.iterdir())

    def crash(output_dir, **kw):  # die after writing part of the state
        (tmp_path / "checkpoints" / ".step_2.tmp" / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(acc, "save_state", crash)
    with pytest.raises(OSError):
        ckpt.save(acc, 2)
    assert [s for s, _ in ckpt.list()] == [1]
    assert not (tmp_path / "checkpoints" / ".step_2.tmp").exists()
    assert sorted(p.name for p in good.iterdir()) == before
    # A leftover half-written folder without extra.json is never picked up as "latest".
    (tmp_path / "checkpoints" / "step_9").mkdir()
    assert ckpt.latest() == good


def test_resume_latest_without_checkpoint_starts_at_zero(tmp_path):
    acc, _, _ = _setup(tmp_path)
    assert CheckpointManager(tmp_path).resume(acc, "latest") == {"step": 0}
    with pytest.raises(RunError, match="not a complete medgen checkpoint"):
        CheckpointManager(tmp_path).resume(acc, tmp_path / "nope")


def test_check_finite_names_step_and_value():
    check_finite(torch.tensor(1.5), 3, "loss")
    with pytest.raises(TrainingError, match=r"reconstruction loss is not finite \(\[nan\]\) at step 17"):
        check_finite(torch.tensor(float("nan")), 17, "reconstruction loss")
    with pytest.raises(TrainingError, match="inf"):
        check_finite(torch.tensor([1.0, float("inf")]), 2)


def test_prepare_run_dir_refuses_nonempty(tmp_path):
    cfg = {"train": {"lr": 1e-3}}
    run = prepare_run_dir(tmp_path / "run", cfg)
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    with pytest.raises(RunError, match="--resume latest"):
        prepare_run_dir(tmp_path / "run", cfg)
    prepare_run_dir(tmp_path / "run", cfg, resume="latest")  # allowed


def test_metrics_logger_appends_and_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for s in range(1, 6):
        logger.log(s, {"loss": torch.tensor(float(s)), "lr": 0.1})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] == 3.0
    MetricsLogger(tmp_path, truncate_after=3)  # resumed from step 3: steps 4, 5 are redone
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_infinite_batches_resume_matches_uninterrupted(tmp_path):
    acc = build_accelerator(TRAIN, tmp_path)
    data = torch.arange(10).float()

    def batches(start, n):
        sampler = EpochSampler(len(data), shuffle=True, seed=5)
        loader = acc.prepare(make_loader(data, 3, sampler))  # 3 batches per epoch (drop_last)
        it = infinite_batches(acc, loader, sampler, start)
        return [next(it).tolist() for _ in range(n)]

    full = batches(0, 8)
    assert full[:3] != full[3:6]  # reshuffled each epoch
    assert batches(4, 4) == full[4:]  # resume mid-epoch 1


def test_save_inference_model_round_trip(tmp_path):
    model = nn.Linear(4, 2)
    cfg = {"target": "torch.nn.Linear", "params": {"in_features": 4, "out_features": 2}}
    save_inference_model(model, tmp_path / "model", cfg)
    assert load_model_config(tmp_path / "model") == cfg
    assert json.loads((tmp_path / "model" / "config.json").read_text())["params"]["in_features"] == 4
    with pytest.raises(RunError, match="not a medgen class"):  # never import arbitrary classes
        load_inference_model(tmp_path / "model")
    with pytest.raises(RunError, match="config.json not found"):
        load_model_config(tmp_path)
