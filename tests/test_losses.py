"""Losses: pixel losses, the masked NMI redundancy estimator and its mask, and a tiny overfit run
per task."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mgdn_jax import losses
from mgdn_jax.model import build_model
from mgdn_jax.variants import gdsr_rgb, model_config

BINS = 32
BANDWIDTH = 0.25 / BINS


@pytest.fixture(scope="module", autouse=True)
def _cheap_compilation():
    """These tests check behaviour, not speed: compile with XLA's optimisations off and draw the
    model initialisations from the RBG PRNG, both far cheaper to compile on CPU."""
    saved = {
        name: jax.config.values[name]
        for name in ("jax_disable_most_optimizations", "jax_default_prng_impl")
    }
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _uniform(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


def _mu_law64(x: jax.Array) -> np.ndarray:
    return np.log1p(5000.0 * np.asarray(x, np.float64)) / np.log(5001.0)


def _entropy64(p: np.ndarray) -> float:
    return float(-np.sum(p * np.log(p + 1e-10)))


# ----------------------------------------------------------------------------- pixel losses


def test_mu_law_values():
    x = np.array([0.0, 1e-4, 0.01, 0.5, 1.0], np.float32)
    expected = np.log1p(5000.0 * x.astype(np.float64)) / np.log(5001.0)
    got = np.asarray(losses.mu_law(jnp.asarray(x), 5000.0))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # Closed forms: T(0) = 0, T(1) = 1, T(1e-4) = log(1.5) / log(5001).
    assert got[0] == 0.0 and abs(got[-1] - 1.0) < 1e-6
    assert abs(got[1] - np.log(1.5) / np.log(5001.0)) < 1e-7


def test_hdr_loss_is_l1_of_tonemapped():
    p, t = _uniform(0, (2, 8, 8, 3)), _uniform(1, (2, 8, 8, 3))
    expected = np.mean(np.abs(_mu_law64(p) - _mu_law64(t)))
    assert float(losses.hdr_loss(p, t)) == pytest.approx(expected, rel=1e-5)


def test_l1_and_charbonnier():
    p = jnp.asarray([0.0, 1.0, -2.0, 0.5])
    t = jnp.asarray([0.0, 0.0, 0.0, 0.5])
    assert float(losses.l1_loss(p, t)) == pytest.approx(3.0 / 4)
    eps = 1e-3
    expected = np.mean(np.sqrt(np.array([0.0, 1.0, 4.0, 0.0]) + eps**2))
    assert float(losses.charbonnier_loss(p, t, eps)) == pytest.approx(expected, rel=1e-6)
    # Equal inputs cost eps, and Charbonnier bounds L1 from above by at most eps.
    assert float(losses.charbonnier_loss(t, t, eps)) == pytest.approx(eps, rel=1e-6)
    c, l1 = float(losses.charbonnier_loss(p, t, eps)), float(losses.l1_loss(p, t))
    assert l1 <= c <= l1 + eps
    g = jax.grad(losses.charbonnier_loss)(t, t, eps)
    assert np.all(np.asarray(g) == 0.0)


def test_sobel_magnitude_and_flat_gradient():
    x = jnp.zeros((1, 6, 6, 1)).at[:, :, 3:, :].set(1.0)  # vertical step between columns 2 and 3
    g = np.asarray(losses.sobel_magnitude(x))[0, :, :, 0]
    np.testing.assert_allclose(g[:, 2], 4.0, rtol=1e-6)
    np.testing.assert_allclose(g[:, 3], 4.0, rtol=1e-6)
    assert np.all(g[:, [0, 1, 4, 5]] < 1e-5)
    grad = jax.grad(lambda a: jnp.sum(losses.sobel_magnitude(a)))(jnp.full((1, 6, 6, 2), 0.3))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_unsupervised_fusion_loss_is_zero_for_identical_images():
    cfg = losses.default_loss_config()
    x = _uniform(2, (1, 16, 16, 3))
    loss, terms = losses.unsupervised_fusion_loss(x, [x, x], cfg)
    assert float(terms["intensity"]) == 0.0
    assert float(terms["gradient"]) < 1e-6
    assert abs(float(terms["ssim"])) < 1e-5
    assert abs(float(loss)) < 1e-5
    worse, _ = losses.unsupervised_fusion_loss(0.5 * x, [x, x], cfg)
    assert float(worse) > 0.1


# ----------------------------------------------------------------------------- NMI


def test_nmi_identical_maps():
    a = _normal(3, (2, 32, 32, 3))
    w = jnp.ones((2, 32, 32))
    # The soft histogram blurs the joint distribution; NMI -> 1 as the bandwidth -> 0.
    sharp = np.asarray(losses.masked_nmi(a, a, w, BINS, 0.02 / BINS))
    np.testing.assert_allclose(sharp, 1.0, atol=0.01)
    default = np.asarray(losses.masked_nmi(a, a, w, BINS, BANDWIDTH))
    assert np.all(default > 0.8)
    # Invariant to a per-map affine change (standardisation), so an affine copy is "identical".
    affine = np.asarray(losses.masked_nmi(a, 3.0 * a - 2.0, w, BINS, BANDWIDTH))
    np.testing.assert_allclose(affine, default, atol=1e-4)


def test_nmi_independent_noise_is_near_zero():
    a, b = _normal(4, (2, 64, 64, 3)), _normal(5, (2, 64, 64, 3))
    w = jnp.ones((2, 64, 64))
    independent = np.asarray(losses.masked_nmi(a, b, w, BINS, BANDWIDTH))
    assert np.all(independent < 0.05)
    dependent = np.asarray(losses.masked_nmi(a, jnp.tanh(a) + 0.3 * b, w, BINS, BANDWIDTH))
    assert np.all(dependent > 5 * independent)


@pytest.mark.parametrize("bandwidth", [0.02 / BINS, BANDWIDTH, 1.5 / BINS])
def test_soft_bins_match_the_full_gaussian_kernel(bandwidth):
    """The memberships, computed only at the centres near each value, equal the kernel
    normalised over all centres (float64 NumPy), also at the ends of (0, 1)."""
    u = np.concatenate([[0.0, 1e-4, 0.5 / BINS, 1.0 - 1e-4, 1.0], np.linspace(0, 1, 997)])
    u = u.astype(np.float32)
    got = np.asarray(losses._soft_bins(jnp.asarray(u), BINS, bandwidth, 2.0))
    u = u.astype(np.float64)
    centres = (np.arange(BINS) + 0.5) / BINS
    kernel = np.exp(-((u[:, None] - centres) ** 2) / (2 * bandwidth**2))
    expected = 2.0 * kernel / kernel.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bandwidth", [BANDWIDTH, 1.5 / BINS])
def test_soft_joint_gradients_match_autodiff_of_dense_memberships(bandwidth):
    """The joint histogram's forward formulations (dense matmul, segment sum) and its written-out
    backward pass (gathers at the non-zero memberships) equal the dense definition and its
    autodiff, in float64, for values at and near both ends."""
    ends = np.array([0.0, 1e-4, 0.2 / BINS, 1.0 - 0.2 / BINS, 1.0 - 1e-4, 1.0])
    rng = np.random.default_rng(15)
    with jax.enable_x64(True):
        u1 = jnp.asarray(np.concatenate([ends, rng.random(58)]).reshape(2, 32))
        u2 = jnp.asarray(np.concatenate([rng.random(58), ends[::-1]]).reshape(2, 32))
        weight = jnp.asarray(rng.random((2, 32)))
        probe = jnp.asarray(rng.standard_normal((2, BINS, BINS)))

        def dense(u1, u2, weight):
            p1 = losses._soft_bins(u1, BINS, bandwidth, weight)
            p2 = losses._soft_bins(u2, BINS, bandwidth, jnp.ones_like(u2))
            return jnp.einsum("bnk,bnl->bkl", p1, p2)

        def written(u1, u2, weight):
            return losses._soft_joint(u1, u2, weight, BINS, bandwidth)

        for f in (dense, written):
            assert f(u1, u2, weight).dtype == jnp.float64
        # Both platforms' forward formulations, whichever this one runs.
        for counts in (losses._dense_joint, losses._scattered_joint):
            got = counts(u1, u2, weight, BINS, bandwidth)
            np.testing.assert_allclose(got, dense(u1, u2, weight), atol=1e-12)
        grads = [
            jax.grad(lambda *x, f=f: jnp.sum(f(*x) * probe), argnums=(0, 1, 2))(u1, u2, weight)
            for f in (dense, written)
        ]
        for got, expected in zip(grads[1], grads[0]):
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("counts", sorted(losses.JOINT_COUNTS))
@pytest.mark.parametrize("bandwidth", [BANDWIDTH, 1.5 / BINS])
def test_nmi_matches_numpy_soft_histogram(bandwidth, counts):
    a, b = _normal(6, (1, 12, 10, 2)), _normal(7, (1, 12, 10, 2))
    b = 0.6 * a + b
    w = (_uniform(8, (1, 12, 10)) > 0.3).astype(jnp.float32)
    got = float(losses.masked_nmi(a, b, w, BINS, bandwidth, counts)[0])

    m = np.asarray(w, np.float64).reshape(-1)
    centres = (np.arange(BINS) + 0.5) / BINS
    values = []
    for c in range(2):
        memberships = []
        for f in (a, b):
            x = np.asarray(f, np.float64)[0, :, :, c].reshape(-1)
            mean = np.sum(m * x) / m.sum()
            var = np.sum(m * (x - mean) ** 2) / m.sum()
            u = 1.0 / (1.0 + np.exp(-1.702 * (x - mean) / np.sqrt(var + 1e-6)))
            k = np.exp(-((u[:, None] - centres) ** 2) / (2 * bandwidth**2))
            memberships.append(k / k.sum(axis=1, keepdims=True))
        joint = (memberships[0] * m[:, None]).T @ memberships[1] / m.sum()
        h1, h2 = _entropy64(joint.sum(1)), _entropy64(joint.sum(0))
        h12 = _entropy64(joint)
        values.append(2 * (h1 + h2 - h12) / (h1 + h2 + 1e-10))
    assert got == pytest.approx(np.mean(values), abs=2e-5)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "rocm", "tpu"])
def test_nmi_counts_by_platform(platform):
    """`masked_nmi` exported for `platform` (no such device needed) counts with the segment sum
    (the only scatter) exactly where `default_joint_counts` names it: on CPU only."""
    f = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((2, 8, 8), jnp.float32)
    program = jax.export.export(losses.masked_nmi, platforms=(platform,))(f, f, w).mlir_module()
    name = losses.default_joint_counts(platform)
    assert ("scatter" in program) == (name == "scattered")
    assert name == ("scattered" if platform == "cpu" else "dense")


def test_nmi_counts_must_be_known():
    f, w = _normal(0, (1, 4, 4, 1)), jnp.ones((1, 4, 4))
    with pytest.raises(ValueError, match="counts must be one of.*'sparse'"):
        losses.masked_nmi(f, f, w, counts="sparse")


def test_descending_nmi_makes_features_less_redundant():
    a, b = _normal(23, (1, 32, 32, 2)), _normal(24, (1, 32, 32, 2))
    w = jnp.ones((1, 32, 32))
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda f: losses.masked_nmi(a, f, w, BINS, BANDWIDTH)[0])
    )
    f = a + 0.3 * b
    tx = optax.adam(0.1)
    state = tx.init(f)
    first, _ = value_and_grad(f)
    for _ in range(20):
        value, grad = value_and_grad(f)
        updates, state = tx.update(grad, state)
        f = optax.apply_updates(f, updates)
    assert float(value) < 0.7 * float(first)


@jax.jit
def _nmi_value_and_grads(a, b, w):
    return jax.value_and_grad(
        lambda a, b: jnp.mean(losses.masked_nmi(a, b, w, BINS, BANDWIDTH)), argnums=(0, 1)
    )(a, b)


@pytest.mark.parametrize(
    "case", ["random", "constant", "zeros", "fully_masked", "one_pixel", "constant_vs_random"]
)
def test_nmi_gradients_are_finite(case):
    shape = (2, 8, 8, 3)
    a, b = _normal(9, shape), _normal(10, shape)
    w = jnp.ones(shape[:3])
    if case == "constant":
        a, b = jnp.full(shape, 0.7), jnp.full(shape, -1.3)
    elif case == "zeros":
        a, b = jnp.zeros(shape), jnp.zeros(shape)
    elif case == "fully_masked":
        w = jnp.zeros(shape[:3])
    elif case == "one_pixel":
        w = jnp.zeros(shape[:3]).at[:, 3, 4].set(1.0)
    elif case == "constant_vs_random":
        a = jnp.full(shape, 0.2)
    value, (ga, gb) = _nmi_value_and_grads(a, b, w)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(ga))) and np.all(np.isfinite(np.asarray(gb)))
    if case in ("constant", "zeros", "fully_masked", "constant_vs_random"):
        assert abs(float(value)) < 1e-6


def test_masked_pixels_do_not_change_nmi():
    a, b = _normal(11, (1, 16, 16, 4)), _normal(12, (1, 16, 16, 4))
    b = a + 0.5 * b
    w = (_uniform(13, (1, 16, 16)) > 0.4).astype(jnp.float32)
    noise = 100.0 * _normal(14, (1, 16, 16, 4)) * (1.0 - w)[..., None]
    base = float(losses.masked_nmi(a, b, w, BINS, BANDWIDTH)[0])
    changed = float(losses.masked_nmi(a + noise, b - noise, w, BINS, BANDWIDTH)[0])
    assert changed == pytest.approx(base, abs=1e-6)
    unmasked = float(losses.masked_nmi(a + noise, b - noise, jnp.ones_like(w), BINS, BANDWIDTH)[0])
    assert abs(unmasked - base) > 1e-2


def _edge_image(columns: slice, shape: tuple[int, int] = (12, 12)) -> jax.Array:
    """(1, H, W, 3) image with a vertical step edge in `columns` and flat elsewhere."""
    x = np.zeros((1, *shape, 3), np.float32)
    x[:, :, columns, :] = 1.0
    return jnp.asarray(x)


def test_structure_mask_needs_an_edge_in_every_input():
    a = _edge_image(slice(6, None))  # edge between columns 5 and 6
    b = _edge_image(slice(6, 9))  # edges there and between columns 8 and 9
    mask = np.asarray(losses.structure_mask("mff", [a, b], 0.5))[0]
    assert np.all(mask[:, [5, 6]] == 1.0)
    assert np.all(mask[:, [8, 9]] == 0.0)  # only b has an edge there
    assert mask.sum() == 2 * 12


def test_structure_mask_hdr_uses_ldr_and_gdsr_uses_depth():
    ldr = _edge_image(slice(6, None))
    frames = [jnp.concatenate([ldr, _uniform(i, ldr.shape)], axis=-1) for i in range(3)]
    mask = np.asarray(losses.structure_mask("hdr", frames, 0.5))
    expected = np.asarray(losses.structure_mask("mff", [ldr, ldr, ldr], 0.5))
    np.testing.assert_array_equal(mask, expected)
    # GDSR: the network's RGB input is ImageNet-standardised; edges are measured in [0, 1].
    rgb = 0.2 * _edge_image(slice(6, None))
    step = float(np.max(losses.sobel_magnitude(losses.grey(rgb))))
    standardised = jnp.asarray(gdsr_rgb(np.asarray(rgb)))
    depth = jnp.zeros((1, 12, 12, 1))
    assert float(losses.structure_mask("gdsr", [standardised, depth], 0.5 * step).sum()) == 0.0
    depth = _edge_image(slice(6, None))[..., :1]
    for threshold, edge_pixels in ((0.9 * step, 2 * 12), (1.1 * step, 0)):
        mask = losses.structure_mask("gdsr", [standardised, depth], threshold)
        assert float(mask.sum()) == edge_pixels


def test_pad_mask_reflects_like_the_model():
    mask = _uniform(15, (2, 5, 6))
    padded = np.asarray(losses.pad_mask(mask, 8, 8))
    expected = np.pad(np.asarray(mask), ((0, 0), (0, 3), (0, 2)), mode="reflect")
    np.testing.assert_array_equal(padded, expected)


def test_nmi_loss_ignores_shared_structure_at_padded_size():
    """Features are (B, Hp, Wp, C); the image-size mask is padded and its 1s are excluded."""
    mask = jnp.zeros((1, 6, 7)).at[:, 2:4, 1:5].set(1.0)
    f1, f2 = _normal(16, (1, 8, 8, 2)), _normal(17, (1, 8, 8, 2))
    f2 = f1 + 0.3 * f2
    base = float(losses.nmi_loss([[f1, f2]], mask, BINS, BANDWIDTH))
    excluded = 1.0 - (1.0 - losses.pad_mask(mask, 8, 8))[..., None]
    noise = 50.0 * _normal(18, f1.shape) * excluded
    changed = float(losses.nmi_loss([[f1 + noise, f2]], mask, BINS, BANDWIDTH))
    assert changed == pytest.approx(base, abs=1e-6)
    assert float(losses.nmi_loss([[f1, f2]], jnp.ones((1, 6, 7)), BINS, BANDWIDTH)) == 0.0


def test_task_loss_terms_and_validation():
    cfg = losses.default_loss_config()
    x = [_uniform(19, (1, 16, 16, 3)), _uniform(20, (1, 16, 16, 3))]
    feats = [[_normal(21, (1, 16, 16, 4)), _normal(22, (1, 16, 16, 4))]]
    loss, m = losses.task_loss("mef", x[0], None, x, feats, cfg)
    assert set(m) == {"loss", "reconstruction", "nmi", "intensity", "gradient", "ssim"}
    assert float(loss) == pytest.approx(float(m["reconstruction"] + cfg.nmi_lambda * m["nmi"]))
    cfg.pixel = "charbonnier"
    _, m = losses.task_loss("mff", x[0], x[1], x, feats, cfg)
    expected = losses.charbonnier_loss(x[0], x[1], cfg.charbonnier_eps)
    assert float(m["reconstruction"]) == pytest.approx(float(expected))
    cfg.nmi_lambda = 0.0
    loss, m = losses.task_loss("gdsr", x[0][..., :1], x[1][..., :1], x, feats, cfg)
    assert set(m) == {"loss", "reconstruction"} and float(loss) == float(m["reconstruction"])
    with pytest.raises(ValueError, match="needs a target"):
        losses.task_loss("hdr", x[0], None, x, feats, cfg)
    with pytest.raises(ValueError, match="unknown task"):
        losses.task_loss("ivf", x[0], x[1], x, feats, cfg)


# ----------------------------------------------------------------------------- overfit


def _tiny_config(variant: str):
    cfg = model_config(variant)
    cfg.update(embed_dim=12, depths=(1, 1), num_heads=(2, 2), window_size=4, mgca_heads=6)
    return cfg


def _batch(task: str) -> tuple[list[jax.Array], jax.Array | None]:
    """Random inputs and a target that is a simple function of them, away from the initial
    output (about 0.5), so that a few steps have a clear direction to go."""
    channels = {"mff": (3, 3), "mef": (3, 3), "hdr": (6, 6, 6), "gdsr": (3, 1)}[task]
    x = [_uniform(30 + i, (1, 16, 16, c)) for i, c in enumerate(channels)]
    target = {
        "mff": 0.25 * (x[0] + x[1]),
        "mef": None,  # reference-free objective
        "hdr": 0.05 * x[1][..., 3:],
        "gdsr": 0.25 * x[1],
    }[task]
    return x, target


# MFF and MEF share one architecture, so one compiled step serves both: it evaluates the
# supervised ('mff') and the reference-free ('mef') objective and keeps one by a traced flag.
_ARCHITECTURE = {"mff": "mff", "mef": "mff", "hdr": "hdr", "gdsr": "gdsr"}


@functools.cache
def _train_step(architecture: str):
    cfg = losses.default_loss_config()

    def objective(out, target, supervised, inputs, feats):
        if architecture != "mff":
            return losses.task_loss(architecture, out, target, inputs, feats, cfg)[0]
        with_reference, _ = losses.task_loss("mff", out, target, inputs, feats, cfg)
        without_reference, _ = losses.task_loss("mef", out, None, inputs, feats, cfg)
        return jnp.where(supervised, with_reference, without_reference)

    @nnx.jit
    def step(model, optimizer, inputs, target, supervised):
        def loss_fn(model):
            out, feats = model(*inputs, return_features=True)
            return objective(out, target, supervised, inputs, feats)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return step


@pytest.mark.parametrize("task", ["mff", "mef", "hdr", "gdsr"])
def test_task_loss_decreases_on_tiny_overfit(task):
    architecture = _ARCHITECTURE[task]
    model = build_model(_tiny_config(architecture), seed=0)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    inputs, target = _batch(task)
    supervised = jnp.asarray(target is not None)
    if target is None:
        target = jnp.zeros_like(inputs[0])
    step = _train_step(architecture)
    # 16 evaluations: 15 updates between the first loss and the last.
    history = [float(step(model, optimizer, inputs, target, supervised)) for _ in range(16)]
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < history[0], history
