"""Conversion of official PyTorch MGDN checkpoints to Flax NNX, and converted-checkpoint I/O.

    from mgdn_jax.convert import from_torch
    model = from_torch("weights.pth", variant="hdr")

Command line: `mgdn-convert SRC.pth --variant mff --output DIR` writes an orbax checkpoint of
the parameters (DIR/params) and the model config (DIR/config.json); `load_converted(DIR)`
rebuilds the model without torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mgdn_jax.errors import UserError, run_cli
from mgdn_jax.image_io import current_umask
from mgdn_jax.model import MGDN, abstract_model
from mgdn_jax.variants import VARIANTS, model_config

# Official module names -> paths in our module tree, applied in order to a dotted name.
_MODULE_RULES: tuple[tuple[str, str], ...] = (
    (r"^inconv1\b", "embed.0"),
    (r"^inconv2\b", "embed.1"),
    (r"^conv1\b", "embed.0"),
    (r"^conv_after_body\b", "merge"),
    (r"^conv_last\b", "head"),
    (r"^(merge|head)\.0\b", r"\1.conv"),
    (r"^layers\.(\d+)", r"stages.\1"),
    (r"\.MGF\.TCA\b", ".mgdf.mgca"),
    (r"\.MGF\.kernel_predictor_(?:ref|under)\b", ".mgdf.predictors.0"),
    (r"\.MGF\.kernel_predictor_(?:ext|over)\b", ".mgdf.predictors.1"),
    (r"(predictors\.\d)\.0\.0\b", r"\1.conv1.conv"),
    (r"(predictors\.\d)\.1\.0\b", r"\1.conv2.conv"),
    (r"(predictors\.\d)\.2\b", r"\1.to_taps"),
    (r"\.MGF\.conv_out_1\.0\b", ".mgdf.out_convs.0.conv"),
    (r"\.MGF\.conv_out_2\.0\b", ".mgdf.out_convs.1.conv"),
    (r"\.MGF\.conv_ref\.(\d)\.0\b", r".mgdf.ref_refine.layers.\1.conv"),
    (r"\.MGF\.conv_ref\b", ".mgdf.ref_refine"),
    (r"\.MGF\b", ".mgdf"),
    (r"\.adjust_channel_01\b", ".out_convs.0"),
    (r"\.adjust_channel_02\b", ".out_convs.1"),
    (r"\.adjust_channel_03\b", ".out_convs.2"),
    (r"\.adjust_channel\b", ".merge"),
    (r"\.residual_group\b", ".transformer"),
    (r"\.lce\.conv\.0\b", ".local.reduce"),
    (r"\.lce\.conv\.1\b", ".local.spatial"),
    (r"\.lce\.conv\.2\b", ".local.expand"),
    (r"\.lce\.fc\.0\b", ".local.gate_reduce"),
    (r"\.lce\.fc\.2\b", ".local.gate_expand"),
    (r"\.lce\b", ".local"),
)

# Tensors of official checkpoints that the forward pass does not use, or that are derived.
_IGNORED = re.compile(
    r"^(patch_embed\.norm|norm)\.(weight|bias)$|\.(attn_mask|relative_position_index)$"
)


def module_path(official_name: str) -> str:
    """Translates an official module name (e.g. `layers.0.MGF.TCA`) to our dotted module path."""
    name = official_name
    for pattern, repl in _MODULE_RULES:
        name = re.sub(pattern, repl, name)
    return name


def official_param_names(cfg: ml_collections.ConfigDict) -> Iterator[str]:
    """Every tensor name the official model of `cfg` uses in its forward pass."""
    wb = (".weight", ".bias")
    n = len(cfg.in_channels)
    hdr = cfg.task == "hdr"
    embeds = ["conv1"] if hdr else [f"inconv{i + 1}" for i in range(n)]
    yield from (e + p for e in embeds for p in wb)
    for s, depth in enumerate(cfg.depths):
        mgf = f"layers.{s}.MGF."
        yield mgf + "TCA.temperature"
        for conv in ("q", "kv", "q_dwconv", "kv_dwconv", "project_out"):
            yield from (f"{mgf}TCA.{conv}{p}" for p in wb)
        for pred in ("under", "over") if hdr else ("ref", "ext"):
            for layer in ("0.0", "1.0", "2"):
                yield from (f"{mgf}kernel_predictor_{pred}.{layer}{p}" for p in wb)
        for i in (1, 2):
            yield from (f"{mgf}conv_out_{i}.0{p}" for p in wb)
        if hdr:
            for i in (0, 1):
                yield from (f"{mgf}conv_ref.{i}.0{p}" for p in wb)
        for b in range(depth):
            blk = f"layers.{s}.residual_group.blocks.{b}."
            yield blk + "attn.relative_position_bias_table"
            for mod in (
                "norm1",
                "norm2",
                "attn.qkv",
                "attn.proj",
                "mlp.fc1",
                "mlp.fc2",
                "lce.conv.0",
                "lce.conv.1",
                "lce.conv.2",
            ):
                yield from (blk + mod + p for p in wb)
            yield from (blk + "lce.fc.0.weight", blk + "lce.fc.2.weight")
        for mod in ["dilated_conv", "adjust_channel"] + [
            f"adjust_channel_0{i + 1}" for i in range(n)
        ]:
            yield from (f"layers.{s}.{mod}{p}" for p in wb)
    for mod in ("conv_after_body.0", "conv_last.0"):
        yield from (mod + p for p in wb)


def param_path(official_name: str) -> str:
    """Official tensor name -> our dotted parameter path (`...weight` -> `...kernel`, etc.)."""
    module, _, leaf = official_name.rpartition(".")
    path = module_path(module)
    if leaf == "weight":
        leaf = "scale" if re.search(r"\.norm\d$", path) else "kernel"
    return f"{path}.{leaf}"


def _to_jax_layout(name: str, value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> ours: OIHW kernels to HWIO, Linear (out, in) to (in, out)."""
    if name.endswith(".weight") and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if name.endswith(".weight") and value.ndim == 2:
        return value.T
    if name.endswith(".temperature"):
        return value.reshape(-1)
    return value


def _model_params(model: MGDN) -> dict[str, nnx.Variable]:
    return {
        ".".join(str(k) for k in path): var
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def load_state_dict(
    model: MGDN, state_dict: Mapping[str, np.ndarray], source: str, variant: str
) -> MGDN:
    """Copies an official state_dict into `model`, checking names and shapes.

    Raises:
      UserError: a tensor of the forward pass is missing, unexpected or mis-shaped.
    """
    cfg = model_config(variant)
    params = _model_params(model)
    expected = set(official_param_names(cfg))
    present = {k for k in state_dict if not _IGNORED.search(k)}
    if cfg.task != "hdr":  # 2-input models carry an unused third output conv
        present -= {k for k in present if re.search(r"\.adjust_channel_03\.", k)}
    hint = f"; is it a {variant!r} checkpoint?"
    missing = sorted(expected - present)
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing){hint}")
    unexpected = sorted(present - expected)
    if unexpected:
        raise UserError(f"{source}: unexpected tensor {unexpected[0]!r}{hint}")
    for name in sorted(expected):
        var = params[param_path(name)]
        value = _to_jax_layout(name, np.asarray(state_dict[name], np.float32))
        if value.shape != var.get_value().shape:
            torch_shape = tuple(np.shape(state_dict[name]))
            raise UserError(
                f"{source}: tensor {name!r} has shape {torch_shape}, expected one that maps to "
                f"{tuple(var.get_value().shape)}{hint}"
            )
        var.set_value(jnp.asarray(value))
    return model


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `.pth` file (a flat state_dict, or one under 'params_ema' (preferred),
    'params' or 'state_dict') as NumPy."""
    try:
        import torch
    except ImportError as e:
        raise UserError("reading .pth files needs PyTorch: pip install 'mgdn-jax[torch]'") from e
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from e
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
        raise UserError(f"{path}: not a state_dict of tensors")
    return {k.removeprefix("module."): v.detach().float().numpy() for k, v in obj.items()}


def from_torch(path: str | Path, variant: str) -> MGDN:
    """Builds the released `variant` architecture and loads an official `.pth` checkpoint."""
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    model = abstract_model(model_config(variant))
    return load_state_dict(model, read_torch_state_dict(path), str(path), variant)


def check_new_directory(output: str | Path) -> Path:
    """The absolute path of a directory that does not exist yet and can be made, or a
    `UserError` naming the problem."""
    output = Path(output).absolute()
    if output.exists():
        raise UserError(f"{output}: already exists; choose a new output directory")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such directory")
    if not os.access(output.parent, os.W_OK):
        raise UserError(f"{output}: {output.parent} is not writable")
    return output


def save_converted(model: MGDN, cfg: ml_collections.ConfigDict, output: str | Path) -> None:
    """Writes DIR/params (orbax) and DIR/config.json; the directory appears only when complete."""
    import orbax.checkpoint as ocp

    output = check_new_directory(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(staging / "params", nnx.state(model, nnx.Param))
        (staging / "config.json").write_text(cfg.to_json(indent=2))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{dotted parameter path: shape} of a parameter tree or of orbax's metadata tree (the
    trailing `value` of a Variable dropped)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        shapes[".".join(keys[:-1] if keys[-1] == "value" else keys)] = tuple(leaf.shape)
    return shapes


def _check_stored_shapes(directory: Path, stored: dict, wanted: dict) -> None:
    """A one-line `UserError` naming the first parameter that config.json and the stored
    parameters disagree on (before restoring: orbax's failed restores leave its background
    threads printing tracebacks)."""
    for name in sorted(stored.keys() | wanted.keys()):
        if stored.get(name) != wanted.get(name):
            have, want = (d.get(name, "absent") for d in (stored, wanted))
            raise UserError(
                f"{directory}: config.json does not match the stored parameters ({name}: "
                f"stored {have}, config.json gives {want})"
            )


def load_converted(directory: str | Path) -> tuple[MGDN, ml_collections.ConfigDict]:
    """Loads a directory written by `save_converted` (or by training) into a model."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{directory}: not a converted MGDN checkpoint (no config.json)")
    try:
        cfg = ml_collections.ConfigDict(json.loads(config_file.read_text()))
        model = abstract_model(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError included
        problem = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"{config_file}: not an MGDN model config ({problem})") from e
    # Onto this process's first device, whatever devices the parameters were saved from (a
    # multi-device training run's export holds its mesh sharding).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.state(model, nnx.Param),
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(directory / "params").item_metadata
            _check_stored_shapes(directory, _shapes(stored), _shapes(abstract))
            restored = ckptr.restore(directory / "params", abstract)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{directory}: cannot restore parameters ({e})".splitlines()[0]) from e
    nnx.update(model, restored)
    return model, cfg


def load_weights(path: str | Path, variant: str) -> MGDN:
    """A `.pth` file or a converted directory, checked to be of `variant`."""
    path = Path(path)
    if path.is_dir():
        model, cfg = load_converted(path)
        if cfg.variant != variant:
            raise UserError(f"{path}: holds {cfg.variant!r} weights, not {variant!r}")
        return model
    return from_torch(path, variant)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mgdn-convert", description="Convert an official MGDN .pth to an orbax checkpoint."
    )
    parser.add_argument("source", help="official PyTorch checkpoint (.pth)")
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--output", required=True, help="new directory to write")
    args = parser.parse_args(argv)

    def convert() -> None:
        check_new_directory(args.output)
        model = from_torch(args.source, args.variant)
        save_converted(model, model_config(args.variant), args.output)
        print(f"wrote {args.output}")

    return run_cli(convert)


if __name__ == "__main__":
    sys.exit(main())
