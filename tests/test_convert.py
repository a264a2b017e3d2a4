"""Conversion of official checkpoints: the name mapping, every error path, the CLI."""

from __future__ import annotations

import functools
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgdn_jax import convert
from mgdn_jax import model as model_lib
from mgdn_jax.errors import EXIT_USAGE, UserError
from mgdn_jax.model import MGDN
from mgdn_jax.variants import VARIANTS, model_config


@functools.cache
def _abstract(variant: str) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(model_lib.abstract_model(model_config(variant)))


def abstract_model(variant: str) -> MGDN:
    """A new shape-only model of `variant`'s released architecture (cached per variant)."""
    return nnx.merge(*_abstract(variant), copy=True)


@functools.cache
def state_dict(path: str) -> dict[str, np.ndarray]:
    return convert.read_torch_state_dict(path)


@pytest.fixture
def mff_state(reference) -> dict[str, np.ndarray]:
    """A fresh copy of the pretrained MFF state_dict, for the test to edit."""
    return dict(state_dict(str(reference / "weights" / "mff_62000_E.pth")))


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_names_map_onto_model_params(variant):
    cfg = model_config(variant)
    model = abstract_model(variant)
    ours = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert len(ours) == len(nnx.to_flat_state(nnx.state(model)))  # parameters only
    names = list(convert.official_param_names(cfg))
    mapped = {convert.param_path(name) for name in names}
    assert len(mapped) == len(names)  # no name repeated, no two mapped to one parameter
    assert mapped == ours


def test_loads_pretrained_with_ignored_tensors(mff_state):
    ignored = {
        "norm.weight",
        "patch_embed.norm.bias",
        "layers.0.adjust_channel_03.weight",
        "layers.1.residual_group.blocks.1.attn_mask",
        "layers.0.residual_group.blocks.0.attn.relative_position_index",
    }
    assert ignored <= set(mff_state)  # the official checkpoint carries them
    mff_state["layers.0.residual_group.blocks.1.attn_mask"] = np.zeros((3, 5, 7), np.float32)
    model = convert.load_state_dict(abstract_model("mff"), mff_state, "mff.pth", "mff")
    kernel = model.head.conv.kernel.get_value()
    np.testing.assert_array_equal(kernel, mff_state["conv_last.0.weight"].transpose(2, 3, 1, 0))
    temperature = model.stages[1].mgdf.mgca.temperature.get_value()
    np.testing.assert_array_equal(temperature, mff_state["layers.1.MGF.TCA.temperature"].ravel())


def test_missing_tensor(mff_state):
    del mff_state["layers.1.MGF.TCA.temperature"]
    with pytest.raises(UserError, match=r"mff\.pth: missing tensor 'layers\.1\.MGF\.TCA\.temp"):
        convert.load_state_dict(abstract_model("mff"), mff_state, "mff.pth", "mff")


def test_unexpected_tensor(mff_state):
    mff_state["layers.0.MGF.extra.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(UserError, match=r"unexpected tensor 'layers\.0\.MGF\.extra\.weight'"):
        convert.load_state_dict(abstract_model("mff"), mff_state, "mff.pth", "mff")


def test_misshaped_tensor(mff_state):
    mff_state["layers.0.dilated_conv.weight"] = np.zeros((30, 30, 1, 3), np.float32)
    with pytest.raises(UserError, match=r"'layers\.0\.dilated_conv\.weight' has shape"):
        convert.load_state_dict(abstract_model("mff"), mff_state, "mff.pth", "mff")


def test_hdr_needs_third_output_conv(reference):
    sd = dict(state_dict(str(reference / "variants" / "hdr_random.pth")))
    del sd["layers.2.adjust_channel_03.bias"]
    with pytest.raises(UserError, match=r"missing tensor 'layers\.2\.adjust_channel_03\.bias'"):
        convert.load_state_dict(abstract_model("hdr"), sd, "hdr.pth", "hdr")


@pytest.mark.parametrize("variant", ["mff", "hdr", "mef", "gdsr16"])
def test_weights_of_another_variant(reference, variant):
    path = reference / "variants" / "gdsr_random.pth"
    with pytest.raises(UserError, match=rf"gdsr_random\.pth: .*is it a '{variant}' checkpoint"):
        convert.from_torch(path, variant)


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="nope.pth: no such weights file"):
        convert.from_torch(tmp_path / "nope.pth", "mff")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="corrupt.pth: not a readable PyTorch checkpoint"):
        convert.from_torch(corrupt, "mff")
    import torch

    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(UserError, match="list.pth: not a state_dict of tensors"):
        convert.from_torch(not_tensors, "mff")
    with pytest.raises(UserError, match="unknown variant 'sr'"):
        convert.from_torch(corrupt, "sr")


def test_cli_round_trip_and_existing_output(reference, tmp_path, capsys):
    source = reference / "variants" / "mef_random.pth"
    out = tmp_path / "mef"
    assert convert.main([str(source), "--variant", "mef", "--output", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mef"]
    assert (out / "config.json").is_file()

    converted, cfg = convert.load_converted(out)
    assert cfg.variant == "mef" and tuple(cfg.depths) == (6, 6)
    original = convert.from_torch(source, "mef")
    rng = np.random.default_rng(0)
    # The recorded MEF input size, so the forward shares compiled ops with the parity test.
    inputs = [jnp.asarray(rng.uniform(size=(1, 48, 40, 3)), jnp.float32) for _ in range(2)]
    np.testing.assert_array_equal(converted(*inputs), original(*inputs))
    assert isinstance(convert.load_weights(out, "mef"), MGDN)
    with pytest.raises(UserError, match="holds 'mef' weights, not 'mff'"):
        convert.load_weights(out, "mff")

    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert convert.main([str(source), "--variant", "mef", "--output", str(out)]) == EXIT_USAGE
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

    # A config.json that contradicts the stored parameters: one error, before orbax restores.
    config = json.loads((out / "config.json").read_text())
    for change, message in (
        ({"embed_dim": 30}, "embed.0.bias: stored (60,), config.json gives (30,)"),
        ({"depths": [6, 7]}, "stages.1.transformer.blocks.6.attn.proj.bias: stored absent"),
    ):
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=re.escape(f"{out}: config.json does not match")) as e:
            convert.load_converted(out)
        assert message in str(e.value)


def test_unwritable_output_is_checked_first(tmp_path, capsys, monkeypatch):
    """An output directory that cannot be made is reported before the checkpoint is read (the
    source does not even exist here). As root every directory is writable, so the permission
    check is stubbed."""
    monkeypatch.setattr(convert.os, "access", lambda path, mode: False)
    argv = [str(tmp_path / "missing.pth"), "--variant", "mff", "--output", str(tmp_path / "out")]
    assert convert.main(argv) == EXIT_USAGE
    assert f"{tmp_path} is not writable" in capsys.readouterr().err


def test_load_converted_rejects_other_directories(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        convert.load_converted(tmp_path)
