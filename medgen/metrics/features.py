"""Feature extractors for the distribution metrics, their weights, and a per-folder cache.

Registry (`get_extractor(name_or_path, weights=None, device=None)`):

- `inception`: clean-fid's Inception-V3 TorchScript (`inception-2015-12-05.pt`, the TF-FID
  network ported by NVIDIA), with clean-fid's "clean" resize: each channel resized to 299x299 by
  PIL bicubic in float, no re-quantisation after (Parmar et al. 2022). 2048-d pool3 features.
- `dinov2`: DINOv2 ViT-L/14 from torch.hub, 224x224 bicubic + ImageNet normalisation, CLS
  token (1024-d), as dgm-eval recommends (Stein et al. 2023).
- `medicalnet`: MedicalNet 3D ResNet-10 pretrained on 23 medical datasets (Chen et al. 2019,
  "Med3D"), MONAI's `resnet10` with per-volume z-score input, global-average-pooled (512-d).
  For volume-level FID.
- `pca`: the in-domain extractor that needs no download (see `PCAExtractor`).
- a path to any TorchScript file: called on the (N, C, *S) tensor in [-1, 1]; its output is
  flattened to (N, D).

Every extractor takes (N, C, *S) float tensors in [-1, 1] (the data layer's convention;
`to_unit_interval` converts uint8, uint16 and [0, 1] inputs explicitly), turns grayscale into
3 channels where the network wants RGB, returns (N, D) float32 CPU features, and carries a
`.recipe` dict (extractor, weights file and sha256, resize filter, quantisation) that goes
into every report. Extraction runs in float32 with autocast disabled, so a caller's bf16
autocast cannot change the numbers.

Weights are found in this order: an explicit `weights=` path, `$MEDGEN_WEIGHTS_DIR/<file>`,
the owning library's cache (clean-fid's /tmp, torch.hub's checkpoints folder, the Hugging Face
cache), then a download into `medgen_cache_dir()/weights` when online (never when
`MEDGEN_OFFLINE=1`). When all fail, `WeightsError` says which file to place where.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from medgen.errors import DataError, WeightsError
from medgen.io import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_HUB_REPO = "facebookresearch/dinov2"
MEDICALNET_FILE = "resnet_10_23dataset.pth"
MEDICALNET_HF_REPO = "TencentMedicalNet/MedicalNet-Resnet10"

REGISTRY = ("inception", "dinov2", "medicalnet", "pca")


# ----------------------------------------------------------------------------- paths and weights
def medgen_cache_dir() -> Path:
    """$MEDGEN_CACHE_DIR, else $XDG_CACHE_HOME/medgen, else ~/.cache/medgen."""
    if os.environ.get("MEDGEN_CACHE_DIR"):
        return Path(os.environ["MEDGEN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medgen"


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("MEDGEN_OFFLINE", "HF_HUB_OFFLINE"))


def resolve_weights(
    filename: str,
    what: str,
    explicit: str | os.PathLike | None = None,
    library_dirs: Sequence[Path] = (),
    download: Callable[[Path], Path] | None = None,
    source: str = "",
    allow_download: bool = True,
) -> Path:
    """Find a weights file (explicit, $MEDGEN_WEIGHTS_DIR, library cache, download) or explain."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise WeightsError(f"{what} weights {p} do not exist; pass the path of {filename} ({source})")
        return p
    looked = []
    env = os.environ.get("MEDGEN_WEIGHTS_DIR")
    for d in ([Path(env).expanduser()] if env else []) + list(library_dirs) + [medgen_cache_dir() / "weights"]:
        looked.append(str(d / filename))
        if (d / filename).is_file():
            return d / filename
    target = Path(env).expanduser() if env else medgen_cache_dir() / "weights"
    if download is not None and allow_download and not offline():
        try:
            return download(target)
        except Exception as e:  # no network, HTTP error, ...
            reason = f"download failed ({type(e).__name__}: {e})"
    else:
        reason = "downloads are off (MEDGEN_OFFLINE/HF_HUB_OFFLINE)" if offline() else "not present locally"
    raise WeightsError(
        f"{what} weights not found and {reason}. Place {filename} ({source}) at {target / filename} "
        f"(set MEDGEN_WEIGHTS_DIR to choose the folder) or pass --weights PATH. Looked in: {', '.join(looked) or 'nothing'}"
    )


def _download_url(url: str, target_dir: Path, timeout: float = 60) -> Path:
    target = target_dir / Path(url).name
    log.info("downloading %s -> %s", url, target)
    with urllib.request.urlopen(url, timeout=timeout) as r:
        atomic_write_bytes(target, r.read())
    return target


# ----------------------------------------------------------------------------- inputs
def to_unit_interval(x, value_range: str = "auto") -> torch.Tensor:
    """Map images to float32 [0, 1], explicitly by their encoding.

    value_range: "auto" (uint8 -> /255, uint16/int32 -> /65535, float -> must be the data
    layer's [-1, 1]), "-1,1", "0,1", "uint8" (0..255 values), "uint16" (0..65535 values).
    """
    t = torch.as_tensor(x)
    if value_range == "auto":
        if t.dtype == torch.uint8:
            value_range = "uint8"
        elif t.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16):
            value_range = "uint16"
        else:
            value_range = "-1,1"
    t = t.float()
    if value_range == "uint8":
        return t / 255.0
    if value_range == "uint16":
        return t / 65535.0
    lo, hi = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0)}.get(value_range, (None, None))
    if lo is None:
        raise ValueError(f"value_range must be auto, -1,1, 0,1, uint8 or uint16; got {value_range!r}")
    if t.numel() and (t.min() < lo - 1e-3 or t.max() > hi + 1e-3):
        raise DataError(f"images have values in [{float(t.min()):.3g}, {float(t.max()):.3g}], outside the declared range [{lo}, {hi}]")
    return ((t - lo) / (hi - lo)).clamp_(0, 1)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, H, W) -> (N, 3, H, W): grayscale is repeated into the three channels."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, *x.shape[2:])
    if x.shape[1] == 3:
        return x
    raise DataError(f"expected 1 or 3 channels, got {x.shape[1]}")


@contextlib.contextmanager
def _fp32():
    """Features in float32 even inside a caller's autocast region."""
    with contextlib.ExitStack() as stack:
        for dev in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(dev, enabled=False))
        yield


# ----------------------------------------------------------------------------- extractors
class FeatureExtractor:
    """Base: batching, device, multi-channel handling. Subclasses implement `_features`."""

    name = "base"
    spatial_dims: tuple[int, ...] = (2,)  # input dimensionalities the network accepts
    rgb = True  # network wants 3 channels (grayscale is repeated)
    batch_size = 32

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.recipe: dict[str, Any] = {"extractor": self.name}

    def _features(self, x01: torch.Tensor) -> torch.Tensor:  # (B, C, *S) in [0, 1] -> (B, D)
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images, value_range: str = "auto") -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.ndim - 2 not in self.spatial_dims:
            raise DataError(f"{self.name} takes {' or '.join(f'{d}D' for d in self.spatial_dims)} inputs (N, C, *S); got shape {tuple(x.shape)}")
        out = []
        for s in range(0, x.shape[0], self.batch_size):
            b = to_unit_interval(x[s : s + self.batch_size], value_range)
            if self.rgb and b.shape[1] not in (1, 3):  # e.g. multi-contrast MRI: each channel as grayscale
                feats = torch.cat([self._run(b[:, c : c + 1]) for c in range(b.shape[1])], 1)
            else:
                feats = self._run(b)
            out.append(feats)
        return torch.cat(out) if out else torch.empty(0, 0)

    def extract(self, batches: Iterable[torch.Tensor], total: int, desc: str = "features", value_range: str = "auto") -> torch.Tensor:
        """Features (N, D) of a stream of image batches (B, C, *S) (e.g. read from disk), `total`
        images in all. The stream is re-cut into this extractor's own batch size, so the numbers
        equal those of one call on the whole set while memory holds about one batch; progress per
        image (`medgen.progress`)."""
        from medgen.progress import progress

        bar = progress(total=total, desc=desc, unit="image")
        out, pending, held = [], [], 0
        for batch in batches:
            pending.append(batch)
            held += len(batch)
            while held >= self.batch_size:
                rows = torch.cat(pending)
                out.append(self(rows[: self.batch_size], value_range))
                pending, held = [rows[self.batch_size :]], held - self.batch_size
                bar.update(self.batch_size)
        if held:
            out.append(self(torch.cat(pending), value_range))
            bar.update(held)
        bar.close()
        return torch.cat(out) if out else torch.empty(0, 0)

    def _run(self, b: torch.Tensor) -> torch.Tensor:
        with _fp32():
            return self._features(b.to(self.device)).float().reshape(b.shape[0], -1).cpu()


class InceptionExtractor(FeatureExtractor):
    """clean-fid's Inception-V3 TorchScript with clean-fid's "clean" resize (Parmar et al. 2022).

    Mirrors `cleanfid.inception_torchscript.InceptionV3W` in clean mode: images in [0, 255]
    resized to 299x299 by `cleanfid.resize.build_resizer("clean")` (PIL bicubic per channel in
    float), normalised (x - 128) / 128, then `base.layers` -> (N, 2048). Inputs are quantised
    to 8 bits first (round of (x+1)*127.5), so 8-bit PNGs give exactly clean-fid's features and
    16-bit or float images are treated the way the network was calibrated.
    """

    name = "inception"
    batch_size = 64

    def __init__(self, weights=None, device=None, quantise: bool = True):
        super().__init__(device)
        path = resolve_weights(
            INCEPTION_FILE, "Inception-V3 (clean-fid)", weights,
            library_dirs=[Path("/tmp")],  # clean-fid downloads here on Linux (features.feature_extractor)
            download=lambda d: _download_url(INCEPTION_URL, d), source=INCEPTION_URL,
        )
        try:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
            self.layers = self.model.layers
        except Exception as e:
            raise WeightsError(f"{path}: not a clean-fid Inception TorchScript file ({e}); expected {INCEPTION_FILE} from {INCEPTION_URL}") from None
        from cleanfid.resize import build_resizer

        self.resize = build_resizer("clean")
        self.quantise = quantise
        self.recipe = {
            "extractor": "inception", "network": "Inception-V3 pool3 (clean-fid TorchScript)",
            "weights": str(path), "weights_sha256": sha256_file(path), "feature_dim": 2048,
            "resize": "PIL bicubic to 299x299 per channel in float (clean-fid 'clean' mode)",
            "quantisation": "uint8: round((x+1)*127.5) before resize" if quantise else "none (float [0,255])",
            "grayscale": "repeated to 3 channels",
        }

    def _features(self, x01):
        x = _rgb(x01) * 255.0
        if self.quantise:
            x = x.round()
        hwc = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) in [0, 255]
        resized = np.stack([self.resize(img) for img in hwc])  # (B, 299, 299, 3) float32
        t = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        return self.layers.forward((t - 128) / 128).reshape(t.shape[0], 2048)


class DinoV2Extractor(FeatureExtractor):
    """DINOv2 ViT-L/14 CLS features (Oquab et al. 2023) as in dgm-eval (Stein et al. 2023):
    bicubic resize to 224x224 (antialiased), ImageNet mean/std, the model's output token."""

    name = "dinov2"
    batch_size = 32
    arch = "dinov2_vitl14"

    def __init__(self, weights=None, device=None):
        super().__init__(device)
        hub = Path(torch.hub.get_dir())
        repo_dir = hub / "facebookresearch_dinov2_main"
        path = resolve_weights(
            DINOV2_FILE, "DINOv2 ViT-L/14", weights, library_dirs=[hub / "checkpoints"],
            download=lambda d: _download_url(DINOV2_URL, d), source=DINOV2_URL,
        )
        try:
            if repo_dir.is_dir():
                model = torch.hub.load(str(repo_dir), self.arch, source="local", pretrained=False)
            elif not offline():
                model = torch.hub.load(DINOV2_HUB_REPO, self.arch, pretrained=False, skip_validation=True, trust_repo=True)
            else:
                raise FileNotFoundError(repo_dir)
        except Exception as e:
            raise WeightsError(
                f"DINOv2 model code not available ({type(e).__name__}: {e}). Clone "
                f"https://github.com/{DINOV2_HUB_REPO} to {repo_dir} (torch.hub's folder) and place {DINOV2_FILE} "
                f"under $MEDGEN_WEIGHTS_DIR or pass --weights"
            ) from None
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().to(self.device)
        self.recipe = {
            "extractor": "dinov2", "network": f"{self.arch} CLS token (torch.hub {DINOV2_HUB_REPO})",
            "weights": str(path), "weights_sha256": sha256_file(path),
            "resize": "bicubic antialiased to 224x224 (torchvision)", "normalisation": "ImageNet mean/std",
            "quantisation": "none (float)", "grayscale": "repeated to 3 channels",
        }

    def _features(self, x01):
        import torchvision.transforms.functional as TF

        x = TF.resize(_rgb(x01), [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        return self.model(x)


class MedicalNetExtractor(FeatureExtractor):
    """MedicalNet ResNet-10 (Chen et al. 2019) for volumes: MONAI `resnet10` in MedicalNet's
    configuration (1 input channel, shortcut B, 7^3 stride-2 stem), per-volume z-score input
    (MedicalNet's normalisation, as MAISI's evaluation), global average pool -> (N, 512)."""

    name = "medicalnet"
    spatial_dims = (3,)
    rgb = False
    batch_size = 4

    def __init__(self, weights=None, device=None):
        super().__init__(device)
        from monai.networks.nets import resnet10

        def hf_cache(_d):  # the library cache first, then a download through huggingface_hub
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(MEDICALNET_HF_REPO, MEDICALNET_FILE))

        path = weights
        if path is None:
            with contextlib.suppress(Exception):
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(MEDICALNET_HF_REPO, MEDICALNET_FILE, local_files_only=True)
        path = resolve_weights(
            MEDICALNET_FILE, "MedicalNet ResNet-10", path, download=hf_cache,
            source=f"https://huggingface.co/{MEDICALNET_HF_REPO}",
        )
        net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False, conv1_t_stride=2)
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
            state = ckpt.get("state_dict", ckpt)
            net.load_state_dict({k.replace("module.", ""): v for k, v in state.items()}, strict=True)
        except Exception as e:
            raise WeightsError(f"{path}: not MedicalNet ResNet-10 weights ({e})") from None
        self.model = net.eval().to(self.device)
        self.recipe = {
            "extractor": "medicalnet", "network": "MedicalNet ResNet-10 (23 datasets), global average pool",
            "weights": str(path), "weights_sha256": sha256_file(path), "feature_dim": 512,
            "resize": "none (native volume size)", "normalisation": "per-volume z-score", "quantisation": "none (float)",
        }

    def _features(self, x01):
        if x01.shape[1] != 1:
            return torch.cat([self._features(x01[:, c : c + 1]) for c in range(x01.shape[1])], 1)
        mean = x01.mean(dim=(2, 3, 4), keepdim=True)
        std = x01.std(dim=(2, 3, 4), keepdim=True)
        return self.model((x01 - mean) / (std + 1e-5))


class TorchScriptExtractor(FeatureExtractor):
    """Any TorchScript module: called on the (B, C, *S) batch in [-1, 1]; output flattened."""

    name = "torchscript"
    spatial_dims = (2, 3)
    rgb = False

    def __init__(self, path, device=None):
        super().__init__(device)
        path = Path(path)
        try:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:
            raise WeightsError(f"{path}: cannot load as TorchScript ({e}); export your network with torch.jit.script/trace and save it") from None
        self.recipe = {
            "extractor": f"torchscript:{path.name}", "weights": str(path), "weights_sha256": sha256_file(path),
            "resize": "none (the module's own)", "input": "(B, C, *S) float32 in [-1, 1]", "quantisation": "none (float)",
        }

    def _features(self, x01):
        return self.model(x01 * 2 - 1)


class PCAExtractor(FeatureExtractor):
    """In-domain features with no download: projections on the real set's principal components.

    Images are resampled to a fixed grid (`size`^2 in 2D, `size`^3 in 3D; antialiased area
    averaging), flattened, centred on the real mean and projected onto the top `n_components`
    principal directions of the real set (SVD, Pearson 1901). FID on these features is the
    Fréchet distance between real and synthetic images within the subspace where the real
    anatomy varies most: it sees layout, shape and contrast errors (e.g. ventricle size,
    missing structures, wrong intensities) but not texture finer than the grid. Why this and
    not a random or ImageNet network: it is derived from the data under study, deterministic,
    needs no weights, works identically in 2D and 3D, and its numbers have a plain meaning
    (squared pixel units in [-1, 1] intensities). It is only comparable between models
    evaluated against the same real set (the basis is fitted on it; its sha256 is in the
    recipe) — never across datasets or papers; use Inception/DINOv2 for that.
    """

    name = "pca"
    spatial_dims = (2, 3)
    rgb = False
    batch_size = 256

    def __init__(self, n_components: int = 64, size: int | None = None, device=None):
        super().__init__(device)
        self.n_components, self.size = n_components, size
        self.mean = self.basis = None
        self.recipe = {"extractor": "pca", "fitted": False}

    def _grid_size(self, spatial: int) -> int:
        return self.size or (64 if spatial == 2 else 32)

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *S) -> (N, C * size^d) float64 on the fixed grid (area-average when shrinking)."""
        spatial = x.ndim - 2
        size = (self._grid_size(spatial),) * spatial
        if tuple(x.shape[2:]) != size:
            shrink = all(s >= g for s, g in zip(x.shape[2:], size))
            mode = "area" if shrink else ("bilinear" if spatial == 2 else "trilinear")
            x = torch.nn.functional.interpolate(x, size=size, mode=mode, **({} if shrink else {"align_corners": False}))
        return x.flatten(1).double()

    def fit(self, real_images, value_range: str = "auto") -> "PCAExtractor":
        """Fit on (N, C, *S) real images, or a list of such sets (e.g. the slices of each plane)."""
        sets = [torch.as_tensor(t) for t in (real_images if isinstance(real_images, (list, tuple)) else [real_images])]
        return self.fit_batches([[t] for t in sets], [t.shape[2:] for t in sets], value_range)

    @torch.no_grad()
    def fit_batches(self, sets: Sequence[Iterable[torch.Tensor]], spatial_shapes: Sequence[Sequence[int]],
                    value_range: str = "auto") -> "PCAExtractor":
        """`fit` on sets read in batches: each set an iterable of (B, C, *S) batches, with its
        spatial shape S in `spatial_shapes`; only the rows on the grid ((N, P) float64) are held."""
        spatial = len(spatial_shapes[0])
        if self.size is None:  # never upsample: the grid is at most the smallest image side
            self.size = min([64 if spatial == 2 else 32] + [min(s) for s in spatial_shapes])
        x = torch.cat([self._grid(to_unit_interval(b, value_range) * 2 - 1) for batches in sets for b in batches])  # (N, P)
        if x.shape[0] < 3:
            raise DataError(f"in-domain PCA features need at least 3 real samples, got {x.shape[0]}")
        k = min(self.n_components, x.shape[0] - 1, x.shape[1])
        self.mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - self.mean, full_matrices=False)  # (N, P) = U S V^T
        self.basis = vh[:k].T.contiguous()  # (P, k)
        # the SVD sign is arbitrary; fix it so the basis (and its hash) is reproducible
        self.basis *= torch.sign(self.basis[self.basis.abs().argmax(0), torch.arange(k)])
        digest = hashlib.sha256(self.basis.float().numpy().tobytes() + self.mean.float().numpy().tobytes()).hexdigest()
        explained = float((s[:k] ** 2).sum() / (s**2).sum())
        self.recipe = {
            "extractor": "pca", "network": "in-domain PCA of the real set (no pretrained weights)",
            "n_components": k, "grid": [self._grid_size(spatial)] * spatial, "n_fit": int(x.shape[0]),
            "explained_variance": round(explained, 4), "basis_sha256": digest,
            "resize": "area (antialiased) to the grid", "quantisation": "none (float)",
            "comparable": "only against the same real set",
        }
        return self

    def _features(self, x01):
        if self.basis is None:
            raise DataError("the in-domain PCA extractor must be fitted on the real images first (.fit(real))")
        return (self._grid(x01.cpu() * 2 - 1) - self.mean) @ self.basis


def weights_present(name: str, weights=None) -> bool:
    """True when `name`'s pretrained weights are available locally (no download attempted)."""
    if weights is not None:
        return Path(weights).is_file()
    if name == "inception":
        dirs = [Path("/tmp")]
    elif name == "medicalnet":
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(MEDICALNET_HF_REPO, MEDICALNET_FILE), str):
                return True
        dirs = []
    else:
        return False
    env = os.environ.get("MEDGEN_WEIGHTS_DIR")
    file = {"inception": INCEPTION_FILE, "medicalnet": MEDICALNET_FILE}[name]
    return any((d / file).is_file() for d in ([Path(env).expanduser()] if env else []) + dirs + [medgen_cache_dir() / "weights"])


def get_extractor(name_or_path: str, weights=None, device=None) -> FeatureExtractor:
    """Build a registered extractor or load a TorchScript file (see the module docstring)."""
    name = str(name_or_path)
    if name == "inception":
        return InceptionExtractor(weights, device)
    if name == "dinov2":
        return DinoV2Extractor(weights, device)
    if name == "medicalnet":
        return MedicalNetExtractor(weights, device)
    if name == "pca":
        return PCAExtractor(device=device)
    if Path(name).is_file():
        if Path(name).name == INCEPTION_FILE:
            return InceptionExtractor(name, device)
        return TorchScriptExtractor(name, device)
    raise WeightsError(f"unknown feature extractor {name!r}: use one of {', '.join(REGISTRY)} or the path of a TorchScript file")


# ----------------------------------------------------------------------------- 2.5D
PLANES = {"xy": 2, "zx": 3, "yz": 4}  # plane name -> axis sliced in (N, C, D, H, W)


def volume_slices(volumes: torch.Tensor, axis: int, step: int = 1) -> torch.Tensor:
    """(N, C, D, H, W) -> (N * S/step, C, a, b): every `step`-th slice along `axis` (2, 3 or 4)."""
    v = volumes.movedim(axis, 1)[:, ::step]  # (N, S', C, a, b)
    return v.reshape(-1, *v.shape[2:])


# ----------------------------------------------------------------------------- cache
def _file_fingerprint(path: Path) -> list:
    p = Path(path)
    if p.is_dir():  # a DICOM series folder
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return [str(p), sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0), len(files)]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(paths: Sequence[Path], extractor_recipe: dict, extra: dict | None = None) -> str:
    """sha256 of the file list (path, size, mtime), the extractor recipe and extra settings."""
    payload = {"files": [_file_fingerprint(p) for p in paths], "extractor": extractor_recipe, "extra": extra or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cached_features(key: str, compute: Callable[[], dict[str, torch.Tensor]], use_cache: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """Load {name: (N, D)} features for `key` from medgen_cache_dir()/features, or compute and
    store them (safetensors + a JSON sidecar; never inside the input folder). -> (features, hit)."""
    from safetensors.torch import load_file, save

    folder = medgen_cache_dir() / "features"
    file = folder / f"{key}.safetensors"
    if use_cache and file.is_file():
        with contextlib.suppress(Exception):
            return load_file(str(file)), True
    feats = compute()
    if use_cache:
        atomic_write_bytes(file, save({k: v.contiguous().float() for k, v in feats.items()}))
        atomic_write_json(folder / f"{key}.json", {k: list(v.shape) for k, v in feats.items()})
    return feats, False
