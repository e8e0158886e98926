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
           "text_embed.0": "class_embedding.linear_1", "text_embed.2": "class_embedding.linear_2",  # pooled text
           "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}

    table, unplaced = [], []
    for key in unet.state_dict():
        module, _, param = key.rpartition(".")
        if module in top:
            table.append(Entry(key, (f"{top[module]}.{param}",)))
            continue
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:  # e.g. size conditioning's size_embed
            unplaced.append(key)
            continue
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
    if unplaced:
        raise KeyMismatchError(f"the U-Net holds {len(unplaced)} tensors diffusers' UNet2DConditionModel has no place "
                               f"for ({_listing(unplaced)}): a model trained with diffusion.size_conditioning=true "
                               "cannot be exported; export one trained without it")
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


# ------------------------------------------------------------------------------------------------ original names
# The original CompVis single-file names of diffusers' tensors: the inverse of diffusers' own converters
# (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`). The export checks
# every use against those converters (`single_file.check_inverse`), so this inverse cannot drift from them.

_RESNET_ORIGINAL = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                    ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                    ("conv_shortcut.", "skip_connection.")]
_VAE_ATTENTION_ORIGINAL = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_original(key: str, layers: int, attention_up: set[int], top: Mapping[str, str]) -> str:
    """One diffusers U-Net key → its `model.diffusion_model.` suffix; `layers` = layers_per_block, `attention_up`
    = the up blocks with attention (their upsampler sits at index 2 of the output block, else at 1)."""
    if key in top:
        return top[key]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":
            return f"output_blocks.{b * (layers + 1) + layers}.{2 if b in attention_up else 1}.{rest}"
        block = (f"input_blocks.{1 + b * (layers + 1) + j}" if side == "down"
                 else f"output_blocks.{b * (layers + 1) + j}")
        return f"{block}.0.{_resnet_original(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key)
    if m:
        if m.group(1) == "resnets":
            return f"middle_block.{2 * int(m.group(2))}.{_resnet_original(m.group(3))}"
        return f"middle_block.1.{m.group(3)}"
    raise KeyError(f"no original name for the diffusers U-Net key {key}")


def _resnet_original(rest: str) -> str:
    for theirs, original in _RESNET_ORIGINAL:
        if rest.startswith(theirs):
            return original + rest[len(theirs):]
    return rest


def _vae_original(key: str, levels: int, top: Mapping[str, str]) -> str:
    """One diffusers AutoencoderKL key → its `first_stage_model.` suffix."""
    if key in top:
        return top[key]
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        part, side, i, kind, j, rest = m.groups()
        level = int(i) if side == "down" else levels - 1 - int(i)
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{j}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        return f"{part}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key)
    if m:
        part, kind, k, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(k) + 1}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        module, _, param = rest.rpartition(".")
        return f"{part}.mid.attn_1.{_VAE_ATTENTION_ORIGINAL[module]}.{param}"
    raise KeyError(f"no original name for the diffusers VAE key {key}")


def original_unet(theirs: Mapping[str, torch.Tensor], layers: int, attention_up: set[int],
                  top: Mapping[str, str], prefix: str) -> dict[str, torch.Tensor]:
    """diffusers U-Net tensors → original names (same tensors: every U-Net layout is shared)."""
    return {prefix + _unet_original(k, layers, attention_up, top): v for k, v in theirs.items()}


def original_vae(theirs: Mapping[str, torch.Tensor], levels: int, top: Mapping[str, str],
                 prefix: str) -> dict[str, torch.Tensor]:
    """diffusers VAE tensors → original names; the mid attention's Linear weights become 1×1 convs (a reshape)."""
    out = {}
    for k, v in theirs.items():
        name = prefix + _vae_original(k, levels, top)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[name] = v
    return out
