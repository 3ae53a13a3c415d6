"""The audit's verdict on the built-in cohort, at the harness's sizes and on its test cohort
(eval/audit_harness.py, eval/RESULTS.md): copy families the detectors never train on are flagged
at least at the rate the harness reports, every detector catches its own control, new subjects
pass with a bound under the policy and exceed tau at the nominal null level, a fifth of copies
fails, a latent model's copies are found through its own autoencoder (2D 64^2, 3D 32^3), noise is
never a copy, and every way the audit can be blind gives `inconclusive`. `--run` audits a run's
own split and records the attempt."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from medgen.errors import DataError
from medgen.privacy.bound import CopyBound
from medgen.privacy.calibration import CopyAudit
from medgen.privacy.families import LATENT_FAMILIES
from medgen.privacy.planting import family_copies
from medgen.privacy.verdict import MAX_COPY_RATE, judge

# = eval/audit_harness.py SETTINGS (the demo's sizes) and its test cohort
SETTINGS = {
    2: {"size": 64, "n_train": 100, "n_holdout": 60, "steps": 500, "batch_size": 64, "ae_steps": 200},
    3: {"size": 32, "n_train": 60, "n_holdout": 40, "steps": 300, "batch_size": 32, "ae_steps": 120},
}
COHORT_SEED = 7  # the harness's test cohort (settings were chosen on seeds 0 and 3)
N_GENUINE = {2: 200, 3: 40}  # other subjects, standing in for an honest model
N_STUDY = {2: 600, 3: 0}  # a typical study's sizes (2D): 200 more held-out images and 400 more new subjects
# Union recall per family (flagged and matched to the source): the lowest over the harness's three
# detector seeds on the test cohort, in 2D also over its rerun with one thread (another autoencoder)
# (eval/RESULTS.md, eval/logs/cpu/audit_harness_{2d,2d_1thread,3d}.json; `python eval/audit_harness.py --dims 2|3`).
# Asserted where that lowest value is at least 50%; the weak spots below it (zoom and rotation,
# and in decoded space elastic deformations and latent blends) vary from one autoencoder or
# detector seed to the next and are reported in RESULTS, not asserted.
HARNESS_MIN_RECALL = {
    "pixel": {2: {"blur": 1.0, "gamma": 1.0, "blend": 1.0, "downup": 1.0, "elastic": 0.95}},
    "latent": {
        2: {"autoencoder": 1.0, "latent-noise": 1.0, "latent-blend": 0.8, "blur": 1.0, "gamma": 1.0, "downup": 1.0, "blend": 0.7},
        3: {"autoencoder": 1.0, "latent-noise": 1.0, "blur": 1.0, "gamma": 0.85, "downup": 1.0, "blend": 0.5},
    },
}
K = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cohort(tmp_path_factory, dims: int):
    """The harness's split of the test cohort: training, held-out and other subjects."""
    from medgen.data import load_images
    from medgen.data.cohort import synth_brain

    st = SETTINGS[dims]
    n_t, n_h = st["n_train"], st["n_holdout"]
    n_g = n_t + n_h + N_GENUINE[dims]
    path = synth_brain(tmp_path_factory.mktemp(f"cohort{dims}d") / "c", n=n_g + N_STUDY[dims], dims=dims, size=st["size"], seed=COHORT_SEED)
    x, samples = load_images(path)
    return {"train": x[:n_t], "holdout": x[n_t : n_t + n_h], "genuine": x[n_t + n_h : n_g], "study": x[n_g:], "samples": samples, "path": path}


@pytest.fixture(scope="module")
def cohort2d(tmp_path_factory):
    return _cohort(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def audit2d(cohort2d):
    """The default audit of a pixel-space model (SSL + pixel-rank), fitted once as the harness does (seed 0)."""
    st = SETTINGS[2]
    return CopyAudit.fit(cohort2d["train"], cohort2d["holdout"], detector_options={"steps": st["steps"], "batch_size": st["batch_size"]}, seed=0)


def _assert_at_null_level(audit, flagged: torch.Tensor) -> None:
    """New subjects exceed tau at the union's nominal level (each detector's tau is a conformal
    quantile of held-out images), up to three binomial standard deviations of sampling noise."""
    nominal, n = sum(f.attained_level for f in audit.fits), len(flagged)
    rate = float(flagged.double().mean())
    assert rate <= nominal + 3 * math.sqrt(nominal * (1 - nominal) / n), f"{rate:.3f} of {n} new subjects above tau, nominal {nominal:.3f}"


def _check_families(audit, train, minimum, roundtrip=None):
    """As the harness scores them: a latent audit sees every copy decoded, as its model would output it."""
    for fam, floor in minimum.items():
        copies, sources = family_copies(train, fam, K, seed=0, autoencoder=roundtrip)
        if audit.decoded and fam not in LATENT_FAMILIES:
            copies = roundtrip(copies)
        recall = float(audit.score(copies).caught(sources).double().mean())  # flagged and matched to its source
        assert recall >= floor, f"{fam}: {recall:.2f} caught, the harness reports at least {floor:.2f}"


def test_families_never_trained_on_are_flagged_at_the_harness_rate_2d(audit2d, cohort2d):
    assert not audit2d.reasons, audit2d.reasons  # a healthy, trained audit; every detector caught its own control
    c = audit2d.control.summary()
    assert audit2d.control.recall >= 0.95 and set(c["pooled_families"]) == {"gamma", "blend", "elastic"}
    assert c["by_detector"]["ssl"]["own_families"] == ["flip"] and c["by_detector"]["ssl"]["recall"] >= 0.8
    assert c["by_detector"]["pixel-rank"]["recall"] >= 0.95
    assert audit2d.control.n == 3 * K  # the flips check the SSL detector but stay out of the bound's recall
    _check_families(audit2d, cohort2d["train"], HARNESS_MIN_RECALL["pixel"][2])


def test_new_subjects_pass_within_the_bound_and_a_fifth_of_copies_fails(audit2d, cohort2d):
    genuine, train = cohort2d["genuine"], cohort2d["train"]
    honest = judge(audit2d, genuine)
    _assert_at_null_level(audit2d, honest.is_copy)
    rate = float(honest.is_copy.double().mean())
    t = honest.report["test"]
    assert t["p_value"] >= 0.05 and t["null_rate_pct"] == pytest.approx(100 * audit2d.null_rate, abs=1e-3)
    b = honest.bound
    assert b.recall >= 0.95 and honest.report["bound"]["sentence"].startswith("at 95% confidence, at most")
    # never `fail`; 200 samples as flagged as new patients (~3%) cannot bound copies under 5% (the
    # operating table), so the verdict passes or, if not, says how many samples would
    if honest.verdict == "inconclusive":
        to_pass = honest.report["samples_to_pass"]
        assert to_pass > len(genuine) and f"about {to_pass} samples would pass" in honest.reasons[-1]
        bigger = CopyBound(int(rate * to_pass), to_pass, b.control_caught, b.control_n, b.alpha)
        assert bigger.upper <= MAX_COPY_RATE < CopyBound(int(rate * (to_pass - 1)), to_pass - 1, b.control_caught, b.control_n, b.alpha).upper
    else:
        assert honest.verdict == "pass" and b.upper <= MAX_COPY_RATE, honest.report["bound"]
    # a policy a 200-sample set of new patients can meet passes, with the same bound
    loose = judge(audit2d, genuine, max_copy_rate=0.1)
    assert loose.verdict == "pass" and loose.exit_code == 0 and loose.bound.upper == pytest.approx(b.upper)

    # 160 new subjects + 40 copies from validation families: a fifth of the set
    fams = ("blur", "gamma", "blend", "downup", "elastic")
    copies = torch.cat([family_copies(train, fam, 8, seed=5)[0] for fam in fams])
    mixed = judge(audit2d, torch.cat([genuine[:160], copies]))
    assert mixed.verdict == "fail" and mixed.exit_code == 1 and mixed.p_value < 0.05, mixed.report["test"]
    assert mixed.is_copy[160:].double().mean() >= 0.9 and mixed.bound.upper > 0.15
    assert mixed.report["thresholds"] == honest.report["thresholds"]  # the same calibrated audit judges every set


def test_new_subjects_pass_at_a_studys_sizes(audit2d, cohort2d):
    """Issue 20: genuine new subjects pass. With 200 held-out images each detector's tau is their
    conformal quantile at 1/201 (the union's null about 1%), and 400 new subjects (an honest model
    as good as it gets) pass the 5% policy; the same trained SSL detector, recalibrated."""
    study, train = cohort2d["study"], cohort2d["train"]
    holdout, new = study[:200], study[200:]
    ssl = audit2d.fits[0].detector
    audit = CopyAudit.fit(train, holdout, [ssl, "pixel-rank"], seed=0)
    assert not audit.reasons and [f.attained_level for f in audit.fits] == [pytest.approx(1 / 201)] * 2
    honest = judge(audit, new)
    _assert_at_null_level(audit, honest.is_copy)
    assert honest.verdict == "pass" and honest.exit_code == 0 and honest.bound.upper <= MAX_COPY_RATE, honest.report["bound"]


def test_dar_measures_count_both_directions(audit2d, cohort2d):
    """n_copies_pct counts synthetic samples above tau; n_mem_pct (Dar et al.) training images
    whose best synthetic match is above tau; n_copy_sources_pct the flagged samples' sources."""
    train, genuine = cohort2d["train"], cohort2d["genuine"]
    many = torch.stack([train[3] + 0.01 * torch.randn(train[3].shape, generator=torch.Generator().manual_seed(i)) for i in range(10)]).clamp(-1, 1)
    synth = torch.cat([genuine[:30], many])
    result = judge(audit2d, synth)
    r = result.report
    assert r["n_copies"] >= 10 and r["n_copy_sources"] >= 1
    scores, embeddings = audit2d.score(synth, keep_embeddings=True)
    memorized = torch.zeros(train.shape[0], dtype=torch.bool)
    for f, e in zip(audit2d.fits, embeddings):  # brute force, per detector
        for j in range(train.shape[0]):
            sims = [torch.corrcoef(torch.stack([f.train_embeddings[j].double(), e[i].double()]))[0, 1] for i in range(e.shape[0]) if scores.anatomical[i]]
            memorized[j] |= bool(max(sims) > f.threshold)
    assert r["n_mem"] == int(memorized.sum()) and memorized[3]
    assert r["n_mem_pct"] == pytest.approx(100 * memorized.double().mean().item(), abs=1e-3)
    assert r["dar"]["n_above"] >= r["n_copies"]  # Dar's tau is the lower one: a measure, not the decision


def test_noise_and_blank_samples_are_reported_never_copies(audit2d, cohort2d):
    genuine = cohort2d["genuine"]
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn((10,) + tuple(genuine.shape[1:]), generator=g) * 0.5).clamp(-1, 1)
    blank = torch.full((3,) + tuple(genuine.shape[1:]), -1.0)
    inverted = -genuine[:3]  # a wrong contrast: no patient looks like this
    result = judge(audit2d, torch.cat([genuine, noise, blank, inverted]))
    n = len(genuine)
    assert not result.is_copy[n:].any()
    assert result.report["not_anatomy"] == {"blank": 3, "noise": 10, "atypical": 3}
    assert result.report["n_not_anatomy"] == 16
    # non-copies: the bound counts them in its denominator, so they can only lower it
    alone = judge(audit2d, genuine).bound
    assert (result.bound.n_flagged, result.bound.n_samples) == (alone.n_flagged, n + 16) and result.bound.upper < alone.upper
    assert result.scores.not_anatomy[:n] == [""] * n
    only_noise = judge(audit2d, noise)
    assert only_noise.verdict == "inconclusive" and any("nothing to audit" in x for x in only_noise.reasons)


class _Constant:
    """A detector whose embedding collapsed to one vector (or, `rank1`, to a line)."""

    def __init__(self, rank1=False):
        self.name, self.rank1 = "collapsed", rank1
        self.recipe = {"detector": "collapsed"}

    def embed(self, images, device=None):
        base = torch.linspace(-1, 1, 16).repeat(images.shape[0], 1)
        if self.rank1:
            return base * images.flatten(1).mean(1, keepdim=True)  # one number per image
        return base


class _Blind:
    """A detector that ignores the image: fresh random embeddings on every call."""

    name, recipe = "blind", {"detector": "blind"}

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def embed(self, images, device=None):
        return torch.randn(images.shape[0], 32, generator=self.g)


def test_blind_audits_are_inconclusive(cohort2d):
    train, holdout, genuine = cohort2d["train"], cohort2d["holdout"], cohort2d["genuine"]
    copies = train[:10].clone()  # exact copies: a seeing audit fails them
    for det in (_Constant(), _Constant(rank1=True)):
        r = judge(CopyAudit.fit(train, holdout, det), torch.cat([genuine[:20], copies]))
        assert r.verdict == "inconclusive" and r.exit_code == 3 and any("collapsed" in x for x in r.reasons), r.reasons
    # a detector that cannot see copies fails its own control, even beside one that can: the union must not hide it
    r = judge(CopyAudit.fit(train, holdout, [_Blind(), "pixel-rank"]), genuine)
    assert r.verdict == "inconclusive" and any("positive control failed for detector blind" in x for x in r.reasons)
    by_detector = r.report["control"]["by_detector"]
    assert by_detector["blind"]["recall"] < 0.5 and by_detector["pixel-rank"]["recall"] >= 0.95
    assert r.report["control"]["blind_detectors"] == ["blind"]
    # a detector that did not train (2 steps): NT-Xent near chance
    r = judge(CopyAudit.fit(train, holdout, "ssl", detector_options={"steps": 2, "batch_size": 16}), genuine)
    assert r.verdict == "inconclusive" and any("did not converge" in x for x in r.reasons)


def test_overlapping_or_tiny_holdout_and_small_sample_sets_are_refused_or_inconclusive(cohort2d):
    train, holdout, genuine = cohort2d["train"], cohort2d["holdout"], cohort2d["genuine"]
    pixel = "pixel-rank"
    with pytest.raises(DataError, match="overlaps the training set"):
        CopyAudit.fit(train, train.clone(), pixel)
    ok = CopyAudit.fit(train, holdout, pixel)
    assert not ok.reasons and judge(ok, genuine).verdict == "pass"
    n_t, n_h = len(train), len(holdout)
    shared = CopyAudit.fit(train, holdout, pixel, subjects={"train": [f"s{i}" for i in range(n_t)], "holdout": ["s0"] + [f"h{i}" for i in range(n_h - 1)]})
    assert judge(shared, genuine).verdict == "inconclusive" and any("subject id" in x for x in shared.reasons)
    dup = CopyAudit.fit(train, torch.cat([holdout, train[:2]]), pixel)
    assert dup.holdout_dropped == 2 and any("identical to training images" in x for x in dup.reasons)
    small = CopyAudit.fit(train, holdout[:12], pixel)
    assert judge(small, genuine).verdict == "inconclusive" and any("only 12 held-out images" in x for x in small.reasons)
    # 30 honest samples cannot bound the copy share under 5%: inconclusive, with the number that would
    r = judge(ok, genuine[:30])
    assert r.verdict == "inconclusive" and r.exit_code == 3 and any("samples would pass" in x for x in r.reasons), r.reasons
    need, b = r.report["samples_to_pass"], r.bound
    assert b.n_flagged == 0 and b.control_caught == b.control_n == 60
    # closed form with none flagged: upper = (1 - (a/2)^(1/n)) / (a/2)^(1/60); `need` is the least n under 5%
    closed = lambda n: (1 - (b.alpha / 2) ** (1 / n)) / (b.alpha / 2) ** (1 / b.control_n)  # noqa: E731
    assert closed(need) <= MAX_COPY_RATE < closed(need - 1)


def test_audit_run_uses_exactly_the_runs_split_and_is_recorded(tmp_path, cohort2d):
    from medgen.cli import main
    from medgen.data import datasets_from_config, load_split
    from medgen.privacy.attempts import read_attempts
    from medgen.privacy.audit import run_split

    run = tmp_path / "run"
    run.mkdir()
    data_cfg = {"path": str(cohort2d["path"]), "spatial_dims": 2, "shape": [64, 64], "split": {"val": 0.1, "holdout": 0.4, "seed": 3}}
    datasets_from_config(data_cfg, run)  # writes run/split.json as training does
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text(json.dumps({"data": data_cfg}))
    split = load_split(run / "split.json")
    train, holdout, cfg = run_split(run)
    assert {s.subject_id for s in train} == set(split["train"]) and {s.subject_id for s in holdout} == set(split["holdout"])
    assert cfg["shape"] == [64, 64]
    _, both, _ = run_split(run, holdout_splits=("holdout", "val"))
    assert {s.subject_id for s in both} == set(split["holdout"]) | set(split["val"])

    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    for s in holdout[:30]:
        (synthetic / s.path.name).write_bytes(s.path.read_bytes())
    out = tmp_path / "audit"
    code = main(["audit", "--run", str(run), "--synthetic", str(synthetic), "--out", str(out), "--detector", "pixel-rank"])
    report = json.loads((out / "report.json").read_text())
    assert report["n_train"] == len(split["train"]) and report["n_holdout"] == len(split["holdout"])
    assert report["inputs"]["run"] == str(run) and report["inputs"]["holdout_splits"] == ["holdout"]
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert {Path(r["nearest_train"]).name for r in rows} <= {s.path.name for s in train}
    # new patients, but 30 samples cannot bound the copy share under 5%: inconclusive (exit 3), not pass
    assert code == 3 and report["verdict"] == "inconclusive" and report["samples_to_pass"] > 30
    # a fifth of the samples are training images: fail, exit code 1
    for s in train[:8]:
        (synthetic / f"copy_{s.path.name}").write_bytes(s.path.read_bytes())
    code = main(["audit", "--run", str(run), "--synthetic", str(synthetic), "--out", str(out), "--detector", "pixel-rank", "--overwrite"])
    report = json.loads((out / "report.json").read_text())
    assert code == 1 and report["verdict"] == "fail" and report["n_copies"] >= 8 and report["test"]["p_value"] < 0.05
    # both attempts are on the run's record, with their verdicts and bounds
    log = read_attempts(run)
    assert [(a["kind"], a["verdict"]) for a in log] == [("audit", "inconclusive"), ("audit", "fail")]
    assert log[1]["bound_upper_pct"] == report["bound"]["upper_pct"] and log[1]["out"] == str(out)


@pytest.mark.slow
def test_latent_copies_are_found_through_the_models_own_autoencoder_2d(cohort2d, tmp_path):
    """A latent model's copy is a decoded training latent. With the demo's VQ-GAN (trained as the
    demo trains it, 64^2), the latent detector catches round trips and noisy latents of training
    images, while decoded new subjects (an honest latent model at best) exceed tau at the null level."""
    from medgen.privacy.planting import train_roundtrip_autoencoder

    st = SETTINGS[2]
    files = [s.path for s in cohort2d["samples"][: st["n_train"]]]
    roundtrip = train_roundtrip_autoencoder(files, 2, st["size"], st["ae_steps"], tmp_path)
    audit = CopyAudit.fit(cohort2d["train"], cohort2d["holdout"], "pixel-rank,latent", autoencoder=roundtrip, seed=0)
    assert audit.decoded and not audit.reasons, audit.reasons
    assert audit.control.summary()["by_detector"]["latent"]["recall"] == 1.0
    _check_families(audit, cohort2d["train"], HARNESS_MIN_RECALL["latent"][2], roundtrip)
    # a training image as stored (no decoder outputs it; a wrapper or a leak can) is a copy too
    assert audit.score(cohort2d["train"][:K]).caught(list(range(K))).all()
    honest = judge(audit, roundtrip(cohort2d["genuine"]))
    _assert_at_null_level(audit, honest.is_copy)
    # an honest latent model is never `fail`; at 200 samples the bound can be above 5% (inconclusive)
    assert honest.verdict in ("pass", "inconclusive") and honest.report["test"]["p_value"] >= 0.05, honest.reasons


@pytest.mark.slow
def test_3d_latent_copies_new_subjects_and_noise(tmp_path_factory, tmp_path):
    """3D at 32^3 with the demo's 3D VQ-GAN: round trips and noisy latents are caught (every
    pixel detector missed round trips at 16^3), decoded new subjects exceed tau at the null level, a fifth
    of latent copies fails, and noise is never a copy."""
    from medgen.privacy.planting import train_roundtrip_autoencoder

    st = SETTINGS[3]
    cohort = _cohort(tmp_path_factory, 3)
    train, holdout, genuine = cohort["train"], cohort["holdout"], cohort["genuine"]
    roundtrip = train_roundtrip_autoencoder([s.path for s in cohort["samples"][: st["n_train"]]], 3, st["size"], st["ae_steps"], tmp_path)
    audit = CopyAudit.fit(train, holdout, "pixel-rank,latent", autoencoder=roundtrip, seed=0)
    assert not audit.reasons, audit.reasons
    _check_families(audit, train, HARNESS_MIN_RECALL["latent"][3], roundtrip)
    assert audit.score(train[:K]).caught(list(range(K))).all()  # stored training volumes: anatomy, and copies
    decoded = roundtrip(genuine)
    _assert_at_null_level(audit, audit.score(decoded).is_copy)
    copies = torch.cat([family_copies(train, fam, 5, seed=5, autoencoder=roundtrip)[0] for fam in ("autoencoder", "latent-noise")])
    assert judge(audit, torch.cat([decoded, copies])).verdict == "fail"  # 10 of 50
    noise = (torch.randn((6,) + tuple(genuine.shape[1:]), generator=torch.Generator().manual_seed(0)) * 0.5).clamp(-1, 1)
    assert not audit.score(noise).is_copy.any()


@pytest.mark.slow
def test_a_pixel_prior_that_memorized_its_training_subjects_fails(tmp_path, capsys):
    """A model that really copies: the demo's pixel prior over-trained on 8 subjects (1000 steps,
    batch 8) is audited through `medgen audit --run` like any run: fail, exit 1, with most
    training subjects reproduced. (Measured: at 1000 steps 47 of its 100 samples are copies, bound
    67%, all 8 subjects reproduced; at 800 steps 22, bound 37%; at 1500 steps, a third more time,
    50 or more.)"""
    from medgen.cli import main
    from medgen.config import load_config
    from medgen.data.cohort import synth_brain
    from medgen.demo import demo_config
    from medgen.sample.pipeline import load_pipeline, write_samples
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    cohort = synth_brain(tmp_path / "cohort", n=40, dims=2, size=32, seed=5)
    cfg = load_config(demo_config("demo_diffusion_2d_pixel.yaml"), [
        f"data.path={cohort}", "data.split.val=0.0", "data.split.holdout=0.8", "model.conditional=false", "train.tracker=none",
        "train.max_steps=1000", "train.batch_size=8", "train.checkpoint_every=1000", "train.preview_every=1000"], DEFAULTS)
    run = train_diffusion(cfg, tmp_path / "run")
    samples = write_samples(load_pipeline(run, "cpu"), tmp_path / "samples", 100)
    code = main(["audit", "--run", str(run), "--synthetic", str(samples), "--out", str(tmp_path / "audit")])
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert report["n_train"] == 8 and report["n_holdout"] == 32
    assert code == 1 and report["verdict"] == "fail" and report["n_copies"] >= 15, (report["verdict"], report["n_copies"], report["reasons"])
    assert report["bound"]["upper_pct"] > 25 and report["n_mem_pct"] >= 75  # most training subjects are reproduced
