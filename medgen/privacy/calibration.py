"""A calibrated copy audit: detectors, their thresholds, the null rate and the positive control,
fitted once on the training and held-out sets and then used to score any synthetic images.

Per detector, a sample is scored by its best similarity with a training image, and flagged when
it is above that detector's tau; several detectors are combined as a union. tau is calibrated in
the direction the samples are scored, on each held-out image's best similarity with the training
set: the larger of a split-conformal quantile (distribution-free: a patient the model never saw
exceeds it with probability at most max(null_level, 1 / (n_holdout + 1)); with fewer than 199
held-out images that is their maximum) and the Gaussian tail quantile of their Fisher
z-transforms at `null_level` (default 0.5%), which extrapolates beyond the held-out maximum and
only raises tau. A higher tau costs recall, which the positive control measures and the bound
accounts for; it never makes the bound wrong. Dar et al. 2024's tau (the 95th percentile of each
training image's best held-out similarity: a max over the held-out set, scored against
samples' max over the larger training set, so new patients exceed it 30% of the time at the
demo's sizes) is kept as a measure in the report; it no longer decides.

For a latent model the audit is given the model's autoencoder and works in the space the model
outputs: training and held-out images are decoded through it (what the model would output for a
patient it reproduces, or for one it never saw), every detector compares samples with the
decoded training images, the positive control's copies are decoded too, and the `latent`
detector (native-resolution correlation) joins the union. Raw copies scored against decoded
references would be flagged for their sharpness, not for being copies. A sample is matched with
the stored training images as well (the best of both, tau calibrated the same way): the decoder
cannot output a raw training image, but a wrapper, a bug or a leak can, and that is a copy too.

Beside the thresholds, `CopyAudit.fit` measures what a verdict needs to be trusted:

- the **null rate**: how often a new patient scores above tau. Each held-out image is scored
  against the tau of the other held-out images (leave-one-out), as independent of tau as a
  synthetic sample is.
- the **positive control**: copies of training images from copy families the detectors never
  train on (`medgen.privacy.families`), scored like synthetic samples; a copy is caught when it
  is flagged with its own training image as the match. Its recall enters the privacy bound
  (`medgen.privacy.bound`), and every detector must catch the families it is in the union for
  (`DETECTOR_CONTROL_FAMILIES`): a detector blind to its own family makes the verdict
  `inconclusive`.
- the **anatomy gate**: blank images, noise and images unlike any patient are reported apart and
  never counted as copies (an SSL embedding of noise can sit anywhere, even next to a patient).
- **health**: collapsed embeddings, a saturated tau, a detector that did not converge, held-out
  images that duplicate training images or share their subjects, a held-out set too small.
  Each makes the verdict `inconclusive` (`reasons`).

`medgen.privacy.verdict.judge(audit, synthetic)` gives the verdict; it can be called again on
further samples, which are judged against the same tau, null and control.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from medgen.errors import DataError
from medgen.privacy.memorization import SIMILARITIES, calibrated_threshold, copy_threshold, effective_rank, leave_one_out_exceedances, summary
from medgen.metrics.knn import pairwise_topk

log = logging.getLogger(__name__)

DEFAULT_DETECTORS = "ssl,pixel-rank"  # "auto" for a pixel-space model
LATENT_DETECTORS = "pixel-rank,latent"  # "auto" for a latent model (the audit has its autoencoder)
NULL_LEVEL = 0.005  # tau: a new patient exceeds it with probability about this (at most this or 1 / (n_holdout + 1))
DAR_PERCENTILE = 95.0  # Dar et al. 2024's tau, reported as a measure
CONTROL_PER_FAMILY = 20  # positive-control copies per family (distinct training images while they last)
MIN_DETECTOR_RECALL = 0.8  # each detector must catch this share of its own control families
# The families each detector must catch (its positive control), else it is blind and the verdict
# inconclusive (eval/RESULTS.md). In pixel space the SSL detector is there for mirrored and
# shifted copies, which only it sees (flips are its own training augmentation: they check that it
# works, but stay out of the recall inside the bound), and the rank detector for intensity changes,
# blends and deformations. In a latent model's decoded space an exact latent copy is the decoded
# source image itself: every working detector must catch it. How much more each catches there
# (decoded gamma changes, blends, deformations, noisy latents) is the bound's business, through
# the pooled recall: the autoencoder changes those copies in ways no detector is invariant to.
DETECTOR_CONTROL_FAMILIES = {
    "pixel": {"ssl": ("flip",), "pixel-rank": ("gamma", "blend", "elastic")},
    "decoded": {},  # every detector: ("autoencoder",)
}
DECODED_CHECK = ("autoencoder",)
SATURATION = 1e-4  # tau within this of the largest possible similarity (1): nothing can exceed it
MIN_EFFECTIVE_RANK = 2.0  # below: the embedding is (close to) a line or a point
MIN_HOLDOUT = 20
GATE_MARGIN = 0.05  # the least distance below the lowest held-out value for "not anatomy"


# ----------------------------------------------------------------------------- small helpers


def image_name(names: Sequence[str] | None, i: int, what: str) -> str:
    return str(names[i]) if names is not None else f"{what}[{i}]"


def image_hashes(x: torch.Tensor) -> list[str]:
    """Content hash of each image (N, C, *S): equal tensors, equal hashes."""
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for img in x.float().cpu()]


def smoothness(images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, C, *S) -> (N,) lag-1 spatial autocorrelation of the channel mean, averaged over the
    axes: about 0.9-1 for anatomy at any resolution, about 0 for white noise."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].float().mean(1)  # (B, *S)
        per_axis = []
        for axis in range(1, x.ndim):
            a = x.narrow(axis, 0, x.shape[axis] - 1).flatten(1)
            b = x.narrow(axis, 1, x.shape[axis] - 1).flatten(1)
            a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
            per_axis.append((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12))
        out.append(torch.stack(per_axis).mean(0))
    return torch.cat(out)


def _floor(holdout_values: torch.Tensor) -> float:
    """A value no genuine patient should fall under: the lowest held-out value, lowered by three
    times the spread between it and the median (at least GATE_MARGIN)."""
    v = holdout_values.double()
    low, median = float(v.min()), float(v.median())
    return low - max(GATE_MARGIN, 3 * (median - low))


# ----------------------------------------------------------------------------- per-detector fit


@dataclass
class DetectorFit:
    """One detector calibrated on the held-out set."""

    name: str
    detector: Any
    train_embeddings: torch.Tensor  # (Nt, D) of the training images as the model would output them (decoded for a latent model)
    threshold: float  # tau: the larger of the conformal and the Gaussian tail quantile of holdout_train_best at the null level
    attained_level: float  # the conformal quantile's attained level: tau exceeds it, so a new patient is above tau at most this often
    holdout_train_best: torch.Tensor  # (Nh,) each held-out image's best training similarity (the null's scores)
    holdout_flagged: torch.Tensor  # (Nh,) bool: above the tau of the other held-out images (leave-one-out)
    dar_threshold: float  # Dar et al. 2024's tau: percentile of each training image's best held-out similarity (a measure)
    train_holdout_best: torch.Tensor  # (Nt,) the scores behind dar_threshold
    effective_rank: float  # of the centred training embeddings (Roy & Vetterli 2007)
    # (Nt, D) of the training images as stored, beside the decoded ones, in a latent model's audit:
    # its decoder cannot output a raw training image, but a wrapper, a bug or a leak can (issue 20)
    raw_train_embeddings: torch.Tensor | None = None

    def best_match(self, e: torch.Tensor, similarity: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return best_training_match(e, self.train_embeddings, self.raw_train_embeddings, similarity, device)

    def health(self) -> list[str]:
        """Reasons this detector cannot be trusted (empty when it can)."""
        reasons = []
        dim = self.train_embeddings.shape[1]
        if self.effective_rank < MIN_EFFECTIVE_RANK:
            reasons.append(f"detector {self.name}: the training embeddings collapsed (effective rank {self.effective_rank:.2f} of {dim} dimensions), so it cannot tell images apart")
        if self.threshold >= 1 - SATURATION:
            reasons.append(f"detector {self.name}: tau = {self.threshold:.6f} is at the largest possible similarity, so no copy can exceed it (held-out images duplicate training images, the embedding cannot tell images apart, or a latent model's autoencoder decodes different patients alike: train it further)")
        info = getattr(self.detector, "train_info", None) or {}
        if "final_loss" in info and "batch_size" in info:
            chance = math.log(max(2 * int(info["batch_size"]) - 1, 2))  # NT-Xent of an embedding that ignores the image
            if info["final_loss"] > 0.5 * chance:
                reasons.append(f"detector {self.name}: training did not converge (NT-Xent {info['initial_loss']:.3f} -> {info['final_loss']:.3f}, chance level {chance:.3f}); train longer (--steps) or on more images")
        return reasons

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": round(self.threshold, 6),
            "attained_null_level": round(self.attained_level, 6),
            "recipe": self.detector.recipe,
            "effective_rank": round(self.effective_rank, 3),
            "embedding_dim": int(self.train_embeddings.shape[1]),
            "null_pct": round(100.0 * float(self.holdout_flagged.double().mean()), 4),
            "holdout_train_best": summary(self.holdout_train_best),
            "dar_threshold": round(self.dar_threshold, 6),
            "train_holdout_best": summary(self.train_holdout_best),
        }


def _embed(detector, images: torch.Tensor, name: str, what: str, device) -> torch.Tensor:
    e = detector.embed(images, device=device).float().cpu()
    bad = (~torch.isfinite(e)).any(1).nonzero().flatten()
    if len(bad):
        raise DataError(f"detector {name} produced non-finite embeddings for {len(bad)} {what} image(s) (e.g. index {int(bad[0])})")
    return e


def best_training_match(e: torch.Tensor, e_t: torch.Tensor, e_raw: torch.Tensor | None, similarity: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) best similarity of embeddings `e` with a training image and (N,) its index; in a
    latent model's audit (`e_raw`) the best over the decoded and the stored training images."""
    v, i = pairwise_topk(e, e_t, k=1, metric=similarity, device=device)
    v, i = v[:, 0].float().cpu(), i[:, 0].cpu()
    if e_raw is not None:
        vr, ir = pairwise_topk(e, e_raw, k=1, metric=similarity, device=device)
        vr, ir = vr[:, 0].float().cpu(), ir[:, 0].cpu()
        v, i = torch.maximum(v, vr), torch.where(vr > v, ir, i)
    return v, i


def _fit_detector(detector, reference: torch.Tensor, calibration: torch.Tensor, similarity: str, null_level: float, percentile: float, device,
                  raw: torch.Tensor | None = None) -> DetectorFit:
    """Calibrate one detector: `reference` and `calibration` are the training and held-out images
    as the model would output them (decoded through its autoencoder for a latent model); `raw`,
    for a latent model, the training images as stored, matched beside the decoded ones."""
    name = getattr(detector, "name", type(detector).__name__)
    e_t = _embed(detector, reference, name, "training", device)  # (Nt, D)
    e_h = _embed(detector, calibration, name, "held-out", device)  # (Nh, D)
    e_r = _embed(detector, raw, name, "training", device) if raw is not None else None
    hb = best_training_match(e_h, e_t, e_r, similarity, device)[0]  # (Nh,): the samples' direction
    tau, attained = calibrated_threshold(hb, null_level)
    th = pairwise_topk(e_t, e_h, k=1, metric=similarity, device=device)[0][:, 0].float().cpu()  # (Nt,): Dar's direction
    return DetectorFit(
        name=name, detector=detector, train_embeddings=e_t, threshold=tau, attained_level=attained, holdout_train_best=hb,
        holdout_flagged=leave_one_out_exceedances(hb, null_level), dar_threshold=copy_threshold(th, percentile),
        train_holdout_best=th, effective_rank=effective_rank(e_t), raw_train_embeddings=e_r,
    )


# ----------------------------------------------------------------------------- scores


@dataclass
class Scores:
    """Images scored against the training set by every detector of an audit."""

    detectors: list[str]
    similarity: torch.Tensor  # (N, K) best similarity with a training image, per detector
    nearest: torch.Tensor  # (N, K) index of that training image
    margin: torch.Tensor  # (N, K) similarity - tau of that detector
    not_anatomy: list[str]  # per image: "" (anatomy), "blank", "noise" or "atypical"

    def __len__(self) -> int:
        return self.similarity.shape[0]

    @classmethod
    def cat(cls, parts: Sequence["Scores"]) -> "Scores":
        """The scores of several sets (batches, rounds), in order."""
        return cls(parts[0].detectors, torch.cat([p.similarity for p in parts]), torch.cat([p.nearest for p in parts]),
                   torch.cat([p.margin for p in parts]), [r for p in parts for r in p.not_anatomy])

    def select(self, index) -> "Scores":
        index = torch.as_tensor(index, dtype=torch.long)
        return Scores(self.detectors, self.similarity[index], self.nearest[index], self.margin[index],
                      [self.not_anatomy[i] for i in index.tolist()])

    @property
    def flagged(self) -> torch.Tensor:  # (N, K) above each detector's own tau
        return self.margin > 0

    @property
    def anatomical(self) -> torch.Tensor:  # (N,) bool
        return torch.tensor([r == "" for r in self.not_anatomy], dtype=torch.bool)

    @property
    def is_copy(self) -> torch.Tensor:  # (N,) bool: anatomy above tau of at least one detector
        return self.anatomical & self.flagged.any(1)

    @property
    def deciding(self) -> torch.Tensor:  # (N,) the detector furthest above (or least below) its tau
        return self.margin.argmax(1)

    @property
    def best(self) -> torch.Tensor:  # (N,) similarity under the deciding detector
        return self.similarity.gather(1, self.deciding[:, None])[:, 0]

    @property
    def nearest_train(self) -> torch.Tensor:  # (N,) nearest training image under the deciding detector
        return self.nearest.gather(1, self.deciding[:, None])[:, 0]

    def caught(self, sources: Sequence[int]) -> torch.Tensor:
        """(N,) bool: image i is a copy and a detector that flags it points at training image
        sources[i] (a copy flagged only for resembling some other image is not caught)."""
        src = torch.as_tensor(list(sources), dtype=torch.long)[:, None]  # (N, 1)
        return self.is_copy & (self.flagged & (self.nearest == src)).any(1)

    def flagged_by(self, i: int) -> str:
        """Names of the detectors that flag copy i, joined by '+' ("" when it is not a copy)."""
        if not bool(self.is_copy[i]):
            return ""
        return "+".join(n for n, f in zip(self.detectors, self.flagged[i].tolist()) if f)


# ----------------------------------------------------------------------------- anatomy gate


@dataclass
class AnatomyGate:
    """Tells anatomy from images that are no patient at all, calibrated on the held-out set.

    A sample is `blank` when (nearly) constant, `noise` when its lag-1 spatial autocorrelation is
    below every held-out image's by a wide margin, `atypical` when its best pixel-rank
    (Spearman) correlation with the training set, over the image's axis flips, is below its floor
    (a wrong modality, a failed model's output).
    Floors: the lowest held-out value lowered by three times its distance to the median (at
    least GATE_MARGIN). A copy is never gated: it resembles a training image at least as much as
    a held-out patient does.
    """

    detector: Any  # a pixel-rank PixelDetector
    train_embeddings: torch.Tensor
    similarity_floor: float
    smoothness_floor: float
    similarity: str = "pearson"
    raw_train_embeddings: torch.Tensor | None = None  # a latent model's audit: the stored training images too

    @classmethod
    def fit(cls, fits: Sequence[DetectorFit], train: torch.Tensor, holdout: torch.Tensor, similarity: str, device=None,
            raw: tuple[torch.Tensor, torch.Tensor] | None = None) -> "AnatomyGate":
        """Floors from the held-out set; reuses the pixel-rank detector's training embeddings when
        it is one of `fits`. `train` and `holdout` are as the model outputs them; for a latent model
        `raw` = (training, held-out) images as stored, so that a stored image, sharper than any
        decoded one, is anatomy too (the floors are the lower of both)."""
        from medgen.privacy.detector import PixelDetector

        rank = next((f for f in fits if isinstance(f.detector, PixelDetector) and f.detector.ranks), None)
        detector = rank.detector if rank is not None else PixelDetector(train.ndim - 2, ranks=True)
        e_t = rank.train_embeddings if rank is not None else detector.embed(train)
        e_r = None
        if raw is not None:
            e_r = rank.raw_train_embeddings if rank is not None and rank.raw_train_embeddings is not None else detector.embed(raw[0])
        held = [holdout] if raw is None else [holdout, raw[1]]
        gate = cls(detector, e_t, 0.0, min(_floor(smoothness(h)) for h in held), similarity, e_r)
        gate.similarity_floor = min(_floor(gate.best_similarity(h, device=device)) for h in held)
        return gate

    def best_similarity(self, images: torch.Tensor, device=None) -> torch.Tensor:
        """(N,) best pixel-rank similarity with a training image over the image's axis flips:
        mirrored anatomy is still anatomy (a flipped copy must not be called atypical)."""
        from medgen.privacy.detector import flip_sets

        best = None
        for axes in flip_sets(images.ndim - 2):
            e = self.detector.embed(images.flip(axes) if axes else images)
            v = best_training_match(e, self.train_embeddings, self.raw_train_embeddings, self.similarity, device)[0]
            best = v if best is None else torch.maximum(best, v)
        return best

    def classify(self, images: torch.Tensor, device=None) -> list[str]:
        best = self.best_similarity(images, device=device)
        smooth = smoothness(images)
        spread = images.float().flatten(1).std(1)
        out = []
        for sd, sm, b in zip(spread.tolist(), smooth.tolist(), best.tolist()):
            out.append("blank" if sd < 1e-3 else "noise" if sm < self.smoothness_floor else "atypical" if b < self.similarity_floor else "")
        return out

    def summary(self) -> dict[str, float]:
        return {"rank_similarity_floor": round(self.similarity_floor, 4), "smoothness_floor": round(self.smoothness_floor, 4), "size": self.detector.size}


# ----------------------------------------------------------------------------- the audit


@dataclass
class Control:
    """The positive control: copies of training images, scored like samples. The union's recall
    on the `pooled` families (flagged and matched to the copied image) enters the privacy bound;
    each detector must also catch its own families (`detector_families`), which may include
    check-only families outside the pool."""

    families: list[str]  # per control image
    sources: list[int]  # training index copied
    scores: Scores
    detector_families: dict[str, tuple[str, ...]]  # detector -> the families it must catch
    min_detector_recall: float
    pooled: tuple[str, ...] = ()  # the families of the bound's recall (all when empty)
    kept: list[tuple[torch.Tensor, int, str, float]] = field(default_factory=list)  # a few caught copies (image, source, family, similarity)

    EXAMPLES_PER_FAMILY = 2  # caught copies kept for the report's figure (not all: 3D control sets are large)

    def examples(self, n: int) -> list[tuple[torch.Tensor, int, str, float]]:
        """Up to n caught copies, alternating between families."""
        by_family: dict[str, list] = {}
        for e in self.kept:
            by_family.setdefault(e[2], []).append(e)
        out = [e for group in zip(*by_family.values()) for e in group] if by_family else []
        out += [e for e in self.kept if not any(e is o for o in out)]
        return out[:n]

    @property
    def caught(self) -> torch.Tensor:  # (N,) flagged, and matched to the training image it copies
        return self.scores.caught(self.sources)

    @property
    def in_pool(self) -> torch.Tensor:  # (N,) bool: the copy counts in the bound's recall
        return torch.tensor([not self.pooled or f in self.pooled for f in self.families], dtype=torch.bool)

    @property
    def n(self) -> int:
        return int(self.in_pool.sum())

    @property
    def n_caught(self) -> int:
        return int((self.caught & self.in_pool).sum())

    @property
    def recall(self) -> float:
        return self.n_caught / self.n

    def caught_by(self, k: int) -> torch.Tensor:
        """(N,) bool: detector k alone flags the copy and points at its source."""
        src = torch.as_tensor(self.sources, dtype=torch.long)
        return self.scores.anatomical & self.scores.flagged[:, k] & (self.scores.nearest[:, k] == src)

    def detector_recall(self, k: int) -> float:
        """Detector k's recall on its own families."""
        own = set(self.detector_families[self.scores.detectors[k]])
        mask = torch.tensor([f in own for f in self.families], dtype=torch.bool)
        return float(self.caught_by(k)[mask].double().mean()) if bool(mask.any()) else float("nan")

    def blind_detectors(self) -> list[str]:
        """Detectors that miss their own control families (below `min_detector_recall`)."""
        return [d for k, d in enumerate(self.scores.detectors) if not self.detector_recall(k) >= self.min_detector_recall]

    def summary(self) -> dict[str, Any]:
        hit = self.caught.tolist()

        def by_family(flags: list[bool]) -> dict[str, float]:
            groups: dict[str, list[bool]] = {}
            for fam, h in zip(self.families, flags):
                groups.setdefault(fam, []).append(h)
            return {f: round(sum(v) / len(v), 4) for f, v in groups.items()}

        return {
            "n": self.n, "caught": self.n_caught, "recall": round(self.recall, 4), "pooled_families": list(self.pooled),
            "by_family": by_family(hit),
            "min_detector_recall": self.min_detector_recall,
            "by_detector": {d: {"own_families": list(self.detector_families[d]), "recall": round(self.detector_recall(k), 4),
                                "by_family": by_family(self.caught_by(k).tolist())} for k, d in enumerate(self.scores.detectors)},
            "blind_detectors": self.blind_detectors(),
            "missed": [{"family": f, "source": s} for f, s, h in zip(self.families, self.sources, hit) if not h],
        }


def default_detectors(autoencoder=None) -> str:
    """The default union: "ssl,pixel-rank" for a pixel-space model; "pixel-rank,latent" for a
    latent one (with its autoencoder), whose decoded outputs the SSL detector cannot see: trained
    on the fly, it caught 5-15% of decoded mirrored copies on the harness (eval/RESULTS.md)."""
    return DEFAULT_DETECTORS if autoencoder is None else LATENT_DETECTORS


def default_control_families(autoencoder=None) -> tuple[str, ...]:
    from medgen.privacy.families import CONTROL_FAMILIES, LATENT_CONTROL_FAMILIES

    return CONTROL_FAMILIES + (LATENT_CONTROL_FAMILIES if autoencoder is not None else ())


@dataclass
class CopyAudit:
    """Fitted detectors and calibrated thresholds; scores and judges synthetic images.

        audit = CopyAudit.fit(train, holdout)        # (N, C, *S) tensors in [-1, 1]
        result = judge(audit, synthetic)             # medgen.privacy.verdict: verdict, bound, rates, p-value
        later = judge(audit, more_synthetic)         # same tau, null and control
        scores = audit.score(images)                 # per-sample similarities and flags
    """

    fits: list[DetectorFit]
    gate: AnatomyGate
    null_level: float
    percentile: float  # of Dar's tau (a measure)
    similarity: str
    n_train: int
    n_holdout: int
    image_shape: tuple[int, ...]
    control: Control | None = None
    reasons: list[str] = field(default_factory=list)  # why a verdict would be inconclusive
    warnings: list[str] = field(default_factory=list)
    holdout_dropped: int = 0
    decoded: bool = False  # calibrated on held-out images decoded through the model's autoencoder

    @property
    def spatial_dims(self) -> int:
        return len(self.image_shape) - 1

    @property
    def thresholds(self) -> dict[str, float]:
        return {f.name: f.threshold for f in self.fits}

    @property
    def holdout_flagged(self) -> torch.Tensor:  # (Nh,) bool: above tau (leave-one-out) of any detector
        return torch.stack([f.holdout_flagged for f in self.fits], 1).any(1)

    @property
    def null_rate(self) -> float:
        return float(self.holdout_flagged.double().mean())

    @classmethod
    def fit(
        cls,
        train: torch.Tensor,
        holdout: torch.Tensor,
        detectors: Any = "auto",
        *,
        null_level: float = NULL_LEVEL,
        percentile: float = DAR_PERCENTILE,
        similarity: str = "pearson",
        detector_options: dict | None = None,
        autoencoder=None,
        control_families: Sequence[str] | None = None,
        control_per_family: int = CONTROL_PER_FAMILY,
        min_control_recall: float = MIN_DETECTOR_RECALL,
        min_holdout: int = MIN_HOLDOUT,
        subjects: dict[str, Sequence[str]] | None = None,
        names: dict[str, Sequence[str]] | None = None,
        device=None,
        seed: int = 0,
    ) -> "CopyAudit":
        """Build (train when "ssl") the detectors and calibrate them.

        `train`, `holdout`: (N, C, *S) in [-1, 1], one shape. `detectors`: "auto" (the default
        union, `default_detectors`), a comma-separated string of detector names ("ssl",
        "pixel-rank", "pixel", "latent", a detector folder, a feature extractor; see
        `medgen.privacy.detector.build_detectors`), an object with `embed`, or a list of either.
        `autoencoder`: a `medgen.privacy.families.RoundTrip` of a latent model's autoencoder
        (held-out images are decoded through it, and the latent detector and control families
        use it). `null_level`: the exceedance probability of tau for a new patient.
        `min_control_recall`: the share of its own positive-control families each detector must
        catch. `subjects` maps "train"/"holdout" to per-image subject ids (shared ids make the
        verdict inconclusive); `names` to per-image names for messages.
        """
        from medgen.privacy.detector import build_detectors, default_device

        names, subjects = names or {}, subjects or {}
        device = default_device(device)
        if similarity not in SIMILARITIES:
            raise DataError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not 0 < null_level < 1:
            raise DataError(f"--null-level is a probability in (0, 1), got {null_level}")
        if not 0 < percentile <= 100:
            raise DataError(f"--percentile must be in (0, 100], got {percentile}")
        if not 0 <= min_control_recall <= 1:
            raise DataError(f"--min-control-recall is a fraction in [0, 1], got {min_control_recall}")
        check_images(train, "training", names.get("train"), 2)
        check_images(holdout, "held-out", names.get("holdout"), 2)
        if train.shape[1:] != holdout.shape[1:]:
            raise DataError(f"image shapes (C, *S) differ: training {tuple(train.shape[1:])}, held-out {tuple(holdout.shape[1:])}; pass a data config with data.shape (and data.channels) so all sets are cropped/padded alike")
        holdout, dropped, reasons, warnings = _check_split(train, holdout, subjects, names, min_holdout)
        n_t, n_h = train.shape[0], holdout.shape[0]
        # a latent model outputs decoded images only: the audit works in that space, comparing its
        # samples with the decoded training images, calibrated on decoded held-out images
        reference = autoencoder(train) if autoencoder is not None else train
        calibration = autoencoder(holdout) if autoencoder is not None else holdout
        spec = default_detectors(autoencoder) if detectors in (None, "auto") else detectors
        built = build_detectors(spec, reference, options=detector_options, device=device, seed=seed, autoencoder=autoencoder)
        fits = [_fit_detector(d, reference, calibration, similarity, null_level, percentile, device, raw=train if autoencoder is not None else None)
                for d in built]
        if len({f.name for f in fits}) != len(fits):
            raise DataError(f"detectors must differ: got {[f.name for f in fits]}")
        for f in fits:
            reasons.extend(f.health())
        gate = AnatomyGate.fit(fits, reference, calibration, similarity, device, raw=(train, holdout) if autoencoder is not None else None)

        audit = cls(fits, gate, null_level, percentile, similarity, n_t, n_h, tuple(train.shape[1:]), reasons=reasons, warnings=warnings,
                    holdout_dropped=dropped, decoded=autoencoder is not None)
        families = list(control_families) if control_families is not None else list(default_control_families(autoencoder))
        if families and control_per_family > 0:
            audit.control = audit._positive_control(train, families, control_per_family, min_control_recall, autoencoder, device, seed)
            if audit.control.n == 0:
                audit.control = None
            for name in audit.control.blind_detectors():
                k = [f.name for f in fits].index(name)
                fams = ", ".join(audit.control.detector_families[name])
                reasons.append(f"positive control failed for detector {name}: it caught {100 * audit.control.detector_recall(k):.0f}% of the "
                               f"copies of its own families ({fams}; at least {100 * min_control_recall:.0f}% needed), so it would miss the "
                               f"copies it is in the union for; drop it with --detector, or find out why it is blind")
        for r in reasons:
            log.warning("audit: inconclusive: %s", r)
        return audit

    def _positive_control(self, train, families, per_family, min_recall, autoencoder, device, seed) -> Control:
        """Copies of `families` (the bound's recall) and of the detectors' check-only families,
        `per_family` each from distinct training images (while they last); for a latent model
        (`autoencoder`) as it would output them, decoded."""
        from medgen.privacy.families import LATENT_FAMILIES, make_copies

        space = "decoded" if autoencoder is not None else "pixel"
        fallback = DECODED_CHECK if space == "decoded" else tuple(families)
        own_families = {f.name: DETECTOR_CONTROL_FAMILIES[space].get(f.name, fallback) for f in self.fits}
        checks = [f for wanted in own_families.values() for f in wanted if f not in families]
        g = torch.Generator().manual_seed(seed + 1)
        per_family = min(per_family, train.shape[0])
        fams, sources, images = [], [], []
        for i, fam in enumerate(list(families) + list(dict.fromkeys(checks))):
            src = torch.randperm(train.shape[0], generator=g)[:per_family].tolist()  # distinct images within a family
            copies = make_copies(train, fam, src, seed=seed + i, autoencoder=autoencoder)
            # a latent model outputs decoded images only: its copy of a gamma-changed patient is that image decoded.
            # Scoring raw copies against a tau calibrated on decoded images would overstate the recall.
            images.append(autoencoder(copies) if autoencoder is not None and fam not in LATENT_FAMILIES else copies)
            fams += [fam] * len(src)
            sources += src
        made = set(fams)
        own = {name: tuple(x for x in wanted if x in made) or tuple(families) for name, wanted in own_families.items()}
        images = torch.cat(images)
        control = Control(fams, sources, self.score(images, device=device), own, min_recall, tuple(families))
        caught = control.caught.tolist()
        for fam in families:
            hits = [i for i, (f, c) in enumerate(zip(fams, caught)) if f == fam and c][: Control.EXAMPLES_PER_FAMILY]
            control.kept += [(images[i].clone(), sources[i], fam, float(control.scores.best[i])) for i in hits]
        return control

    def score(self, images: torch.Tensor, device=None, keep_embeddings: bool = False):
        """Score images (N, C, *S) against the training set with every detector and the gate.
        Returns `Scores`, or (Scores, [per-detector embeddings (N, D)]) with `keep_embeddings`."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise DataError(f"images have shape (C, *S) = {tuple(images.shape[1:])}, the audit was calibrated on {self.image_shape}; pass a data config with data.shape (and data.channels) so all sets are cropped/padded alike")
        sims, idxs, margins, embeddings = [], [], [], []
        for f in self.fits:
            e = f.detector.embed(images, device=device).float().cpu()
            if not torch.isfinite(e).all():
                raise DataError(f"detector {f.name} produced non-finite embeddings")
            embeddings.append(e)
            v, i = f.best_match(e, self.similarity, device)
            sims.append(v)
            idxs.append(i)
            margins.append(sims[-1] - f.threshold)
        scores = Scores([f.name for f in self.fits], torch.stack(sims, 1), torch.stack(idxs, 1), torch.stack(margins, 1),
                        self.gate.classify(images, device=device))
        return (scores, embeddings) if keep_embeddings else scores

    def summary(self) -> dict[str, Any]:
        return {
            "detectors": {f.name: f.summary() for f in self.fits},
            "anatomy_gate": self.gate.summary(),
            "control": None if self.control is None else self.control.summary(),
        }


def check_images(x: torch.Tensor, what: str, names: Sequence[str] | None, min_count: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{what} images: expected a (N, C, H, W) or (N, C, D, H, W) tensor, got {shape}")
    if x.shape[0] < min_count:
        raise DataError(f"{what} set has {x.shape[0]} image(s); the audit needs at least {min_count}")
    bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten()
    if len(bad):
        raise DataError(f"{what} image {image_name(names, int(bad[0]), what)} holds NaN or Inf values ({len(bad)} such image(s))")


def _check_split(train: torch.Tensor, holdout: torch.Tensor, subjects: dict, names: dict, min_holdout: int) -> tuple[torch.Tensor, int, list[str], list[str]]:
    """(holdout without training duplicates, number dropped, reasons, warnings) for a calibration split.

    Held-out images identical to a training image (content hash) are left out of calibration:
    they would put tau at 1 and hide every copy. All of them identical: refused."""
    reasons, warnings = [], []
    train_hashes = set(image_hashes(train))
    dup = [i for i, h in enumerate(image_hashes(holdout)) if h in train_hashes]
    if dup:
        examples = ", ".join(image_name(names.get("holdout"), i, "holdout") for i in dup[:3])
        if len(dup) > holdout.shape[0] - 2:
            raise DataError(f"the held-out set overlaps the training set: {len(dup)} of {holdout.shape[0]} held-out images are identical to training images (e.g. {examples}); the threshold must be calibrated on images of patients NOT used for training")
        holdout = holdout[torch.tensor(sorted(set(range(holdout.shape[0])) - set(dup)))]
        reasons.append(f"{len(dup)} held-out image(s) are identical to training images (e.g. {examples}); they were left out of the calibration, but a held-out set that shares images with the training set cannot be trusted to hold only unseen patients")
    shared = sorted(set(subjects.get("train") or ()) & set(subjects.get("holdout") or ()))
    if shared:
        reasons.append(f"{len(shared)} subject id(s) are in both the training and the held-out set (e.g. {shared[:3]}): tau must be calibrated on patients the model never saw")
    n_h = holdout.shape[0]
    if n_h < min_holdout:
        reasons.append(f"only {n_h} held-out images (at least {min_holdout} needed): tau and the null rate rest on too few patients to tell copies from look-alikes")
    return holdout, len(dup), reasons, warnings
