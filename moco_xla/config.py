"""Typed run configuration: YAML file + ``--set key=value`` overrides, validated before any replica starts.

Every mistake becomes one ``UserError`` line naming the key and what is valid
(unknown keys get a did-you-mean), so a week-long job never dies at step 0 on a typo.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# The named configs ship inside the package (moco_xla/configs/), so `--config NAME` works from any
# working directory and from a wheel; files on disk are a regular install's, hence a Path.
CONFIG_DIR = Path(str(importlib.resources.files("moco_xla").joinpath("configs")))
DEFAULT_CONFIG = "digits"


@dataclass
class DataConfig:
    dataset: str = "digits"          # digits | mnist | emnist | cifar10 | imagenet | imagenet-mini | folder
    root: str | None = None          # local path or gs://bucket/prefix (shards)
    split: str = "balanced"          # EMNIST split
    image_size: int = 16
    augment: str = "digits"          # moco_v1 | moco_v2 | small | small_v2 | digits | digits_affine | handwriting(_crop)
    workers: int = 0
    shuffle_buffer: int = 1000       # streaming shards: seeded shuffle buffer
    on_bad_sample: str = "error"     # error | skip
    test_fraction: float = 0.3       # digits: held-out stratified split
    val_size: int = 0                # > 0: this many training images (seeded, class-balanced) replace the test set
    subset: str | None = None        # null: every training image; "1000" or "100/class": a balanced seeded slice
    subset_seed: int = 0             # which slice data.subset draws (the same in pre-training and eval)


@dataclass
class ModelConfig:
    arch: str = "small_resnet"       # resnet18 | resnet34 | resnet50 | small_resnet | vit_small | vit_base | small_vit
    in_channels: int = 1
    small_stem: bool = True          # 3x3 stride-1 stem, no max-pool (28-32 px images)
    width: int = 32                  # small_resnet base width
    dim: int = 128                   # feature dimension of the head
    mlp: bool = True                 # v2 MLP head (v1: linear)
    bn_splits: int = 8               # Split BN sub-batches (1 = plain BN on each replica)
    sync_bn: bool = False            # BN over the global batch (instead of shuffle BN)
    channels_last: bool | None = None  # ResNets in NHWC: null = on for CUDA only; true = also CPU; XLA ignores it
    patch_size: int = 16             # ViT patch size (small_vit on 16 px digits: 4)
    stop_grad_conv1: bool = True     # ViT: frozen random patch projection (MoCo v3's --stop-grad-conv1)


@dataclass
class MocoConfig:
    K: int = 4096                    # queue length (negatives)
    m: float = 0.99                  # key encoder momentum
    T: float = 0.1                   # softmax temperature
    symmetric: bool = True           # both crops serve as query in turn
    shuffle: str = "gather"          # gather | all_to_all | none
    version: int = 2                 # 1/2: queue MoCo (moco.py); 3: MoCo v3, the batch as negatives (moco_v3.py)
    mlp_dim: int = 4096              # v3: hidden width of the projector and predictor MLPs
    proj_layers: int = 0             # v3: projector depth; 0 = the official code's (ResNet 2, ViT 3)


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 128            # global batch (all replicas together), as in the papers
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"           # sgd | lars (MoCo v3 ResNet) | adamw (MoCo v3 ViT)
    scale_lr: bool = False           # lr is the base lr for 256 images, times batch_size / 256 (v3 recipe)
    schedule: str = "cosine"         # cosine | step | constant
    lr_steps: list = field(default_factory=lambda: [120, 160])  # epochs where lr *= 0.1 (step)
    warmup_epochs: int = 0
    precision: str = "auto"          # auto | fp32 | bf16 | fp16
    log_every: int = 10              # steps between host reads of loss/acc
    stop_every: int = 5              # steps between agreeing on a stop (SIGTERM, NaN): reacts within 2x
    seed: int = 0
    max_steps_per_epoch: int = 0     # 0 = the whole epoch (small values for smoke tests)
    collapse_warn: bool = True       # warn when the loss sits at the uniform-logits value
    compile: bool = False            # torch.compile both encoders (CUDA/CPU; slower on CPU as measured)
    compile_backend: str = "inductor"  # inductor | aot_eager (traces without generating kernels) | eager


@dataclass
class ProbeConfig:
    """Linear probe on frozen features: the MoCo lincls protocol (SGD, lr 30, no weight decay)."""
    epochs: int = 100
    batch_size: int = 256            # global batch
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"           # cosine | step | constant
    lr_steps: list = field(default_factory=lambda: [60, 80])  # epochs where lr *= 0.1 (step)
    augment: bool = False            # random crops each epoch (features recomputed); else features once
    normalize: bool = True           # L2-normalise pooled features: one lr fits every encoder (false: lincls)
    eval_every: int = 10             # epochs between test-set evaluations (0 = only at the end)


@dataclass
class DistillConfig:
    """SimCLRv2's third step, as Noisy Student runs it by default: a student learns the fine-tuned
    teacher's predictions on every training image plus ``label_weight`` x the cross-entropy on
    the labelled ones. The teacher sees the clean image (or the student's crop, SimCLRv2); the
    targets are its top class (or its softened predictions: KL at ``temperature``, times T^2).

    The defaults were chosen on held-out training digits, never the test set: the evidence is in
    docs/fewlabels.md.
    """
    steps: int = 500                 # student SGD steps (cosine); every step: a batch of all + labelled
    batch_size: int = 64             # global batch drawn from all training images (labelled or not)
    label_batch_size: int = 32       # global batch of labelled images for the label term (capped at labels)
    lr: float = 0.01                 # student initialised from the pre-trained encoder: SGD lr
    scratch_lr: float = 0.05         # student initialised at random (the from-scratch teacher's row)
    temperature: float = 1.0         # softens teacher and student logits alike
    label_weight: float = 1.0        # weight of the labelled images' cross-entropy (0 = distillation only)
    teacher_view: str = "clean"      # crop: the teacher sees the student's crop (SimCLRv2); clean: the
                                     # un-augmented image, only the student is noised (Noisy Student)
    targets: str = "hard"            # soft: KL at temperature; hard: cross-entropy on the teacher's top class
    student_augment: str = "pretrain"  # the student's noise on all and labelled images: crop: fine-tuning's
                                       # view (random crops when eval.semisup.augment); pretrain: the
                                       # checkpoint's MoCo augmentation (data.augment), a noisier student


@dataclass
class LabelPropConfig:
    """Label propagation (eval/labelprop.py) over the distillation's images, on MoCo's features and on raw
    pixels; a student (the distillation's, its settings) learns the propagated labels. k neighbours
    per image with weights sim^gamma, ``iterations`` steps of F <- alpha S F + (1 - alpha) Y.

    The defaults were chosen on held-out training digits, never the test set: the evidence is in
    docs/fewlabels.md.
    """
    k: int = 10                      # neighbours per image on MoCo's (L2-normalised backbone) features
    pixel_k: int = 5                 # neighbours per image on raw pixels (the baseline without pre-training)
    alpha: float = 0.9               # how far labels travel (alpha^t: the weight of t-step paths)
    gamma: float = 3.0               # edge weight max(cosine, 0)^gamma (Iscen et al. 2019)
    iterations: int = 50             # alpha^50 < 0.6 %: the fixed point for every argmax here
    student_augment: str = "crop"    # the MoCo row's student noise, as eval.semisup.distill.student_augment:
                                     # crop (fine-tuning's view) or pretrain (the checkpoint's MoCo augmentation)
    pixel_student_augment: str = "pretrain"  # the same for the raw-pixel row's student
    pixel_weight: float = 0.0        # MoCo's graph: cosine = (1 - w) x features' + w x raw pixels' (0: the
                                     # features alone; digits_fewlabels sets 0.5)


@dataclass
class SemisupConfig:
    """Few labels: probe, fine-tune and a from-scratch baseline on the same N labelled images.

    The learning rates were chosen on held-out training digits, never the test set (docs/fewlabels.md).
    """
    labels: int = 100                # labelled train images, balanced over classes
    seed: int = 0                    # which images are drawn
    steps: int = 500                 # optimisation steps of every trained row (probes included)
    batch_size: int = 100            # global batch, capped at the number of labels
    probe_lr: float = 3.0            # the probes' SGD lr (cosine, momentum 0.9) on L2-normalised features
    finetune_lr: float = 0.01        # fine-tuning the pre-trained encoder: SGD lr (cosine)
    lr: float = 0.05                 # training the same network from scratch: SGD lr (cosine)
    weight_decay: float = 5e-4       # fine-tune and from-scratch
    augment: bool = True             # fine-tune and from-scratch see random crops (the same ones)
    pixel_c: float = 1.0             # inverse L2 strength of the raw-pixel logistic regression
    labels_file: str | None = None   # CSV of index,label or path,label rows instead of the seeded draw
    rows: str = "all"                # which rows to run: all, or comma-separated keys (moco_labelprop,...)
    holdout: int = 0                 # > 0: score on this many unlabelled training images (seeded), not
                                     # the test set, and keep them out of distillation: to choose settings
    distill: DistillConfig = field(default_factory=DistillConfig)
    labelprop: LabelPropConfig = field(default_factory=LabelPropConfig)


@dataclass
class EvalConfig:
    knn_every: int = 5               # epochs between kNN monitors (0 = only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    batch_size: int = 256
    max_bank: int = 0                # 0 = whole train set as the feature bank
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    semisup: SemisupConfig = field(default_factory=SemisupConfig)


@dataclass
class CheckpointConfig:
    every: int = 1                   # epochs between checkpoints (0 = off; SIGTERM still writes one)
    every_steps: int = 0             # also every N global steps, mid-epoch (0 = off)
    keep: int = 3                    # keep the last K checkpoints
    dir: str | None = None           # default: <out>/checkpoints (local path or gs://)


@dataclass
class Config:
    name: str = "digits"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.augment": ("moco_v1", "moco_v2", "small", "small_v2", "digits", "digits_affine", "handwriting",
                     "handwriting_crop"),
    "data.on_bad_sample": ("error", "skip"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "small_resnet", "vit_small", "vit_base", "small_vit"),
    "moco.version": (1, 2, 3),
    "train.optimizer": ("sgd", "lars", "adamw"),
    "moco.shuffle": ("gather", "all_to_all", "none"),
    "train.schedule": ("cosine", "step", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "eval.semisup.distill.teacher_view": ("crop", "clean"),
    "eval.semisup.distill.targets": ("soft", "hard"),
    "eval.semisup.distill.student_augment": ("crop", "pretrain"),
    "eval.semisup.labelprop.student_augment": ("crop", "pretrain"),
    "eval.semisup.labelprop.pixel_student_augment": ("crop", "pretrain"),
}


def config_path(name_or_path: str | None) -> Path:
    """A config name (``digits``: the packaged moco_xla/configs/digits.yaml) or a path to a YAML file.

    A path that does not exist but reads ``configs/NAME.yaml`` (how commands written for the
    source tree name the packaged configs) resolves to the packaged config NAME.
    """
    name_or_path = name_or_path or DEFAULT_CONFIG
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return p
        packaged = CONFIG_DIR / p.name
        if p.parent.name == "configs" and packaged.is_file():
            return packaged
        raise UserError(f"config file {p} does not exist")
    p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"unknown config {name_or_path!r}; valid: {', '.join(names)} or a .yaml path")
    return p


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate. Raises UserError."""
    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None or raw == {}:
        names = ", ".join(f.name for f in dataclasses.fields(Config) if f.name != "name")
        raise UserError(f"config {path} is empty; it needs at least one of the sections {names} "
                        f"(see moco_xla/configs/digits.yaml)")
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    cfg = from_dict(raw)
    for item in overrides or []:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def from_dict(raw: dict) -> Config:
    cfg = Config()
    for key, value in raw.items():
        _set(cfg, key, value)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """``section.key=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise UserError(f"--set {item!r} must look like section.key=value (e.g. train.lr=0.03)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    _set(cfg, key.strip(), value)


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            prefix = ".".join(parts[:i])
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            guess = difflib.get_close_matches(".".join(parts[: i + 1]), full, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; valid: {', '.join(full)}"
            raise UserError(f"unknown config key {dotted!r}{hint}")
        f = next(f for f in dataclasses.fields(obj) if f.name == part)
        current = getattr(obj, part)
        if dataclasses.is_dataclass(current):
            if i == len(parts) - 1:
                if not isinstance(value, dict):
                    raise UserError(f"config section {dotted!r} must be a mapping")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v)
                return
            obj = current
            continue
        if i != len(parts) - 1:
            raise UserError(f"config key {'.'.join(parts[: i + 1])!r} is not a section")
        setattr(obj, part, _coerce(dotted, value, f, current))
        return


def _coerce(key: str, value: Any, f: dataclasses.Field, current: Any) -> Any:
    typ = typing.get_type_hints(_owner(f))[f.name]
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(typ) if a is not type(None)] if optional else [typ]
    if value is None:
        if optional:
            return None
        raise UserError(f"config key {key!r} needs a value of type {args[0].__name__}")
    want = args[0]
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 5e-4 as a string
            except ValueError:
                pass
    elif want is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif want is list or typing.get_origin(want) is list:
        if isinstance(value, list):
            return value
    else:
        return value
    raise UserError(f"config key {key!r} must be {want.__name__}, got {value!r}")


_OWNERS: dict[int, type] = {}


def _owner(f: dataclasses.Field) -> type:
    if not _OWNERS:
        for cls in (Config, DataConfig, ModelConfig, MocoConfig, TrainConfig, EvalConfig, CheckpointConfig,
                    ProbeConfig, SemisupConfig, DistillConfig, LabelPropConfig):
            for g in dataclasses.fields(cls):
                _OWNERS[id(g)] = cls
    return _OWNERS[id(f)]


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Range and consistency checks; with ``world_size`` also the per-replica split."""
    for dotted, choices in CHOICES.items():
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if value not in choices:
            raise UserError(f"config key {dotted!r} is {value!r}; valid: {', '.join(map(str, choices))}")
    t, m, d, e = cfg.train, cfg.moco, cfg.data, cfg.eval
    checks = [
        (t.lr > 0, "train.lr", f"must be > 0, got {t.lr}"),
        (t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}"),
        (t.batch_size >= 2, "train.batch_size", f"must be >= 2, got {t.batch_size}"),
        (0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}"),
        (t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}"),
        (t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}"),
        (t.stop_every >= 1, "train.stop_every", f"must be >= 1, got {t.stop_every}"),
        (t.warmup_epochs >= 0, "train.warmup_epochs", f"must be >= 0, got {t.warmup_epochs}"),
        (t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0"),
        (0 <= m.m < 1, "moco.m", f"must be in [0, 1), got {m.m}"),
        (m.T > 0, "moco.T", f"must be > 0, got {m.T}"),
        (m.K >= 1, "moco.K", f"must be >= 1, got {m.K}"),
        (cfg.model.dim >= 1, "model.dim", f"must be >= 1, got {cfg.model.dim}"),
        (cfg.model.in_channels in (1, 3), "model.in_channels", f"must be 1 or 3, got {cfg.model.in_channels}"),
        (cfg.model.bn_splits >= 1, "model.bn_splits", f"must be >= 1, got {cfg.model.bn_splits}"),
        (cfg.model.width >= 1, "model.width", f"must be >= 1, got {cfg.model.width}"),
        (d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}"),
        (d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}"),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {d.shuffle_buffer}"),
        (0 < d.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {d.test_fraction}"),
        (d.val_size >= 0, "data.val_size", f"must be >= 0, got {d.val_size}"),
        (e.knn_k >= 1, "eval.knn_k", f"must be >= 1, got {e.knn_k}"),
        (e.knn_t > 0, "eval.knn_t", f"must be > 0, got {e.knn_t}"),
        (e.knn_every >= 0, "eval.knn_every", f"must be >= 0, got {e.knn_every}"),
        (e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}"),
        (e.max_bank >= 0, "eval.max_bank", f"must be >= 0, got {e.max_bank}"),
        (not (d.dataset == "imagenet" and e.max_bank == 0), "eval.max_bank",
         "is 0 (the whole train set): for ImageNet that gathers 1.28 M x D fp32 features (10.5 GB at "
         "D 2048) onto every replica, above a TPU core's memory; set it, e.g. eval.max_bank=65536"),
        *probe_checks(e.probe, e.semisup),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}"),
        (cfg.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps",
         f"must be >= 0, got {cfg.checkpoint.every_steps}"),
        (not (cfg.model.sync_bn and cfg.model.bn_splits > 1), "model.sync_bn",
         "cannot be combined with model.bn_splits > 1 (choose one BN scheme)"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise UserError(f"config key {key!r} {msg}")
    for ok, key, msg in v3_checks(cfg):
        if not ok:
            raise UserError(f"config key {key!r} {msg}")
    enqueue = t.batch_size * (2 if m.symmetric else 1)
    if m.version != 3 and m.K % enqueue:  # v3 has no queue
        what = "2 x global batch (symmetric loss enqueues both crops)" if m.symmetric else "the global batch"
        raise UserError(f"moco.K={m.K} must be divisible by {what} = {enqueue}; "
                        f"e.g. moco.K={max(enqueue, m.K // enqueue * enqueue)}")
    if world_size is not None:
        validate_world(cfg, world_size)


def v3_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """MoCo v3 and ViT keys: the heads' widths, the patch grid, which optimiser and arch go together."""
    m, mo, d = cfg.model, cfg.moco, cfg.data
    vit = m.arch in ("vit_small", "vit_base", "small_vit")
    return [
        (mo.mlp_dim >= 1, "moco.mlp_dim", f"must be >= 1, got {mo.mlp_dim}"),
        (mo.proj_layers >= 0, "moco.proj_layers", f"must be >= 0 (0: the official depth), got {mo.proj_layers}"),
        (m.patch_size >= 1, "model.patch_size", f"must be >= 1, got {m.patch_size}"),
        (not vit or mo.version == 3, "model.arch",
         f"{m.arch} is a ViT: it needs moco.version=3 (MoCo v1/v2 train ResNets and small_resnet)"),
        (not vit or d.image_size % m.patch_size == 0, "model.patch_size",
         f"{m.patch_size} must divide data.image_size={d.image_size} (a whole grid of patches)"),
        (m.arch != "small_vit" or m.width % 4 == 0, "model.width",
         f"small_vit's width must be divisible by 4 (2-D sin-cos position embedding, 4 heads), got {m.width}"),
        (mo.version == 3 or cfg.train.optimizer == "sgd", "train.optimizer",
         f"{cfg.train.optimizer} is MoCo v3's (moco.version=3); MoCo v1/v2 train with sgd"),
    ]


def probe_checks(p: ProbeConfig, s: SemisupConfig) -> list[tuple[bool, str, str]]:
    """Ranges of the eval.probe and eval.semisup sections (linear probe, few-label study)."""
    schedules = ("cosine", "step", "constant")
    return [
        (p.schedule in schedules, "eval.probe.schedule", f"is {p.schedule!r}; valid: {', '.join(schedules)}"),
        (p.epochs >= 1, "eval.probe.epochs", f"must be >= 1, got {p.epochs}"),
        (p.batch_size >= 1, "eval.probe.batch_size", f"must be >= 1, got {p.batch_size}"),
        (p.lr > 0, "eval.probe.lr", f"must be > 0, got {p.lr}"),
        (0 <= p.momentum < 1, "eval.probe.momentum", f"must be in [0, 1), got {p.momentum}"),
        (p.weight_decay >= 0, "eval.probe.weight_decay", f"must be >= 0, got {p.weight_decay}"),
        (p.eval_every >= 0, "eval.probe.eval_every", f"must be >= 0, got {p.eval_every}"),
        (s.labels >= 1, "eval.semisup.labels", f"must be >= 1, got {s.labels}"),
        (s.steps >= 1, "eval.semisup.steps", f"must be >= 1, got {s.steps}"),
        (s.batch_size >= 1, "eval.semisup.batch_size", f"must be >= 1, got {s.batch_size}"),
        (s.probe_lr > 0, "eval.semisup.probe_lr", f"must be > 0, got {s.probe_lr}"),
        (s.finetune_lr > 0, "eval.semisup.finetune_lr", f"must be > 0, got {s.finetune_lr}"),
        (s.lr > 0, "eval.semisup.lr", f"must be > 0, got {s.lr}"),
        (s.weight_decay >= 0, "eval.semisup.weight_decay", f"must be >= 0, got {s.weight_decay}"),
        (s.pixel_c > 0, "eval.semisup.pixel_c", f"must be > 0, got {s.pixel_c}"),
        (s.holdout >= 0, "eval.semisup.holdout", f"must be >= 0, got {s.holdout}"),
        *distill_checks(s.distill),
        *labelprop_checks(s.labelprop),
    ]


def labelprop_checks(lp: LabelPropConfig) -> list[tuple[bool, str, str]]:
    """Ranges of eval.semisup.labelprop."""
    k = "eval.semisup.labelprop"
    return [
        (lp.k >= 1, f"{k}.k", f"must be >= 1, got {lp.k}"),
        (lp.pixel_k >= 1, f"{k}.pixel_k", f"must be >= 1, got {lp.pixel_k}"),
        (0 < lp.alpha < 1, f"{k}.alpha", f"must be in (0, 1), got {lp.alpha}"),
        (lp.gamma > 0, f"{k}.gamma", f"must be > 0, got {lp.gamma}"),
        (lp.iterations >= 1, f"{k}.iterations", f"must be >= 1, got {lp.iterations}"),
        (0 <= lp.pixel_weight < 1, f"{k}.pixel_weight", f"must be in [0, 1), got {lp.pixel_weight}"),
    ]


def distill_checks(d: DistillConfig) -> list[tuple[bool, str, str]]:
    """Ranges of eval.semisup.distill."""
    k = "eval.semisup.distill"
    return [
        (d.steps >= 1, f"{k}.steps", f"must be >= 1, got {d.steps}"),
        (d.batch_size >= 1, f"{k}.batch_size", f"must be >= 1, got {d.batch_size}"),
        (d.label_batch_size >= 1, f"{k}.label_batch_size", f"must be >= 1, got {d.label_batch_size}"),
        (d.lr > 0, f"{k}.lr", f"must be > 0, got {d.lr}"),
        (d.scratch_lr > 0, f"{k}.scratch_lr", f"must be > 0, got {d.scratch_lr}"),
        (d.temperature > 0, f"{k}.temperature", f"must be > 0, got {d.temperature}"),
        (d.label_weight >= 0, f"{k}.label_weight", f"must be >= 0, got {d.label_weight}"),
    ]


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on the replica count."""
    t = cfg.train
    if t.batch_size % world_size:
        raise UserError(f"train.batch_size={t.batch_size} (global) must be divisible by the "
                        f"{world_size} replicas")
    per = t.batch_size // world_size
    if per % cfg.model.bn_splits:
        raise UserError(f"per-replica batch {per} must be divisible by model.bn_splits="
                        f"{cfg.model.bn_splits}")
    if cfg.moco.shuffle == "all_to_all" and per % world_size:
        raise UserError(f"moco.shuffle=all_to_all needs the per-replica batch {per} divisible by "
                        f"the {world_size} replicas")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
