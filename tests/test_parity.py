"""Every activation recorded from the official PyTorch model, reproduced module by module."""

from __future__ import annotations

import numpy as np
import pytest
from test_convert import abstract_model, state_dict

from mgdn_jax import convert, parity

TOLERANCE = 1e-4
MFF_WEIGHTS = "weights/mff_62000_E.pth"
TCA = "layers.1.MGF.TCA#1"  # a module called twice, recorded at (1, 48, 72, 30) in CASES[1]
CASES = [
    ("activations/mff_pretrained_lytro01_64x64.npz", "mff", MFF_WEIGHTS),
    ("activations/mff_pretrained_lytro05_45x70.npz", "mff", MFF_WEIGHTS),
    ("variants/mef_random.npz", "mef", "variants/mef_random.pth"),
    ("variants/hdr_random.npz", "hdr", "variants/hdr_random.pth"),
    ("variants/gdsr_random.npz", "gdsr", "variants/gdsr_random.pth"),
]


@pytest.mark.parametrize("activations, variant, weights", CASES, ids=[c[0] for c in CASES])
def test_every_recorded_array_matches(reference, activations, variant, weights):
    acts = parity.read_activations(reference / activations)
    path = str(reference / weights)
    model = convert.load_state_dict(abstract_model(variant), state_dict(path), path, variant)
    rows = parity.compare(model, acts)
    recorded = {k.removeprefix("act/") for k in acts if k.startswith("act/")}
    assert len(rows) == len(recorded) + 1 > 20
    assert {r.name for r in rows} == recorded | {"output"}
    unmapped = [r.name for r in rows if r.max_abs is None]
    assert not unmapped, f"not mapped: {unmapped}"
    beyond = [(r.name, r.max_abs, r.ref_max) for r in rows if not r.within(TOLERANCE)]
    assert not beyond, parity.format_table(rows, TOLERANCE)


def test_cli_passes(reference, capsys):
    weights = reference / MFF_WEIGHTS
    acts = reference / CASES[1][0]
    argv = [str(acts), "--variant", "mff", "--weights", str(weights)]
    assert parity.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("| module | shape | max abs diff | mean abs diff | ok |")
    assert f"| {TCA} | (1, 48, 72, 30) |" in out
    assert "| NO |" not in out and "not mapped" not in out


@pytest.mark.parametrize(
    "name, change, row",
    [
        ("output", lambda a: a + np.float32(1e-2), "| output | (1, 45, 70, 3) | "),
        (f"act/{TCA}", lambda a: a[:, :-1], f"| {TCA} | (1, 47, 72, 30) | - | - | NO: ours is"),
    ],
    ids=["perturbed output", "mis-shaped module"],
)
def test_cli_fails_on_a_changed_array(reference, tmp_path, capsys, name, change, row):
    """A recorded array off by more than the tolerance, or of another shape than ours: its row
    says NO, the summary names it, exit status 1."""
    acts = parity.read_activations(reference / CASES[1][0])
    acts[name] = change(acts[name])
    changed = tmp_path / "changed.npz"
    np.savez(changed, **acts)
    argv = [str(changed), "--variant", "mff", "--weights", str(reference / MFF_WEIGHTS)]
    assert parity.main(argv) == 1
    captured = capsys.readouterr()
    assert row in captured.out and "| NO" in captured.out
    assert captured.out.count("| NO") == 1
    failed = f"FAILED: 1 beyond tolerance 0.0001 or of another shape: {name.removeprefix('act/')}"
    assert failed in captured.err


@pytest.mark.parametrize("tolerance", ["nan", "-1", "inf"])
def test_cli_rejects_a_tolerance_that_is_not_a_finite_bound(tolerance, tmp_path, capsys):
    """A usage error (exit status 2) naming the value, before any file is read."""
    argv = ["missing.npz", "--variant", "mff", "--weights", str(tmp_path), "--tolerance", tolerance]
    with pytest.raises(SystemExit) as exit_info:
        parity.main(argv)
    assert exit_info.value.code == 2
    assert f"must be a finite number >= 0, got {tolerance}" in capsys.readouterr().err


def test_cli_rejects_activation_files_of_the_wrong_kind(reference, tmp_path, capsys):
    """A single array, a missing input, an input of the wrong width: one error each."""
    acts = parity.read_activations(reference / CASES[1][0])
    single = tmp_path / "single.npy"
    np.save(single, acts["output"])
    without_input1 = {k: v for k, v in acts.items() if k != "input1"}
    narrow = {**acts, "input0": acts["input0"][..., :2]}
    cases = [(single, "a single array")]
    for name, arrays, message in (
        (
            "without_input1.npz",
            without_input1,
            "input1 should be (B, H, W, 3) for this model, got none",
        ),
        (
            "narrow.npz",
            narrow,
            f"input0 should be (B, H, W, 3) for this model, got shape {narrow['input0'].shape}",
        ),
    ):
        np.savez(tmp_path / name, **arrays)
        cases.append((tmp_path / name, message))
    weights = str(reference / MFF_WEIGHTS)
    for path, message in cases:
        assert parity.main([str(path), "--variant", "mff", "--weights", weights]) == 2
        assert message in capsys.readouterr().err
