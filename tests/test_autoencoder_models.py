"""Stage-1 networks: autoencoder shapes, quantizer math, discriminators, losses, perceptual weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medgen.errors import WeightsError
from medgen.models.autoencoder import Autoencoder, load_autoencoder, plan_downsampling
from medgen.models.discriminator import GANDiscriminator, take_slices
from medgen.models.quantizer import VectorQuantizer, nearest_code
from medgen.models.serialization import save_inference_model
from medgen.train.losses import adaptive_gan_weight, feature_matching_loss, hinge_d_loss, hinge_g_loss, ssim_loss

TINY = dict(channels=(8, 16, 16), norm_groups=4, num_codes=32)


@pytest.mark.parametrize("latent", ["vq", "kl"])
@pytest.mark.parametrize("dims,shape,down,latent_shape", [
    (2, (32, 32), 4, (8, 8)),
    (3, (16, 16, 16), 4, (4, 4, 4)),
    (3, (16, 16, 8), (4, 4, 1), (4, 4, 8)),  # anisotropic: thin axis kept
])
def test_shapes(latent, dims, shape, down, latent_shape):
    torch.manual_seed(0)
    model = Autoencoder(dims, in_channels=2, latent_channels=3, downsample=down, latent=latent, attention=True, **TINY)
    x = torch.randn(2, 2, *shape)
    recon, aux = model(x)
    assert recon.shape == x.shape and aux["z"].shape == (2, 3, *latent_shape)
    assert aux["latent_loss"].ndim == 0 and aux["latent_loss"] >= 0
    model.eval()
    z = model.encode(x)
    assert z.shape == (2, *model.latent_shape(shape)) == (2, 3, *latent_shape)
    assert model.decode(z).shape == x.shape
    assert model.downsample_factors == ((down,) * dims if isinstance(down, int) else down)
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.randn(1, 2, *[s + 2 for s in shape]))


def test_plan_downsampling():
    assert plan_downsampling((4, 4, 1), 3) == [(2, 2, 1), (2, 2, 1)]
    assert plan_downsampling((8, 8, 2), 4) == [(2, 2, 1), (2, 2, 1), (2, 2, 2)]
    with pytest.raises(ValueError, match="power of two"):
        plan_downsampling((3, 4), 3)
    with pytest.raises(ValueError, match="stages"):
        plan_downsampling((8, 8), 3)


def test_kl_encode_is_posterior_mean_and_decode_vq_requantizes():
    torch.manual_seed(0)
    kl = Autoencoder(2, 1, 4, latent="kl", **TINY).eval()
    x = torch.randn(2, 1, 16, 16)
    mean = kl.encoder(x).chunk(2, dim=1)[0]
    assert torch.equal(kl.encode(x), mean)
    assert torch.equal(kl.encode(x, quantize=False), mean)
    vq = Autoencoder(2, 1, 4, latent="vq", **TINY).eval()
    z = vq.encode(x)
    noisy = z + 1e-3 * torch.randn_like(z)  # a diffusion model's output near the codes
    assert torch.allclose(vq.decode(noisy), vq.decode(z))
    # Medical Diffusion's latents: the encoder output before the codebook, and the codebook's range
    h = vq.encode(x, quantize=False)
    assert torch.equal(h, vq.encoder(x)) and not torch.equal(h, z)
    assert torch.equal(vq.quantizer.lookup(vq.quantizer.indices(h)), z)
    assert vq.codebook_range() == (vq.quantizer.embed.min().item(), vq.quantizer.embed.max().item())
    with pytest.raises(ValueError, match="VQ"):
        kl.codebook_range()


def test_deep_supervision_heads(tmp_path):
    """Medfusion's deep supervision: zero-initialised 1x1 heads on the coarser decoder levels."""
    torch.manual_seed(0)
    model = Autoencoder(3, 1, 4, latent="kl", downsample=(4, 4, 1), deep_supervision=2, **TINY)
    x = torch.randn(2, 1, 16, 16, 8)
    recon, aux = model(x)
    assert [d.shape for d in aux["deep"]] == [(2, 1, 8, 8, 8), (2, 1, 4, 4, 8)]  # levels 1, 2 (finest first)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in aux["deep"])  # zero-initialised
    sum(d.sum() for d in aux["deep"]).backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in model.decoder.aux_out)
    assert Autoencoder(2, 1, 4, latent="kl", **TINY)(torch.randn(1, 1, 16, 16))[1]["deep"] == []
    model.eval()
    save_inference_model(model, tmp_path / "model", model.config())
    loaded = load_autoencoder(tmp_path / "model")
    assert len(loaded.decoder.aux_out) == 2 and torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    with pytest.raises(ValueError, match="deep_supervision"):
        Autoencoder(2, 1, 4, deep_supervision=3, **TINY)


def test_save_load_round_trip_identical(tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(3, 1, 4, downsample=(4, 4, 1), **TINY)
    model(torch.randn(2, 1, 16, 16, 8))  # one training step moves the EMA codebook off its init
    model.eval()
    save_inference_model(model, tmp_path / "run" / "model", model.config())
    loaded = load_autoencoder(tmp_path / "run")  # run dir -> run/model
    x = torch.randn(2, 1, 16, 16, 8)
    assert not loaded.training and loaded.downsample_factors == (4, 4, 1)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded(x)[0], model(x)[0])


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("chunk", [1 << 10, 333 * 50, 1 << 26])
def test_chunked_search_equals_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    flat, codes = torch.randn(1001, 8, generator=g), torch.randn(50, 8, generator=g)
    ref = torch.cdist(flat.double(), codes.double()).argmin(1)
    assert torch.equal(nearest_code(flat, codes, chunk), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not round the distances
        assert torch.equal(nearest_code(flat, codes, chunk), ref)


def test_quantizer_straight_through_commitment_and_perplexity():
    vq = VectorQuantizer(4, 2, commitment=0.25).eval()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = torch.tensor([[0.1, 0.2], [9.5, 0.3], [0.4, 9.8], [10.2, 9.9]]).t().reshape(1, 2, 2, 2).requires_grad_(True)
    z_q, loss, stats = vq(z)
    assert torch.equal(stats["indices"].flatten(), torch.arange(4))
    assert torch.allclose(z_q, vq.embed.t().reshape(1, 2, 2, 2))
    assert loss.item() == pytest.approx(0.25 * ((z.detach() - z_q.detach()) ** 2).mean().item())
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    assert stats["perplexity"].item() == pytest.approx(4.0, rel=1e-4)  # uniform over 4 codes
    assert stats["usage"].item() == 1.0


def test_ema_update_closed_form():
    d, eps = 0.9, 1e-5
    vq = VectorQuantizer(2, 2, decay=d, eps=eps, dead_threshold=0.0)
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    vq.cluster_size.copy_(torch.tensor([2.0, 3.0]))
    vq.embed_sum.copy_(torch.tensor([[0.0, 0.0], [300.0, 300.0]]))
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).t().reshape(1, 2, 3)  # all nearest to code 0
    vq(z)
    n = torch.tensor([d * 2 + (1 - d) * 3, d * 3])
    assert torch.allclose(vq.cluster_size, n)
    m0 = (1 - d) * torch.tensor([9.0, 12.0])
    assert torch.allclose(vq.embed_sum[0], m0)
    smoothed = (n + eps) / (n.sum() + 2 * eps) * n.sum()
    assert torch.allclose(vq.embed[0], m0 / smoothed[0]) and torch.allclose(vq.embed[1], torch.tensor([100.0, 100.0]))


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, decay=0.99, dead_threshold=0.5)
    vq.embed.fill_(100.0)  # all codes far from the data
    vq.embed[:4] = torch.randn(4, 4)  # 4 live codes near the data ...
    vq.cluster_size.fill_(0.0)
    vq.cluster_size[:4] = 10.0  # ... with healthy usage; codes 4..15 are dead
    z = torch.randn(2, 4, 8, 8)
    flat = z.movedim(1, -1).reshape(-1, 4)
    _, _, stats = vq(z)
    assert stats["restarted"].item() == 12
    revived = vq.embed[4:]
    # each revived code sits on a distinct encoding of the batch (drawn without replacement)
    assert (revived[:, None] - flat[None]).norm(dim=-1).min(1).values.max() < 1e-5
    assert len(torch.unique(revived, dim=0)) == 12
    vq.eval()
    _, _, stats = vq(z)
    used = stats["indices"].unique()
    assert (used >= 4).sum() >= 6  # revived codes now win assignments
    assert stats["usage"].item() > 0.5


def test_dead_code_dynamics_match_medical_diffusion():
    """A dead code keeps its EMA statistics and moves to a batch encoding at every step until
    its own uses lift N_k to the threshold: from N = 0 at n uses per step, N_t = n (1 - g^t),
    alive after ceil(log(1 - thr / n) / log g) steps (TATS/Medical Diffusion's codebook). A
    pseudo-use reset on restart (N_k := 1) would revive it after a single use."""
    g, n, thr = 0.9, 4, 1.0
    vq = VectorQuantizer(2, 1, decay=g, eps=0.0, dead_threshold=thr)
    vq.embed.copy_(torch.tensor([[-100.0], [1000.0]]))  # code 0 alive far away, code 1 dead and farther
    vq.cluster_size.copy_(torch.tensor([1000.0, 0.0]))
    vq.embed_sum.copy_(torch.tensor([[-100000.0], [0.0]]))
    z = torch.full((1, 1, n), 10.0)  # n identical encodings: every candidate is 10
    restarted, sizes = [], []
    for _ in range(5):
        _, _, stats = vq(z)
        restarted.append(int(stats["restarted"].item()))
        sizes.append(vq.cluster_size[1].item())
    # step 1: code 0 takes all n encodings, code 1 (unused) moves onto 10; then code 1 wins them
    expected_sizes = [0.0] + [n * (1 - g ** t) for t in range(1, 5)]  # 0, 0.4, 0.76, 1.084, 1.376
    assert sizes == pytest.approx(expected_sizes, abs=1e-5)
    steps_to_revive = math.ceil(math.log(1 - thr / n) / math.log(g))  # 3 steps of uses
    # moved at step 1 (unused) and after the first 2 steps of uses; alive after the 3rd
    assert restarted == [1] * steps_to_revive + [0] * (5 - steps_to_revive) == [1, 1, 1, 0, 0]
    assert vq.embed[1].item() == pytest.approx(10.0, abs=1e-5)  # alive: the EMA mean of its encodings
    # the statistics were never overwritten by a restart: m_1 = sum of (1 - g) g^i * n * 10
    assert vq.embed_sum[1].item() == pytest.approx(sizes[-1] * 10.0, rel=1e-5)


def test_first_training_step_initialises_codebook_from_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 4, decay=0.99, dead_threshold=1.0)
    z = torch.randn(2, 4, 8, 8) + 5.0  # 128 encodings far from the N(0, 1/D) initial codebook
    flat = z.movedim(1, -1).reshape(-1, 4)
    z_q, _, stats = vq(z)
    # initialised before quantizing: every code is a distinct encoding (drawn without
    # replacement), so each wins at least its own encoding, and every z_q is an encoding
    z_q = z_q.detach().movedim(1, -1).reshape(-1, 4)
    assert (z_q[:, None] - flat[None]).norm(dim=-1).min(1).values.max() < 1e-5
    assert stats["usage"].item() == 1.0
    counts = torch.bincount(stats["indices"].flatten(), minlength=64).float()
    assert torch.allclose(vq.cluster_size, 0.99 * 1.0 + 0.01 * counts)  # one use at init, then the EMA
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    fresh = VectorQuantizer(64, 4, decay=0.99, dead_threshold=0.0)
    fresh.load_state_dict(state)
    _, _, stats = fresh(z)  # a trained codebook (loaded or resumed) is not initialised again: a plain EMA step
    counts = torch.bincount(stats["indices"].flatten(), minlength=64).float()
    assert torch.allclose(fresh.cluster_size, 0.99 * state["cluster_size"] + 0.01 * counts)


def test_quantizer_under_autocast_bf16():
    torch.manual_seed(0)
    model = Autoencoder(2, 1, 4, **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, aux = model(torch.randn(2, 1, 16, 16))
    assert torch.isfinite(recon.float()).all() and aux["latent_loss"].dtype == torch.float32


# ----------------------------------------------------------------------------- discriminators and losses


def test_discriminators_no_batchnorm_and_slices():
    d = GANDiscriminator(3, 1, channels=8, num_layers=2, slices_per_volume=2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    x = torch.randn(3, 1, 16, 16, 16)
    idx = d.draw_slices(x)
    out = d(x, idx)
    assert set(out) == {"volume", "slice"} and out["slice"][-1].shape[0] == 6
    s = take_slices(x, idx)
    assert torch.equal(s[1], x[0, :, idx[0, 1]]) and torch.equal(s[4], x[2, :, idx[2, 0]])
    assert set(GANDiscriminator(2, 1, 8, 2)(torch.randn(2, 1, 32, 32))) == {"slice"}


def test_gan_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    # three layers + logits: the layers are summed (Medical Diffusion), the logits excluded
    feats_f = [torch.ones(2, 3), torch.full((2, 2), 2.0), torch.full((2, 4), -1.0), torch.zeros(2, 1)]
    feats_r = [torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 4), torch.ones(2, 1)]
    assert feature_matching_loss(feats_f, feats_r).item() == pytest.approx(1.0 + 2.0 + 1.0)
    w = torch.ones(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    lam = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert lam.item() == pytest.approx(5.0 / (1.0 + 1e-4))


def test_ssim_loss_matches_pytorch_msssim():
    """Medfusion's 1 - SSIM term: pytorch_msssim.ssim(nonnegative_ssim=True) on [0, 1], recon clamped."""
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    torch.manual_seed(0)
    for shape in [(3, 3, 48, 40), (2, 1, 16, 16, 16)]:
        y = torch.rand(shape) * 2 - 1
        x = y + 0.5 * torch.randn_like(y)  # past [-1, 1]: the clamp matters
        ref = 1 - pytorch_msssim.ssim(((x + 1) / 2).clamp(0, 1), (y + 1) / 2, data_range=1, size_average=False,
                                      nonnegative_ssim=True).mean()
        assert ssim_loss(x, y).item() == pytest.approx(ref.item(), abs=1e-5)
    assert ssim_loss(y, y).item() == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------- perceptual loss


def test_perceptual_loss_from_local_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    from medgen.models.perceptual import PerceptualLoss

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loss = PerceptualLoss("resnet18", path, spatial_dims=2)
    assert all(not p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = loss(y, x)
    d.backward()
    assert d.item() > 0 and y.grad.abs().sum() > 0
    loss.train()
    assert not loss.training  # frozen BatchNorm statistics
    vol = torch.rand(1, 1, 16, 16, 8) * 2 - 1  # 3D: slices along every axis, anisotropic planes resized
    assert PerceptualLoss("resnet18", path, spatial_dims=3, slices=2, axes=(0, 1, 2))(vol, vol.flip(2)).item() > 0


def test_perceptual_volume_slices_one_depth_slice_per_volume(tmp_path):
    """Medical Diffusion scores LPIPS on one random depth slice per volume, the same for x and x^."""
    from medgen.models.perceptual import PerceptualLoss, random_backbone_state

    loss = PerceptualLoss("resnet18", random_backbone_state("resnet18"), spatial_dims=3)  # slices=1, axes=(0,)
    x = torch.arange(3 * 6, dtype=torch.float32).view(3, 1, 6, 1, 1).expand(3, 1, 6, 5, 4)  # slice d of volume b = 6b + d
    xs, ys = loss._to_slices(x, x + 0.5)
    assert xs.shape == ys.shape == (3, 1, 5, 4)
    value = xs[:, 0, 0, 0]
    assert torch.equal(value // 6, torch.arange(3.0))  # one slice from each volume, in order
    assert torch.equal(ys[:, 0, 0, 0], value + 0.5)  # the same slice of the reconstruction


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # lpips calls vgg16(pretrained=)
def test_lpips_matches_the_lpips_package(tmp_path):
    """Our LPIPS (`lpips`) and its unweighted baseline (`vgg16`) against `lpips.LPIPS` on the same
    weights: a backbone and linear layers this test writes, and the linear weights the package ships."""
    lpips = pytest.importorskip("lpips")
    from safetensors.torch import save_file

    from medgen.models.perceptual import PerceptualLoss

    torch.manual_seed(0)
    # the reference with a random VGG16 (nothing downloaded) and the package's v0.1 linear weights
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    # lpips keeps torchvision's module indices: net.slice{k}.{i}.* is torchvision's features.{i}.*
    backbone = {f"features.{k.split('.', 1)[1]}": v.contiguous() for k, v in ref.net.state_dict().items()}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    path = tmp_path / "vgg16.safetensors"
    save_file(backbone, str(path))
    with torch.no_grad():
        # 1. backbone from the file, linear layers from the lpips package (what Medical Diffusion downloads)
        ours = PerceptualLoss("lpips", path)
        assert ours(x, y).item() == pytest.approx(ref(x, y).mean().item(), rel=1e-4)
        assert ours(x[:, :1], y[:, :1]).item() == pytest.approx(ref(x[:, :1], y[:, :1]).mean().item(), rel=1e-4)
        # 2. the unweighted baseline (Medfusion's `lpips.LPIPS(net="vgg", lpips=False)`)
        ref.lpips = False
        baseline = PerceptualLoss("vgg16", path)(x, y).item()
        assert baseline == pytest.approx(ref(x, y).mean().item(), rel=1e-4)
        assert abs(baseline - ours(x, y).item()) > 1e-3  # the learned weights matter
        # 3. learned weights in the file (lin.l), e.g. LPIPS retrained by the user
        ref.lpips = True
        lin = {f"lin.{i}": torch.rand(c) for i, c in enumerate((64, 128, 256, 512, 512))}
        for i, layer in enumerate(ref.lins):
            layer.model[-1].weight.copy_(lin[f"lin.{i}"].view(1, -1, 1, 1))
        save_file({**backbone, **lin}, str(path))
        assert PerceptualLoss("lpips", path)(x, y).item() == pytest.approx(ref(x, y).mean().item(), rel=1e-4)


def test_perceptual_weights_lookup_and_offline_message(tmp_path, monkeypatch):
    """Explicit file > $MEDGEN_WEIGHTS_DIR/<arch>.safetensors > torchvision's checkpoint in torch.hub's
    cache (downloaded there when online); offline with neither, the error says what to put where."""
    from safetensors.torch import save_file

    from medgen.models.perceptual import PerceptualLoss, random_backbone_state

    monkeypatch.setenv("MEDGEN_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDGEN_OFFLINE", "1")
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(WeightsError, match=r"(?s)weights/vgg16\.safetensors does not exist.*MEDGEN_OFFLINE.*"
                                           r"save_file.*vgg16-397923af\.pth.*perceptual=none"):
        PerceptualLoss("lpips")
    torch.manual_seed(0)
    state = {k: v for k, v in random_backbone_state("vgg16").items() if k.startswith("features.")}
    hub_file.parent.mkdir(parents=True)
    torch.save(state, hub_file)  # what torchvision's download leaves in torch.hub's cache
    from_hub = PerceptualLoss("lpips")
    assert from_hub.source == str(hub_file)
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    shifted = {k: v + 0.01 for k, v in state.items()}
    (tmp_path / "weights").mkdir()
    save_file(shifted, str(tmp_path / "weights" / "vgg16.safetensors"))
    local = PerceptualLoss("lpips")
    assert local.source == str(tmp_path / "weights" / "vgg16.safetensors")
    assert torch.equal(local.stages[0][0].weight, shifted["features.0.weight"])
    assert local(x, -x).item() != pytest.approx(from_hub(x, -x).item())
    with pytest.raises(WeightsError, match=r"none\.safetensors does not exist.*loss\.perceptual_weights"):
        PerceptualLoss("lpips", tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        PerceptualLoss("vgg16", bad)


def _ddp_quantizer_worker(rank, world, port, z_all, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different random draws per process: restarts must still agree
    vq = VectorQuantizer(8, 2, decay=0.8, dead_threshold=0.05)
    vq.load_state_dict(init)
    for _ in range(3):
        vq(z_all[rank::world])  # each process sees its own shard
    out[rank] = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.cluster_size[:3] = 0.0  # kill three codes (moved away from the data, so they stay unused);
    vq.embed[:3] = 100.0  # restarts then draw different candidates on each process
    _, _, stats = vq(z_all[rank::world])
    out[f"restarted{rank}"] = stats["restarted"].item()
    out[f"after{rank}"] = {k: v.clone() for k, v in vq.state_dict().items()}
    dist.destroy_process_group()


def test_quantizer_ema_all_reduced_under_ddp():
    """Two processes with different data keep identical codebooks equal to one process on all data."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    z_all = torch.randn(4, 2, 4, 4)
    ref = VectorQuantizer(8, 2, decay=0.8, dead_threshold=0.0)  # no restarts: deterministic reference
    ref.cluster_size.fill_(1.0)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_quantizer_worker, args=(2, port, z_all, init, out), nprocs=2, join=True)
    for k in init:
        assert torch.equal(out[0][k], out[1][k]), k  # identical on both processes
        assert torch.equal(out["after0"][k], out["after1"][k]), k  # also after dead-code restarts
    assert out["restarted0"] == out["restarted1"] >= 3
    # no code fell below the threshold in the first 3 steps (1.0 * 0.8^3 > 0.05), so the EMA
    # statistics must equal one process quantizing the concatenated shards
    assert out[0]["cluster_size"].min() >= 0.05
    for _ in range(3):
        ref(torch.cat([z_all[0::2], z_all[1::2]]))
    assert torch.allclose(out[0]["cluster_size"], ref.cluster_size, atol=1e-5)
    assert torch.allclose(out[0]["embed_sum"], ref.embed_sum, atol=1e-5)
    assert torch.allclose(out[0]["embed"], ref.embed, atol=1e-5)


def test_channels_last_mixed_2d_3d_modules():
    """The 3D VQ-GAN's discriminator mixes Conv3d and Conv2d: each conv gets its own layout."""
    from medgen.models.autoencoder import to_channels_last

    torch.manual_seed(0)
    d = GANDiscriminator(3, 1, channels=8, num_layers=2)
    x = torch.randn(2, 1, 16, 16, 16)
    idx = d.draw_slices(x)
    ref = d(x, idx)
    to_channels_last(d)
    assert d.volume.layers[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert d.slice.layers[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    out = d(x.contiguous(memory_format=torch.channels_last_3d), idx)
    for k in ref:
        assert torch.allclose(out[k][-1], ref[k][-1], atol=1e-5)
