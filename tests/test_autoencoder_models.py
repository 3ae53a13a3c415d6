"""Stage-1 networks: autoencoder shapes, quantizer math, discriminators, losses, perceptual weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgen.errors import WeightsError
from medgen.models.autoencoder import Autoencoder, load_autoencoder, plan_downsampling
from medgen.models.discriminator import GANDiscriminator, take_slices
from medgen.models.quantizer import VectorQuantizer, nearest_code
from medgen.models.serialization import save_inference_model
from medgen.train.losses import adaptive_gan_weight, feature_matching_loss, hinge_d_loss, hinge_g_loss

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
    vq = Autoencoder(2, 1, 4, latent="vq", **TINY).eval()
    z = vq.encode(x)
    noisy = z + 1e-3 * torch.randn_like(z)  # a diffusion model's output near the codes
    assert torch.allclose(vq.decode(noisy), vq.decode(z))


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
    # each revived code sits on an encoding of the batch
    assert (revived[:, None] - flat[None]).norm(dim=-1).min(1).values.max() < 1e-5
    assert torch.all(vq.cluster_size[4:] == 1.0)
    vq.eval()
    _, _, stats = vq(z)
    used = stats["indices"].unique()
    assert (used >= 4).sum() >= 6  # revived codes now win assignments
    assert stats["usage"].item() > 0.5


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
    feats_f = [torch.ones(2, 3), torch.zeros(2, 1)]
    feats_r = [torch.zeros(2, 3), torch.ones(2, 1)]
    assert feature_matching_loss(feats_f, feats_r).item() == pytest.approx(1.0)  # logits excluded
    w = torch.ones(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    lam = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert lam.item() == pytest.approx(5.0 / (1.0 + 1e-4))


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
    vol = torch.rand(1, 1, 16, 16, 8) * 2 - 1  # 3D: random slices per axis, anisotropic planes resized
    assert PerceptualLoss("resnet18", path, spatial_dims=3)(vol, vol.flip(2)).item() > 0


def test_perceptual_loss_missing_weights_is_clear(tmp_path, monkeypatch):
    from medgen.models.perceptual import PerceptualLoss

    monkeypatch.setenv("MEDGEN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=r"vgg16\.safetensors does not exist.*perceptual=none"):
        PerceptualLoss("vgg16")
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
