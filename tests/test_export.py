"""python -m moco_xla.export: the query backbone of a checkpoint made here, loaded into torchvision,
timm (the real package, pretrained=False) and Detectron2's ResNet names, giving the same features."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from moco_xla.checkpoint import CheckpointStore, find_checkpoint
from moco_xla.config import load_config
from moco_xla.export import main as export_main
from moco_xla.eval.encoder import load_encoder
from moco_xla.runtime import make_runtime
from moco_xla.train import build_model

SMALL_HEADS = ["moco.mlp_dim=64", "model.dim=32"]


def make_run(tmp: Path, config: str, sets: list[str]) -> tuple[Path, torch.nn.Module]:
    """A run directory with one committed checkpoint of a freshly built model whose BN statistics and
    gains are random (so that a wrong key mapping changes the features); returns (run, backbone)."""
    cfg = load_config(config, SMALL_HEADS + sets)
    model = build_model(cfg, make_runtime("local"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.encoder_q.backbone.state_dict().items():
            if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("running_mean", ".bias")) and t.dtype.is_floating_point:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder_k.")}  # keep it small
    payload = {"format": 1, "config": cfg.to_dict(), "model": state}
    import io
    buf = io.BytesIO()
    torch.save(payload, buf)
    CheckpointStore(str(tmp / "run" / "checkpoints"), 1).write(buf.getvalue(), {"global_step": 1})
    return tmp / "run", model.encoder_q.backbone.eval()


def export(run: Path, fmt: str, out: Path, capsys) -> str:
    rc = export_main(["--ckpt", str(run), "--format", fmt, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def load_partial(net: torch.nn.Module, sd: dict) -> set[str]:
    """Load with strict=False; returns the missing keys (nothing may be unexpected)."""
    result = net.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    return set(result.missing_keys)


def detectron2_r50_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of Detectron2's build_resnet_backbone at depth 50 (BasicStem, then
    BottleneckBlocks res2..res5 with a projection shortcut where the width changes; FrozenBN)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{s}"] = (cout,)

    conv("stem.conv1", 64, 3, 7)
    cin = 64
    for stage, (blocks, mid) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=2):
        for b in range(blocks):
            p = f"res{stage}.{b}"
            if cin != 4 * mid:
                conv(f"{p}.shortcut", 4 * mid, cin, 1)
            conv(f"{p}.conv1", mid, cin, 1)
            conv(f"{p}.conv2", mid, mid, 3)
            conv(f"{p}.conv3", 4 * mid, mid, 1)
            cin = 4 * mid
    return shapes


@pytest.fixture(scope="module")
def resnet50_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("r50"), "mocov3_resnet50_imagenet", ["data.image_size=64"])


@torch.no_grad()
def test_resnet50_torchvision_and_timm_give_the_checkpoints_features(resnet50_run, tmp_path, capsys):
    run, backbone = resnet50_run
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = backbone(x)
    out = export(run, "torchvision", tmp_path / "tv.pth", capsys)
    assert "torchvision.models.resnet50(weights=None)" in out
    sd = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert not any(k.startswith(("head", "predictor", "encoder_")) for k in sd)  # the backbone only
    tv = torchvision.models.resnet50(weights=None)
    assert load_partial(tv, sd) == {"fc.weight", "fc.bias"}
    tv.fc = torch.nn.Identity()
    torch.testing.assert_close(tv.eval()(x), want, rtol=1e-4, atol=1e-5)

    export(run, "timm", tmp_path / "timm.pth", capsys)
    net = timm.create_model("resnet50", pretrained=False)
    assert load_partial(net, torch.load(tmp_path / "timm.pth", weights_only=True)) == {"fc.weight", "fc.bias"}
    net.eval()
    torch.testing.assert_close(net.forward_head(net.forward_features(x), pre_logits=True), want,
                               rtol=1e-4, atol=1e-5)


def test_resnet50_detectron2_pickle_has_detectron2s_names_and_shapes(resnet50_run, tmp_path, capsys):
    run, backbone = resnet50_run
    out = export(run, "detectron2", tmp_path / "d2.pkl", capsys)
    assert "MODEL.RESNETS.STRIDE_IN_1X1 False" in out
    with open(tmp_path / "d2.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    got = {k: tuple(v.shape) for k, v in obj["model"].items()}
    assert got == detectron2_r50_shapes()
    sd = backbone.state_dict()
    for d2, tv in [("stem.conv1.weight", "conv1.weight"), ("stem.conv1.norm.running_var", "bn1.running_var"),
                   ("res2.0.shortcut.weight", "layer1.0.downsample.0.weight"),
                   ("res3.0.shortcut.norm.bias", "layer2.0.downsample.1.bias"),
                   ("res5.2.conv3.norm.weight", "layer4.2.bn3.weight"), ("res4.5.conv2.weight", "layer3.5.conv2.weight")]:
        assert (obj["model"][d2] == sd[tv].numpy()).all(), d2


@torch.no_grad()
def test_vit_small_torchvision_and_timm_give_the_checkpoints_features(tmp_path, capsys):
    run, backbone = make_run(tmp_path, "mocov3_vit_small_imagenet", ["data.image_size=32"])  # 2 x 2 patches
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = backbone(x)
    out = export(run, "timm", tmp_path / "timm.pth", capsys)
    assert 'timm.create_model("vit_small_patch16_224", num_heads=12, img_size=32)' in out  # v3's ViT-S: 12 heads
    net = timm.create_model("vit_small_patch16_224", pretrained=False, num_heads=12, img_size=32)
    assert load_partial(net, torch.load(tmp_path / "timm.pth", weights_only=True)) == {"head.weight", "head.bias"}
    net.eval()
    torch.testing.assert_close(net.forward_head(net.forward_features(x), pre_logits=True), want,
                               rtol=1e-4, atol=1e-4)
    out = export(run, "torchvision", tmp_path / "tv.pth", capsys)
    assert "VisionTransformer(image_size=32, patch_size=16, num_layers=12, num_heads=12, hidden_dim=384" in out
    tv = torchvision.models.VisionTransformer(32, 16, 12, 12, 384, 1536)
    assert load_partial(tv, torch.load(tmp_path / "tv.pth", weights_only=True)) == {"heads.head.weight",
                                                                                    "heads.head.bias"}
    tv.heads = torch.nn.Identity()
    torch.testing.assert_close(tv.eval()(x), want, rtol=1e-4, atol=1e-4)
    rc = export_main(["--ckpt", str(run), "--format", "detectron2", "--out", str(tmp_path / "x.pkl")])
    assert rc == 2 and capsys.readouterr().err.count("\n") == 1


def shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("config,tv_build,timm_name,timm_kw", [
    ("mocov3_vit_small_imagenet", lambda: torchvision.models.VisionTransformer(224, 16, 12, 12, 384, 1536),
     "vit_small_patch16_224", {"num_heads": 12}),
    ("mocov3_vit_base_imagenet", lambda: torchvision.models.vit_b_16(weights=None), "vit_base_patch16_224", {}),
])
def test_vit_224_layouts_are_torchvisions_and_timms(config, tv_build, timm_name, timm_kw):
    """At full size (on the meta device: shapes, no memory): every exported key has the target's name and
    shape, and only the classifier is left over."""
    from moco_xla.export import to_timm, to_torchvision
    from moco_xla.eval.encoder import build_eval_backbone
    cfg = load_config(config)
    with torch.device("meta"):
        sd = build_eval_backbone(cfg)[0].state_dict()
        tv, tm = tv_build().state_dict(), timm.create_model(timm_name, pretrained=False, **timm_kw).state_dict()
    tv_sd, how = to_torchvision(cfg, sd)
    assert shapes(tv_sd) == {k: s for k, s in shapes(tv).items() if not k.startswith("heads.")}
    timm_sd, how = to_timm(cfg, sd)
    assert shapes(timm_sd) == {k: s for k, s in shapes(tm).items() if not k.startswith("head.")}
    assert f'"{timm_name}"' in how and ("img_size" not in how)


@pytest.mark.parametrize("sets,fmt,accepts", [
    ([], "timm", "vit_small, vit_base"),
    ([], "detectron2", "resnet18/34/50 with the ImageNet stem"),
    (["model.arch=resnet18", "model.small_stem=true", "data.image_size=16"], "detectron2",
     "resnet18 with the small-image stem"),
    (["model.arch=resnet18", "model.small_stem=true", "data.image_size=16"], "timm", "resnet18 with the small-image stem"),
])
def test_small_image_models_are_refused_with_one_line(tmp_path, capsys, sets, fmt, accepts):
    run, _ = make_run(tmp_path, "mocov3_digits", ["model.width=4"] + sets)
    rc = export_main(["--ckpt", str(run), "--format", fmt, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --format {fmt} cannot take"), err
    assert accepts in err and not (tmp_path / "out").exists()


def test_small_stem_torchvision_export_loads_into_the_same_stem(tmp_path, capsys):
    run, backbone = make_run(tmp_path, "mocov3_digits", ["model.arch=resnet18", "model.small_stem=true",
                                                         "data.image_size=16"])
    out = export(run, "torchvision", tmp_path / "tv.pth", capsys)
    assert "conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False), maxpool = nn.Identity()" in out
    tv = torchvision.models.resnet18(weights=None)
    tv.conv1, tv.maxpool, tv.fc = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False), torch.nn.Identity(), torch.nn.Identity()
    assert load_partial(tv, torch.load(tmp_path / "tv.pth", weights_only=True)) == set()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), backbone(x), rtol=1e-4, atol=1e-5)
    _, loaded = load_encoder(find_checkpoint(str(run)))  # the probes read the same checkpoint
    assert loaded.conv1.weight.shape == (64, 1, 3, 3)
