"""Progress on long steps (issue 22 row 14): one helper, lines in a log when stderr is not a terminal."""

from __future__ import annotations

import re
import time

import torch

from medgen.progress import ProgressLog, progress


def test_a_log_gets_a_line_every_percent_and_at_the_end(capsys):
    steps = list(progress(range(2000), desc="copy detector"))  # pytest's stderr is not a terminal
    assert steps == list(range(2000))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 100 and lines[0].startswith("copy detector: step 20/2000 (1%), ")
    assert re.fullmatch(r"copy detector: step 2000/2000 \(100%\), [\d.]+ step/s, ETA 0:00:00", lines[-1])


def test_updates_by_chunks_and_slow_units_still_print(capsys, monkeypatch):
    bar = progress(total=1000, desc="features", unit="image")
    for _ in range(15):
        bar.update(64)  # chunks that jump over every multiple of 10 images
    assert len(capsys.readouterr().err.splitlines()) == 15
    clock = iter([0.0, 31.0, 62.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    slow = ProgressLog(total=1000, desc="sample", unit="batch")  # 1 batch in 31 s: below 1% of the work
    slow.update(1)
    slow.update(1)
    assert capsys.readouterr().err.splitlines()[0].startswith("sample: batch 1/1000 (0%), ")


def test_disabled_on_other_processes_prints_nothing(capsys):
    assert list(progress(range(50), desc="sample", enabled=False)) == list(range(50))
    assert capsys.readouterr().err == ""


def test_long_steps_report_progress(capsys):
    """Sampling, the probe's attack and the SSL copy detector each print progress lines in a log."""
    from medgen.privacy.detector import train_detector
    from medgen.recon.attack import worst_case_perturbation

    train_detector(torch.rand(8, 1, 16, 16) * 2 - 1, steps=30, batch_size=4, image_size=16, widths=[8, 8], blocks=[1, 1],
                   embed_dim=8)
    assert re.search(r"^copy detector: step 30/30 \(100%\)", capsys.readouterr().err, re.M)
    k = torch.randn(2, 2, 8, 8)  # (B, 2, H, W) full k-space
    worst_case_perturbation(lambda y: y.square(), k, torch.ones(8, 8), [0.1], steps=20, desc="attack on the surrogate, R=4")
    assert re.search(r"^attack on the surrogate, R=4: step 20/20 \(100%\)", capsys.readouterr().err, re.M)
