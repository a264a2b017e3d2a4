"""Training losses of MGDN: the per-task reconstruction losses and the masked NMI redundancy loss.

All images are NHWC float arrays in [0, 1]; every loss is a scalar averaged over the batch.

Reconstruction terms (`reconstruction_loss`):
- 'hdr': L1 between the mu-law tone-mapped prediction and target, T(x) = log(1 + mu x) /
  log(1 + mu), mu = 5000.
- 'gdsr': L1 to the normalised ground-truth depth.
- 'mff' / 'mef' with a reference image: L1 or Charbonnier sqrt(d^2 + eps^2) (`cfg.pixel`).
- 'mff' / 'mef' without one, the usual unsupervised fusion objective
      w_int |F - max_k I_k|_1 + w_grad |S(F) - max_k S(I_k)|_1 + w_ssim (1 - mean_k SSIM(F, I_k)),
  with S the per-channel 3x3 Sobel gradient magnitude (replicate padding) and SSIM the Gaussian
  11x11 SSIM of `mgdn_jax.metrics.ssim` (images of at least 11x11).

Redundancy term (`nmi_loss`), added for every task with weight `cfg.nmi_lambda`: the normalised
mutual information between the MGDF-filtered feature maps of every pair of inputs, at every
stage, counted only on pixels outside the shared-structure mask, averaged over stages, pairs and
images. The mask (`structure_mask`) is 1 where EVERY input's grey Sobel magnitude exceeds
`cfg.nmi_threshold`; it is computed at the image size and reflect-padded bottom/right to the
window-padded feature size, as the model pads its inputs. See `masked_nmi` for the estimator.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mgdn_jax.layers import recomputed
from mgdn_jax.metrics import HIGHEST, mu_law, ssim
from mgdn_jax.variants import GDSR_RGB_MEAN, GDSR_RGB_STD

TASKS = ("mff", "mef", "hdr", "gdsr")
# sigmoid(1.702 z) is the logistic approximation of the standard normal CDF, so standardised,
# roughly Gaussian feature values spread evenly over (0, 1).
PROBIT_SCALE = 1.702
ENTROPY_EPS = 1e-10
VARIANCE_EPS = 1e-6
SOBEL_EPS = 1e-6


def default_loss_config() -> ml_collections.ConfigDict:
    """The loss hyper-parameters `task_loss` reads.

    pixel: 'l1' or 'charbonnier', the MFF/MEF loss against a reference image.
    charbonnier_eps: eps of the Charbonnier loss.
    mu: the mu-law constant of the HDR loss.
    w_intensity, w_gradient, w_ssim: weights of the unsupervised MFF/MEF terms.
    nmi_lambda: weight of the NMI redundancy loss (0 turns it off). The paper gives no value and
        the release ships neither this loss nor its fusion loss modules; 0.1 is this project's
        choice.
    nmi_bins: histogram bins over (0, 1); nmi_bandwidth: Gaussian kernel sigma in the same
        units (default a quarter of a bin).
    nmi_threshold: Sobel-magnitude threshold (grey in [0, 1], unnormalised 3x3 Sobel, whose
        largest value is 4 sqrt(2)) above which a pixel is an edge of one input.
    """
    cfg = ml_collections.ConfigDict()
    cfg.pixel = "l1"
    cfg.charbonnier_eps = 1e-3
    cfg.mu = 5000.0
    cfg.w_intensity = 1.0
    cfg.w_gradient = 1.0
    cfg.w_ssim = 1.0
    cfg.nmi_lambda = 0.1
    cfg.nmi_bins = 32
    cfg.nmi_bandwidth = 0.25 / 32
    cfg.nmi_threshold = 0.1
    return cfg


# ----------------------------------------------------------------------------- pixel losses


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """mean |pred - target| over all elements."""
    return jnp.mean(jnp.abs(pred - target))


def charbonnier_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-3) -> jax.Array:
    """mean sqrt((pred - target)^2 + eps^2) over all elements."""
    return jnp.mean(jnp.sqrt((pred - target) ** 2 + eps**2))


def hdr_loss(pred: jax.Array, target: jax.Array, mu: float = 5000.0) -> jax.Array:
    """L1 between the mu-law tone-mapped linear HDR prediction and target (values in [0, 1])."""
    return l1_loss(mu_law(pred, mu), mu_law(target, mu))


def grey(x: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, H, W, 1) BT.601 luma 0.299 R + 0.587 G + 0.114 B; 1 channel: itself."""
    if x.shape[-1] == 1:
        return x
    return 0.299 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def sobel_magnitude(x: jax.Array) -> jax.Array:
    """Per-channel 3x3 Sobel magnitude sqrt(gx^2 + gy^2 + 1e-12), replicate padding.

    (B, H, W, C) -> (B, H, W, C); the 1e-12 keeps the gradient finite on flat regions.
    """
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")

    def at(dy: int, dx: int) -> jax.Array:
        return xp[:, dy : dy + h, dx : dx + w, :]

    gx = at(0, 2) + 2 * at(1, 2) + at(2, 2) - at(0, 0) - 2 * at(1, 0) - at(2, 0)
    gy = at(2, 0) + 2 * at(2, 1) + at(2, 2) - at(0, 0) - 2 * at(0, 1) - at(0, 2)
    return jnp.sqrt(gx * gx + gy * gy + SOBEL_EPS**2)


def unsupervised_fusion_loss(
    output: jax.Array, inputs: list[jax.Array], cfg: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reference-free MFF/MEF objective (see the module docstring).

    output and inputs: (B, H, W, C), H, W >= 11. Returns (weighted sum, its three terms).
    """
    intensity = l1_loss(output, jnp.max(jnp.stack(inputs), axis=0))
    source_grad = jnp.max(jnp.stack([sobel_magnitude(x) for x in inputs]), axis=0)
    gradient = l1_loss(sobel_magnitude(output), source_grad)
    ssim_term = 1.0 - jnp.mean(jnp.stack([jnp.mean(ssim(output, x)) for x in inputs]))
    loss = cfg.w_intensity * intensity + cfg.w_gradient * gradient + cfg.w_ssim * ssim_term
    return loss, {"intensity": intensity, "gradient": gradient, "ssim": ssim_term}


# ----------------------------------------------------------------------------- NMI


def structure_planes(task: str, inputs: list[jax.Array]) -> list[jax.Array]:
    """The (B, H, W, 1) grey planes whose edges define the shared structure: grey of each RGB
    input (MFF/MEF), of the LDR half of each 6-channel frame (HDR), of the RGB image (its
    ImageNet standardisation undone, back in [0, 1]) and the depth map itself (GDSR)."""
    if task == "hdr":
        return [grey(x[..., :3]) for x in inputs]
    if task == "gdsr":
        rgb, depth = inputs
        std, mean = np.asarray(GDSR_RGB_STD, np.float32), np.asarray(GDSR_RGB_MEAN, np.float32)
        return [grey(rgb * std + mean), depth]
    return [grey(x) for x in inputs]


def structure_mask(task: str, inputs: list[jax.Array], threshold: float) -> jax.Array:
    """(B, H, W) float mask, 1 where EVERY input's grey Sobel magnitude exceeds `threshold`
    (structure shared by all inputs), else 0. Not differentiated (the inputs are data)."""
    edges = [sobel_magnitude(p)[..., 0] > threshold for p in structure_planes(task, inputs)]
    return jax.lax.stop_gradient(jnp.all(jnp.stack(edges), axis=0).astype(jnp.float32))


def pad_mask(mask: jax.Array, height: int, width: int) -> jax.Array:
    """Reflect-pads a (B, H, W) mask at the bottom/right to (B, height, width), as the model pads
    its inputs to the window multiple."""
    _, h, w = mask.shape
    return jnp.pad(mask, ((0, 0), (0, height - h), (0, width - w)), mode="reflect")


def _squash(x: jax.Array, weight: jax.Array) -> jax.Array:
    """(B, N, C) features -> (0, 1): standardise per image and channel with the weighted mean and
    variance over pixels (weight (B, N)), then sigmoid(1.702 z)."""
    total = jnp.maximum(jnp.sum(weight, axis=1), 1.0)[:, None, None]
    w = weight[:, :, None]
    mean = jnp.sum(w * x, axis=1, keepdims=True) / total
    var = jnp.sum(w * (x - mean) ** 2, axis=1, keepdims=True) / total
    return jax.nn.sigmoid(PROBIT_SCALE * (x - mean) * jax.lax.rsqrt(var + VARIANCE_EPS))


# Kernel weights dropped by `_soft_bins` are below this fraction of the nearest centre's weight.
_TAP_TOLERANCE = 1e-6


def _tap_radius(bins: int, bandwidth: float) -> int:
    """How many centres on each side of the nearest one carry weight: those further away are
    at least radius + 1/2 bins from the value, the nearest at most 1/2, so their kernel weight
    relative to the nearest one's is below exp(-((r + 1/2)^2 - 1/4) / (2 s^2)), s the bandwidth
    in bins. The smallest r that makes it < `_TAP_TOLERANCE`: 1 for the default quarter-bin
    bandwidth (3 centres; dropped weight < 1.2e-7, float32's resolution)."""
    s = bandwidth * bins
    r = math.ceil(math.sqrt(2 * s * s * math.log(1 / _TAP_TOLERANCE) + 0.25) - 0.5)
    return min(bins - 1, max(1, r))


def _taps(u: jax.Array, bins: int, bandwidth: float, scale: jax.Array) -> tuple[list, list]:
    """(...,) values in (0, 1) -> the centres that carry weight and their Gaussian-kernel
    memberships: 2 r + 1 (...,) int32 centre indices (the nearest centre and `_tap_radius` r
    neighbours on each side, clipped to [0, bins)) and as many (...,) weights summing to
    `scale` (...,), 0 for the neighbours beyond either end.

    The kernel exp(-(u - centre)^2 / (2 bandwidth^2)), normalised over the centres, evaluated
    only near the value (the others' weights are negligible). The exponents are shifted by the
    nearest centre's squared distance (the softmax's maximum, known without a reduction).
    """
    nearest = jnp.clip(jnp.floor(u * bins), 0, bins - 1)
    shift = jnp.square(jax.lax.stop_gradient(u - (nearest + 0.5) / bins))
    radius = _tap_radius(bins, bandwidth)
    index = [nearest + offset for offset in range(-radius, radius + 1)]
    kernel = [
        jnp.where(
            (i >= 0) & (i < bins),
            jnp.exp((jnp.square(u - (i + 0.5) / bins) - shift) * (-0.5 / bandwidth**2)),
            0.0,
        )
        for i in index
    ]
    norm = scale / sum(kernel)
    return [jnp.clip(i, 0, bins - 1).astype(jnp.int32) for i in index], [k * norm for k in kernel]


def _soft_bins(u: jax.Array, bins: int, bandwidth: float, scale: jax.Array) -> jax.Array:
    """(...,) values in (0, 1) -> (..., bins) Gaussian-kernel memberships summing to `scale`
    (...,): the `_taps` scattered into the dense array by comparison (a tap clipped onto an end
    centre carries weight 0)."""
    index, weight = _taps(u, bins, bandwidth, scale)
    centres = jnp.arange(bins, dtype=jnp.int32)
    return sum(jnp.where(centres == i[..., None], w[..., None], 0.0) for i, w in zip(index, weight))


def _entropy(p: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return -jnp.sum(p * jnp.log(p + ENTROPY_EPS), axis=axes)


def _dense_joint(
    u1: jax.Array, u2: jax.Array, weight: jax.Array, bins: int, bandwidth: float
) -> jax.Array:
    """`_soft_joint`'s counts from the dense (B, N, bins) memberships and one matmul."""
    p1 = _soft_bins(u1, bins, bandwidth, weight)
    p2 = _soft_bins(u2, bins, bandwidth, jnp.ones_like(u2))
    return jnp.einsum("bnk,bnl->bkl", p1, p2, precision=HIGHEST)


def _shift_planes(planes: jax.Array, sign: int) -> jax.Array:
    """(B, bins, bins, T, T) planes, T = 2 r + 1 -> (B, bins, bins, T, T): plane (x, y) moved
    by sign * (x - r, y - r) over the (bins, bins) grid, zero where it leaves the grid."""
    _, bins, _, taps, _ = planes.shape
    r = taps // 2
    padded = jnp.pad(planes, ((0, 0), (r, r), (r, r), (0, 0), (0, 0)))

    def moved(x: int, y: int) -> jax.Array:
        top, left = r - sign * (x - r), r - sign * (y - r)
        return padded[:, top : top + bins, left : left + bins, x, y]

    rows = [jnp.stack([moved(x, y) for y in range(taps)], axis=-1) for x in range(taps)]
    return jnp.stack(rows, axis=-2)


def _nearest_pair(i1: list, i2: list, bins: int) -> jax.Array:
    """(B, N) flat index (b, nearest centre of map 1, nearest centre of map 2) into
    (B * bins * bins) from the `_taps` centre lists."""
    r = len(i1) // 2
    rows = jnp.arange(i1[r].shape[0], dtype=jnp.int32)[:, None] * bins
    return (rows + i1[r]) * bins + i2[r]


def _scattered_joint(
    u1: jax.Array, u2: jax.Array, weight: jax.Array, bins: int, bandwidth: float
) -> jax.Array:
    """`_soft_joint`'s counts from the sparse memberships: the T x T (T = 2 r + 1) products of
    the two pixels' `_taps` weights, summed per pair of nearest centres (one segment sum of
    T^2-vectors into (B, bins, bins, T, T)), then each plane moved to its offset and added."""
    i1, a = _taps(u1, bins, bandwidth, weight)
    i2, b = _taps(u2, bins, bandwidth, jnp.ones_like(u2))
    batch, n = u1.shape
    taps = len(a)
    products = jnp.stack([x * y for x in a for y in b], axis=-1)
    planes = jax.ops.segment_sum(
        products.reshape(batch * n, taps * taps),
        _nearest_pair(i1, i2, bins).reshape(-1),
        num_segments=batch * bins * bins,
    )
    planes = planes.reshape(batch, bins, bins, taps, taps)
    return jnp.sum(_shift_planes(planes, 1), axis=(3, 4))


# How `_soft_joint` counts in its forward pass: (B, N) u1, u2, weight, bins, bandwidth ->
# (B, bins, bins).
JOINT_COUNTS: dict[str, Callable[..., jax.Array]] = {
    "dense": _dense_joint,
    "scattered": _scattered_joint,
}
# Per lowering platform (`jax.lax.platform_dependent`'s names), the `JOINT_COUNTS` key the loss
# runs; other platforms run `_GENERAL_JOINT_COUNTS`, whose matmul suits GPUs and TPUs (scatters
# are slow on TPU). On CPU, building the dense memberships costs more than the matmul that uses
# them: the segment sum is 2.6x faster (bench/nmi.py, README).
_JOINT_COUNTS_ON = {"cpu": "scattered"}
_GENERAL_JOINT_COUNTS = "dense"


def default_joint_counts(platform: str) -> str:
    """The `JOINT_COUNTS` key the NMI loss runs when lowered for `platform` ("cpu", "cuda",
    "rocm", "tpu")."""
    return _JOINT_COUNTS_ON.get(platform, _GENERAL_JOINT_COUNTS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _soft_joint(
    u1: jax.Array,
    u2: jax.Array,
    weight: jax.Array,
    bins: int,
    bandwidth: float,
    counts: str | None = None,
) -> jax.Array:
    """(B, N) values in (0, 1) of two maps, (B, N) pixel weights -> (B, bins, bins) weighted
    soft joint counts sum_n weight_n a_nk b_nl (a, b the `_soft_bins` memberships).

    Forward: `JOINT_COUNTS[counts]`; None: `default_joint_counts` of the platform the program is
    lowered for (all are traced; `jax.lax.platform_dependent` compiles that platform's).

    Backward: each membership has only T = 2 r + 1 non-zeros, so d count / d a_nk is needed at
    those centres only, sum_l G_kl b_nl over the T non-zero b_nl. The T x T values of the
    cotangent G a pixel needs sit at fixed offsets from its pair of nearest centres, so they are
    one gather of a T^2-vector per pixel from G laid out as (bins, bins, T, T) planes, not the
    two dense (B, N, bins) x (bins, bins) matmuls and membership scatters that differentiating
    the forward costs.
    """

    def formulation(name: str) -> Callable[..., jax.Array]:
        return functools.partial(JOINT_COUNTS[name], bins=bins, bandwidth=bandwidth)

    if counts is not None:
        return formulation(counts)(u1, u2, weight)
    per_platform = {p: formulation(default_joint_counts(p)) for p in _JOINT_COUNTS_ON}
    return jax.lax.platform_dependent(
        u1, u2, weight, default=formulation(_GENERAL_JOINT_COUNTS), **per_platform
    )


def _soft_joint_fwd(
    u1: jax.Array,
    u2: jax.Array,
    weight: jax.Array,
    bins: int,
    bandwidth: float,
    counts: str | None,
) -> tuple[jax.Array, tuple]:
    return _soft_joint(u1, u2, weight, bins, bandwidth, counts), (u1, u2, weight)


def _soft_joint_bwd(
    bins: int, bandwidth: float, counts: str | None, residuals: tuple, g: jax.Array
) -> tuple:
    u1, u2, weight = recomputed(g, *residuals)
    (i1, a), pull1 = jax.vjp(lambda u, s: _taps(u, bins, bandwidth, s), u1, weight)
    (i2, b), pull2 = jax.vjp(lambda u: _taps(u, bins, bandwidth, jnp.ones_like(u)), u2)
    taps = len(a)
    table = _shift_planes(jnp.broadcast_to(g[..., None, None], (*g.shape, taps, taps)), -1)
    local = jnp.take(
        table.reshape(-1, taps, taps), _nearest_pair(i1, i2, bins), axis=0, mode="clip"
    )
    da = jnp.einsum("bnkm,mbn->kbn", local, jnp.stack(b), precision=HIGHEST)
    db = jnp.einsum("bnkm,kbn->mbn", local, jnp.stack(a), precision=HIGHEST)
    zero = [np.zeros(i.shape, jax.dtypes.float0) for i in i1]
    du1, dweight = pull1((zero, list(da)))
    (du2,) = pull2((zero, list(db)))
    return du1, du2, dweight


_soft_joint.defvjp(_soft_joint_fwd, _soft_joint_bwd)


def _joint_histograms(
    u1: jax.Array,
    u2: jax.Array,
    weight: jax.Array,
    bins: int,
    bandwidth: float,
    counts: str | None,
) -> jax.Array:
    """(C, B, N) values in (0, 1) of two maps, (B, N) pixel weights -> (B, C, bins, bins)
    weighted soft joint counts (`_soft_joint`), one channel at a time so that only one
    channel's per-pixel memberships exist at once; the batch axis (which a data-parallel mesh
    splits) stays a plain array axis."""
    return jax.lax.map(
        lambda args: _soft_joint(*args, weight, bins, bandwidth, counts), (u1, u2)
    ).transpose(1, 0, 2, 3)


def _masked_nmi(
    f1: jax.Array,
    f2: jax.Array,
    weight: jax.Array,
    bins: int,
    bandwidth: float,
    counts: str | None,
) -> jax.Array:
    b, h, w, c = f1.shape
    m = weight.reshape(b, h * w)

    def channels(f: jax.Array) -> jax.Array:  # (B, H, W, C) -> (C, B, H * W) squashed values
        return _squash(f.reshape(b, h * w, c), m).transpose(2, 0, 1)

    joint = _joint_histograms(channels(f1), channels(f2), m, bins, bandwidth, counts)
    total = jnp.sum(m, axis=1)
    joint = joint / jnp.maximum(total, 1.0)[:, None, None, None]
    h1 = _entropy(jnp.sum(joint, axis=3), (2,))
    h2 = _entropy(jnp.sum(joint, axis=2), (2,))
    h12 = _entropy(joint, (2, 3))
    nmi = 2.0 * (h1 + h2 - h12) / (h1 + h2 + ENTROPY_EPS)
    return jnp.where(total > 0, jnp.mean(nmi, axis=1), 0.0)


@functools.partial(jax.jit, static_argnames=("bins", "bandwidth", "counts"))
def masked_nmi(
    f1: jax.Array,
    f2: jax.Array,
    weight: jax.Array,
    bins: int = 32,
    bandwidth: float = 0.25 / 32,
    counts: str | None = None,
) -> jax.Array:
    """Differentiable normalised mutual information of two feature maps over weighted pixels.

    f1, f2: (B, H, W, C); weight: (B, H, W) in {0, 1}, 1 for the pixels that count. Per image b
    and channel c:
    1. each map is standardised with the weighted mean / variance over pixels,
       z = (x - mean) / sqrt(var + 1e-6), and squashed to u = sigmoid(1.702 z) in (0, 1);
    2. every pixel spreads unit mass over `bins` centres (k + 1/2) / bins with Gaussian kernel
       weights exp(-(u - centre)^2 / (2 bandwidth^2)), normalised to sum to 1 (computed for the
       centres whose weight exceeds 1e-6 of the nearest one's: 3 at the default bandwidth);
    3. the soft joint histogram P(k, l) = sum_n w_n a_nk b_nl / sum_n w_n, marginals P1, P2;
    4. H(p) = -sum p log(p + 1e-10), I = H1 + H2 - H12, NMI = 2 I / (H1 + H2 + 1e-10).
    Channels are averaged (per-channel NMI, then the mean). Returns (B,); an image with no
    weighted pixel gets 0. Constant maps give u = 1/2 everywhere and NMI 0.

    The kernel blurs the joint histogram, so identical (or affinely related) maps score below 1:
    about 0.87 at the default 32 bins / quarter-bin bandwidth, tending to 1 as the bandwidth
    shrinks. Independent maps score above 0 by the finite-sample bias: about 0.03 with 4096
    counted pixels, 0.3 with 256.

    counts: how step 3 is computed, a `JOINT_COUNTS` key (same values up to float rounding);
    None, the platform's fastest (`default_joint_counts`). Either way it runs one channel at a
    time, and the backward pass never forms the dense (B, H W, bins) memberships
    (`_soft_joint`).
    """
    if counts is not None and counts not in JOINT_COUNTS:
        raise ValueError(f"counts must be one of {sorted(JOINT_COUNTS)} or None, got {counts!r}")
    return _masked_nmi(f1, f2, weight, bins, bandwidth, counts)


def nmi_loss(
    features: list[list[jax.Array]], mask: jax.Array, bins: int, bandwidth: float
) -> jax.Array:
    """Mean masked NMI over stages, input pairs (all i < j) and images.

    features[stage][input]: (B, Hp, Wp, C) at the window-padded size; mask: (B, H, W) shared
    structure at the image size (`structure_mask`), reflect-padded like the inputs to Hp x Wp;
    NMI counts the pixels where the mask is 0.
    """
    values = []
    for stage in features:
        hp, wp = stage[0].shape[1:3]
        weight = 1.0 - pad_mask(mask, hp, wp)
        for i, j in itertools.combinations(range(len(stage)), 2):
            values.append(jnp.mean(masked_nmi(stage[i], stage[j], weight, bins, bandwidth)))
    return jnp.mean(jnp.stack(values))


# ----------------------------------------------------------------------------- entry point


def reconstruction_loss(
    task: str,
    output: jax.Array,
    target: jax.Array | None,
    inputs: list[jax.Array],
    cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The task's image loss (see the module docstring) and its named terms."""
    if task in ("hdr", "gdsr") and target is None:
        raise ValueError(f"task {task!r} needs a target")
    if task == "hdr":
        return hdr_loss(output, target, cfg.mu), {}
    if task == "gdsr":
        return l1_loss(output, target), {}
    if target is None:
        return unsupervised_fusion_loss(output, inputs, cfg)
    if cfg.pixel == "l1":
        return l1_loss(output, target), {}
    if cfg.pixel == "charbonnier":
        return charbonnier_loss(output, target, cfg.charbonnier_eps), {}
    raise ValueError(f"unknown pixel loss {cfg.pixel!r}; expected 'l1' or 'charbonnier'")


def task_loss(
    task: str,
    output: jax.Array,
    target: jax.Array | None,
    inputs: list[jax.Array],
    features: list[list[jax.Array]],
    cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total training loss = reconstruction + nmi_lambda * NMI redundancy.

    task: one of `TASKS`. output: (B, H, W, out) model output; target: same shape, or None for
    reference-free MFF/MEF; inputs: the model inputs (B, H, W, C_i) (HDR: 6-channel LDR || HDR
    frames; GDSR: RGB and 1-channel depth); features: `model(..., return_features=True)[1]`;
    cfg: `default_loss_config()`. Returns (loss, {"loss", "reconstruction", the unsupervised
    terms when used, and "nmi" unless nmi_lambda is 0, when the NMI is not computed at all}).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    recon, terms = reconstruction_loss(task, output, target, inputs, cfg)
    metrics = {"reconstruction": recon, **terms}
    loss = recon
    if cfg.nmi_lambda:
        mask = structure_mask(task, inputs, cfg.nmi_threshold)
        metrics["nmi"] = nmi_loss(features, mask, cfg.nmi_bins, cfg.nmi_bandwidth)
        loss = loss + cfg.nmi_lambda * metrics["nmi"]
    return loss, {"loss": loss, **metrics}
