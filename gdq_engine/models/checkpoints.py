"""Checkpoint formats: detect, convert and load EDSR-PyTorch, BasicSR and gdq_engine files.

Supported layouts (after unwrapping ``params_ema`` / ``params`` / ``state_dict`` / ``model``
wrappers and stripping ``module.`` prefixes):

=====================  ==========================================================  ==========
format                 marker keys                                                 arch
=====================  ==========================================================  ==========
``gdq_engine``         ``{"format": "gdq_engine", "arch", "config", "state_dict"}``  any
``edsr-pytorch``       ``head.0``, ``body.{i}.body.0/2``, ``tail.0.0``, ``tail.1``   edsr
``edsr-pytorch-rdn``   ``SFENet1``, ``RDBs.{d}.convs.{c}.conv.0``, ``GFF``, ``UPNet`` rdn
``basicsr-edsr``       ``conv_first``, ``body.{i}.conv1/2``, ``conv_after_body``      edsr
``basicsr-msrresnet``  ``conv_first``, ``body.{i}.conv1/2``, ``upconv1``, ``conv_hr`` msrresnet
``bare-edsr``          ``head``, ``body.{i}.conv1/2``, ``body_tail``, ``upsampler.0`` edsr
``bare-msrresnet``     ``head.0``, ``body.{i}.conv1/2``, ``upsampler.0``, ``tail.2``  msrresnet
=====================  ==========================================================  ==========

The ``bare-*`` layouts are ``model.state_dict()`` of gdq_engine's own modules saved without
:func:`save_checkpoint` (a training loop of the user's own): renamed to the BasicSR layout and
read as that. Their EDSR config beyond the shapes (mean, ``res_scale``) is assumed, with a warning.

Architecture hyperparameters (scale, width, depth) are inferred from tensor shapes; files are read
with ``torch.load(weights_only=True)`` so no code inside a checkpoint ever runs.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .common import DIV2K_RGB_MEAN, SRModel
from .edsr import EDSR
from .rdn import RDN
from .srresnet import MSRResNet

NATIVE_FORMAT = "gdq_engine"
ARCHS = {"edsr": EDSR, "msrresnet": MSRResNet, "rdn": RDN}

# (pattern, replacement) rules from each foreign layout to gdq_engine's module names.
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "edsr-pytorch": [
        (r"^head\.0\.", "head."),
        (r"^body\.(\d+)\.body\.0\.", r"body.\1.conv1."),
        (r"^body\.(\d+)\.body\.2\.", r"body.\1.conv2."),
        (r"^tail\.0\.(\d+)\.", r"upsampler.\1."),
        (r"^tail\.1\.", "tail."),
    ],
    "basicsr-edsr": [
        (r"^conv_first\.", "head."),
        (r"^conv_after_body\.", "body_tail."),
        (r"^upsample\.(\d+)\.", r"upsampler.\1."),
        (r"^conv_last\.", "tail."),
    ],
    "basicsr-msrresnet": [
        (r"^conv_first\.", "head.0."),
        (r"^upconv1\.", "upsampler.0."),
        (r"^upconv2\.", "upsampler.3."),
        (r"^conv_hr\.", "tail.0."),
        (r"^conv_last\.", "tail.2."),
    ],
    "edsr-pytorch-rdn": [
        (r"^SFENet1\.", "head."),
        (r"^SFENet2\.", "body_entry."),
        (r"^RDBs\.(\d+)\.convs\.(\d+)\.conv\.0\.", r"body.\1.convs.\2.conv."),
        (r"^RDBs\.(\d+)\.LFF\.", r"body.\1.fuse."),
        (r"^GFF\.(\d+)\.", r"body_tail.\1."),
    ],
}

# gdq_engine's own module names back to the BasicSR layout (basicsr-edsr, basicsr-msrresnet) a bare
# state dict is read as.
_BARE_TO_BASICSR: dict[str, list[tuple[str, str]]] = {
    "bare-edsr": [
        (r"^head\.", "conv_first."),
        (r"^body_tail\.", "conv_after_body."),
        (r"^upsampler\.(\d+)\.", r"upsample.\1."),
        (r"^tail\.", "conv_last."),
    ],
    "bare-msrresnet": [
        (r"^head\.0\.", "conv_first."),
        (r"^upsampler\.0\.", "upconv1."),
        (r"^upsampler\.3\.", "upconv2."),
        (r"^tail\.0\.", "conv_hr."),
        (r"^tail\.2\.", "conv_last."),
    ],
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or matched to the requested model."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)`` on CPU with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/truncated/foreign files
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, corrupt or not a torch file): "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def unwrap_state_dict(obj: dict, key: str | None = None) -> dict[str, torch.Tensor]:
    """Return the tensor dict inside a checkpoint: picks ``key`` if given, else ``params_ema``,
    ``params``, ``state_dict`` or ``model`` when present; strips ``module.`` prefixes."""
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"checkpoint has no entry {key!r}; top-level keys: {sorted(obj)[:10]}")
        obj = obj[key]
    else:
        for wrapper in ("params_ema", "params", "state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    state = {}
    for k, v in obj.items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
        state[k[len("module."):] if k.startswith("module.") else k] = v
    if not state:
        raise CheckpointError("checkpoint holds no tensors")
    return state


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """Name the key layout of a state dict (see the module table) or raise CheckpointError."""
    keys = set(state)
    if "head.0.weight" in keys and "body.0.body.0.weight" in keys:
        return "edsr-pytorch"
    if "SFENet1.weight" in keys:
        return "edsr-pytorch-rdn"
    if "conv_first.weight" in keys and "upconv1.weight" in keys:
        return "basicsr-msrresnet"
    if "conv_first.weight" in keys and "conv_after_body.weight" in keys:
        return "basicsr-edsr"
    if {"head.weight", "body.0.conv1.weight", "body_tail.weight", "upsampler.0.weight"} <= keys:
        return "bare-edsr"
    if {"head.0.weight", "body.0.conv1.weight", "upsampler.0.weight", "tail.2.weight"} <= keys:
        return "bare-msrresnet"
    sample = sorted(keys)[:8]
    hint = ""
    if "body_entry.weight" in keys:
        hint = (" (a bare state dict of gdq_engine's RDN: save it with gdq_engine.save_checkpoint, which keeps "
                "its config)")
    raise CheckpointError(
        "unrecognised checkpoint layout. Expected EDSR-PyTorch keys (head.0.*, body.N.body.0.*, tail.*), "
        "BasicSR keys (conv_first.*, body.N.conv1.*, conv_after_body.* or upconv1.*), RDN keys (SFENet1.*), "
        f"a gdq_engine EDSR / MSRResNet state dict or a gdq_engine file; found keys such as {sample}{hint}")


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _scale_from_upsampler(first_out: int, base: int, stages: int) -> int:
    if stages == 2:
        return 4
    if stages == 1 and first_out % base == 0 and first_out // base in (4, 9):
        return {4: 2, 9: 3}[first_out // base]
    raise CheckpointError(f"cannot infer the scale: {stages} upsampling convs, first with {first_out} "
                          f"outputs for width {base} (supported scales: 2, 3, 4)")


def _rename(state: dict, fmt: str) -> dict[str, torch.Tensor]:
    return _apply_rules(state, _RENAMES[fmt])


def _apply_rules(state: dict, patterns: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``state`` with each key renamed by the first (pattern, replacement) rule that matches it."""
    rules = [(re.compile(p), r) for p, r in patterns]
    out = {}
    for k, v in state.items():
        for rx, rep in rules:
            k2 = rx.sub(rep, k)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[str, dict, dict[str, torch.Tensor], str]:
    """Foreign state dict -> (arch, config, state dict in gdq_engine names, detected format)."""
    fmt = detect_format(state)
    if fmt in _BARE_TO_BASICSR:  # back to the BasicSR names, then read as that layout
        arch, config, state, _ = convert_state_dict(_apply_rules(state, _BARE_TO_BASICSR[fmt]))
        return arch, config, state, fmt
    if fmt == "edsr-pytorch":
        n_feats = state["head.0.weight"].shape[0]
        n_blocks = _count(state, r"^body\.(\d+)\.body\.0\.weight$")
        stages = _count(state, r"^tail\.0\.(\d+)\.weight$")
        scale = _scale_from_upsampler(state["tail.0.0.weight"].shape[0], n_feats, stages)
        mean = DIV2K_RGB_MEAN
        if "add_mean.bias" in state:
            mean = tuple(round(float(v) / 255.0, 6) for v in state["add_mean.bias"])
        state = {k: v for k, v in state.items() if not k.startswith(("sub_mean.", "add_mean."))}
        state["body_tail.weight"] = state.pop(f"body.{n_blocks}.weight")
        state["body_tail.bias"] = state.pop(f"body.{n_blocks}.bias")
        config = dict(scale=scale, n_feats=n_feats, n_blocks=n_blocks, res_scale=0.1 if n_feats > 64 else 1.0,
                      mean=mean, pixel_range=255.0)
        return "edsr", config, _rename(state, fmt), fmt
    if fmt == "basicsr-edsr":
        n_feats = state["conv_first.weight"].shape[0]
        stages = _count(state, r"^upsample\.(\d+)\.weight$")
        config = dict(scale=_scale_from_upsampler(state["upsample.0.weight"].shape[0], n_feats, stages),
                      n_feats=n_feats, n_blocks=_count(state, r"^body\.(\d+)\.conv1\.weight$"),
                      res_scale=0.1 if n_feats > 64 else 1.0, mean=DIV2K_RGB_MEAN, pixel_range=255.0)
        return "edsr", config, _rename(state, fmt), fmt
    if fmt == "basicsr-msrresnet":
        n_feats = state["conv_first.weight"].shape[0]
        stages = 2 if "upconv2.weight" in state else 1
        config = dict(scale=_scale_from_upsampler(state["upconv1.weight"].shape[0], n_feats, stages),
                      n_feats=n_feats, n_blocks=_count(state, r"^body\.(\d+)\.conv1\.weight$"))
        return "msrresnet", config, _rename(state, fmt), fmt
    # edsr-pytorch-rdn
    n_feats = state["SFENet1.weight"].shape[0]
    growth = state["RDBs.0.convs.0.conv.0.weight"].shape[0]
    stages = 2 if "UPNet.4.weight" in state else 1
    scale = _scale_from_upsampler(state["UPNet.0.weight"].shape[0], growth, stages)
    config = dict(scale=scale, n_feats=n_feats, n_blocks=_count(state, r"^RDBs\.(\d+)\.LFF\.weight$"),
                  n_layers=_count(state, r"^RDBs\.0\.convs\.(\d+)\.conv\.0\.weight$"), growth=growth)
    state = _rename(state, fmt)
    last = "UPNet.4" if stages == 2 else "UPNet.2"
    up = {"UPNet.0": "upsampler.0", "UPNet.2": "upsampler.2", last: "tail"}
    state = {(up[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]) if k.rsplit(".", 1)[0] in up else k: v
             for k, v in state.items()}
    return "rdn", config, state, fmt


def build_model(arch: str, config: dict) -> SRModel:
    """Instantiate an architecture ("edsr", "msrresnet", "rdn") from its config dict."""
    if arch not in ARCHS:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    cfg = dict(config)
    if "mean" in cfg:
        cfg["mean"] = tuple(cfg["mean"])
    return ARCHS[arch](**cfg)


def model_from_checkpoint(obj: dict, key: str | None = None, source: str = "checkpoint") -> tuple[SRModel, str]:
    """Build and fill a model from a loaded checkpoint dict; returns (model in eval mode, format)."""
    if obj.get("format") == NATIVE_FORMAT:
        arch, config, state, fmt = obj["arch"], obj["config"], obj["state_dict"], NATIVE_FORMAT
    else:
        arch, config, state, fmt = convert_state_dict(unwrap_state_dict(obj, key))
    if fmt == "bare-edsr":
        warnings.warn(f"{source}: a bare EDSR state dict holds no config beyond its shapes; assumed "
                      f"res_scale={config['res_scale']} and the DIV2K mean (gdq_engine.save_checkpoint keeps "
                      "them)", stacklevel=2)
    model = build_model(arch, config)
    missing, unexpected = _diff_keys(model, state)
    if missing or unexpected:
        raise CheckpointError(f"{source} ({fmt}, {arch} {config}) does not match the architecture: "
                              f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} ({fmt}) has tensors of the wrong shape: {exc}") from exc
    return model.eval(), fmt


def _diff_keys(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def save_checkpoint(model: SRModel, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write ``model`` as a gdq_engine checkpoint (arch + config + fp32 state dict), atomically."""
    payload = {"format": NATIVE_FORMAT, "version": 1, "arch": model.arch, "config": dict(model.config),
               "state_dict": {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
               "meta": dict(meta or {})}
    atomic_torch_save(payload, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a hidden temporary beside ``path``, then rename: readers never see a
    partial file. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)
