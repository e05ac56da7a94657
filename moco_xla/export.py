"""``python -m moco_xla.export``: the pre-trained query backbone in the layout users load weights from.

    python -m moco_xla.export --ckpt RUN --format torchvision|timm|detectron2 --out FILE

Only the backbone is written (no projector, predictor or momentum encoder):

- ``torchvision``: a state dict that ``torchvision.models.resnet50(weights=None)`` (or resnet18/34,
  ``vit_b_16``, a ``VisionTransformer`` of the same size for ViT-S) loads with ``strict=False``,
  only the classifier (``fc.*`` / ``heads.head.*``) missing;
- ``timm``: a state dict for ``timm.create_model("resnet50")`` / ``vit_small_patch16_224`` /
  ``vit_base_patch16_224``, only the classifier missing (MoCo v3's ViT-S has 12 heads: create it
  with ``num_heads=12``);
- ``detectron2``: the pickle facebookresearch/moco's detection/convert-pretrain-to-detectron2.py
  writes, ``{"model": {name: ndarray}, "__author__": "MOCO", "matching_heuristics": True}`` with
  the keys renamed to Detectron2's ResNet (stem, res2..res5, convN.norm, shortcut).

Each run prints how to build the network that loads the file.
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from . import cli
from .checkpoint import find_checkpoint
from .config import Config
from .errors import UserError
from .eval.encoder import load_encoder
from .vit import is_vit, vit_dims

FORMATS = ("torchvision", "timm", "detectron2")
RESNETS = ("resnet18", "resnet34", "resnet50")
TIMM_VIT = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
# Detectron2's ResNet configs for a torchvision-style (stride in the 3x3 conv), RGB, 0-255 input
# backbone, as facebookresearch/moco's detection configs set them.
D2_OPTS = ("MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
           "MODEL.PIXEL_MEAN '[123.675, 116.28, 103.53]' MODEL.PIXEL_STD '[58.395, 57.12, 57.375]'")


def backbone_state(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's parameters and buffers as contiguous CPU tensors (frozen ones included)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}


def check_exportable(cfg: Config, fmt: str) -> None:
    """UserError naming what ``fmt`` accepts when the checkpoint's model does not fit it."""
    m = cfg.model
    imagenet_resnet = m.arch in RESNETS and not m.small_stem and m.in_channels == 3
    if fmt == "torchvision":
        ok, accepts = m.arch in RESNETS or is_vit(m.arch), "resnet18/34/50 and the ViTs (vit_small, vit_base, small_vit)"
    elif fmt == "timm":
        ok, accepts = imagenet_resnet or m.arch in TIMM_VIT, \
            "resnet18/34/50 with the ImageNet stem (model.small_stem=false) on 3 channels, vit_small, vit_base"
    else:
        ok, accepts = imagenet_resnet, "resnet18/34/50 with the ImageNet stem (model.small_stem=false) on 3 channels"
    if not ok:
        if m.arch not in RESNETS:
            what = m.arch
        elif m.small_stem:
            what = f"{m.arch} with the small-image stem (model.small_stem=true)"
        else:
            what = f"{m.arch} on {m.in_channels} input channel(s)"
        raise UserError(f"--format {fmt} cannot take this checkpoint's {what}; it takes {accepts}")


def to_torchvision(cfg: Config, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's own keys are torchvision's (its ResNets and VisionTransformer)."""
    m = cfg.model
    if is_vit(m.arch):
        dim, depth, heads = vit_dims(m.arch, m.width)
        build = ("torchvision.models.vit_b_16(weights=None)" if m.arch == "vit_base" and cfg.data.image_size == 224
                 and m.patch_size == 16 else
                 f"torchvision.models.VisionTransformer(image_size={cfg.data.image_size}, "
                 f"patch_size={m.patch_size}, num_layers={depth}, num_heads={heads}, hidden_dim={dim}, "
                 f"mlp_dim={4 * dim})")
        if m.in_channels != 3:
            build += f" with conv_proj = nn.Conv2d({m.in_channels}, {dim}, {m.patch_size}, {m.patch_size})"
        return sd, f"net = {build}; net.load_state_dict(sd, strict=False)  # missing: heads.head.*"
    build = f"torchvision.models.{m.arch}(weights=None)"
    if m.small_stem:
        build += f" with conv1 = nn.Conv2d({m.in_channels}, 64, 3, 1, 1, bias=False), maxpool = nn.Identity()"
    elif m.in_channels != 3:
        build += f" with conv1 = nn.Conv2d({m.in_channels}, 64, 7, 2, 3, bias=False)"
    return sd, f"net = {build}; net.load_state_dict(sd, strict=False)  # missing: fc.*"


def timm_vit_key(key: str) -> str:
    """A torchvision VisionTransformer key as timm's VisionTransformer names it."""
    fixed = {"class_token": "cls_token", "conv_proj.weight": "patch_embed.proj.weight",
             "conv_proj.bias": "patch_embed.proj.bias", "encoder.pos_embedding": "pos_embed",
             "encoder.ln.weight": "norm.weight", "encoder.ln.bias": "norm.bias"}
    if key in fixed:
        return fixed[key]
    match = re.fullmatch(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)", key)
    if not match:
        raise KeyError(f"unexpected ViT key {key!r}")
    block, rest = match.groups()
    rest = {"ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
            "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
            "self_attention.in_proj_weight": "attn.qkv.weight", "self_attention.in_proj_bias": "attn.qkv.bias",
            "self_attention.out_proj.weight": "attn.proj.weight", "self_attention.out_proj.bias": "attn.proj.bias",
            "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
            "mlp.3.weight": "mlp.fc2.weight", "mlp.3.bias": "mlp.fc2.bias"}[rest]
    return f"blocks.{block}.{rest}"


def to_timm(cfg: Config, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """timm's ResNets share torchvision's keys; its ViT renames them (timm_vit_key)."""
    m = cfg.model
    if not is_vit(m.arch):
        return sd, f'net = timm.create_model("{m.arch}"); net.load_state_dict(sd, strict=False)  # missing: fc.*'
    kwargs = [] if m.arch == "vit_base" else ["num_heads=12"]  # MoCo v3's ViT-S: 12 heads (timm's: 6)
    if cfg.data.image_size != 224:
        kwargs.append(f"img_size={cfg.data.image_size}")
    if m.patch_size != 16:
        kwargs.append(f"patch_size={m.patch_size}")
    if m.in_channels != 3:
        kwargs.append(f"in_chans={m.in_channels}")
    args = "".join(f", {k}" for k in kwargs)
    out = {timm_vit_key(k): v for k, v in sd.items()}
    return out, (f'net = timm.create_model("{TIMM_VIT[m.arch]}"{args}); '
                 f"net.load_state_dict(sd, strict=False)  # missing: head.*")


def detectron2_key(key: str) -> str:
    """convert-pretrain-to-detectron2.py's renaming of a torchvision ResNet key."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(cfg: Config, sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], str]:
    """Detectron2's names and numpy arrays; BN's num_batches_tracked dropped (its FrozenBN has none)."""
    model = {detectron2_key(k): v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    depth = cfg.model.arch.removeprefix("resnet")
    extra = f" MODEL.RESNETS.DEPTH {depth}" + (" MODEL.RESNETS.RES2_OUT_CHANNELS 64" if depth != "50" else "")
    return ({"model": model, "__author__": "MOCO", "matching_heuristics": True},
            f"train_net.py --config-file <R{depth} config> MODEL.WEIGHTS FILE {D2_OPTS}{extra}")


def export(cfg: Config, backbone: torch.nn.Module, fmt: str) -> tuple[Any, str]:
    """(object to write, how to load it) for ``fmt``; UserError when the model does not fit it."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}; valid: {', '.join(FORMATS)}")
    check_exportable(cfg, fmt)
    sd = backbone_state(backbone)
    return {"torchvision": to_torchvision, "timm": to_timm, "detectron2": to_detectron2}[fmt](cfg, sd)


def write(obj: Any, out: Path, fmt: str) -> None:
    cli.out_file(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "detectron2":
        with open(out, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m moco_xla.export", __doc__)
    p.add_argument("--ckpt", required=True, help="a ckpt-*.pt file, a checkpoint directory or a run directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--debug", action="store_true", help="print full tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = cli.argv_or_sys(argv)
    return cli.run(lambda: export_checkpoint(parse_args(argv)), argv)


def export_checkpoint(args: argparse.Namespace) -> int:
    ckpt = find_checkpoint(args.ckpt)
    cfg, backbone = load_encoder(ckpt)
    obj, how = export(cfg, backbone, args.format)
    write(obj, Path(args.out), args.format)
    d2 = args.format == "detectron2"
    tensors = len(obj["model"]) if d2 else len(obj)
    print(f"wrote {args.out}: {cfg.model.arch} backbone of {ckpt}, {tensors} tensors, {args.format} layout")
    print(f"load it: {how}" if d2 else f"load it: sd = torch.load(FILE); {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
