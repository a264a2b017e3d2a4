"""Metrics: PSNR / SSIM against scikit-image, every other metric against an independent float64
NumPy implementation of its published formula, and the limiting cases."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mgdn_jax import metrics

H, W = 48, 64


def _image(seed: int, shape: tuple[int, ...] = (H, W, 3)) -> np.ndarray:
    """A float32 image in [0, 1] with structure at several scales and some flat-ish regions."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random(shape), sigma=(3, 3, 0)[: len(shape)])
    x = (x - x.min()) / (x.max() - x.min())
    x = 0.8 * x + 0.2 * gaussian_filter(rng.random(shape), sigma=(0.7, 0.7, 0)[: len(shape)])
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def planes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fused, source A, source B) as (H, W) float64 grey planes with integer values 0..255."""
    a, b = _image(1), _image(2)
    f = np.clip(0.5 * (a + b) + 0.05 * np.random.default_rng(3).standard_normal(a.shape), 0, 1)
    return tuple(np.asarray(metrics.to_grey_255(x), np.float64) for x in (f, a, b))


# ----------------------------------------------------------------------------- float64 references


def _gaussian2d(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g = np.outer(g, g)
    return g / g.sum()


def _filter_valid64(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    windows = sliding_window_view(x, kernel.shape)
    return np.einsum("ijkl,kl->ij", windows, kernel)


def _entropy64(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def _mi64(x: np.ndarray, y: np.ndarray) -> float:
    joint = np.bincount((x.astype(int) * 256 + y.astype(int)).ravel(), minlength=65536)
    joint = joint.reshape(256, 256).astype(np.float64)
    return _entropy64(joint.sum(1)) + _entropy64(joint.sum(0)) - _entropy64(joint.ravel())


def _sobel64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(x, 1)
    h, w = x.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[dy : dy + h, dx : dx + w]

    gx = at(0, 2) + 2 * at(1, 2) + at(2, 2) - at(0, 0) - 2 * at(1, 0) - at(2, 0)
    gy = at(2, 0) + 2 * at(2, 1) + at(2, 2) - at(0, 0) - 2 * at(0, 1) - at(0, 2)
    return gx, gy


def _qabf64(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    def strength_angle(x):
        gx, gy = _sobel64(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            angle = np.where(gx == 0, np.pi / 2, np.arctan(gy / gx))
        return np.hypot(gx, gy), angle

    gf, af = strength_angle(f)
    num = den = 0.0
    for s in (a, b):
        gs, as_ = strength_angle(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(gs > gf, gf / gs, np.where(gs < gf, gs / gf, 1.0))
        alpha = 1 - np.abs(as_ - af) / (np.pi / 2)
        qg = 0.9994 / (1 + np.exp(-15 * (g - 0.5)))
        qa = 0.9879 / (1 + np.exp(-22 * (alpha - 0.8)))
        num += np.sum(qg * qa * gs)
        den += np.sum(gs)
    return num / den


def _vifp64(ref: np.ndarray, dist: np.ndarray) -> float:
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        k = _gaussian2d(n, n / 5)
        if scale > 1:
            ref = _filter_valid64(ref, k)[::2, ::2]
            dist = _filter_valid64(dist, k)[::2, ::2]
        mr, md = _filter_valid64(ref, k), _filter_valid64(dist, k)
        vr = _filter_valid64(ref * ref, k) - mr**2
        vd = _filter_valid64(dist * dist, k) - md**2
        cov = _filter_valid64(ref * dist, k) - mr * md
        vr, vd = np.maximum(vr, 0), np.maximum(vd, 0)
        g = cov / (vr + 1e-10)
        sv = vd - g * cov
        for i in np.ndindex(g.shape):
            if vr[i] < 1e-10:
                g[i], sv[i], vr[i] = 0.0, vd[i], 0.0
            if vd[i] < 1e-10:
                g[i], sv[i] = 0.0, 0.0
            if g[i] < 0:
                sv[i], g[i] = vd[i], 0.0
        sv = np.maximum(sv, 1e-10)
        num += np.sum(np.log10(1 + g * g * vr / (sv + 2)))
        den += np.sum(np.log10(1 + vr / 2))
    return num / den


def _mef_ssim_scale64(f: np.ndarray, sources: list[np.ndarray], c: float) -> float:
    """Ma, Zeng & Wang 2015 patch by patch, as their MATLAB release computes it: box-window
    decomposition, adaptive structure exponent, Gaussian-window comparison."""
    eps = np.finfo(np.float64).eps
    gauss = _gaussian2d(11, 1.5).ravel()
    y = sliding_window_view(f, (11, 11)).reshape(-1, 121)
    xs = np.stack([sliding_window_view(s, (11, 11)).reshape(-1, 121) for s in sources])
    centred = xs - xs.mean(axis=2, keepdims=True)  # (K, patches, 121)
    norms = np.linalg.norm(centred, axis=2)
    strength = norms + 1e-3
    consistency = (np.linalg.norm(centred.sum(axis=0), axis=1) + eps) / (norms.sum(axis=0) + eps)
    consistency = np.clip(consistency, eps, 1 - eps)
    p = np.minimum(np.tan(np.pi / 2 * consistency), 10.0)
    weights = (strength / 11) ** p + eps
    weights = weights / weights.sum(axis=0)
    structure = np.sum(weights[..., None] * centred / strength[..., None], axis=0)
    size = np.linalg.norm(structure, axis=1, keepdims=True)
    desired = (
        np.where(size > 0, structure / np.where(size > 0, size, 1), 0) * strength.max(0)[:, None]
    )

    def moments(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return gauss @ (u * v).T - (gauss @ u.T) * (gauss @ v.T)

    score = (2 * moments(desired, y) + c) / (moments(desired, desired) + moments(y, y) + c)
    return float(score.mean())


def _mef_ssim64(f: np.ndarray, sources: list[np.ndarray]) -> float:
    def halve(x):  # MATLAB imfilter(x, ones(2) / 4, 'symmetric')(1:2:end, 1:2:end)
        x = np.pad(x, ((0, x.shape[0] % 2), (0, x.shape[1] % 2)), mode="symmetric")
        return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])

    beta = np.array([0.0448, 0.2856, 0.3001])
    beta = beta / beta.sum()
    c = (0.03 * 255) ** 2
    total = 1.0
    for level in range(3):
        if level:
            f, sources = halve(f), [halve(s) for s in sources]
        total *= max(_mef_ssim_scale64(f, sources, c), 0.0) ** beta[level]
    return total


def _mu_law64(x: np.ndarray) -> np.ndarray:
    return np.log1p(5000 * x.astype(np.float64)) / np.log(5001)


# ----------------------------------------------------------------------------- reference metrics


@pytest.mark.parametrize("channels,data_range", [(3, 1.0), (1, 1.0), (3, 255.0)])
def test_psnr_and_ssim_match_scikit_image(channels, data_range):
    a = _image(4, (H, W, channels)) * data_range
    b = np.clip(a + 0.08 * data_range * np.random.default_rng(5).standard_normal(a.shape), 0, None)
    b = b.astype(np.float32)
    expected_psnr = peak_signal_noise_ratio(a, b, data_range=data_range)
    expected_ssim = structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=-1,
    )
    assert float(metrics.psnr(b, a, data_range)) == pytest.approx(expected_psnr, abs=1e-4)
    assert float(metrics.ssim(b, a, data_range)) == pytest.approx(expected_ssim, abs=1e-4)


def test_batched_reference_metrics_and_identical_images():
    a = np.stack([_image(6), _image(7)])
    b = a.copy()
    b[1] = np.clip(b[1] + 0.1, 0, 1)
    p = np.asarray(jax.jit(metrics.psnr)(b, a))
    s = np.asarray(jax.jit(metrics.ssim)(b, a))
    assert p.shape == s.shape == (2,)
    assert p[0] == np.inf and np.isfinite(p[1])
    assert s[0] == pytest.approx(1.0, abs=1e-6) and s[1] < 1.0
    single = float(metrics.ssim(b[1], a[1]))
    assert single == pytest.approx(float(s[1]), abs=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[0, :10], a[0, :10])


def test_hdr_metrics_on_tone_mapped_and_linear_values():
    t = _image(8) ** 2.2
    p = np.clip(t * 1.05 + 0.002, 0, 1).astype(np.float32)
    ssim_kw = dict(channel_axis=-1)  # the release's HDR SSIM: scikit-image's defaults
    pm, tm_ = _mu_law64(p), _mu_law64(t)
    assert float(metrics.psnr_mu(p, t)) == pytest.approx(
        peak_signal_noise_ratio(tm_, pm, data_range=1.0), abs=1e-4
    )
    assert float(metrics.ssim_mu(p, t)) == pytest.approx(
        structural_similarity(tm_, pm, data_range=1.0, **ssim_kw), abs=1e-4
    )
    assert float(metrics.psnr_l(p, t)) == pytest.approx(
        peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-4
    )
    assert float(metrics.ssim_l(p, t)) == pytest.approx(
        structural_similarity(t, p, data_range=1.0, **ssim_kw), abs=1e-4
    )


def test_depth_rmse_border_crop_and_centimetres():
    gt = 1.0 + _image(9, (30, 40, 1))
    border_only = gt.copy()
    border_only[:6] += 5.0
    border_only[:, -6:] -= 5.0
    assert float(metrics.depth_rmse_cm(border_only, gt)) == 0.0
    shifted = gt + 0.01  # 1 cm everywhere
    assert float(metrics.depth_rmse_cm(shifted, gt)) == pytest.approx(1.0, rel=1e-4)
    one = gt.copy()
    one[6, 6] += 0.1  # the first interior pixel, 10 cm off
    expected = math.sqrt(10.0**2 / ((30 - 12) * (40 - 12)))
    assert float(metrics.depth_rmse_cm(one, gt)) == pytest.approx(expected, rel=1e-4)
    noisy = gt + 0.02 * np.random.default_rng(10).standard_normal(gt.shape).astype(np.float32)
    d = 100 * (noisy.astype(np.float64) - gt)[6:-6, 6:-6]
    batch = metrics.depth_rmse_cm(np.stack([noisy, shifted]), np.stack([gt, gt]))
    np.testing.assert_allclose(np.asarray(batch), [np.sqrt(np.mean(d**2)), 1.0], rtol=1e-4)


# ----------------------------------------------------------------------------- fusion metrics


def test_to_grey_255_is_bt601_rounded():
    x = _image(11)
    expected = np.round(255 * (x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])))
    got = np.asarray(metrics.to_grey_255(x))
    assert got.shape == (H, W)
    assert np.mean(got != expected) < 1e-3 and np.max(np.abs(got - expected)) <= 1
    np.testing.assert_array_equal(
        np.asarray(metrics.to_grey_255(x[..., :1])), np.round(255 * x[..., 0])
    )


def test_simple_statistics_match_numpy(planes):
    f = planes[0]
    assert float(metrics.entropy(f)) == pytest.approx(
        _entropy64(np.bincount(f.astype(int).ravel(), minlength=256)), abs=1e-4
    )
    assert float(metrics.standard_deviation(f)) == pytest.approx(np.std(f), rel=1e-5)
    rf = np.sqrt(np.mean(np.diff(f, axis=1) ** 2))
    cf = np.sqrt(np.mean(np.diff(f, axis=0) ** 2))
    assert float(metrics.spatial_frequency(f)) == pytest.approx(np.hypot(rf, cf), rel=1e-5)
    dx = f[:-1, 1:] - f[:-1, :-1]
    dy = f[1:, :-1] - f[:-1, :-1]
    ag = np.mean(np.sqrt((dx**2 + dy**2) / 2))
    assert float(metrics.average_gradient(f)) == pytest.approx(ag, rel=1e-5)


def test_information_metrics_match_numpy(planes):
    f, a, b = planes
    mi = _mi64(f, a) + _mi64(f, b)
    assert float(metrics.mutual_information(f, (a, b))) == pytest.approx(mi, abs=1e-4)
    scd = (
        np.corrcoef((f - b).ravel(), a.ravel())[0, 1]
        + np.corrcoef((f - a).ravel(), b.ravel())[0, 1]
    )
    assert float(metrics.scd(f, a, b)) == pytest.approx(scd, abs=1e-5)


def test_qabf_matches_numpy(planes):
    f, a, b = planes
    assert float(jax.jit(metrics.qabf)(f, a, b)) == pytest.approx(_qabf64(f, a, b), abs=1e-5)


def test_vif_matches_numpy(planes):
    f, a, b = planes
    expected = _vifp64(a, f) + _vifp64(b, f)
    assert float(jax.jit(metrics.vif_f)(f, (a, b))) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("crop", [(48, 64), (45, 63)], ids=["even", "odd"])
def test_mef_ssim_matches_numpy_patch_decomposition(planes, crop):
    f, a, b = (x[: crop[0], : crop[1]] for x in planes)
    expected = _mef_ssim64(f, [a, b])
    assert 0.0 < expected < 1.0
    assert float(jax.jit(metrics.mef_ssim)(f, (a, b))) == pytest.approx(expected, abs=1e-5)


def test_fusion_metrics_limiting_cases():
    a = _image(12)
    self_fused = metrics.fusion_metrics(a, [a, a])
    assert set(self_fused) == {"EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "MEF-SSIM"}
    assert self_fused["MEF-SSIM"] == pytest.approx(1.0, abs=1e-5)
    assert self_fused["VIF"] == pytest.approx(2.0, abs=1e-5)  # vifp(A, A) = 1 per source
    assert self_fused["MI"] == pytest.approx(2 * self_fused["EN"], abs=1e-4)
    assert self_fused["SCD"] == 0.0  # F - A = F - B = 0: no correlation defined
    # Perfect edge transfer: G = A = 1 gives the product of the two sigmoids at 1, not 1.
    perfect = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert self_fused["Qabf"] == pytest.approx(perfect, abs=1e-5)

    flat = np.full((H, W, 3), 0.4, np.float32)
    constant = metrics.fusion_metrics(flat, [flat, flat])
    assert all(math.isfinite(v) for v in constant.values())
    for name in ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF"):
        assert constant[name] == 0.0, name
    assert constant["MEF-SSIM"] == pytest.approx(1.0)

    mixed = metrics.fusion_metrics(flat, [a, _image(13)])
    assert all(math.isfinite(v) for v in mixed.values())
    assert mixed["VIF"] == 0.0 and mixed["EN"] == 0.0


def test_fusion_metric_convention_and_input_checks():
    convention = metrics.FUSION_METRIC_CONVENTION
    assert convention["log_base"] == 2 and convention["histogram_bins"] == 256
    assert "0.299" in convention["grey"] and "VIF" in convention
    a = _image(14)
    with pytest.raises(ValueError, match="two source"):
        metrics.fusion_metrics(a, [a])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.mef_ssim(np.zeros((40, 64)), [np.zeros((40, 64))] * 2)
