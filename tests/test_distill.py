"""Distillation (SimCLRv2's step 3) and the few-label study's labels: a toy problem on one replica and on
2 gloo replicas, the study's nine rows on the tiny setting, and the labels file's checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import run_gloo
from eval_fns import SMALL_SELECT, Points, run_eval, tiny_checkpoint
from moco_xla import data
from moco_xla.eval import command as moco_eval
from moco_xla.eval.rows import SEMISUP_ROWS
from moco_xla.eval.fewlabels_split import distill_views, propagated_views, semisup_split, student_images, summary_key
from moco_xla.data.subsets import train_labels
from moco_xla.config import load_config
from moco_xla.data.transforms import CleanAndAugmented
from moco_xla.errors import UserError
from moco_xla.data.subsets import Relabelled, read_labels_file
from moco_xla.eval.distill import distill_loss
from moco_xla.report import read_metrics, read_summary
from moco_xla.runtime import make_runtime

# ----------------------------------------------------------------------------- the toy problem


def jitter(x: torch.Tensor) -> torch.Tensor:
    """The toy's augmentation: a small Gaussian jitter each time a point is read."""
    return x + 0.02 * torch.randn(x.shape)


class Jittered(Points):
    """Points under a transform (by default ``jitter``), as data.build()'s datasets apply theirs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=jitter) -> None:
        super().__init__(x, y)
        self.transform = transform

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return self.transform(x), y


class Fourier(nn.Module):
    """Random Fourier features (fixed): a teacher that can fit any few labels, and extrapolates in patches."""

    def __init__(self, dim: int = 256, scale: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(2, dim, generator=g) * scale)
        self.register_buffer("b", torch.rand(dim, generator=g) * 6.2832)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x @ self.w + self.b)


def two_clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two elongated clusters, one per class, apart along x; the class is the cluster."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) * torch.tensor([0.4, 1.5]) + torch.tensor([[-1.5, 0.0], [1.5, 0.0]])[y]
    return x, y


def finetune_then_distill(rt, seed: int, labelled_per_class: int = 3, steps: int = 60, targets: str = "soft",
                          clean: bool = False) -> dict:
    """Teacher: Fourier features + head fitted to a few labelled points. Student: a linear classifier
    trained on the teacher's softened (or hard) predictions over all 400 points only (label weight 0);
    ``clean``: the teacher sees the points without jitter (CleanAndAugmented), the student jittered.

    Both through the study's trainers, on ``rt``'s replicas (each its share of every batch).
    """
    from moco_xla.eval.distill import DistillSpec, distill, paired
    from moco_xla.data.subsets import Relabelled
    from moco_xla.schedule import SGDSpec
    from moco_xla.eval.fit import image_accuracy, image_batches, train_classifier
    x, y = two_clusters(400, seed)
    test = Points(*two_clusters(400, seed + 100))
    g = torch.Generator().manual_seed(seed)
    picked = torch.cat([(y == c).nonzero().flatten()[torch.randperm(200, generator=g)[:labelled_per_class]]
                        for c in (0, 1)])
    train = Jittered(x, y)
    labelled = Relabelled(train, picked, y[picked])
    per_lab, per_all = len(picked) // rt.world_size, 100 // rt.world_size
    teacher = train_classifier(rt, Fourier(seed=seed), 256, 2, image_batches(rt, labelled, per_lab, 0), steps,
                               SGDSpec(0.5, 0.9, 5e-4, "cosine"), 0)
    pool = Jittered(x, y, CleanAndAugmented(nn.Identity(), jitter)) if clean else train
    batches = paired(image_batches(rt, pool, per_all, 1), image_batches(rt, labelled, per_lab, 2))
    student = distill(rt, teacher, nn.Identity(), 2, 2, batches, steps, SGDSpec(0.5, 0.9, 0.0, "cosine"),
                      DistillSpec(temperature=1.0, label_weight=0.0, targets=targets), 0)
    with torch.no_grad():
        agree = (student(test.x).argmax(1) == teacher(test.x).argmax(1)).float().mean().item() * 100
    return {"teacher": float(image_accuracy(rt, teacher, test, 400)),
            "student": float(image_accuracy(rt, student, test, 400)), "agree": agree,
            "weight": student[1].weight.detach().clone(), "teacher_weight": teacher[1].weight.detach().clone()}


# ----------------------------------------------------------------------------- units

def test_distill_loss_is_tempered_kl():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    assert distill_loss(t, t, 2.0).abs() < 1e-6  # the teacher's own predictions cost nothing
    s = torch.zeros(2, 3, requires_grad=True)
    loss = distill_loss(s, t, 4.0)
    p, q = torch.softmax(t / 4, 1), torch.full((2, 3), 1 / 3)
    assert loss.item() == pytest.approx(16 * (p * (p / q).log()).sum(1).mean().item(), rel=1e-5)
    loss.backward()
    assert (s.grad.argmin(1) == t.argmax(1)).all()  # descent raises the teacher's class


def test_distillation_improves_on_its_teacher():
    """Measured (60 steps each, seeds 0-2): teacher 78.8/80.5/96.5 % -> student 92.2/89.0/100 %.

    The gain comes from the student's smoother function class averaging the teacher's patchy
    extrapolation over the unlabelled points (on this toy, a linear classifier fitted to the 6
    labels alone does as well: the test checks the mechanics, the digits study the benefit).
    """
    rt = make_runtime("local")
    results = [finetune_then_distill(rt, seed) for seed in range(3)]
    gains = [r["student"] - r["teacher"] for r in results]
    assert all(g > 0 for g in gains) and sum(gains) / 3 > 5.0, results
    # it learnt the teacher's answers (a student that ignored them would agree half the time)
    assert all(r["agree"] > 65.0 for r in results), results


def test_noisy_student_hard_targets_from_clean_images_improve_on_the_teacher():
    """eval.semisup.distill teacher_view=clean, targets=hard: the teacher labels the clean points, the
    student learns those labels on jittered ones. Measured (60 steps, seeds 0-2): teacher 78.8/80.8/96.8 %
    -> student 92.0/89.0/100 % (soft targets on the same jitter: 92.2/88.5/100)."""
    rt = make_runtime("local")
    results = [finetune_then_distill(rt, seed, targets="hard", clean=True) for seed in range(3)]
    assert all(r["student"] > r["teacher"] for r in results), results
    assert all(r["agree"] > 65.0 for r in results), results


def test_two_views_give_the_teacher_the_clean_image_and_the_student_the_crop():
    from moco_xla.eval.fit import image_batches
    from moco_xla.eval.distill import paired
    x, y = two_clusters(40, 0)
    rt = make_runtime("local")
    views = Jittered(x, y, CleanAndAugmented(nn.Identity(), jitter))
    x_teacher, x_student, y_all, x_lab, y_lab = next(paired(image_batches(rt, views, 8, 1),
                                                            image_batches(rt, Points(x, y), 4, 2)))
    rows = (x_teacher.unsqueeze(1) == x.unsqueeze(0)).all(-1)  # [8, 40]: which clean point each row is
    assert rows.sum(1).eq(1).all()  # every teacher row is one clean point, unchanged
    assert torch.equal(y_all, y[rows.float().argmax(1)])  # and carries that point's label
    moved = (x_student - x[rows.float().argmax(1)]).abs()
    assert 0 < moved.max() < 0.2  # the student sees the same point, jittered
    same = next(paired(image_batches(rt, Jittered(x, y), 8, 1), image_batches(rt, Points(x, y), 4, 2)))
    assert same[0] is same[1]  # from one view both see the same crop (SimCLRv2)


def test_clean_and_augmented_views_of_the_digits_come_from_one_read_of_each_image(digits_train):
    """The study's distillation pool: the clean view is the bank's own (eval-transformed) image, the
    other a random crop of that same image, and each sample is read and decoded once for both."""
    from moco_xla.data.loaders import Transformed
    from moco_xla.data.subsets import clean_and_augmented
    from moco_xla.data.transforms import train_transform

    reads: list[int] = []

    class Counted(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(digits_train.base)

        def __getitem__(self, i: int):
            reads.append(i)
            return digits_train.base[i]

    bank = Transformed(Counted(), digits_train.transform, digits_train.num_classes, digits_train.skips)
    views = clean_and_augmented(bank, train_transform("digits", 16, 1))
    torch.manual_seed(0)
    (clean, crop), label = views[7]
    assert reads == [7]
    x, y = digits_train[7]
    assert torch.equal(clean, x) and label == y and crop.shape == x.shape and not torch.equal(crop, x)


@pytest.mark.parametrize("student_augment", ["crop", "pretrain"])
def test_the_student_is_noised_as_configured_and_the_teacher_sees_the_clean_image(student_augment):
    """eval.semisup.distill.student_augment: fine-tuning's crops, or the checkpoint's MoCo augmentation
    (here digits_affine's warps), on the pool and on the labelled images alike."""
    from torchvision.transforms import v2

    from moco_xla.data.transforms import train_transform
    from moco_xla.data.subsets import with_transform
    cfg = load_config("tiny", ["data.augment=digits_affine", "eval.semisup.labels=20",
                               f"eval.semisup.distill.student_augment={student_augment}"])
    bundle = data.build(cfg)
    split = semisup_split(cfg, bundle)
    images = with_transform(bundle.bank, train_transform("digits_affine", 16, 1))
    noised = student_images(cfg, bundle.bank, images, student_augment)
    pool, labelled = distill_views(cfg, bundle.bank, noised, split)
    pair = pool.dataset.transform
    assert isinstance(pair, CleanAndAugmented) and pair.clean is bundle.bank.transform
    assert labelled.ds.transform is pair.augment and len(pool) == len(split.pool) and len(labelled) == 20
    warps = any(isinstance(t, v2.RandomAffine) for t in pair.augment.transforms)
    assert warps == (student_augment == "pretrain")
    assert (pair.augment is images.transform) == (student_augment == "crop")
    (clean, noised), y = pool[3]
    assert torch.equal(clean, bundle.bank[int(split.pool[3])][0]) and noised.shape == clean.shape
    crop_cfg = load_config("tiny", ["eval.semisup.labels=20", "eval.semisup.distill.teacher_view=crop",
                                    "eval.semisup.distill.student_augment=crop"])
    shared, _ = distill_views(crop_cfg, bundle.bank,
                                        student_images(crop_cfg, bundle.bank, images, "crop"), split)
    assert shared.dataset is images  # the teacher sees the student's crop (SimCLRv2)


def test_label_propagation_students_are_noised_as_their_setting_says():
    """eval.semisup.labelprop.(pixel_)student_augment: each propagation row's student sees the pool (with
    the propagated labels) and the labelled images through fine-tuning's crops or the MoCo augmentation."""
    from torchvision.transforms import v2

    from moco_xla.data.transforms import train_transform
    from moco_xla.data.subsets import with_transform
    cfg = load_config("tiny", ["data.augment=digits_affine", "eval.semisup.labels=20"])
    assert (cfg.eval.semisup.labelprop.student_augment, cfg.eval.semisup.labelprop.pixel_student_augment) == (
        "crop", "pretrain")  # the held-out protocol's choices
    bundle = data.build(cfg)
    split = semisup_split(cfg, bundle)
    images = with_transform(bundle.bank, train_transform("digits_affine", 16, 1))
    propagated = torch.arange(len(split.pool)) % 10
    for augment in ("crop", "pretrain"):
        pool, labelled = propagated_views(cfg, bundle.bank, images, split, propagated, augment)
        assert pool.ds is labelled.ds and len(pool) == len(split.pool) and len(labelled) == 20
        assert (pool.ds is images) == (augment == "crop")
        warps = any(isinstance(t, v2.RandomAffine) for t in pool.ds.transform.transforms)
        assert warps == (augment == "pretrain")
        assert [pool[i][1] for i in range(5)] == propagated[:5].tolist()
        assert [labelled[i][1] for i in range(5)] == split.labels[:5].tolist()


def test_finetune_and_distill_on_two_gloo_replicas():
    """Each replica trains on its half of every batch; averaged gradients keep teacher and student equal."""
    r0, r1 = run_gloo(finetune_then_distill, 2, 0)
    torch.testing.assert_close(r0["teacher_weight"], r1["teacher_weight"])
    torch.testing.assert_close(r0["weight"], r1["weight"])
    assert r0["student"] == r1["student"] > r0["teacher"] == r1["teacher"], (r0, r1)


# ----------------------------------------------------------------------------- the study and its labels

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint of the tiny model (untrained): the study's plumbing, not its figures."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))[0]


@pytest.fixture(scope="module")
def digits_train():
    return data.build(load_config("tiny")).bank


def _write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def _two_per_class(train) -> list[str]:
    labels = train_labels(train)
    return [f"{int(i)},{c}" for c in range(10) for i in (labels == c).nonzero().flatten()[:2]]


def _study_args(ckpt, labels, out, *extra: str) -> list[str]:
    """A tiny study from a labels file on 2 gloo replicas, with non-default distillation settings."""
    return ["semisup", "--ckpt", str(ckpt), "--labels-file", str(labels), "--out", str(out),
            "--backend", "cpu", "--cores", "2", "--set", "eval.semisup.steps=3",
            "--set", "eval.semisup.distill.steps=3", "--set", "eval.semisup.distill.batch_size=32",
            "--set", "eval.semisup.distill.temperature=2", "--set", "eval.semisup.distill.teacher_view=crop",
            "--set", "eval.semisup.distill.targets=soft", "--set", "eval.semisup.distill.student_augment=crop",
            "--set", "eval.semisup.labelprop.k=7", "--set", "eval.semisup.labelprop.student_augment=pretrain",
            "--set", "eval.semisup.labelprop.pixel_weight=0.5", *[a for s in SMALL_SELECT for a in ("--set", s)],
            *extra]


def test_semisup_with_labels_file_on_two_gloo_replicas(tiny_ckpt, digits_train, tmp_path):
    """Every row, the distilled ones included, from a user's labels file; settings in summary.json."""
    labels = _write(tmp_path / "labels.csv", ["# my 20 digits", "index,label", *_two_per_class(digits_train)])
    out = tmp_path / "out"
    p = run_eval(_study_args(tiny_ckpt, labels, out))
    assert p.returncode == 0, p.stderr[-3000:]
    study = read_summary(out)["semisup"]["20"]
    assert study["labelprop"]["k"] == 7 and study["labelprop"]["student_augment"] == "pretrain"
    assert study["labelprop"]["pixel_weight"] == 0.5
    assert set(study["labelprop"]) == {"k", "pixel_k", "alpha", "gamma", "iterations", "student_augment",
                                      "pixel_student_augment", "pixel_weight"}
    assert set(study["rows"]) == set(SEMISUP_ROWS) and len(SEMISUP_ROWS) == 9
    assert all(0.0 <= v <= 100.0 for v in study["rows"].values())
    assert study["labels_file"] == str(labels.resolve()) and study["scored_on"] == "test"
    d = study["distill"]
    assert d["steps"] == 3 and d["temperature"] == 2.0 and d["batch_size"] == 32 and d["unlabelled_pool"] == 1257
    assert {"lr", "scratch_lr", "label_weight"} <= set(d) and d["teacher_view"] == "crop" and d["targets"] == "soft"
    assert d["student_augment"] == "crop"
    record = [r for r in read_metrics(out) if r["type"] == "semisup"][-1]
    assert {k: record[k] for k in study["rows"]} == study["rows"]
    for title in ("MoCo fine-tuned + distilled", "from scratch + distilled",
                  "MoCo + 0.5 x raw pixels label propagation + distilled", "raw-pixel label propagation + distilled",
                  "from " + str(labels.resolve()), "points over the strongest row without pre-training",
                  "points over the best from scratch"):
        assert title in p.stdout
    assert study["raw_pixels"] == ["moco_labelprop", "pixel_labelprop", "pixel_logistic"]
    chosen = study["selection"]  # cross-validation on the 20 labels, each fold's rows on both replicas
    assert chosen["moco_finetune"]["folds"] == 2 and chosen["moco_finetune"]["fold_sizes"] == [10, 10]
    assert chosen["moco_labelprop"]["chosen"] in (5, 10) and "fixed" in chosen["moco_distill"]["scored_by"]
    assert "raw pixels" in study["titles"]["moco_labelprop"]
    m = study["margins"]
    assert m["best_moco"]["top1"] == max(study["rows"][k] for k in ("moco_probe", "moco_finetune", "moco_distill",
                                                                    "moco_labelprop"))
    assert m["over_scratch"]["margin"] == m["best_moco"]["top1"] - max(
        study["rows"]["supervised_scratch"], study["rows"]["scratch_distill"])
    assert m["over_no_pretraining"]["margin"] <= m["over_scratch"]["margin"]
    # eval.semisup.rows: the chosen rows (and the teacher a distilled row needs) alone, each as in the full study
    p = run_eval(_study_args(tiny_ckpt, labels, tmp_path / "some",
                             "--set", "eval.semisup.rows=scratch_distill,moco_labelprop"))
    assert p.returncode == 0, p.stderr[-3000:]
    some = read_summary(tmp_path / "some")["semisup"]["20"]["rows"]
    assert some == {k: study["rows"][k] for k in ("moco_labelprop", "supervised_scratch", "scratch_distill")}


def test_labels_file_errors_are_one_line_exit_2(tiny_ckpt, digits_train, tmp_path, capsys):
    good = _two_per_class(digits_train)
    n = len(digits_train)
    cases = [
        ([f"{n},3", *good[1:]], f"index {n} is not in the train set (valid: 0..{n - 1})"),
        ([*good, good[5]], "is listed twice (also on line 6)"),
        ([g for g in good if not g.endswith(",7")], "labels no image of class 7"),
        ([*good, "5,10"], "label 10 is out of range (valid: 0..9)"),
        ([*good, "5,seven"], "'seven' is not a class number"),
        ([*good, "5;3"], "expected 2 fields, got 1"),
        ([*good, "images/a.png,3"], "have no file paths; use 'index,label' rows"),
        (["# nothing"], "has no labelled images"),
    ]
    for lines, message in cases:
        f = _write(tmp_path / "labels.csv", lines)
        assert moco_eval.main(["semisup", "--ckpt", str(tiny_ckpt), "--labels-file", str(f)]) == 2, lines
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --labels-file") and "\n" not in err and message in err, (message, err)
    f = _write(tmp_path / "labels.csv", good)
    for argv, message in ((["--labels", "30"], "--labels 30 disagrees with the 20 images"),
                          (["--set", "eval.semisup.distill.lr=0"], "eval.semisup.distill.lr' must be > 0")):
        assert moco_eval.main(["semisup", "--ckpt", str(tiny_ckpt), "--labels-file", str(f), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert moco_eval.main(["semisup", "--ckpt", str(tiny_ckpt), "--labels-file", str(tmp_path / "no.csv")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_labels_file_paths_and_its_labels_are_used(tmp_path):
    """path,label rows (folder datasets), relative to data.root or absolute; the file's labels win."""
    class Folder:
        samples = [(str(tmp_path / f"c{i % 3}" / f"{i}.png"), i % 3) for i in range(9)]

        def __len__(self):
            return len(self.samples)

    rows = ["path,label", "c0/0.png,0", f"{tmp_path / 'c1' / '4.png'},2", "c2/8.png,1"]
    idx, labels = read_labels_file(str(_write(tmp_path / "l.csv", rows)), Folder(), 3, str(tmp_path))
    assert idx.tolist() == [0, 4, 8] and labels.tolist() == [0, 2, 1]
    with pytest.raises(UserError, match="c0/1.jpg is not an image of the train set"):
        read_labels_file(str(_write(tmp_path / "l.csv", rows + ["c0/1.jpg,0"])), Folder(), 3, str(tmp_path))
    images = Points(torch.arange(9.0).unsqueeze(1), torch.zeros(9, dtype=torch.long))
    x, y = Relabelled(images, idx, labels)[1]
    assert torch.equal(x, images[4][0]) and y == 2  # image 4 with the file's label, not the dataset's 0


def test_holdout_keeps_scored_images_out_of_labels_and_distillation():
    cfg = load_config("tiny", ["eval.semisup.holdout=300", "eval.semisup.labels=50", "eval.semisup.seed=3"])
    bundle = data.build(cfg)
    split = semisup_split(cfg, bundle)
    held = set(split.test.indices)
    assert len(held) == 300 and split.scored_on.startswith("holdout")
    assert not held & set(split.picked.tolist()) and not held & set(split.pool.tolist())
    assert set(split.picked.tolist()) <= set(split.pool.tolist()) and len(split.pool) == 1257 - 300
    assert summary_key(cfg) == "semisup_holdout"
    plain = semisup_split(load_config("tiny", ["eval.semisup.labels=50", "eval.semisup.seed=3"]), bundle)
    assert torch.equal(plain.picked, split.picked) and plain.test is bundle.test and len(plain.pool) == 1257
