"""`medgen export`: the folder is complete and names no patient, medgen loads it and samples what the
run samples, diffusers loads its UNet and pipeline, MONAI's bundle API loads its bundle, and a
damaged folder is refused naming the file (issue 23 part 5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import medgen
from medgen.cli import main as cli
from medgen.errors import RunError

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=[16,32]", "model.num_res_blocks=1", "model.attention_levels=[false,true]", "model.head_channels=16",
        "model.norm_groups=8", "train.tracker=none", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2",
        "train.preview_every=2", "sample.steps=2", "sample.n_preview=2"]


def _randomize(run: Path, seed: int = 0) -> Path:
    """Random weights at a working scale for the run's denoiser: two training steps leave the
    zero-initialised output layers near zero, where any two networks agree."""
    from safetensors.torch import load_file, save_file

    path = run / "model" / "model.safetensors"
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(str(path)).items()}, str(path))
    return run


def _train(config: str, out: Path, *overrides: str) -> Path:
    from medgen.config import load_config
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    return _randomize(train_diffusion(load_config(REPO / "configs" / config, [*TINY, *overrides], DEFAULTS), out))


@pytest.fixture(scope="module")
def pixel_run(cohort_2d, tmp_path_factory):
    """Unconditional 2D pixel run (medgen backbone, 16 px) with one recorded audit."""
    from medgen.privacy.attempts import record_attempt

    run = _train("demo_diffusion_2d_pixel.yaml", tmp_path_factory.mktemp("ex") / "dm2d", f"data.path={cohort_2d}",
                 "data.shape=[16,16]", "model.conditional=false")
    record_attempt(run, {"kind": "audit", "event": "verdict", "verdict": "pass", "seed": 0, "n_samples": 400,
                         "bound_upper_pct": 1.5, "confidence": 0.95})
    return run


@pytest.fixture(scope="module")
def latent_run(cohort_2d, tmp_path_factory):
    """Class-conditional 2D latent run on an (untrained) KL autoencoder: 32 px images, 8 px latents."""
    from medgen.models.autoencoder import Autoencoder
    from medgen.models.serialization import save_inference_model

    torch.manual_seed(0)
    ae = Autoencoder(spatial_dims=2, in_channels=1, latent_channels=4, channels=[8, 16, 16], downsample=4, num_res_blocks=1,
                     attention=False, latent="kl", norm_groups=8)
    ae_run = tmp_path_factory.mktemp("ae") / "ae_run"
    data = {"path": str(cohort_2d), "spatial_dims": 2, "channels": 1, "shape": [32, 32], "split": {"val": 0.1, "holdout": 0.1, "seed": 0}}
    save_inference_model(ae, ae_run / "model", {**ae.config(), "data": data})
    return _train("demo_diffusion_2d.yaml", tmp_path_factory.mktemp("ex") / "ldm2d", f"autoencoder.run={ae_run}")


@pytest.fixture(scope="module")
def monai_run(cohort_2d, tmp_path_factory):
    """Class-conditional 2D pixel run on MONAI's DiffusionModelUNet (model.backbone=monai)."""
    return _train("demo_diffusion_2d_pixel.yaml", tmp_path_factory.mktemp("ex") / "monai2d", f"data.path={cohort_2d}",
                  "data.shape=[16,16]", "model.backbone=monai")


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """A 3D pixel run folder as training leaves it (model/ only), around an untrained 8^3 UNet."""
    from medgen.diffusion import NoiseSchedule
    from medgen.models.serialization import save_inference_model
    from medgen.models.unet import UNet
    from medgen.train.diffusion import model_config_json

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, channels=[8, 16], num_res_blocks=1, attention_levels=[False, False], norm_groups=4)
    info = {"sample_shape": [1, 8, 8, 8], "image_shape": [1, 8, 8, 8], "latent": None, "spacing": [2.0, 2.0, 2.0],
            "data": {"path": "/data/cohort3d", "spatial_dims": 3, "shape": [8, 8, 8]}}
    run = tmp_path_factory.mktemp("ex") / "dm3d"
    save_inference_model(net, run / "model", model_config_json(net, NoiseSchedule(), info, 1, {"steps": 2}))
    return _randomize(run)


def _export(run: Path, **kwargs) -> Path:
    from medgen.export import export_model

    export_model(run, run.parent / "export", **kwargs)
    return run.parent / "export"


@pytest.fixture(scope="module")
def pixel_export(pixel_run):
    """Through the command line, with a licence and a modality."""
    out = pixel_run.parent / "export"
    assert cli(["export", "--run", str(pixel_run), "--out", str(out), "--license", "cc-by-nc-4.0", "--modality", "MRI (T1-weighted)"]) == 0
    return out


@pytest.fixture(scope="module")
def latent_export(latent_run):
    return _export(latent_run)


@pytest.fixture(scope="module")
def monai_export(monai_run):
    return _export(monai_run, modality="MRI (T1-weighted)")


@pytest.fixture(scope="module")
def volume_export(volume_run):
    return _export(volume_run)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "medgen_export.json").read_text())


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --------------------------------------------------------------------------- the folder


def test_export_folder_is_complete_and_names_no_patient(pixel_run, pixel_export, cohort_2d):
    from medgen.io import sha256_file
    from medgen.release.card import find_leaks, real_identifiers

    m = _manifest(pixel_export)
    on_disk = {p.relative_to(pixel_export).as_posix() for p in pixel_export.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert set(m["files"]) == on_disk - {"medgen_export.json"}
    assert all(sha256_file(pixel_export / f) == h for f, h in m["files"].items())
    assert {"README.md", "model/model.safetensors", "model/config.json", "scheduler/scheduler_config.json", "unet/config.json",
            "model_index.json"} <= on_disk
    assert sha256_file(pixel_export / "model/model.safetensors") == sha256_file(pixel_run / "model/model.safetensors")  # the EMA weights

    card = (pixel_export / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "medgen" and meta["license"] == "cc-by-nc-4.0"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"medical-imaging", "diffusion", "synthetic-data", "diffusers"} <= set(meta["tags"])
    assert "MRI (T1-weighted)" in card and "verdict **pass**" in card and "at 95% confidence at most 1.50%" in card
    split = json.loads((pixel_run / "split.json").read_text())
    assert m["training_data"]["splits"]["train"] == {"subjects": len(split["subjects"]["train"]), "images": len(split["files"]["train"])}
    assert f"train: {len(split['subjects']['train'])} subjects" in card

    ids = real_identifiers(pixel_run, [], data=cohort_2d, folders=[pixel_run.resolve()])
    assert split["subjects"]["train"][0] in ids
    assert find_leaks(pixel_run / "model", ids)  # the run's own config names the data folder ...
    assert find_leaks(pixel_export, ids) == []  # ... the export does not


def test_export_refuses_a_folder_that_would_name_a_patient(pixel_run, tmp_path):
    from medgen.export import export_model

    subject = json.loads((pixel_run / "split.json").read_text())["subjects"]["train"][0]
    with pytest.raises(RunError, match=f"export refused.*{subject}"):
        export_model(pixel_run, tmp_path / "out", modality=f"MRI of {subject}")
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging left
    assert cli(["export", "--run", str(pixel_run), "--out", str(tmp_path / "x"), "--license", "My licence"]) == 2


# --------------------------------------------------------------------------- medgen loads it


@pytest.mark.parametrize("kind", ["pixel", "latent", "volume"])
def test_load_pipeline_of_the_export_samples_what_the_run_samples(kind, request):
    run, export = request.getfixturevalue(f"{kind}_run"), request.getfixturevalue(f"{kind}_export")
    label = 1 if kind == "latent" else None
    a, b = (medgen.load_pipeline(str(folder), device="cpu") for folder in (run, export))
    assert a.checkpoint_sha256 == b.checkpoint_sha256
    x, y = (p.sample(3, steps=3, seed=11, label=label) for p in (a, b))
    assert x.std() > 0.05 and torch.equal(x, y)


def test_a_damaged_export_is_refused_naming_the_file(latent_export, tmp_path, capsys):
    export = tmp_path / "copy"
    shutil.copytree(latent_export, export)
    (export / "README.md").write_text("an edited card\n")  # the card may be edited: loading does not check it
    medgen.load_pipeline(export, device="cpu")

    weights = export / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError, match=r"model/model\.safetensors does not match its sha256 in medgen_export\.json"):
        medgen.load_pipeline(export, device="cpu")
    assert cli(["sample", "--run", str(export), "--n", "1", "--out", str(tmp_path / "s")]) == 2
    assert "model.safetensors does not match" in capsys.readouterr().err

    (export / "autoencoder" / "model.safetensors").unlink()
    with pytest.raises(RunError, match=r"autoencoder/model\.safetensors is missing: the export folder is incomplete"):
        medgen.load_pipeline(export, device="cpu")
    (export / "medgen_export.json").write_text("{not json")
    with pytest.raises(RunError, match=r"medgen_export\.json cannot be read as JSON"):
        medgen.load_pipeline(export, device="cpu")


# --------------------------------------------------------------------------- diffusers


def test_diffusers_pipeline_samples_what_medgen_samples(pixel_run, pixel_export):
    """An unconditional 2D pixel run: diffusers' own DDPMPipeline, from the folder, gives medgen's samples."""
    from diffusers import DDPMPipeline

    from medgen.diffusion import generators

    x = medgen.load_pipeline(pixel_run, device="cpu").sample(3, steps=4, seed=5)
    pipe = DDPMPipeline.from_pretrained(str(pixel_export))
    images = pipe(batch_size=3, generator=generators([5, 6, 7]), num_inference_steps=4, output_type="np").images
    assert type(pipe.scheduler).__name__ == _manifest(pixel_export)["formats"]["diffusers"]["scheduler_class"]
    torch.testing.assert_close(torch.from_numpy(images), ((x + 1) / 2).permute(0, 2, 3, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["latent", "monai"])
def test_diffusers_unet_is_the_same_network(kind, request):
    """Class-conditional runs of both backbones: UNet2DModel.from_pretrained(export, subfolder="unet")
    computes the denoiser's output; the scheduler config has the run's alpha_bar."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    run, export = request.getfixturevalue(f"{kind}_run"), request.getfixturevalue(f"{kind}_export")
    pipe = medgen.load_pipeline(run, device="cpu")
    unet = UNet2DModel.from_pretrained(str(export), subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *pipe.sample_shape, generator=g)
    t, labels = torch.tensor([0, 400, 999]), torch.tensor([0, 1, pipe.num_classes])
    with torch.no_grad():
        ref = pipe.denoiser(x, t, labels)
        out = unet(x, t, class_labels=labels).sample
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(str(export), subfolder="scheduler")
    torch.testing.assert_close(scheduler.alphas_cumprod, pipe.schedule.alphas_cumprod())


def test_a_3d_denoiser_has_no_diffusers_unet(volume_export):
    """diffusers' only UNet over a third axis is a video network: its conv_in is 2D and it needs text states."""
    import inspect

    from diffusers import UNet3DConditionModel

    from medgen.models.unet import UNet

    diffusers = _manifest(volume_export)["formats"]["diffusers"]
    assert diffusers["unet"] is None and "UNet3DConditionModel" in diffusers["why"]
    ours = UNet(spatial_dims=3, channels=[16, 32], num_res_blocks=1, attention_levels=[False, True], head_channels=16, norm_groups=8)
    video = UNet3DConditionModel(block_out_channels=[16, 32], layers_per_block=1, down_block_types=["DownBlock3D", "CrossAttnDownBlock3D"],
                                 up_block_types=["CrossAttnUpBlock3D", "UpBlock3D"], norm_num_groups=8, attention_head_dim=16,
                                 cross_attention_dim=32, in_channels=1, out_channels=1)
    assert ours.conv_in.weight.shape == (16, 1, 3, 3, 3) and video.conv_in.weight.shape == (16, 1, 3, 3)
    assert inspect.signature(video.forward).parameters["encoder_hidden_states"].default is inspect.Parameter.empty


# --------------------------------------------------------------------------- MONAI


def test_monai_bundle_loads_through_monai_bundle_and_matches(monai_export, pixel_export):
    from monai.bundle import ConfigParser, load

    export = monai_export
    bundle = export / "monai_bundle"
    net = load("monai_bundle", bundle_dir=str(export), workflow_type="inference", device="cpu")  # as docs/README.md says
    pipe = medgen.load_pipeline(export, device="cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *pipe.sample_shape, generator=g)
    t, labels = torch.tensor([10, 900]), torch.tensor([1, pipe.num_classes])
    with torch.no_grad():
        ref = pipe.denoiser(x, t, labels)
        torch.testing.assert_close(net.eval()(x, t, class_labels=labels), ref, rtol=1e-6, atol=1e-6)
    assert ref.abs().max() > 0.5

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.testing.assert_close(parser.get_parsed_content("scheduler").alphas_cumprod, pipe.schedule.alphas_cumprod())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16]
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "MRI (T1-weighted)"
    assert (bundle / "docs" / "README.md").is_file()
    # a medgen-backbone run has no bundle, and says why
    m = _manifest(pixel_export)["formats"]["monai_bundle"]
    assert m["folder"] is None and "model.backbone=monai" in m["why"] and not (pixel_export / "monai_bundle").exists()


def test_monai_bundle_samples_an_unconditional_model(monai_run):
    """The bundle's inferer and `sample` expression (written for unconditional models) run."""
    from monai.bundle import ConfigParser

    from medgen.export.monai_bundle import inference_config

    config = json.loads((monai_run / "model" / "config.json").read_text())
    config["params"] = {**config["params"], "num_classes": 0}
    pipe = medgen.load_pipeline(monai_run, device="cpu")
    parser = ConfigParser(inference_config(config, pipe.schedule, clip_x0=True)[0])
    parser["device"] = "$torch.device('cpu')"
    scheduler = parser.get_parsed_content("scheduler")
    scheduler.set_timesteps(2)
    x = parser.get_parsed_content("sample")(parser.get_parsed_content("noise"))
    assert x.shape == (1, *pipe.sample_shape) and torch.isfinite(x).all()
