"""The one key table between our U-Net / autoencoder parameter names and diffusers' (`UNet2DConditionModel`,
`AutoencoderKL`), used in both directions.

A table is a list of `Entry(ours, theirs, layout)`: one of our tensors equals the concatenation (dim 0) of the
diffusers tensors `theirs`; `layout` says how a diffusers tensor is laid out when it differs from ours:
    None        the same shape
    "conv1x1"   diffusers holds a 1×1 conv (C_out, C_in, 1, 1) where we hold a Linear (C_out, C_in)
    "linear"    diffusers holds a Linear (C_out, C_in) where we hold a 1×1 conv (C_out, C_in, 1, 1)
A 1×1 conv and a Linear over channels compute the same map, so the conversion is a reshape: bit-exact.

The table is derived from the structure of our module (the architecture is the single source), so it covers
every one of our tensors; `to_ours` / `to_theirs` then account for every diffusers tensor too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


class KeyMismatchError(ValueError):
    """A state dict that does not match the table: missing, unexpected or mis-shaped keys, all listed."""


@dataclass(frozen=True)
class Entry:
    ours: str
    theirs: tuple[str, ...]
    layout: str | None = None


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ------------------------------------------------------------------------------------------------ U-Net

_RESBLOCK = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut"}
_TRANSFORMER = [(r"^blocks\.(\d+)\.", r"transformer_blocks.\1."), (r"\.ff\.proj\.", ".ff.net.0.proj."),
                (r"\.ff\.out\.", ".ff.net.2.")]


def _rename_resblock(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESBLOCK.get(head, head)}.{tail}"


def _rename_transformer(rest: str) -> str:
    for pattern, repl in _TRANSFORMER:
        rest = re.sub(pattern, repl, rest)
    return rest


def unet_table(unet: nn.Module, linear_projection: bool = True) -> list[Entry]:
    """Our `UNet` ↔ diffusers `UNet2DConditionModel`. `linear_projection=False` (SD 1.x): diffusers' proj_in /
    proj_out are 1×1 convs."""
    from ldm_train.models.unet import Downsample, ResBlock, SpatialTransformer
    from ldm_train.models.upsample import Upsample

    prefixes: dict[str, tuple[str, str]] = {}  # our module prefix → (diffusers prefix, kind)

    def stage(ours: str, layers: nn.ModuleList, theirs: str, j: int) -> None:
        for k, layer in enumerate(layers):
            if isinstance(layer, ResBlock):
                prefixes[f"{ours}.{k}"] = (f"{theirs}.resnets.{j}", "res")
            elif isinstance(layer, SpatialTransformer):
                prefixes[f"{ours}.{k}"] = (f"{theirs}.attentions.{j}", "attn")
            elif isinstance(layer, (Downsample, Upsample)):
                kind = "downsamplers" if isinstance(layer, Downsample) else "upsamplers"
                prefixes[f"{ours}.{k}"] = (f"{theirs}.{kind}.0", "plain")

    level, j = 0, 0
    for k, layers in enumerate(unet.down_blocks):
        stage(f"down_blocks.{k}", layers, f"down_blocks.{level}", j)
        j += 1
        if isinstance(layers[0], Downsample):
            level, j = level + 1, 0
    res = [i for i, layer in enumerate(unet.mid_block) if isinstance(layer, ResBlock)]
    for i, layer in enumerate(unet.mid_block):
        if isinstance(layer, ResBlock):
            prefixes[f"mid_block.{i}"] = (f"mid_block.resnets.{res.index(i)}", "res")
        else:
            prefixes[f"mid_block.{i}"] = ("mid_block.attentions.0", "attn")
    per_level = len(unet.up_blocks) // unet.num_levels
    for k, layers in enumerate(unet.up_blocks):
        stage(f"up_blocks.{k}", layers, f"up_blocks.{k // per_level}", k % per_level)
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}

    table = []
    for key in unet.state_dict():
        module, _, param = key.rpartition(".")
        if module in top:
            table.append(Entry(key, (f"{top[module]}.{param}",)))
            continue
        prefix = next(p for p in prefixes if key.startswith(p + "."))
        theirs, kind = prefixes[prefix]
        rest = key[len(prefix) + 1:]
        if kind == "res":
            rest = _rename_resblock(rest)
        elif kind == "attn":
            rest = _rename_transformer(rest)
        layout = None
        if kind == "attn" and not linear_projection and re.match(r"proj_(in|out)\.weight$", rest):
            layout = "conv1x1"
        table.append(Entry(key, (f"{theirs}.{rest}",), layout))
    return table


# ------------------------------------------------------------------------------------------------ autoencoder

def autoencoder_table(autoencoder: nn.Module) -> list[Entry]:
    """Our KL `Autoencoder` (no attention outside the mid blocks) ↔ diffusers `AutoencoderKL`."""
    rules = [
        (r"^encoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.levels\.(\d+)\.down\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
        (r"^decoder\.levels\.(\d+)\.up\.", r"decoder.up_blocks.\1.upsamplers.0."),
        (r"^(en|de)coder\.mid\.0\.", r"\1coder.mid_block.resnets.0."),
        (r"^(en|de)coder\.mid\.1\.", r"\1coder.mid_block.attentions.0."),
        (r"^(en|de)coder\.mid\.2\.", r"\1coder.mid_block.resnets.1."),
        (r"^(en|de)coder\.norm_out\.", r"\1coder.conv_norm_out."),
        (r"\.skip\.", ".conv_shortcut."),
        (r"attentions\.0\.norm\.", "attentions.0.group_norm."),
        (r"attentions\.0\.proj\.", "attentions.0.to_out.0."),
    ]
    table = []
    for key in autoencoder.state_dict():
        theirs = key
        for pattern, repl in rules:
            theirs = re.sub(pattern, repl, theirs)
        if ".attentions.0.qkv." in theirs:
            parts = tuple(theirs.replace(".qkv.", f".to_{x}.") for x in "qkv")
            table.append(Entry(key, parts, "linear" if key.endswith("weight") else None))
        elif ".attentions.0.to_out.0.weight" in theirs:
            table.append(Entry(key, (theirs,), "linear"))
        else:
            table.append(Entry(key, (theirs,)))
    return table


# ------------------------------------------------------------------------------------------------ conversion

def _their_shape(ours_shape: torch.Size, parts: int, layout: str | None) -> tuple[int, ...]:
    """Shape of one diffusers tensor from our tensor's shape (split into `parts` along dim 0)."""
    shape = (ours_shape[0] // parts, *ours_shape[1:])
    if layout == "conv1x1":
        return (*shape, 1, 1)
    if layout == "linear":
        return shape[:2]
    return shape


def to_ours(theirs: Mapping[str, torch.Tensor], table: list[Entry], ours: Mapping[str, torch.Tensor],
            what: str) -> dict[str, torch.Tensor]:
    """Diffusers state dict → ours, checked against our state dict `ours` (its shapes): every key accounted for."""
    expected = {t for e in table for t in e.theirs}
    missing, unexpected = expected - set(theirs), set(theirs) - expected
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    out, bad = {}, []
    for e in table:
        want = _their_shape(ours[e.ours].shape, len(e.theirs), e.layout)
        for t in e.theirs:
            if t in theirs and tuple(theirs[t].shape) != want:
                bad.append(f"{t}: file {tuple(theirs[t].shape)}, expected {want} (our {e.ours})")
        if not missing and not bad:
            pieces = [theirs[t].reshape(-1, *ours[e.ours].shape[1:]) for t in e.theirs]
            out[e.ours] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).contiguous()
    if bad:
        problems.append(f"{len(bad)} with the wrong shape: " + "; ".join(bad[:8]) + (" …" if len(bad) > 8 else ""))
    if problems:
        raise KeyMismatchError(f"{what}: the weights do not match the architecture in its config.json — "
                               + " | ".join(problems) + ". Check that the config.json and the weights file belong "
                               "together (a different model size or variant?)")
    return out


def to_theirs(ours: Mapping[str, torch.Tensor], table: list[Entry]) -> dict[str, torch.Tensor]:
    """Our state dict → diffusers names and layouts (the inverse of `to_ours`)."""
    out = {}
    for e in table:
        tensor = ours[e.ours]
        want = _their_shape(tensor.shape, len(e.theirs), e.layout)
        for name, piece in zip(e.theirs, tensor.chunk(len(e.theirs))):
            out[name] = piece.reshape(want).contiguous()
    return out
