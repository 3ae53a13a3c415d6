"""fastMRI k-space files for the MRI probe: the FFT convention against deepinv, single- and multi-coil
references, cropping, ESPIRiT maps, masks, coil maps, measurement noise, and the errors users hit."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from medgen.errors import ConfigError, DataError
from medgen.recon.fastmri import (
    add_measurement_noise,
    estimate_coil_maps,
    read_coil_maps,
    read_kspace,
    read_mask,
    simulate_kspace,
    write_fastmri_h5,
)
from medgen.recon.kspace import apply_mask, birdcage_maps, fully_sampled, magnitude, mri_physics, to_complex
from medgen.recon.metrics import psnr


def _phantom(n: int, H: int, W: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, H, W) smooth positive images on an elliptical object (zero background) and the object mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    obj = (xx / 0.75) ** 2 + (yy / 0.8) ** 2 < 1
    out = []
    for _ in range(n):
        a, b, c = torch.rand(3, generator=g)
        blob = ((xx - 0.3 * a + 0.15) ** 2 + (yy - 0.3 * b + 0.15) ** 2 < 0.08).float()
        out.append(obj * (0.5 + 0.3 * torch.cos(3 * xx + 2 * c) * torch.sin(2 * yy) + 0.3 * blob))
    return torch.stack(out)[:, None], obj


def _fastmri_fft(x: np.ndarray) -> np.ndarray:
    """fastMRI's k-space of images x (..., H, W): fftshift(fft2(ifftshift(x)), norm="ortho")."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _two_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) complex -> deepinv's (N, 2, H, W)."""
    return torch.view_as_real(x.to(torch.complex64)).movedim(-1, 1).contiguous()


# ----------------------------------------------------------------------------- reading k-space


@pytest.mark.parametrize("phase", [False, True])
def test_single_coil_round_trip_matches_deepinv(tmp_path, phase):
    """fastMRI's FFT is deepinv's: a file written from fastMRI's formula reads back as |image| / max and as
    deepinv's fully sampled k-space of the scaled image (odd height, where fftshift != ifftshift)."""
    H, W = 33, 28
    img, _ = _phantom(2, H, W)
    img = img * torch.tensor([3.0, 0.02])[:, None, None, None]  # different per-slice scales
    if phase:
        img = img * torch.exp(1j * 2 * torch.pi * torch.rand(img.shape, generator=torch.Generator().manual_seed(1)))
    k_np = _fastmri_fft(img[:, 0].numpy().astype(np.complex128))
    np.testing.assert_allclose(simulate_kspace(img), k_np, rtol=0, atol=1e-5 * np.abs(k_np).max())

    data = read_kspace(write_fastmri_h5(tmp_path / "sc.h5", k_np.astype(np.complex64)))
    assert (data.coils, data.slices, data.cropped) == (1, [0, 1], False)
    assert data.kspace.shape == (2, 2, H, W) and data.kspace.dtype == torch.float32
    peak = img.abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(data.scale, peak, rtol=1e-5, atol=0)
    torch.testing.assert_close(data.truth, img.abs() / peak[:, None, None, None], rtol=0, atol=1e-5)
    assert torch.allclose(data.truth.amax(dim=(1, 2, 3)), torch.ones(2))

    physics = fully_sampled(mri_physics(torch.ones(H, W)))
    x = to_complex(data.truth) if not phase else _two_channel(img[:, 0] / peak[:, None, None])
    torch.testing.assert_close(physics.A(x), data.kspace, rtol=0, atol=1e-5)
    torch.testing.assert_close(magnitude(physics.A_adjoint(data.kspace)), data.truth, rtol=0, atol=1e-5)


def test_multi_coil_rss_reference_and_espirit_maps(tmp_path):
    """Birdcage k-space (4 coils) reads back with RSS = |image|; ESPIRiT maps match the true maps on the object,
    make the fully sampled operator an isometry and give the image back through deepinv's adjoint."""
    from deepinv.physics import MultiCoilMRI

    H, W, C = 48, 40, 4
    img, obj = _phantom(2, H, W, seed=3)
    maps = birdcage_maps(C, (H, W))
    path = write_fastmri_h5(tmp_path / "mc.h5", simulate_kspace(img * 7.0, maps), reconstruction=img[:, 0].numpy())
    data = read_kspace(path)
    assert data.coils == C and data.kspace.shape == (2, 2, C, H, W)
    torch.testing.assert_close(data.truth, img / img.amax(dim=(1, 2, 3), keepdim=True), rtol=0, atol=1e-5)
    true_op = MultiCoilMRI(mask=torch.ones(H, W), coil_maps=maps, img_size=(H, W))
    torch.testing.assert_close(true_op.A(to_complex(data.truth)), data.kspace, rtol=0, atol=1e-5)

    est = estimate_coil_maps(data.kspace)
    assert est.shape == (2, C, H, W) and est.dtype == torch.complex64
    torch.testing.assert_close(est.abs().square().sum(1), torch.ones(2, H, W), rtol=0, atol=1e-5)  # crop=0: everywhere
    agreement = (est.conj() * maps).sum(1).abs()  # |<S_est, S>| per pixel, 1 when equal up to a common phase
    assert agreement[:, obj].min() > 0.999

    op = MultiCoilMRI(mask=torch.ones(H, W), coil_maps=est, img_size=(H, W))
    x_hat = op.A_adjoint(data.kspace)
    assert psnr(magnitude(x_hat), data.truth).min() > 60  # ~80 dB measured
    assert (op.A(x_hat) - data.kspace).norm() < 1e-2 * data.kspace.norm()  # the maps explain the data
    u = torch.randn(2, 2, H, W, generator=torch.Generator().manual_seed(0)) * obj
    torch.testing.assert_close(op.A_adjoint(op.A(u)), u, rtol=0, atol=1e-4)  # A^H A = I


@pytest.mark.parametrize("coils, shape", [(1, (32, 32)), (4, (32, 32)), (1, (31, 27))])
def test_crop_to_image_shape(tmp_path, coils, shape):
    """64x48 data read at a smaller image_shape give the centre crop of the image with fastMRI's offsets
    ((H - h) // 2, (W - w) // 2; odd differences tell them from rounding up) and its k-space."""
    img, _ = _phantom(1, 64, 48, seed=2)
    img = img * torch.linspace(0.2, 1, 48)  # not symmetric, so an off-by-one crop shows
    maps = birdcage_maps(coils, (64, 48)) if coils > 1 else None
    path = write_fastmri_h5(tmp_path / "big.h5", simulate_kspace(img, maps))
    data = read_kspace(path, image_shape=shape)
    top, left = (64 - shape[0]) // 2, (48 - shape[1]) // 2
    crop = img[..., top:top + shape[0], left:left + shape[1]]
    assert data.cropped and data.kspace.shape[-2:] == shape
    torch.testing.assert_close(data.truth, crop / crop.max(), rtol=0, atol=1e-5)
    if coils == 1:
        expected = _two_channel(torch.from_numpy(_fastmri_fft(crop[:, 0].numpy() / crop.max().item())))
        torch.testing.assert_close(data.kspace, expected, rtol=0, atol=1e-5)
    same = read_kspace(path, image_shape=(64, 48))
    assert not same.cropped and torch.equal(same.kspace, read_kspace(path).kspace)
    with pytest.raises(DataError, match="big.h5.*smaller than image_shape 80x48"):
        read_kspace(path, image_shape=(80, 48))


def test_blank_slices_dropped_with_warning(tmp_path, caplog):
    img, _ = _phantom(3, 16, 16)
    k = simulate_kspace(img)
    k[1] = 0
    with caplog.at_level(logging.WARNING, logger="medgen.recon.fastmri"):
        data = read_kspace(write_fastmri_h5(tmp_path / "blank.h5", k))
    assert data.slices == [0, 2] and data.kspace.shape[0] == 2 and data.scale.shape == (2,)
    torch.testing.assert_close(data.truth, img[[0, 2]] / img[[0, 2]].amax(dim=(1, 2, 3), keepdim=True), rtol=0, atol=1e-5)
    assert "blank" in caplog.text and "[1]" in caplog.text
    with pytest.raises(DataError, match="blank.h5.*blank"):
        read_kspace(tmp_path / "blank.h5", slices=[1])


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


def _good(shape=(2, 8, 8)) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(shape) + 1j).astype(np.complex64)


@pytest.mark.parametrize("case, message", [
    ("not_hdf5", "not a readable HDF5 file"),
    ("missing", "does not exist"),
    ("no_kspace", "no 'kspace' dataset.*found: extra/recon, image"),
    ("real", "float32, not complex"),
    ("ndim", r"shape \(8, 8\)"),
    ("nan", "slice 1 of 'kspace' contains NaN"),
    ("out_of_range", r"\[5\] out of range; the file has 2 slice"),
    ("undersampled", "undersampled"),
])
def test_read_kspace_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / f"case_{case}.h5"
    slices = None
    if case == "not_hdf5":
        path.write_text("not hdf5")
    elif case == "no_kspace":
        _write(path, image=np.zeros((2, 8, 8)), **{"extra/recon": np.zeros(3)})
    elif case == "real":
        _write(path, kspace=np.zeros((2, 8, 8), np.float32))
    elif case == "ndim":
        _write(path, kspace=_good((8, 8)))
    elif case == "nan":
        k = _good()
        k[1, 3, 3] = np.nan
        _write(path, kspace=k)
    elif case == "out_of_range":
        _write(path, kspace=_good())
        slices = [0, 5]
    elif case == "undersampled":
        write_fastmri_h5(path, _good(), mask=np.array([1, 0, 1, 1, 0, 1, 1, 1], bool))
    with pytest.raises(DataError, match=message) as err:
        read_kspace(path, slices=slices)
    assert path.name in str(err.value)


def test_read_kspace_option_and_dependency_errors(tmp_path, monkeypatch):
    path = write_fastmri_h5(tmp_path / "ok.h5", _good())
    assert read_kspace(path, slices=[1]).slices == [1]
    with pytest.raises(ConfigError, match="no slices selected"):
        read_kspace(path, slices=[])
    with pytest.raises(ConfigError, match="image_shape"):
        read_kspace(path, image_shape=(0, 8))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match="ok.h5.*pip install h5py"):
        read_kspace(path)


def test_write_fastmri_h5_layout(tmp_path):
    rec = np.random.default_rng(1).random((2, 8, 8)).astype(np.float32)
    single = write_fastmri_h5(tmp_path / "a" / "s.h5", _good(), reconstruction=rec, mask=np.ones(8, bool),
                              attrs={"acquisition": "CORPD_FBK"})
    multi = write_fastmri_h5(tmp_path / "m.h5", _good((2, 3, 8, 8)), reconstruction=rec)
    with h5py.File(single) as f:
        assert f["kspace"].dtype == np.complex64 and "reconstruction_esc" in f and f["mask"].shape == (8,)
        assert f.attrs["acquisition"] == "CORPD_FBK" and f.attrs["max"] == pytest.approx(rec.max())
        assert f.attrs["norm"] == pytest.approx(np.linalg.norm(rec.ravel()))
    with h5py.File(multi) as f:
        assert f["kspace"].shape == (2, 3, 8, 8) and "reconstruction_rss" in f and "reconstruction_esc" not in f
    assert read_kspace(single).kspace.shape == (2, 2, 8, 8)  # an all-ones mask is fully sampled
    with pytest.raises(DataError, match="bad.h5.*complex"):
        write_fastmri_h5(tmp_path / "bad.h5", np.zeros((2, 8, 8)))


def test_import_is_light():
    """`import medgen.recon.fastmri` loads neither h5py nor sigpy."""
    code = "import sys, medgen.recon.fastmri; print(sorted(m for m in ('h5py', 'sigpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- coil maps


def test_estimate_coil_maps_errors(monkeypatch):
    k = torch.zeros(1, 2, 4, 16, 16)
    for width in (6, 17):
        with pytest.raises(ConfigError, match=f"calib_width={width}.*16x16"):
            estimate_coil_maps(k, calib_width=width)
    with pytest.raises(ConfigError, match="multi-coil"):
        estimate_coil_maps(torch.zeros(1, 2, 16, 16))
    monkeypatch.setitem(sys.modules, "sigpy.mri.app", None)
    with pytest.raises(ConfigError, match="pip install sigpy"):
        estimate_coil_maps(k)


def test_read_coil_maps(tmp_path):
    maps = birdcage_maps(3, (8, 10)).numpy()
    per_slice = np.stack([maps, maps * 1j])
    _write(tmp_path / "maps.h5", coil_maps=maps)
    _write(tmp_path / "sens.h5", sens_maps=per_slice)
    np.save(tmp_path / "maps.npy", per_slice)
    torch.testing.assert_close(read_coil_maps(tmp_path / "maps.h5", 2, 3, (8, 10)), torch.from_numpy(np.stack([maps, maps])))
    for name in ("sens.h5", "maps.npy"):
        out = read_coil_maps(tmp_path / name, 2, 3, (8, 10))
        assert out.dtype == torch.complex64
        torch.testing.assert_close(out, torch.from_numpy(per_slice))
    with pytest.raises(DataError, match=r"maps.h5: coil maps have shape \(3, 8, 10\); expected \(4, 8, 10\)"):
        read_coil_maps(tmp_path / "maps.h5", 2, 4, (8, 10))
    with pytest.raises(DataError, match=r"maps.npy: coil maps have shape \(2, 3, 8, 10\)"):
        read_coil_maps(tmp_path / "maps.npy", 3, 3, (8, 10))
    per_slice[1, 0, 0, 0] = np.inf
    np.save(tmp_path / "inf.npy", per_slice)
    with pytest.raises(DataError, match="inf.npy.*NaN or inf"):
        read_coil_maps(tmp_path / "inf.npy", 2, 3, (8, 10))
    _write(tmp_path / "other.h5", kspace=_good())
    with pytest.raises(DataError, match="other.h5 has no 'coil_maps' or 'sens_maps' dataset.*found: kspace"):
        read_coil_maps(tmp_path / "other.h5", 2, 3, (8, 10))


# ----------------------------------------------------------------------------- masks


def test_read_mask_formats(tmp_path):
    H, W = 6, 8
    cols = [0, 3, 4, 7]
    expected = torch.zeros(H, W)
    expected[:, cols] = 1
    line = expected[0].numpy()
    np.save(tmp_path / "cols.npy", line.astype(bool))
    np.save(tmp_path / "full.npy", expected.numpy())
    (tmp_path / "idx.json").write_text(json.dumps(cols))
    (tmp_path / "bits.json").write_text(json.dumps(line.astype(int).tolist()))
    _write(tmp_path / "m.h5", mask=line.astype(bool))
    for name in ("cols.npy", "full.npy", "idx.json", "bits.json", "m.h5"):
        mask = read_mask(tmp_path / name, (H, W))
        assert mask.dtype == torch.float32 and torch.equal(mask, expected), name


@pytest.mark.parametrize("name, content, message", [
    ("half.npy", np.full(8, 0.5), r"must be 0 or 1, found \[0.5\]"),
    ("two.npy", np.array([0, 2, 1, 0, 0, 0, 0, 0]), r"must be 0 or 1, found \[2.0\]"),
    ("empty.npy", np.zeros(8), "samples nothing"),
    ("short.npy", np.ones(7), r"shape \(7,\); expected \(8,\)"),
    ("obj.npy", np.array([1, "a"], dtype=object), "not a readable .npy"),
    ("far.json", [0, 9], r"\[9\] are not column indices 0 to 7"),
    ("dict.json", {"columns": [1]}, "expected a JSON list"),
    ("none.h5", None, "no 'mask' dataset"),
    ("mask.txt", "1 0 1", "unsupported file type .txt"),
])
def test_read_mask_rejects_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, content, allow_pickle=True)
    elif name.endswith(".json"):
        path.write_text(json.dumps(content))
    elif name.endswith(".h5"):
        _write(path, kspace=_good())
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_mask(path, (6, 8))
    assert name in str(err.value)


# ----------------------------------------------------------------------------- measurement noise


def test_add_measurement_noise():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(128, 128)
    mask[:, ::2] = 1
    y = apply_mask(torch.randn(3, 2, 4, 128, 128, generator=g), mask)
    sigma = 0.05
    noisy = add_measurement_noise(y, mask, sigma, torch.Generator().manual_seed(1))
    measured = mask.bool().expand_as(y)
    noise = (noisy - y)[measured]
    assert abs(noise.std().item() / sigma - 1) < 0.05 and abs(noise.mean().item()) < 0.01 * sigma
    assert torch.all(noisy[~measured] == 0)
    torch.testing.assert_close(noisy, add_measurement_noise(y, mask, sigma, torch.Generator().manual_seed(1)))
    assert torch.equal(add_measurement_noise(y, mask, 0.0), y)
    single = add_measurement_noise(y[:, :, 0], mask, sigma)  # single-coil (B, 2, H, W)
    assert torch.all(single[~measured[:, :, 0]] == 0) and not torch.equal(single, y[:, :, 0])
    for bad in (-0.1, float("nan")):
        with pytest.raises(ConfigError, match="sigma"):
            add_measurement_noise(y, mask, bad)
