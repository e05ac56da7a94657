"""Range and consistency checks of a Config: each failure is one UserError line naming the key and
what is valid, before any replica starts."""
from __future__ import annotations

from ..errors import UserError
from .schema import CHOICES, Config, DistillConfig, LabelPropConfig, ProbeConfig, SelectConfig, SemisupConfig

CROPPING_PRESETS = tuple(a for a in CHOICES["data.augment"] if a != "handwriting")  # a random resized crop


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
        (0 <= t.average_from <= t.epochs, "train.average_from",
         f"must be in [0, train.epochs={t.epochs}] (0: no weight average), got {t.average_from}"),
        (0 <= m.m < 1, "moco.m", f"must be in [0, 1), got {m.m}"),
        (m.T > 0, "moco.T", f"must be > 0, got {m.T}"),
        (m.K >= 1, "moco.K", f"must be >= 1, got {m.K}"),
        (0 <= m.debias < 1, "moco.debias", f"must be in [0, 1) (0: plain InfoNCE), got {m.debias}"),
        (m.debias == 0 or m.version != 3, "moco.debias",
         "is for the queue's negatives (moco.version 1 or 2); MoCo v3 takes 0"),
        (0 <= m.nn_weight <= 1, "moco.nn_weight", f"must be in [0, 1] (0: the key as the positive), got {m.nn_weight}"),
        (m.nn_weight == 0 or m.version != 3, "moco.nn_weight",
         "draws the positive from the queue (moco.version 1 or 2); MoCo v3 has no queue: valid there: 0"),
        (m.nn_weight == 0 or m.debias == 0, "moco.nn_weight",
         "and moco.debias are exclusive (the debiased loss corrects for the key as the positive); valid: "
         "one of them 0"),
        (m.nn_warmup_epochs >= 0, "moco.nn_warmup_epochs", f"must be >= 0, got {m.nn_warmup_epochs}"),
        (m.nn_warmup_epochs == 0 or m.nn_weight > 0, "moco.nn_warmup_epochs",
         f"is {m.nn_warmup_epochs}, but warms up moco.nn_weight, which is 0; valid: moco.nn_weight > 0, or 0 here"),
        (cfg.model.dim >= 1, "model.dim", f"must be >= 1, got {cfg.model.dim}"),
        (cfg.model.in_channels in (1, 3), "model.in_channels", f"must be 1 or 3, got {cfg.model.in_channels}"),
        (cfg.model.bn_splits >= 1, "model.bn_splits", f"must be >= 1, got {cfg.model.bn_splits}"),
        (cfg.model.width >= 1, "model.width", f"must be >= 1, got {cfg.model.width}"),
        (cfg.model.depth >= 1, "model.depth", f"must be >= 1, got {cfg.model.depth}"),
        (cfg.model.depth == 1 or cfg.model.arch == "small_resnet", "model.depth",
         f"is {cfg.model.depth}, but sets small_resnet's blocks per stage and model.arch={cfg.model.arch} "
         "takes its depth from its name; valid: model.depth=1, or model.arch=small_resnet"),
        (d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}"),
        (d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}"),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {d.shuffle_buffer}"),
        (0 < d.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {d.test_fraction}"),
        (d.val_size >= 0, "data.val_size", f"must be >= 0, got {d.val_size}"),
        (d.crop_min_scale is None or 0 < d.crop_min_scale <= 1, "data.crop_min_scale",
         f"must be in (0, 1] or null (the preset's own), got {d.crop_min_scale}"),
        (d.crop_min_scale is None or d.augment in CROPPING_PRESETS, "data.crop_min_scale",
         f"is set, but data.augment={d.augment} makes no random resized crop; valid with: "
         f"{', '.join(CROPPING_PRESETS)}, or leave it null"),
        (e.knn_k >= 1, "eval.knn_k", f"must be >= 1, got {e.knn_k}"),
        (e.knn_t > 0, "eval.knn_t", f"must be > 0, got {e.knn_t}"),
        (e.knn_every >= 0, "eval.knn_every", f"must be >= 0, got {e.knn_every}"),
        (e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}"),
        (e.max_bank >= 0, "eval.max_bank", f"must be >= 0, got {e.max_bank}"),
        (e.knn_layer != "mlp_hidden" or (cfg.model.mlp and m.version in (1, 2)), "eval.knn_layer",
         f"is mlp_hidden, but moco.version={m.version} with model.mlp={cfg.model.mlp} has no MoCo v2 MLP head; "
         "valid: backbone, or mlp_hidden with model.mlp true and moco.version 1 or 2"),
        (e.knn_layer != "projection" or m.version in (1, 2), "eval.knn_layer",
         f"is projection, which reads a MoCo v1/v2 head, but moco.version={m.version}; valid: backbone"),
        (e.knn_encoder != "averaged" or t.average_from >= 1, "eval.knn_encoder",
         "is averaged, but train.average_from is 0 (no weight average is kept); valid: query, key, or "
         "averaged with train.average_from >= 1"),
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
        *select_checks(s.select),
    ]


GRIDS = ("probe_lr", "finetune_lr", "lr", "labelprop_k", "pixel_c")


def select_checks(sel: SelectConfig) -> list[tuple[bool, str, str]]:
    """eval.semisup.select: 0 or at least 2 folds, and grids of one size (every row the same budget)."""
    k = "eval.semisup.select"
    grids = {name: getattr(sel, name) for name in GRIDS}
    sizes = {name: len(values) for name, values in grids.items()}
    return [
        (sel.folds == 0 or sel.folds >= 2, f"{k}.folds", f"must be 0 (no selection) or >= 2, got {sel.folds}"),
        *[(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values) and values,
           f"{k}.{name}", f"must be a non-empty list of positive numbers, got {values!r}")
          for name, values in grids.items()],
        (all(float(v).is_integer() for v in sel.labelprop_k), f"{k}.labelprop_k",
         f"must list whole numbers of neighbours, got {sel.labelprop_k!r}"),
        (len(set(sizes.values())) == 1, f"{k}", "grids must have one size, so that every row gets the same "
         "selection budget; got " + ", ".join(f"{n} {v}" for n, v in sizes.items())),
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
