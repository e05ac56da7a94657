"""The run configuration's sections as typed dataclasses, with their defaults, and the keys whose
values come from a fixed set (CHOICES)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DataConfig:
    dataset: str = "digits"          # digits | mnist | emnist | cifar10 | imagenet | imagenet-mini | folder
    root: str | None = None          # local path or gs://bucket/prefix (shards)
    split: str = "balanced"          # EMNIST split
    image_size: int = 16
    augment: str = "digits"          # moco_v1 | moco_v2 | small | small_v2 | digits(_fine, _affine) | handwriting(_crop)
    workers: int = 0
    shuffle_buffer: int = 1000       # streaming shards: seeded shuffle buffer
    on_bad_sample: str = "error"     # error | skip
    test_fraction: float = 0.3       # digits: held-out stratified split
    val_size: int = 0                # > 0: this many training images (seeded, class-balanced) replace the test set
    subset: str | None = None        # null: every training image; "1000" or "100/class": a balanced seeded slice
    subset_seed: int = 0             # which slice data.subset draws (the same in pre-training and eval)
    crop_min_scale: float | None = None  # pre-training's random resized crop keeps this fraction of the
                                     # image area or more; null: the preset's own (0.2 MoCo, 0.4 digits)


@dataclass
class ModelConfig:
    arch: str = "small_resnet"       # resnet18 | resnet34 | resnet50 | small_resnet | vit_small | vit_base | small_vit
    in_channels: int = 1
    small_stem: bool = True          # 3x3 stride-1 stem, no max-pool (28-32 px images)
    width: int = 32                  # small_resnet base width
    depth: int = 1                   # small_resnet: BasicBlocks per stage (the ResNets: model.arch's own)
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
    m_cosine: bool = False           # v1/v2: m rises to 1 on a half cosine over the run (v3 always does)
    T: float = 0.1                   # softmax temperature
    symmetric: bool = True           # both crops serve as query in turn
    shuffle: str = "gather"          # gather | all_to_all | none
    debias: float = 0.0              # v1/v2: tau+ of the debiased InfoNCE (share of same-class negatives); 0 = InfoNCE
    nn_weight: float = 0.0           # v1/v2: the loss's share whose positive is the queue's nearest key (NNCLR: 1)
    nn_warmup_epochs: int = 0        # v1/v2: the nearest-key share rises linearly from 0 to nn_weight over these epochs
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
    average_from: int = 0            # > 0: also keep the uniform average of the query encoder's weights at the
                                     # ends of epochs average_from..epochs (SWA; averaging.py), 0 = off


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
                                     # features alone, as every config)


@dataclass
class SelectConfig:
    """How the few-label study chooses each row's setting: k-fold cross-validation on its N labelled images
    alone (stratified folds; a row trains on the other folds and is scored on the held-out one), over
    a grid of candidates, the same number for every row that has one (equal budgets). The rows with
    no grid (the distilled students) use the configured values, the same for MoCo and the baselines.
    Label-propagation rows are scored by their propagated labels on the held-out fold (k only changes
    the graph); the trained rows by the model trained on the other folds. Evidence: summary.json's
    ``selection``.
    """
    folds: int = 3                   # 0: no selection, every row uses its configured value
    probe_lr: list = field(default_factory=lambda: [1.0, 3.0, 10.0])        # MoCo and random-init probes
    finetune_lr: list = field(default_factory=lambda: [0.003, 0.01, 0.03])  # fine-tuning MoCo's encoder
    lr: list = field(default_factory=lambda: [0.02, 0.05, 0.1])             # supervised from scratch
    labelprop_k: list = field(default_factory=lambda: [5, 10, 20])  # both graphs: labelprop.k and .pixel_k
    pixel_c: list = field(default_factory=lambda: [0.1, 1.0, 10.0])        # raw-pixel logistic regression


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
    pixel_input: str = "stored"      # the raw-pixel rows' images: stored (as the dataset stores them, where the
                                     # network reads them upsampled) | fed (what the network reads)
    labels_file: str | None = None   # CSV of index,label or path,label rows instead of the seeded draw
    rows: str = "all"                # which rows to run: all, or comma-separated keys (moco_labelprop,...)
    holdout: int = 0                 # > 0: score on this many unlabelled training images (seeded), not
                                     # the test set, and keep them out of distillation: to choose settings
    distill: DistillConfig = field(default_factory=DistillConfig)
    labelprop: LabelPropConfig = field(default_factory=LabelPropConfig)
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass
class EvalConfig:
    knn_every: int = 5               # epochs between kNN monitors (0 = only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    knn_bn: str = "running"          # the kNN's BN statistics: running (pre-training's) | recompute (on the
                                     # bank's clean images first: precise BN, eval/precise_bn.py)
    knn_layer: str = "backbone"      # the features the kNN reads: backbone (pooled) | mlp_hidden (the v1/v2
                                     # projection MLP's hidden layer, after its ReLU) | projection (the v1/v2
                                     # head's output): eval/readout.py
    knn_encoder: str = "query"       # the encoder the kNN reads: query | key (its momentum average) | averaged
                                     # (its weights averaged from epoch train.average_from on)
    knn_centre: bool = False         # subtract the bank's mean feature before the L2 normalisation (as the
                                     # raw-pixel reference does to the pixels): eval/knn.py
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
    "data.augment": ("moco_v1", "moco_v2", "small", "small_v2", "digits", "digits_fine", "digits_affine", "handwriting",
                     "handwriting_crop"),
    "data.on_bad_sample": ("error", "skip"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "small_resnet", "vit_small", "vit_base", "small_vit"),
    "moco.version": (1, 2, 3),
    "train.optimizer": ("sgd", "lars", "adamw"),
    "moco.shuffle": ("gather", "all_to_all", "none"),
    "train.schedule": ("cosine", "step", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "eval.knn_bn": ("running", "recompute"),
    "eval.knn_layer": ("backbone", "mlp_hidden", "projection"),
    "eval.knn_encoder": ("query", "key", "averaged"),
    "eval.semisup.pixel_input": ("stored", "fed"),
    "eval.semisup.distill.teacher_view": ("crop", "clean"),
    "eval.semisup.distill.targets": ("soft", "hard"),
    "eval.semisup.distill.student_augment": ("crop", "pretrain"),
    "eval.semisup.labelprop.student_augment": ("crop", "pretrain"),
    "eval.semisup.labelprop.pixel_student_augment": ("crop", "pretrain"),
}
