"""Image-quality metrics for the MGDN tasks, in JAX.

Two families, with different input conventions:

Reference metrics (HDR, GDSR, supervised fusion) compare a prediction with its ground truth.
They take float images (H, W, C) and return a scalar, or batches (B, H, W, C) and return (B,),
one value per image (averaging over images is left to the caller):
`psnr`, `ssim`, `psnr_mu`, `ssim_mu`, `psnr_l`, `ssim_l`, `depth_rmse_cm`.

Fusion metrics (no ground truth; MFF / MEF) follow the convention of the widely used fusion
toolkits, recorded in `FUSION_METRIC_CONVENTION`: every image is first turned into one 8-bit grey
plane by `to_grey_255` (clip to [0, 1], ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B, scale to
0..255, round to the nearest integer, as if the saved 8-bit image were read back as grey). The
individual fusion metrics take such (H, W) grey planes on the 0..255 scale; `fusion_metrics`
takes the (H, W, C) images in [0, 1] (C = 1 or 3) and does the conversion itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
MU = 5000.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
HDR_SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
GDSR_BORDER = 6

# Xydeas & Petrovic (2000) constants of the edge-preservation sigmoids.
QABF_GAMMA_G, QABF_KAPPA_G, QABF_SIGMA_G = 0.9994, -15.0, 0.5
QABF_GAMMA_A, QABF_KAPPA_A, QABF_SIGMA_A = 0.9879, -22.0, 0.8
QABF_L = 1.0

# Ma, Zeng & Wang (2015), as their MATLAB release computes it: the largest structure exponent
# p, the offset added to patch strengths, the float64 machine epsilon that keeps the consistency
# ratio and the structure weights defined, and the three-scale weights (the first three MS-SSIM
# weights, renormalised to sum to 1).
MEF_SSIM_P_MAX = 10.0
MEF_SSIM_STRENGTH_OFFSET = 1e-3
MEF_SSIM_EPS = float(np.finfo(np.float64).eps)
MEF_SSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001)

# Sheikh & Bovik pixel-domain VIF: HVS noise variance (for 0..255 data) and number of scales.
VIF_SIGMA_NSQ = 2.0
VIF_SCALES = 4

# The no-reference fusion metrics, in the order `fusion_metrics` returns them.
FUSION_METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "MEF-SSIM")

FUSION_METRIC_CONVENTION: dict[str, str | int | float] = {
    "grey": "ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B of the image clipped to [0, 1]",
    "range": "0..255",
    "rounding": "round to nearest integer (half to even) after scaling to 0..255",
    "log_base": 2,
    "histogram_bins": 256,
    "SD": "population standard deviation (ddof 0)",
    "SF": "sqrt(RF^2 + CF^2), RF / CF = RMS of horizontal / vertical first differences",
    "AG": "mean over (H-1)(W-1) of sqrt((dx^2 + dy^2) / 2), forward differences",
    "MI": "MI(F, A) + MI(F, B) from 256x256 joint histograms",
    "SCD": "corr(F - B, A) + corr(F - A, B) (Aslantas & Bendes 2015); 0 for a constant term",
    "Qabf": "Xydeas-Petrovic 2000, 3x3 Sobel with zero padding, L = 1; 0 if no edges at all",
    "VIF": "multi-scale pixel-domain VIF (Sheikh & Bovik 2006), vifp(A, F) + vifp(B, F)",
    "MEF-SSIM": (
        "Ma, Zeng & Wang 2015 as in their MATLAB release: 11x11 patches (valid), decomposed with "
        "a box window, p = tan(pi R / 2) <= 10 from the structural consistency R, compared with "
        "an 11x11 Gaussian window sigma 1.5, C = (0.03*255)^2; 3 scales (2x2 means, an odd last "
        "row / column mirrored) combined as prod Q_l^w_l, w = 0.0448/0.2856/0.3001 renormalised"
    ),
}


# ----------------------------------------------------------------------------- helpers


def _batched(x: jax.Array) -> tuple[jax.Array, bool]:
    """(H, W, C) -> ((1, H, W, C), False); (B, H, W, C) -> (itself, True)."""
    x = jnp.asarray(x)
    if x.ndim == 3:
        return x[None], False
    if x.ndim == 4:
        return x, True
    raise ValueError(f"expected an image (H, W, C) or a batch (B, H, W, C), got shape {x.shape}")


def _pair(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
    p, batched = _batched(pred)
    t, _ = _batched(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
    return p.astype(jnp.float32), t.astype(jnp.float32), batched


def _planes(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B * C, H, W), image-major."""
    b, h, w, c = x.shape
    return x.transpose(0, 3, 1, 2).reshape(b * c, h, w)


def _unbatch(values: jax.Array, batched: bool) -> jax.Array:
    return values if batched else values[0]


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """(size,) normalised 1-D Gaussian taps exp(-x^2 / (2 sigma^2)), x centred on the window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable 'valid' correlation of (..., H, W) planes with the outer product of 1-D taps.

    Returns (..., H - k + 1, W - k + 1), k = len(taps). A loop of k shifted multiply-adds per
    axis: on CPU several times faster than a one-channel convolution, and quick to compile.
    """
    k = len(taps)
    t = jnp.asarray(taps, x.dtype)

    def along(y: jax.Array, axis: int) -> jax.Array:
        n = y.shape[axis] - k + 1
        out = jnp.zeros((*y.shape[:axis], n, *y.shape[axis + 1 :]), y.dtype)
        return jax.lax.fori_loop(
            0, k, lambda i, acc: acc + t[i] * jax.lax.dynamic_slice_in_dim(y, i, n, axis), out
        )

    return along(along(x, x.ndim - 2), x.ndim - 1)


def _check_window(shape: tuple[int, ...], size: int, what: str) -> None:
    if min(shape) < size:
        raise ValueError(f"{what} needs images of at least {size}x{size}, got {shape}")


# ----------------------------------------------------------------------------- reference


def mu_law(x: jax.Array, mu: float = MU) -> jax.Array:
    """mu-law tone mapping T(x) = log(1 + mu x) / log(1 + mu) of linear HDR values in [0, 1]."""
    return jnp.log1p(mu * x) / math.log1p(mu)


def psnr(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """PSNR = 10 log10(data_range^2 / MSE) in dB over all pixels and channels of each image.

    pred, target: (H, W, C) -> scalar or (B, H, W, C) -> (B,). Identical images give +inf.
    """
    p, t, batched = _pair(pred, target)
    mse = jnp.mean((p - t) ** 2, axis=(1, 2, 3))
    value = 10.0 * jnp.log10(data_range**2 / jnp.where(mse > 0, mse, 1.0))
    return _unbatch(jnp.where(mse > 0, value, jnp.inf), batched)


# SSIM windows: (1-D taps of the separable window, the factor turning the window's population
# (co)variances into the ones SSIM uses). "gaussian": Wang et al.'s 11x11 Gaussian (sigma 1.5),
# population statistics; "uniform": scikit-image's default 7x7 box with sample (co)variances,
# what the release's HDR evaluation calls.
SSIM_WINDOWS: dict[str, tuple[np.ndarray, float]] = {
    "gaussian": (gaussian_window(SSIM_WINDOW, SSIM_SIGMA), 1.0),
    "uniform": (np.full(HDR_SSIM_WINDOW, 1.0 / HDR_SSIM_WINDOW, np.float32), 49.0 / 48.0),
}


def ssim_map(x: jax.Array, y: jax.Array, data_range: float, window: str = "gaussian") -> jax.Array:
    """SSIM index map (Wang et al. 2004) of (N, H, W) planes with a `SSIM_WINDOWS` window
    (k x k), K1 = 0.01, K2 = 0.03; only windows fully inside the image: (N, H - k + 1, W - k + 1).
    """
    taps, covariance_scale = SSIM_WINDOWS[window]
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mx, my = filter_valid(x, taps), filter_valid(y, taps)
    vx = covariance_scale * (filter_valid(x * x, taps) - mx * mx)
    vy = covariance_scale * (filter_valid(y * y, taps) - my * my)
    cxy = covariance_scale * (filter_valid(x * y, taps) - mx * my)
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return num / den


def ssim(
    pred: jax.Array, target: jax.Array, data_range: float = 1.0, window: str = "gaussian"
) -> jax.Array:
    """Mean SSIM, channels averaged; matches scikit-image's `structural_similarity(...,
    channel_axis=-1)` with gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    (window "gaussian"), or with its defaults (window "uniform").

    pred, target: (H, W, C) -> scalar or (B, H, W, C) -> (B,); H, W >= the window. Differentiable.
    """
    p, t, batched = _pair(pred, target)
    b, h, w, _ = p.shape
    _check_window((h, w), len(SSIM_WINDOWS[window][0]), "SSIM")
    values = ssim_map(_planes(p), _planes(t), data_range, window).reshape(b, -1).mean(axis=1)
    return _unbatch(values, batched)


def psnr_mu(pred: jax.Array, target: jax.Array, mu: float = MU) -> jax.Array:
    """PSNR of the mu-law tone-mapped linear HDR images (values in [0, 1]); shapes as `psnr`."""
    return psnr(mu_law(pred, mu), mu_law(target, mu), 1.0)


def ssim_mu(pred: jax.Array, target: jax.Array, mu: float = MU) -> jax.Array:
    """SSIM of the mu-law tone-mapped linear HDR images (values in [0, 1]) as the release
    computes it (window "uniform"); shapes as `ssim`."""
    return ssim(mu_law(pred, mu), mu_law(target, mu), 1.0, "uniform")


def psnr_l(pred: jax.Array, target: jax.Array) -> jax.Array:
    """PSNR of the linear HDR images, data range 1; shapes as `psnr`."""
    return psnr(pred, target, 1.0)


def ssim_l(pred: jax.Array, target: jax.Array) -> jax.Array:
    """SSIM of the linear HDR images, data range 1, as the release computes it (window
    "uniform"); shapes as `ssim`."""
    return ssim(pred, target, 1.0, "uniform")


def depth_rmse_cm(pred: jax.Array, target: jax.Array, border: int = GDSR_BORDER) -> jax.Array:
    """GDSR RMSE in centimetres: depths in metres, `border` pixels cropped on every side,
    sqrt(mean((100 pred - 100 gt)^2)).

    pred, target: (H, W, 1) -> scalar or (B, H, W, 1) -> (B,).
    """
    p, t, batched = _pair(pred, target)
    h, w = p.shape[1:3]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"a {h}x{w} depth map has nothing left after a {border}-pixel crop")
    d = 100.0 * (p - t)[:, border : h - border, border : w - border, :]
    return _unbatch(jnp.sqrt(jnp.mean(d * d, axis=(1, 2, 3))), batched)


# ----------------------------------------------------------------------------- fusion


def to_grey_255(image: jax.Array) -> jax.Array:
    """(H, W), (H, W, 1) or (H, W, 3) image in [0, 1] -> (H, W) float32 grey, integers 0..255,
    by `FUSION_METRIC_CONVENTION`."""
    x = jnp.clip(jnp.asarray(image, jnp.float32), 0.0, 1.0)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    elif x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim != 2:
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got {x.shape}")
    return jnp.round(255.0 * x)


def _levels(x: jax.Array) -> jax.Array:
    """Grey values -> integer histogram bins 0..255."""
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)


def _entropy_bits(counts: jax.Array) -> jax.Array:
    """-sum p log2 p of a histogram (empty bins contribute 0)."""
    p = counts / jnp.sum(counts)
    return jnp.sum(jax.scipy.special.xlogy(p, 1.0 / jnp.where(p > 0, p, 1.0))) / math.log(2.0)


def entropy(fused: jax.Array) -> jax.Array:
    """EN = -sum_i p_i log2 p_i over the 256-bin grey histogram of an (H, W) 0..255 plane."""
    counts = jnp.zeros(256, jnp.float32).at[_levels(fused).ravel()].add(1.0)
    return _entropy_bits(counts)


def standard_deviation(fused: jax.Array) -> jax.Array:
    """SD = sqrt(mean((F - mean F)^2)) of an (H, W) plane (population, ddof 0)."""
    return jnp.std(jnp.asarray(fused, jnp.float32))


def spatial_frequency(fused: jax.Array) -> jax.Array:
    """SF = sqrt(RF^2 + CF^2): RF^2 = mean of (F[i, j] - F[i, j-1])^2 over the H x (W-1)
    horizontal differences, CF^2 likewise over the (H-1) x W vertical ones. (H, W) plane."""
    f = jnp.asarray(fused, jnp.float32)
    rf2 = jnp.mean((f[:, 1:] - f[:, :-1]) ** 2)
    cf2 = jnp.mean((f[1:, :] - f[:-1, :]) ** 2)
    return jnp.sqrt(rf2 + cf2)


def average_gradient(fused: jax.Array) -> jax.Array:
    """AG = mean over i < H-1, j < W-1 of sqrt(((F[i+1, j] - F[i, j])^2 + (F[i, j+1] -
    F[i, j])^2) / 2). (H, W) plane."""
    f = jnp.asarray(fused, jnp.float32)
    dy = f[1:, :-1] - f[:-1, :-1]
    dx = f[:-1, 1:] - f[:-1, :-1]
    return jnp.mean(jnp.sqrt((dx * dx + dy * dy) / 2.0))


def _mutual_information(x: jax.Array, y: jax.Array) -> jax.Array:
    """MI(X, Y) = H(X) + H(Y) - H(X, Y) in bits from the 256x256 joint grey histogram."""
    joint = jnp.zeros(256 * 256, jnp.float32).at[(_levels(x) * 256 + _levels(y)).ravel()].add(1.0)
    joint = joint.reshape(256, 256)
    return (
        _entropy_bits(joint.sum(axis=1)) + _entropy_bits(joint.sum(axis=0)) - _entropy_bits(joint)
    )


def mutual_information(fused: jax.Array, sources: Sequence[jax.Array]) -> jax.Array:
    """MI = sum_k MI(F, S_k), each from the 256-bin joint histogram, log2. (H, W) planes."""
    return sum(_mutual_information(fused, s) for s in sources)


def _correlation(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlation of two planes; 0 when either is constant."""
    xc = x - jnp.mean(x)
    yc = y - jnp.mean(y)
    den = jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc))
    return jnp.where(den > 0, jnp.sum(xc * yc) / jnp.where(den > 0, den, 1.0), 0.0)


def scd(fused: jax.Array, source_a: jax.Array, source_b: jax.Array) -> jax.Array:
    """SCD = r(F - B, A) + r(F - A, B), r the Pearson correlation (Aslantas & Bendes 2015).

    (H, W) planes; a constant difference (e.g. F = B) contributes 0.
    """
    f, a, b = (jnp.asarray(v, jnp.float32) for v in (fused, source_a, source_b))
    return _correlation(f - b, a) + _correlation(f - a, b)


def _sobel(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """3x3 Sobel responses (horizontal, vertical) of an (H, W) plane, zero padding, same size."""
    sx = jnp.asarray([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    kernel = jnp.stack([sx, sx.T], axis=-1)[:, :, None, :]
    out = jax.lax.conv_general_dilated(
        x[None, :, :, None],
        kernel,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=dn,
        precision=HIGHEST,
    )[0]
    return out[..., 0], out[..., 1]


def _edge_strength_orientation(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """g = sqrt(sx^2 + sy^2) and alpha = atan(sy / sx) (pi/2 where sx = 0)."""
    gx, gy = _sobel(x)
    g = jnp.sqrt(gx * gx + gy * gy)
    alpha = jnp.where(gx == 0, math.pi / 2, jnp.arctan(gy / jnp.where(gx == 0, 1.0, gx)))
    return g, alpha


def _edge_preservation(g_s: jax.Array, a_s: jax.Array, g_f: jax.Array, a_f: jax.Array) -> jax.Array:
    """Q^{SF} = Q_g Q_alpha of Xydeas & Petrovic; G = min(g_s, g_f) / max(g_s, g_f) (1 if equal)."""
    hi = jnp.maximum(g_s, g_f)
    rel_g = jnp.where(hi > 0, jnp.minimum(g_s, g_f) / jnp.where(hi > 0, hi, 1.0), 1.0)
    rel_a = 1.0 - jnp.abs(a_s - a_f) / (math.pi / 2)
    q_g = QABF_GAMMA_G / (1.0 + jnp.exp(QABF_KAPPA_G * (rel_g - QABF_SIGMA_G)))
    q_a = QABF_GAMMA_A / (1.0 + jnp.exp(QABF_KAPPA_A * (rel_a - QABF_SIGMA_A)))
    return q_g * q_a


def qabf(fused: jax.Array, source_a: jax.Array, source_b: jax.Array) -> jax.Array:
    """Q^{AB/F} = sum(Q^{AF} w_A + Q^{BF} w_B) / sum(w_A + w_B), w = g^L (Xydeas & Petrovic
    2000); (H, W) planes; 0 when neither source has any edge."""
    g_f, a_f = _edge_strength_orientation(jnp.asarray(fused, jnp.float32))
    num = jnp.zeros(())
    den = jnp.zeros(())
    for s in (source_a, source_b):
        g_s, a_s = _edge_strength_orientation(jnp.asarray(s, jnp.float32))
        w = g_s**QABF_L
        num = num + jnp.sum(_edge_preservation(g_s, a_s, g_f, a_f) * w)
        den = den + jnp.sum(w)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _mef_ssim_scale(fused: jax.Array, sources: jax.Array, c: float) -> jax.Array:
    """Mean local MEF-SSIM at one scale; fused (H, W), sources (K, H, W), each mean-centred.

    In every 11x11 patch (n = 121 pixels) source k is x~_k = x_k - (box mean), with strength
    e_k = ||x~_k|| + 1e-3. The structural consistency R = ||sum_k x~_k|| / sum_k ||x~_k|| sets
    the exponent p = tan(pi R / 2) (at most 10); the weights w_k = (e_k / 11)^p + eps, normalised,
    give the structure r = sum_k w_k x~_k / e_k, and the desired patch is x^ = max_k e_k r / ||r||
    (0 where r = 0). It is compared with the fused patch y by
    S = (2 sigma_{x^ y} + C) / (sigma_x^^2 + sigma_y^2 + C), statistics under the Gaussian window.
    As x^ = lambda sum_k a_k x~_k (a_k = w_k / e_k), local box and Gaussian covariances suffice.
    """
    n = SSIM_WINDOW**2
    k = sources.shape[0]
    products = jnp.stack([sources[i] * sources[j] for i in range(k) for j in range(k)])

    def covariances(taps: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """(K, H', W') local means and (K, K, H', W') local covariances of the sources."""
        mu = filter_valid(sources, taps)
        cov = filter_valid(products, taps) - (mu[:, None] * mu[None, :]).reshape(
            k * k, *mu.shape[1:]
        )
        return mu, cov.reshape(k, k, *mu.shape[1:])

    _, box_cov = covariances(np.full(SSIM_WINDOW, 1.0 / SSIM_WINDOW, np.float32))
    norms = jnp.sqrt(n * jnp.maximum(jnp.moveaxis(jnp.diagonal(box_cov), -1, 0), 0.0))
    sum_norm = jnp.sqrt(n * jnp.maximum(jnp.sum(box_cov, axis=(0, 1)), 0.0))
    consistency = (sum_norm + MEF_SSIM_EPS) / (jnp.sum(norms, axis=0) + MEF_SSIM_EPS)
    # tan(pi R / 2) reaches the cap below R = 1, where float32 tan turns large and negative.
    r_cap = 2 / math.pi * math.atan(MEF_SSIM_P_MAX)
    p = jnp.tan(math.pi / 2 * jnp.minimum(consistency, r_cap))
    strength = norms + MEF_SSIM_STRENGTH_OFFSET
    w = (strength / SSIM_WINDOW) ** p + MEF_SSIM_EPS
    a = w / jnp.sum(w, axis=0) / strength
    r_norm = jnp.sqrt(n * jnp.einsum("jhw,khw,jkhw->hw", a, a, box_cov, precision=HIGHEST))
    scale = jnp.max(strength, axis=0) / jnp.where(r_norm > 0, r_norm, jnp.inf)

    taps = gaussian_window(SSIM_WINDOW, SSIM_SIGMA)
    mu, cov = covariances(taps)
    mu_y = filter_valid(fused[None], taps)[0]
    var_y = jnp.maximum(filter_valid(fused[None] ** 2, taps)[0] - mu_y**2, 0.0)
    cov_y = filter_valid(sources * fused[None], taps) - mu * mu_y[None]
    x_quad = jnp.einsum("jhw,khw,jkhw->hw", a, a, cov, precision=HIGHEST)
    var_x = scale**2 * jnp.maximum(x_quad, 0.0)
    cov_xy = scale * jnp.sum(a * cov_y, axis=0)
    return jnp.mean((2 * cov_xy + c) / (var_x + var_y + c))


def _halve(x: jax.Array) -> jax.Array:
    """(..., H, W) -> (..., ceil(H / 2), ceil(W / 2)): means of 2x2 blocks at even offsets, an odd
    last row / column averaged with its mirror image (itself), as MATLAB's
    imfilter(x, ones(2) / 4, 'symmetric') sampled at x(1:2:end, 1:2:end)."""
    x = jnp.pad(
        x, [(0, 0)] * (x.ndim - 2) + [(0, x.shape[-2] % 2), (0, x.shape[-1] % 2)], mode="symmetric"
    )
    return 0.25 * (
        x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]
    )


def mef_ssim(fused: jax.Array, sources: Sequence[jax.Array]) -> jax.Array:
    """MEF-SSIM (Ma, Zeng & Wang 2015): prod_l Q_l^{w_l} over 3 scales, Q_l the mean local score
    of `_mef_ssim_scale` with C = (0.03 * 255)^2 (each Q_l clipped at 0 first).

    fused and sources: (H, W) grey planes on the 0..255 scale (the release's constants assume
    it), H, W >= 44. Within 1e-6 of 1 when every source equals the fused image.
    """
    f = jnp.asarray(fused, jnp.float32)
    s = jnp.stack([jnp.asarray(x, jnp.float32) for x in sources])
    _check_window(tuple(d // 4 for d in f.shape), SSIM_WINDOW, "MEF-SSIM (3 scales)")
    c = (SSIM_K2 * 255.0) ** 2
    weights = np.asarray(MEF_SSIM_SCALE_WEIGHTS) / sum(MEF_SSIM_SCALE_WEIGHTS)
    f = f - jnp.mean(f)
    s = s - jnp.mean(s, axis=(1, 2), keepdims=True)
    score = jnp.ones(())
    for level, weight in enumerate(weights):
        if level:
            f, s = _halve(f), _halve(s)
        score = score * jnp.maximum(_mef_ssim_scale(f, s, c), 0.0) ** weight
    return score


def vifp(reference: jax.Array, distorted: jax.Array) -> jax.Array:
    """Multi-scale pixel-domain VIF (Sheikh & Bovik 2006) of (H, W) 0..255 planes.

    Scale s = 1..4 uses an N x N Gaussian window, N = 2^(5-s) + 1, sigma = N / 5; from scale 2
    on both images are first low-passed with that window ('valid') and subsampled by 2. With
    local (valid) moments, g = sigma_rd / sigma_r^2 and sigma_v^2 = sigma_d^2 - g sigma_rd
    (g = 0, sigma_v^2 = sigma_d^2 where sigma_r^2 < 1e-10 or g < 0; g = sigma_v^2 = 0 where
    sigma_d^2 < 1e-10; sigma_v^2 >= 1e-10):
        VIF = sum log10(1 + g^2 sigma_r^2 / (sigma_v^2 + 2)) / sum log10(1 + sigma_r^2 / 2),
    summed over all scales and positions; 0 if the denominator is 0 (a flat reference).
    """
    r = jnp.asarray(reference, jnp.float32)
    d = jnp.asarray(distorted, jnp.float32)
    r, d = r - jnp.mean(r), d - jnp.mean(d)
    eps = 1e-10
    num = jnp.zeros(())
    den = jnp.zeros(())
    for scale in range(1, VIF_SCALES + 1):
        n = 2 ** (VIF_SCALES - scale + 1) + 1
        taps = gaussian_window(n, n / 5.0)
        if scale > 1:
            r = filter_valid(r[None], taps)[0, ::2, ::2]
            d = filter_valid(d[None], taps)[0, ::2, ::2]
        _check_window(r.shape, n, "VIF (4 scales)")
        mu_r = filter_valid(r[None], taps)[0]
        mu_d = filter_valid(d[None], taps)[0]
        var_r = jnp.maximum(filter_valid(r[None] ** 2, taps)[0] - mu_r**2, 0.0)
        var_d = jnp.maximum(filter_valid(d[None] ** 2, taps)[0] - mu_d**2, 0.0)
        cov = filter_valid((r * d)[None], taps)[0] - mu_r * mu_d
        g = cov / (var_r + eps)
        sv2 = var_d - g * cov
        flat_r = var_r < eps
        g = jnp.where(flat_r, 0.0, g)
        sv2 = jnp.where(flat_r, var_d, sv2)
        var_r = jnp.where(flat_r, 0.0, var_r)
        flat_d = var_d < eps
        g = jnp.where(flat_d, 0.0, g)
        sv2 = jnp.where(flat_d, 0.0, sv2)
        negative = g < 0
        sv2 = jnp.where(negative, var_d, sv2)
        g = jnp.where(negative, 0.0, g)
        sv2 = jnp.maximum(sv2, eps)
        num = num + jnp.sum(jnp.log10(1.0 + g * g * var_r / (sv2 + VIF_SIGMA_NSQ)))
        den = den + jnp.sum(jnp.log10(1.0 + var_r / VIF_SIGMA_NSQ))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def vif_f(fused: jax.Array, sources: Sequence[jax.Array]) -> jax.Array:
    """Fusion VIF: sum_k vifp(S_k, F), the multi-scale pixel-domain VIF with each source as the
    reference. (H, W) 0..255 planes."""
    return sum(vifp(s, fused) for s in sources)


@jax.jit
def _fusion_metrics_grey(f: jax.Array, a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
    return {
        "EN": entropy(f),
        "SD": standard_deviation(f),
        "SF": spatial_frequency(f),
        "AG": average_gradient(f),
        "MI": mutual_information(f, (a, b)),
        "SCD": scd(f, a, b),
        "VIF": vif_f(f, (a, b)),
        "Qabf": qabf(f, a, b),
        "MEF-SSIM": mef_ssim(f, (a, b)),
    }


def fusion_metrics(fused: jax.Array, sources: Sequence[jax.Array]) -> dict[str, float]:
    """All fusion metrics of one fused image against its two sources.

    fused, sources: (H, W, C) images in [0, 1], C = 1 or 3 (or (H, W) grey), H, W >= 44;
    converted to 0..255 grey by `FUSION_METRIC_CONVENTION`. Returns {name: Python float} in the
    order of `FUSION_METRIC_NAMES`.
    """
    if len(sources) != 2:
        raise ValueError(f"fusion metrics take two source images, got {len(sources)}")
    f, a, b = (to_grey_255(x) for x in (fused, *sources))
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"fused {f.shape} and sources {a.shape}, {b.shape} differ in size")
    values = _fusion_metrics_grey(f, a, b)
    return {k: float(values[k]) for k in FUSION_METRIC_NAMES}
