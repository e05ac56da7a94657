"""The quickstart's recipe against the raw pixels (issue 30): trials on a validation split of the
digits' training images, then the quickstart as shipped (``--config digits``) on three seeds,
each scored by the kNN monitor against the centred raw-pixel kNN of the same split.

    python benchmarks/digits_recipe.py run NAME[@SEED] ...   # trials (validation split), one after another
    python benchmarks/digits_recipe.py stopped NAME           # record a trial stopped by hand (its curve so far)
    python benchmarks/digits_recipe.py bn NAME[@SEED] ...    # a trial's final encoder, kNN with either BN statistics
    python benchmarks/digits_recipe.py layers NAME[@SEED] ... # a trial's final encoder, kNN on either layer
    python benchmarks/digits_recipe.py readouts NAME[@SEED] ... # its query and key encoders, hidden layer and output
    python benchmarks/digits_recipe.py test NAME [SEED]       # a trial as the quickstart on the test digits (budget)
    python benchmarks/digits_recipe.py seeds [0,1,2] [MACHINE] # the quickstart as shipped, on the test digits
    python benchmarks/digits_recipe.py pixels                 # the raw-pixel kNN of both splits, 8x8 and 16 px
    python benchmarks/digits_recipe.py report                 # merge into digits-recipe.json and docs/digits.md

Trials run niced on one thread (the temperature they vary changes no cost); the seeds run alone on
the machine with all its threads, one after another, since the quickstart's budget is wall clock
(at most 3 minutes on 2 cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mnist_recipe import RUNS, launch, load, save, stopped_record

ROOT = Path(__file__).resolve().parent.parent
TRIALS_DIR = ROOT / "benchmarks" / "results" / "digits-recipe"
RESULTS = ROOT / "benchmarks" / "results" / "digits-recipe.json"
BN_RESULTS = ROOT / "benchmarks" / "results" / "digits-recipe-bn.json"
PIXELS = ROOT / "benchmarks" / "results" / "digits-recipe-pixels.json"
LAYER_RESULTS = ROOT / "benchmarks" / "results" / "digits-recipe-layers.json"
LAYERS = ("backbone", "mlp_hidden")  # eval.knn_layer
READOUT_RESULTS = ROOT / "benchmarks" / "results" / "digits-recipe-readouts.json"
CENTRE_RESULTS = ROOT / "benchmarks" / "results" / "digits-recipe-centre.json"
# (eval.knn_encoder, eval.knn_layer): the shipped readout first, then the eighth round's candidates
READOUTS = (("query", "mlp_hidden"), ("query", "projection"), ("key", "mlp_hidden"), ("key", "projection"))
DOC = ROOT / "docs" / "digits.md"

VAL = ["data.val_size=300"]  # 300 of the 1,257 training digits score the trials; the test digits are not read
# The quickstart's settings when the trials began, which each trial's overrides then change: moco.m,
# eval.knn_bn, data.crop_min_scale and eval.knn_layer are what the trials chose for configs/digits.yaml since.
TRIAL_BASE = ["moco.m=0.99", "eval.knn_bn=running", "data.crop_min_scale=null", "eval.knn_layer=backbone",
              # and every other setting configs/digits.yaml has changed since, at its value then: a trial
              # means the same run whatever the quickstart ships now
              "train.epochs=40", "train.batch_size=128", "train.lr=0.03", "model.bn_splits=8", "data.augment=digits",
              "moco.nn_weight=0", "moco.nn_warmup_epochs=0"]
SHIPPED = ["moco.m=0.995", "eval.knn_bn=recompute"]  # trial m0.995_pbn: the second and third rounds' base
CROP08 = [*SHIPPED, "data.crop_min_scale=0.8"]  # trial pbn_crop0.8: the fourth round's base
QUICK20 = [*CROP08, "train.epochs=20"]  # trial crop0.8_20ep: the fifth round's base
Q20_SHIPPED = [*QUICK20, "eval.knn_layer=mlp_hidden"]  # configs/digits.yaml since the seventh round
# trial q20_b64_fine (round 20): the base of rounds 21-24's trials and, with the neighbour, of the round-24 settings
B64_FINE = [*Q20_SHIPPED, "train.batch_size=64", "train.lr=0.015", "moco.m=0.9975", "model.bn_splits=4",
            "data.augment=digits_fine"]
# moco_xla/configs/mocov3_digits.yaml's MoCo v3 settings, as overrides of configs/digits.yaml
MOCOV3 = ["moco.version=3", "moco.m=0.99", "moco.T=0.2", "moco.mlp_dim=512", "moco.shuffle=none", "model.bn_splits=1",
          "model.sync_bn=true", "train.optimizer=lars", "train.lr=0.6", "train.scale_lr=true",
          "train.weight_decay=1e-6", "train.momentum=0.9", "train.warmup_epochs=2"]

TRIALS: dict[str, tuple[str, list[str]]] = {
    # name: (what it tests, overrides on top of moco_xla/configs/digits.yaml, TRIAL_BASE and VAL)
    "T0.1": ("temperature 0.1 (the official CIFAR-10 demo's)", ["moco.T=0.1"]),
    "T0.2": ("temperature 0.2 (MoCo v2's)", ["moco.T=0.2"]),
    "T0.3": ("temperature 0.3", ["moco.T=0.3"]),
    "affine": ("small affine warps of the strokes as well (digits_affine, the few-label pre-training's)",
               ["data.augment=digits_affine"]),
    "w16_80ep": ("width 16 (about half the compute of width 32) for 80 epochs", ["model.width=16", "train.epochs=80"]),
    "w16_100ep": ("width 16 for 100 epochs", ["model.width=16", "train.epochs=100"]),
    "w8_160ep": ("width 8 (about a quarter of width 32's compute) for 160 epochs", ["model.width=8", "train.epochs=160"]),
    "m0.95": ("key encoder momentum 0.95 (a 400-step run: 0.99 averages over a quarter of it)", ["moco.m=0.95"]),
    "m0.9": ("key encoder momentum 0.9", ["moco.m=0.9"]),
    "m0.995": ("key encoder momentum 0.995", ["moco.m=0.995"]),
    "m0.999": ("key encoder momentum 0.999", ["moco.m=0.999"]),
    "m0.995_pbn": ("momentum 0.995, the kNN's BN statistics recomputed on the bank's clean digits (precise BN)",
                   SHIPPED),
    "b64": ("batch 64 (twice the steps), learning rate 0.06, 4 BN splits of 16",
            ["train.batch_size=64", "train.lr=0.06", "model.bn_splits=4"]),
    # on top of m0.995_pbn (configs/digits.yaml after the first round):
    "pbn_T0.07": ("m0.995_pbn at temperature 0.07 (MoCo v1's)", [*SHIPPED, "moco.T=0.07"]),
    "pbn_T0.05": ("m0.995_pbn at temperature 0.05", [*SHIPPED, "moco.T=0.05"]),
    "pbn_lr0.06": ("m0.995_pbn at learning rate 0.06", [*SHIPPED, "train.lr=0.06"]),
    "pbn_lr0.015": ("m0.995_pbn at learning rate 0.015", [*SHIPPED, "train.lr=0.015"]),
    "pbn_lr0.0075": ("m0.995_pbn at learning rate 0.0075", [*SHIPPED, "train.lr=0.0075"]),
    "pbn_45ep": ("m0.995_pbn for 45 epochs (the rest of the 3-minute budget)", [*SHIPPED, "train.epochs=45"]),
    "pbn_crop0.6": ("m0.995_pbn with milder crops: 0.6-1 of the digit (data.crop_min_scale)",
                    [*SHIPPED, "data.crop_min_scale=0.6"]),
    "pbn_crop0.8": ("m0.995_pbn with milder crops: 0.8-1 of the digit", CROP08),
    "pbn_crop0.4": ("m0.995_pbn with the digits preset's own crops, 0.4-1 (the quickstart before crop_min_scale 0.8)",
                    [*SHIPPED, "data.crop_min_scale=0.4"]),
    # fourth round, for the budget: shorter runs of the shipped settings, beside them rerun on the same VM
    "crop0.8_40ep": ("the quickstart as shipped (pbn_crop0.8), rerun beside the shorter runs on the same VM",
                     CROP08),
    "crop0.8_30ep": ("the quickstart for 30 epochs", [*CROP08, "train.epochs=30"]),
    "crop0.8_20ep": ("the quickstart for 20 epochs", QUICK20),
    "crop0.8_20ep_m0.99": ("the quickstart for 20 epochs, key momentum 0.99 (averaging over the same share of "
                           "a half-length run)", [*QUICK20, "moco.m=0.99"]),
    # fifth round, on top of crop0.8_20ep (configs/digits.yaml after the fourth round), within the budget:
    "q20_bn4": ("the 20-epoch quickstart with Split BN 4 (statistics over 32 images, not 16)",
                [*QUICK20, "model.bn_splits=4"]),
    "q20_w40": ("the 20-epoch quickstart at width 40 (about 1.6x the compute)", [*QUICK20, "model.width=40"]),
    "q20_K512": ("the 20-epoch quickstart with a queue of 512 (below the validation split's 957 training digits)",
                 [*QUICK20, "moco.K=512"]),
    # sixth round, on top of crop0.8_20ep, within the budget: the optimiser, and MoCo v3's batch negatives
    "q20_wd1e-4": ("the 20-epoch quickstart with weight decay 1e-4 (MoCo's ImageNet setting), not 5e-4",
                   [*QUICK20, "train.weight_decay=1e-4"]),
    "q20_wd1e-3": ("the 20-epoch quickstart with weight decay 1e-3", [*QUICK20, "train.weight_decay=1e-3"]),
    "q20_warm2": ("the 20-epoch quickstart with a 2-epoch linear warm-up", [*QUICK20, "train.warmup_epochs=2"]),
    "q20_v3": ("MoCo v3 for 20 epochs (the batch of keys as negatives, predictor, LARS; mocov3_digits's settings)",
               [*QUICK20, *MOCOV3]),
    # ninth round, on top of the shipped quickstart (crop0.8_20ep read on the MLP's hidden layer):
    # trial b64's batch of 64 again, its learning rate and key momentum scaled with the batch
    "q20_b64": ("the quickstart at batch 64 (twice the steps): learning rate 0.015 (scaled with the batch), "
                "key momentum 0.9975 (the same averaging in epochs), Split BN 4 (16 images each, as now)",
                [*QUICK20, "eval.knn_layer=mlp_hidden", "train.batch_size=64", "train.lr=0.015", "moco.m=0.9975",
                 "model.bn_splits=4"]),
    # tenth round, on top of the shipped quickstart: the two levers that lifted MoCo on mnist-dev
    # (docs/mnist.md), first tried here on the preset's harsher crops (0.4-1), now on the shipped mild ones
    "q20_T0.2": ("the quickstart at temperature 0.2 (mnist-dev's recipe's)", [*Q20_SHIPPED, "moco.T=0.2"]),
    "q20_affine": ("the quickstart with small affine warps of the strokes (digits_affine, mnist-dev's recipe's)",
                   [*Q20_SHIPPED, "data.augment=digits_affine"]),
    "q20_affine_T0.2": ("the quickstart with both: affine warps and temperature 0.2 (mnist-dev's recipe's pair)",
                        [*Q20_SHIPPED, "data.augment=digits_affine", "moco.T=0.2"]),
    # eleventh round, on top of the shipped quickstart: the third round's crops, milder still
    "q20_crop0.9": ("the quickstart with crops of 90-100% of the digit", [*Q20_SHIPPED, "data.crop_min_scale=0.9"]),
    "q20_crop1.0": ("the quickstart without crops (at scale 1 only the square fits a square digit): blur alone",
                    [*Q20_SHIPPED, "data.crop_min_scale=1.0"]),
    # thirteenth round, on top of the shipped quickstart: the queue's same-class keys, and the crops' grid;
    # rounds 13-14 ran on another VM (AVX-512) than rounds 4-12 (AVX2): the shipped settings rerun beside them
    "q20_shipped": ("the quickstart as shipped, rerun beside rounds 13-14 on their VM", Q20_SHIPPED),
    "q20_debias": ("the quickstart with the debiased InfoNCE, tau+ 0.1 (a tenth of the queue: the query's digit)",
                   [*Q20_SHIPPED, "moco.debias=0.1"]),
    "q20_fine_crops": ("the quickstart with its crops drawn on the 16-px view's grid, not the stored 8x8 one "
                       "(digits_fine)", [*Q20_SHIPPED, "data.augment=digits_fine"]),
    # fourteenth round: the crops on the fine grid, where their scale means what it says, a little harsher
    "q20_fine_crops0.7": ("q20_fine_crops with crops of 70-100% of the digit",
                          [*Q20_SHIPPED, "data.augment=digits_fine", "data.crop_min_scale=0.7"]),
    "q20_fine_crops0.6": ("q20_fine_crops with crops of 60-100% of the digit",
                          [*Q20_SHIPPED, "data.augment=digits_fine", "data.crop_min_scale=0.6"]),
    # fifteenth round: the key encoder's momentum rising to 1 on a half cosine over the run (MoCo v3's schedule)
    "q20_m_cosine": ("the quickstart with its key momentum rising from 0.995 to 1 on a half cosine (moco.m_cosine)",
                     [*Q20_SHIPPED, "moco.m_cosine=true"]),
    "q20_m_cosine0.99": ("the quickstart with its key momentum rising from 0.99 to 1 on a half cosine "
                         "(MoCo v3's schedule and base)", [*Q20_SHIPPED, "moco.m=0.99", "moco.m_cosine=true"]),
    # sixteenth round: the kNN reads the query encoder's weights averaged over the last epochs (SWA)
    "q20_swa10": ("the quickstart, the kNN reading the query encoder's weights averaged over epochs 11-20 "
                  "(train.average_from, eval.knn_encoder=averaged)",
                  [*Q20_SHIPPED, "train.average_from=11", "eval.knn_encoder=averaged"]),
    "q20_swa5": ("the quickstart, the kNN reading the query encoder's weights averaged over epochs 16-20",
                 [*Q20_SHIPPED, "train.average_from=16", "eval.knn_encoder=averaged"]),
    # seventeenth round: the digits as stored, 8x8, not upsampled to 16 px (a quarter of the positions)
    "q20_px8": ("the quickstart on the digits as stored, 8x8 (data.image_size=8): a quarter of the compute",
                [*Q20_SHIPPED, "data.image_size=8"]),
    "q20_px8_w64": ("the quickstart at 8x8 and width 64: about the shipped compute",
                    [*Q20_SHIPPED, "data.image_size=8", "model.width=64"]),
    # eighteenth round: the other way, a view larger than the shipped 16 px, within the budget
    "q20_px20": ("the quickstart with the digits upsampled to 20 px: about 1.6x the compute",
                 [*Q20_SHIPPED, "data.image_size=20"]),
    "q20_px24_w24": ("the quickstart with the digits upsampled to 24 px at width 24: about 1.3x the compute",
                     [*Q20_SHIPPED, "data.image_size=24", "model.width=24"]),
    # nineteenth round: a deeper small ResNet (model.depth: blocks per stage), narrower to keep the budget
    "q20_d2_w24": ("the quickstart with two blocks per stage at width 24: about 1.1x the compute",
                   [*Q20_SHIPPED, "model.depth=2", "model.width=24"]),
    "q20_d3_w20": ("the quickstart with three blocks per stage at width 20: about 1.2x the compute",
                   [*Q20_SHIPPED, "model.depth=3", "model.width=20"]),
    # twentieth round: more, smaller steps (the shipped run takes about 150), the batch's settings scaled with it
    "q20_b32": ("the quickstart at batch 32 (four times the steps): learning rate 0.0075, key momentum 0.99875 "
                "(the same averaging in epochs), Split BN 2 (16 images each, as now)",
                [*Q20_SHIPPED, "train.batch_size=32", "train.lr=0.0075", "moco.m=0.99875", "model.bn_splits=2"]),
    "q20_b64_fine": ("q20_b64 (batch 64, learning rate 0.015, key momentum 0.9975, Split BN 4) with the crops on "
                     "the 16-px view's grid (q20_fine_crops)",
                     B64_FINE),
    # twenty-first round: the positive drawn from the queue, its nearest key to the key (NNCLR; moco.nn_weight 1)
    "q20_nn": ("the quickstart with the queue's nearest key to the key as the positive (moco.nn_weight=1)",
               [*Q20_SHIPPED, "moco.nn_weight=1"]),
    "q20_b64_fine_nn": ("q20_b64_fine with the queue's nearest key as the positive",
                        [*B64_FINE, "moco.nn_weight=1"]),
    # twenty-second round: half the loss with the key as the positive, half with its nearest neighbour
    "q20_nn0.5": ("the quickstart with half its loss's positives the queue's nearest keys (moco.nn_weight=0.5)",
                  [*Q20_SHIPPED, "moco.nn_weight=0.5"]),
    "q20_b64_fine_nn0.5": ("q20_b64_fine with half its loss's positives the queue's nearest keys",
                           [*B64_FINE, "moco.nn_weight=0.5"]),
    # twenty-third round: the nearest key's share warmed up from 0 (moco.nn_warmup_epochs), to 1
    "q20_b64_fine_nn_w5": ("q20_b64_fine_nn with the nearest key's share rising from 0 to 1 over 5 epochs",
                           [*B64_FINE, "moco.nn_weight=1", "moco.nn_warmup_epochs=5"]),
    "q20_b64_fine_nn_w10": ("q20_b64_fine_nn with the nearest key's share rising from 0 to 1 over 10 epochs",
                            [*B64_FINE, "moco.nn_weight=1", "moco.nn_warmup_epochs=10"]),
    # twenty-fourth round: more epochs for the neighbour to work in (30, within the budget)
    "q20_b64_fine_nn_w10_30ep": ("q20_b64_fine_nn_w10 for 30 epochs (warm-up 10, then 20 with the neighbour alone)",
                                 [*B64_FINE, "moco.nn_weight=1", "moco.nn_warmup_epochs=10", "train.epochs=30"]),
    "q20_b64_fine_nn_w15_30ep": ("q20_b64_fine_nn for 30 epochs with a 15-epoch warm-up (half the run, as w10 of 20)",
                                 [*B64_FINE, "moco.nn_weight=1", "moco.nn_warmup_epochs=15", "train.epochs=30"]),
    # rounds 20-24 ran on another VM (AMD EPYC family 26 model 2) than rounds 13-19 and q20_shipped (family 25
    # model 17): the settings shipped before round 24, rerun on it
    "q20_shipped_f26": ("the quickstart as shipped before round 24, rerun on the VM of rounds 20-24", Q20_SHIPPED),
}


def run(names: list[str]) -> None:
    """Each NAME of TRIALS (seed 0) or NAME@SEED: the trial with train.seed=SEED, the same validation split."""
    TRIALS_DIR.mkdir(parents=True, exist_ok=True)
    for arg in names:
        name, _, seed = arg.partition("@")
        what, extra = TRIALS[name]
        seed = int(seed or 0)
        run = name if seed == 0 else f"{name}@{seed}"
        result = {"split": "val", "what": what, "seed": seed,
                  **launch(run, [*TRIAL_BASE, *VAL, *extra, f"train.seed={seed}"], RUNS / f"digits-{run}-val",
                           config="digits")}
        save(result, TRIALS_DIR / f"{run}-val.json")


def stopped(name: str) -> None:
    """Record a trial stopped by hand (behind at every monitor): its kNN curve so far."""
    what, extra = TRIALS[name]
    result = {**stopped_record(name, what, TRIAL_BASE + VAL + extra, RUNS / f"digits-{name}-val"), "seed": 0}
    (TRIALS_DIR / f"{name}-val.json").write_text(json.dumps(result, indent=1) + "\n")


def bn(runs: list[str]) -> None:
    """Each finished trial's last checkpoint scored by ``python -m moco_xla.eval knn`` on its validation
    split twice: with pre-training's running BN statistics and with them recomputed on the bank
    (eval.knn_bn): the same weights, so the difference is the statistics' alone."""
    table = json.loads(BN_RESULTS.read_text()) if BN_RESULTS.exists() else {}
    for run in runs:
        ckpt = RUNS / f"digits-{run}-val"
        row = {mode: knn_of(ckpt, [f"eval.knn_bn={mode}"], mode) for mode in ("running", "recompute")}
        table[run] = {**row, "difference": row["recompute"] - row["running"]}
        print(f"{run}: running {row['running']:.2f}  recompute {row['recompute']:.2f}", flush=True)
        BN_RESULTS.write_text(json.dumps(table, indent=1) + "\n")


def layers(runs: list[str]) -> None:
    """Each finished trial's last checkpoint scored by ``python -m moco_xla.eval knn`` on its validation
    split with either readout (eval.knn_layer), BN statistics recomputed on the bank as the quickstart
    does: the same weights, so the difference is the features' alone."""
    table = json.loads(LAYER_RESULTS.read_text()) if LAYER_RESULTS.exists() else {}
    for run in runs:
        ckpt = RUNS / f"digits-{run}-val"
        row = {layer: knn_of(ckpt, ["eval.knn_bn=recompute", f"eval.knn_layer={layer}"], layer) for layer in LAYERS}
        table[run] = {**row, "difference": row["mlp_hidden"] - row["backbone"]}
        print(f"{run}: backbone {row['backbone']:.2f}  mlp_hidden {row['mlp_hidden']:.2f}", flush=True)
        LAYER_RESULTS.write_text(json.dumps(table, indent=1) + "\n")


def readouts(runs: list[str]) -> None:
    """Each finished trial's last checkpoint scored by ``python -m moco_xla.eval knn`` on its validation
    split for every READOUTS pair (eval.knn_encoder, eval.knn_layer), BN statistics recomputed on the bank."""
    for run in runs:
        ckpt = RUNS / f"digits-{run}-val"
        row = {f"{enc} {layer}": knn_of(ckpt, ["eval.knn_bn=recompute", f"eval.knn_encoder={enc}",
                                               f"eval.knn_layer={layer}"], f"{enc}-{layer}") for enc, layer in READOUTS}
        print(f"{run}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        # read again before writing: two of these commands may share the file (one per core)
        table = json.loads(READOUT_RESULTS.read_text()) if READOUT_RESULTS.exists() else {}
        READOUT_RESULTS.write_text(json.dumps({**table, run: row}, indent=1) + "\n")


def centre(runs: list[str]) -> None:
    """Each finished trial's last checkpoint scored by ``python -m moco_xla.eval knn`` on its validation
    split at the shipped readout (the MLP's hidden layer, BN statistics recomputed on the bank), its
    features as they are and centred on the bank's mean feature (eval.knn_centre, as the raw-pixel
    reference centres the pixels): the same weights, so the difference is the centring's alone."""
    for run in runs:
        ckpt = RUNS / f"digits-{run}-val"
        base = ["eval.knn_bn=recompute", "eval.knn_layer=mlp_hidden"]
        row = {mode: knn_of(ckpt, [*base, f"eval.knn_centre={mode == 'centred'}"], mode)
               for mode in ("uncentred", "centred")}
        print(f"{run}: uncentred {row['uncentred']:.2f}  centred {row['centred']:.2f}", flush=True)
        # read again before writing: two of these commands may share the file (one per core)
        table = json.loads(CENTRE_RESULTS.read_text()) if CENTRE_RESULTS.exists() else {}
        table[run] = {**row, "difference": row["centred"] - row["uncentred"]}
        order = list(json.loads(LAYER_RESULTS.read_text())) if LAYER_RESULTS.exists() else []  # its rows' order
        table = dict(sorted(table.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
        CENTRE_RESULTS.write_text(json.dumps(table, indent=1) + "\n")


def knn_of(run_dir: Path, overrides: list[str], tag: str) -> float:
    """``python -m moco_xla.eval knn`` on a run's last checkpoint with ``overrides`` (niced, one thread)."""
    out = RUNS / f"{run_dir.name}-knn-{tag}"
    args = [sys.executable, "-m", "moco_xla.eval", "knn", "--ckpt", str(run_dir), "--backend", "cpu", "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    p = subprocess.run(["nice", "-n", "19", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        raise SystemExit(f"kNN of {run_dir} failed:\n{p.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["knn_top1"]


def test(name: str, seed: str = "0") -> None:
    """A validation trial as the quickstart on the test digits, alone on the machine: does it keep the budget?"""
    what, extra = TRIALS[name]
    run = f"{name}-seed{seed}"
    result = {"split": "test", "what": f"trial {name} ({what}) as the quickstart, not shipped", "seed": int(seed),
              **launch(run, [*TRIAL_BASE, *extra, f"train.seed={seed}"], RUNS / f"digits-{run}-test", config="digits",
                       alone=True)}
    save(result, TRIALS_DIR / f"{run}-test.json")


def seeds(text: str = "0,1,2", machine: str = "") -> None:
    """``python -m moco_xla.launch --config digits --set train.seed=S``: the quickstart as a user runs it.
    ``machine``: a name for another machine than the shipped rows': its rows (quickstart-MACHINE-seedS)
    sit beside those, which stay (another CPU rounds otherwise, and these runs amplify a rounding)."""
    from moco_xla.bench.cli import cpu_model
    TRIALS_DIR.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in text.split(",")]:
        name = f"quickstart-{machine}-seed{seed}" if machine else f"quickstart-seed{seed}"
        out = RUNS / f"digits-{name}"
        if not machine:
            retire(name, out)
        what = "the quickstart as shipped (configs/digits.yaml)" + (f", on {cpu_model()}" if machine else "")
        result = {"split": "test", "what": what, "seed": seed,
                  **launch(name, [f"train.seed={seed}"], out, config="digits", alone=True),
                  "config": yaml.safe_load((out / "config.yaml").read_text())}
        save(result, TRIALS_DIR / f"{name}-test.json")


def retire(name: str, out: Path) -> None:
    """Keep an earlier quickstart's row (and run) as ``previous-NAME`` (``previous2-NAME`` where that
    is taken, and so on) when configs/digits.yaml has changed since: the table then shows the
    quickstart before and after each change."""
    record = TRIALS_DIR / f"{name}-test.json"
    if not record.exists():
        return
    old = json.loads(record.read_text())
    if "config" in old and is_shipped(old):
        return
    generation = next(g for g in ["", *map(str, range(2, 100))]
                      if not (TRIALS_DIR / f"previous{g}-{name}-test.json").exists())  # earlier ones stay
    old.update(name=f"previous{generation}-{name}",
               what="the quickstart as shipped before the current configs/digits.yaml")
    (TRIALS_DIR / f"previous{generation}-{name}-test.json").write_text(json.dumps(old, indent=1) + "\n")
    record.unlink()
    if out.exists():
        out.rename(out.with_name(f"digits-previous{generation}-{name}"))


def pixels() -> None:
    """The centred raw-pixel kNN (the monitor's protocol) of the validation and test splits, on the
    digits as stored (8x8: the monitor's reference) and upsampled to the quickstart's 16 px (the
    reference the monitor printed before it read the stored images), into digits-recipe-pixels.json."""
    from moco_xla import data
    from moco_xla.config import load_config
    from moco_xla.data.subsets import at_stored_size
    from moco_xla.eval.pixel_knn import pixel_knn_accuracy
    from moco_xla.runtime import make_runtime
    rt, out = make_runtime("local"), {}
    for split, extra in (("val", VAL), ("test", [])):
        cfg = load_config("digits", extra)
        b, d, e = data.build(cfg), cfg.data, cfg.eval
        stored = [at_stored_size(ds, d.augment, d.image_size, cfg.model.in_channels) for ds in (b.bank, b.test)]
        out[split] = {size: float(pixel_knn_accuracy(rt, bank, test, b.num_classes, e.knn_k, e.knn_t, e.batch_size,
                                            e.max_bank))
                      for size, (bank, test) in (("stored", stored), ("upsampled", (b.bank, b.test)))}
    PIXELS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


def gains(t: dict, pixel: dict) -> tuple[float, float]:
    """A run's kNN minus the raw pixels' of its split: as stored (8x8), and upsampled to 16 px. Its
    own record holds the one its monitor printed, which must be one of the two."""
    ref = pixel[t["split"]]
    if min(abs(t["pixel_knn_top1"] - v) for v in ref.values()) > 1e-3:
        raise SystemExit(f"{t['name']}: its monitor's pixel kNN {t['pixel_knn_top1']} is neither of {ref}")
    return t["knn_top1"] - ref["stored"], t["knn_top1"] - ref["upsampled"]


def table(trials: list[dict], pixel: dict) -> list[str]:
    rows = ["| run | what | seed | MoCo kNN | raw-pixel kNN (8x8) | MoCo - pixels | MoCo - 16-px pixels | "
            "pre-training wall | load avg (start / end) | kNN curve (epoch: %) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for t in trials:
        curve = ", ".join(f"{e}: {k:.1f}" for e, k in t["knn_curve"])
        gain, gain16 = gains(t, pixel)
        rows.append(f"| {t['name']} | {t['what']} | {t['seed']} | {t['knn_top1']:.2f} | "
                    f"{pixel[t['split']]['stored']:.2f} | {gain:+.2f} | {gain16:+.2f} | {wall(t)} | "
                    f"{load(t['load_before'])} / {load(t['load_after'])} | {curve} |")
    return rows


def wall(t: dict) -> str:
    """Minutes, and the CPU model where the record names it (rows from before the field do not)."""
    return f"{t['wall_s'] / 60:.1f} min" + (f" ({t['cpu']})" if "cpu" in t else "")


def _trial_index(order: list[str], run: str) -> int:
    """Position of a run's trial (NAME or NAME@SEED) in the TRIALS table; test runs (not trials) first."""
    name = run.partition("@")[0]
    return order.index(name) if name in order else 0


def seed_means(val: list[dict], pixel: dict) -> list[str]:
    """Each finished trial's MoCo - pixels on every seed it ran, and their mean (stopped trials left out)."""
    by_trial: dict[str, list[dict]] = {}
    for t in val:
        if "stopped" not in t["what"]:
            by_trial.setdefault(t["name"].partition("@")[0], []).append(t)
    rows = ["| trial | seeds | MoCo - pixels, by seed | mean | mean MoCo - 16-px pixels |", "|---|---|---|---|---|"]
    for name, runs in by_trial.items():
        runs = sorted(runs, key=lambda t: t["seed"])
        both = [gains(t, pixel) for t in runs]
        mean = [sum(g[i] for g in both) / len(both) for i in (0, 1)]
        rows.append(f"| {name} | {', '.join(str(t['seed']) for t in runs)} | "
                    f"{' / '.join(f'{g[0]:+.2f}' for g in both)} | {mean[0]:+.2f} | {mean[1]:+.2f} |")
    return rows


def paired_table(path: Path, heading: str, scored: str, before: str, after: str) -> list[str]:
    """One encoder scored two ways (the ``bn`` and ``layers`` commands' records at ``path``): the range,
    mean and signs of ``after`` - ``before`` over the encoders, then a row each."""
    if not path.exists():
        return []
    pairs = json.loads(path.read_text())
    diffs = [p["difference"] for p in pairs.values()]
    rows = [f"## One encoder, {heading}", "",
            f"Each trial's final checkpoint scored by `python -m moco_xla.eval knn` {scored}: {after} - {before} "
            f"{min(diffs):+.2f} to {max(diffs):+.2f}, mean {sum(diffs) / len(diffs):+.2f} over {len(diffs)} encoders, "
            f"higher on {sum(d > 0 for d in diffs)}, equal on {sum(d == 0 for d in diffs)}, lower on "
            f"{sum(d < 0 for d in diffs)}.",
            "", f"| trial | {before} | {after} | {after} - {before} |", "|---|---|---|---|"]
    rows += [f"| {run} | {p[before]:.2f} | {p[after]:.2f} | {p['difference']:+.2f} |" for run, p in pairs.items()]
    return rows + [""]


def bn_table() -> list[str]:
    return paired_table(BN_RESULTS, "two sets of BN statistics (validation split, `digits_recipe.py bn`)",
                        "with pre-training's running BN statistics (`eval.knn_bn=running`) and with statistics "
                        "recomputed on the bank's clean digits (`recompute`)", "running", "recompute")


def layers_table() -> list[str]:
    return paired_table(LAYER_RESULTS, "two readouts (validation split, `digits_recipe.py layers`)",
                        "on the backbone's pooled features (`eval.knn_layer=backbone`) and on the projection MLP's "
                        "hidden layer (`mlp_hidden`), BN statistics recomputed on the bank", "backbone", "mlp_hidden")


def centre_table() -> list[str]:
    return paired_table(CENTRE_RESULTS, "features centred or not (validation split, `digits_recipe.py centre`)",
                        "at the shipped readout (the MLP's hidden layer, BN statistics recomputed on the bank), its "
                        "features as they are and centred on the bank's mean feature (`eval.knn_centre`)",
                        "uncentred", "centred")


def readouts_table() -> list[str]:
    """Every encoder of ``readouts`` under each READOUTS pair, then the means the eighth round's rule reads."""
    if not READOUT_RESULTS.exists():
        return []
    scored = json.loads(READOUT_RESULTS.read_text())
    names = [f"{enc} {layer}" for enc, layer in READOUTS]
    shipped = [r for r in scored if r.split("@")[0] == "crop0.8_20ep"]

    def summary(label: str, runs: list[str]) -> str:
        base = [scored[r][names[0]] for r in runs]
        cells = []
        for n in names:
            values = [scored[r][n] for r in runs]
            lower = sum(v < b for v, b in zip(values, base))
            cells.append(f"{sum(values) / len(values):.2f} (lower on {lower})" if n != names[0]
                         else f"{sum(values) / len(values):.2f}")
        return f"| {label} | " + " | ".join(cells) + " |"

    return ["## One encoder, four readouts (validation split, `digits_recipe.py readouts`)", "",
            "Each trial's final checkpoint scored by `python -m moco_xla.eval knn` on the query or key encoder "
            "(`eval.knn_encoder`) at the projection MLP's hidden layer or the head's output (`eval.knn_layer`), "
            "BN statistics recomputed on the bank. The summary rows give each readout's mean and on how many "
            "encoders it scored below the first column (the shipped readout).", "",
            "| trial | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
            *[f"| {r} | " + " | ".join(f"{scored[r][n]:.2f}" for n in names) + " |" for r in scored],
            summary(f"mean, crop0.8_20ep's {len(shipped)} seeds", shipped),
            summary(f"mean, all {len(scored)} encoders", list(scored)), ""]


def report() -> None:
    order = list(TRIALS)  # the TRIALS table's order, then the test runs by name
    trials = sorted((json.loads(p.read_text()) for p in TRIALS_DIR.glob("*.json")),
                    key=lambda t: (t["split"] != "val", _trial_index(order, t["name"]), t["name"]))
    RESULTS.write_text(json.dumps(trials, indent=1) + "\n")
    pixel = json.loads(PIXELS.read_text())
    val = [t for t in trials if t["split"] == "val"]
    test = [mark_superseded(t) for t in trials if t["split"] == "test"]
    lines = [DOC_HEAD, "", f"Raw-pixel kNN (`digits_recipe.py pixels`): validation {pixel['val']['stored']:.2f} "
             f"as stored, {pixel['val']['upsampled']:.2f} at 16 px; test {pixel['test']['stored']:.2f} as stored, "
             f"{pixel['test']['upsampled']:.2f} at 16 px.", "",
             "## Validation split (300 of the 1,257 training digits; pre-training and bank: "
             "the other 957)", "", *table(val, pixel), "", "Per trial, over its seeds:", "", *seed_means(val, pixel),
             "", *bn_table(), *layers_table(), *readouts_table(), *centre_table(),
             "## Test digits (540; pre-training and bank: all 1,257 training digits)", "", *table(test, pixel), ""]
    for machine, rows in quickstart_rows(test).items():
        lines += [goal_line(machine, rows, pixel), ""]
    DOC.write_text("\n".join(lines) + DOC_TAIL)
    print(f"wrote {RESULTS} and {DOC}: {len(val)} validation trials, {len(test)} test runs")


def mark_superseded(run: dict) -> dict:
    """A quickstart row (``seeds``) whose recorded config is not configs/digits.yaml's now says so
    in the tables: the rows of another machine are not retired (``retire``) when the config changes."""
    if not run["name"].startswith("quickstart-") or "config" not in run or is_shipped(run):
        return run
    where = run["what"].partition(", on ")[2]
    return {**run, "shipped": False, "what": "the quickstart as shipped before the current configs/digits.yaml"
            + (f", on {where}" if where else "")}


def is_shipped(run: dict) -> bool:
    """``run`` (a ``seeds`` row) had configs/digits.yaml's settings as they are now, but for options
    added to the schema since it ran, at their defaults."""
    from moco_xla.config import Config, load_config
    return _same(run["config"], load_config("digits", [f"train.seed={run['seed']}"]).to_dict(), Config().to_dict())


def _same(recorded: dict, current: dict, defaults: dict) -> bool:
    for key, value in current.items():
        if key not in recorded:
            if value != defaults[key]:
                return False
        elif isinstance(value, dict) and isinstance(recorded[key], dict):
            if not _same(recorded[key], value, defaults[key]):
                return False
        elif recorded[key] != value:
            return False
    return set(recorded) <= set(current)


def quickstart_rows(test: list[dict]) -> dict[str, list[dict]]:
    """The quickstart's test rows by machine: "" for the shipped rows (quickstart-seedS), then each
    MACHINE of the rows ``seeds S MACHINE`` wrote (quickstart-MACHINE-seedS)."""
    groups: dict[str, list[dict]] = {}
    for t in test:
        if t["name"].startswith("quickstart-"):
            groups.setdefault(t["name"][len("quickstart-"):].rpartition("seed")[0].rstrip("-"), []).append(t)
    return dict(sorted(groups.items()))


def goal_line(machine: str, rows: list[dict], pixel: dict) -> str:
    """Issue 30's digits goal on one machine's quickstart rows: MoCo - the stored pixels, every seed."""
    margins = [gains(t, pixel)[0] for t in rows]
    where = f" on {rows[0]['cpu']} (`{machine}` rows)" if machine else ""
    when = " before the current configs/digits.yaml" if rows[0].get("shipped") is False else ""
    return (f"The quickstart as shipped{when}{where}, MoCo - pixels (8x8, as stored) on the test digits: "
            f"{' / '.join(f'{g:+.2f}' for g in margins)} on seeds {', '.join(str(t['seed']) for t in rows)} "
            f"(issue 30's goal: at least +1 on every seed, {'met' if min(margins) >= 1.0 else 'not met'}).")


DOC_HEAD = """# The digits quickstart: does MoCo learn more than the pixels? (2 CPU cores)

Generated by `python benchmarks/digits_recipe.py report` from `benchmarks/results/digits-recipe.json`
and `digits-recipe-bn.json` (trials: `python benchmarks/digits_recipe.py run NAME[@SEED]`, the `TRIALS`
table of that script; BN statistics: `digits_recipe.py bn NAME[@SEED]`; the quickstart on three
seeds: `python benchmarks/digits_recipe.py seeds`). Do not edit the tables by hand.

Every figure is the kNN monitor's protocol (weighted kNN, k 200, T 0.1) on the pre-trained
backbone's pooled features, beside the same kNN on the raw pixels, centred on the bank's mean image
and L2-normalised (`pixel_knn_top1` in summary.json), on the digits as scikit-learn stores them,
8x8: the figure issue 30 quotes (97.0% on the test digits). Until 2026-12-07 the monitor read the
pixels the network reads, the digits upsampled to 16 px, whose interpolation blurs them: a point
lower on both splits (the `MoCo - 16-px pixels` column), and the reference the prose of the first
six rounds below quotes. `digits_recipe.py pixels` measures both on both splits; the tables score
every run, whichever its monitor printed, against both. Trials are scored on a validation split of the
training digits (`data.val_size=300`); the test digits are read only by the quickstart as shipped
(and by one trial's budget check, `digits_recipe.py test`). Each trial changes the settings the
quickstart had when the trials began (m 0.99, `eval.knn_bn=running`, the preset's own crops, the kNN on the backbone, 40 epochs at batch 128 and learning rate 0.03, Split BN 8; `TRIAL_BASE`, which pins them, so a trial is the same run whatever configs/digits.yaml ships). The trials ran
niced on one thread, two at a time; the quickstart's runs had the idle 2-core machine to themselves
(all threads, not niced), so their wall column (`wall_s`, kNN monitors included) is what a user sees."""

DOC_TAIL = """
## What the trials say, and what was chosen

- One seed misleads here: the same trial moves by up to 2 points from seed to seed on the 300
  validation digits (width 16 x 80 epochs: +2.00 on seed 0, +0.00 on seeds 1 and 2), so the later
  trials ran on three seeds and are compared by their mean.
- The temperature that lifted MoCo above the pixels on 28-px MNIST (docs/mnist.md) does not transfer:
  on the digits, T 0.2 and 0.3 trail the quickstart's T 0.1 at every monitor of a 40-epoch run.
- Small affine warps (digits_affine) make the 40-epoch task too hard: far behind at epochs 10 and 20.
- Narrower and longer (width 16 x 80 epochs) is no better than width 32 x 40 on three seeds (mean
  +0.67 each) and overran the 3-minute budget on the test run (`digits_recipe.py test w16_80ep`).
- The key encoder's momentum: a 40-epoch run makes about 300 steps on the validation split (400 on
  all training digits). Faster key encoders fall apart: m 0.95 and 0.9 stood far below at epoch 10
  and 20 and were stopped (so did batch 64, which doubles the steps per epoch, but at a learning
  rate of 0.06 that fails on its own: the ninth round reruns it scaled). m 0.995 beat m 0.99 on each
  of three seeds (mean +1.67 against +0.67); m 0.999, a key encoder that hardly leaves its
  initialisation, +0.00.
- The kNN's BN statistics: pre-training's running statistics average augmented views in Split BN's
  sub-batches of 16 over the last steps; recomputed on the bank's clean digits (`eval.knn_bn=recompute`,
  precise BN) the same encoders score higher on most trials (the paired table).
- Chosen on the validation split, before the test digits were read: **m 0.995 and
  `eval.knn_bn: recompute`** (trial m0.995_pbn: both), the rest of `moco_xla/configs/digits.yaml`
  unchanged (width 32, 40 epochs, T 0.1, K 1024). On the test digits: +0.74 / +0.93 / -0.19 (before,
  m 0.99 with running statistics: +0.56 / +1.30 / -0.19): the validation lead did not carry over.
- A second round on top of m0.995_pbn (trials `pbn_*`, three seeds each), with a rule fixed before it
  ran: a change replaces those settings only if its mean over the three seeds is at least two
  validation digits (+0.67) above m0.995_pbn's +1.33, and only then is it run on the test digits.
  Temperature 0.07 +1.44 and 0.05 +0.67; learning rate 0.015 +1.67 (its seed 0 reached +3.00, seeds 1
  and 2 +0.67 and +1.33) and 0.0075 +1.33; 45 epochs (what is left of the budget) +1.44; learning
  rate 0.06 fell 10 points behind on seed 0 (71.7% at epoch 10 against 93.3%) and its other seeds
  were not run. None passed. (pbn_T0.07 and pbn_T0.05 on seed 0 shared the machine with the test
  suite, and pbn_crop0.6 and 0.8 on seed 0 with a CI rehearsal, hence their long wall.)
- A third round, the same rule: milder crops (`data.crop_min_scale`, new: the digits preset crops
  0.4-1 of the digit, and an 8x8 digit cut to 40% of its area can look like another digit). 0.6-1:
  +2.67 / +1.00 / +1.67, mean +1.78, short of the rule; **0.8-1: +2.67 / +1.67 / +1.67, mean +2.00**,
  two digits above m0.995_pbn: it passed, and is what configs/digits.yaml ships (`crop_min_scale: 0.8`).
  On the test digits, on the Intel VM of that round: +1.11 / +1.48 / +1.48 in 176-180 s (that
  round's docs/digits.md, commit 9ad4528; those rows were replaced by the reruns below).

A fourth round, for the budget, on another VM (an AMD EPYC 2-core machine in place of the Intel Xeon
of the rounds before; rows with a CPU name in the wall column record it; the three
`40ep-quickstart-seed*` rows ran there too, before the field). There the 40-epoch quickstart took
207-217 s and, with that CPU's float rounding, scored +1.30 / +0.56 / +0.37 on the test digits (the
`40ep-quickstart-seed*` rows). Shorter runs of the same settings were tried on the validation
split, beside the shipped settings rerun on the same VM (`crop0.8_40ep`, three seeds): 30 epochs,
20 epochs, and 20 epochs with key momentum 0.99 (the share of a half-length run that 0.995 averages
over in a full one). The rule, fixed before they ran: ship the fewest-epoch candidate whose
three-seed validation mean is at least `crop0.8_40ep`'s (20 epochs: the higher mean first, m 0.995
on a tie); if none qualifies, keep 40 epochs; only then read the test digits, once per seed.
40 epochs +1.89, 30 epochs +1.67, 20 epochs +1.89, 20 epochs with m 0.99 +1.89: **20 epochs at
m 0.995** qualified, and is what configs/digits.yaml ships (`epochs: 20`); past epoch 20 the
40-epoch reruns gained at most one validation digit (their kNN curves).

The 20-epoch quickstart as then shipped (`previous-quickstart-seed*`, alone on the machine): 103-106 s on the AMD VM, the
budget met with a minute to spare (the rerun for the new reference below, the same VM in a slower
hour: 123-131 s, every epoch about a fifth slower); on the test digits +1.30 / +1.48 / +0.00 over the
16-px pixels: issue 30's goal for the digits (+1 on every seed) is **not met**, seed 2 tying them. What
bounds these trials: one digit is a third of a point of the 300 validation digits and a fifth of a
point of the 540 test digits, one setting moves by one to two points from seed to seed and from one
CPU model to another, and the validation lead (about +1.9 for every setting of the last two rounds)
has shrunk to about +1 on the test digits each time. A rule fixed in advance and three seeds keep
the choice honest; they do not make a one-point margin on every seed likely.

A fifth round on top of the 20-epoch quickstart, with the budget it freed (three seeds each):
Split BN 4 (BN statistics over 32 images), width 40 (about 1.6x the compute), a queue of 512 (on
the validation split the 1,024-key queue is longer than its 957 training digits). The rule, fixed
before they ran, that of the second and third rounds: a change replaces the shipped settings only if
its three seeds gain at least six validation digits more in all than `crop0.8_20ep`'s (+0.67 on the
mean, to at least +2.56), and only then are the test digits read. Split BN 4 +2.33 / +2.00 / +1.33
(mean +1.89, the same as the shipped settings'), width 40 +1.00 / +1.67 / +2.00 (+1.56), K 512
+3.33 / +1.67 / +0.33 (+1.78): none passed, configs/digits.yaml is unchanged and the test digits were
not read. (Split BN 4 and width 40 on seed 0, and width 40 on seed 1, shared the machine with a CI rehearsal, hence their
long wall.)

A sixth round on the same base, three seeds each, for levers the rounds before left alone: weight
decay 1e-4 (MoCo's ImageNet setting) and 1e-3 around the shipped 5e-4, a 2-epoch linear warm-up,
and MoCo v3 in place of v2 (the batch of keys as negatives instead of the queue, a predictor, LARS:
`mocov3_digits`'s settings, for 20 epochs). The same rule, fixed before they ran: at least +2.56 on
the three-seed mean, within the 3-minute budget, and only then are the test digits read. Weight decay
1e-4 +3.00 / +1.33 / +2.00 (mean +2.11), 1e-3 +2.67 / +1.00 / +1.33 (+1.67), the warm-up +2.67 /
+1.00 / +1.00 (+1.56); MoCo v3 reached 76.67% on seed 0 after 20 epochs, 19 points below the pixels
(its own config runs 40 epochs; v3's loss on the batch of keys had not caught up), and its other
seeds were not run. None passed; configs/digits.yaml is unchanged and the test digits were not read.

## The reference, measured again

Issue 30 quotes 97.0% for the centred raw pixels on the 540 test digits; the monitor printed 96.11%.
It read the pixels the network reads, the 8x8 digits upsampled to 16 px, and the antialiased bilinear
interpolation blurs them: the same kNN on the digits as stored scores 97.04% on the test digits and
97.00% on the validation split, against 96.11% and 96.00% at 16 px (`digits_recipe.py pixels`;
area-averaging the 16-px digits back to 8x8 does not recover it: the blur stays). The monitor now
reads the images as stored wherever a run upsamples them (`data.subsets.at_stored_size`; the digits
here, EMNIST's 28 px at the emnist config's 32; runs that downsample, such as mnist-dev at 16 px, keep
the pixels fed, which score higher there). Every table above scores each run against both.

Against the stored digits, the quickstart's three seeds (rerun with the new monitor: the same kNN,
97.41 / 97.59 / 96.11%) are **+0.37 / +0.56 / -0.93**: issue 30's digits goal, 98.04% or more on
every seed, is further off than the rounds above had it. On the validation split the best trials'
three-seed means sit about +0.9 above the stored pixels; no setting of rounds 1-6 reached +1.56 there
(the rule's bar of the last rounds in these terms), and the test digits have always come out lower
than the validation digits.

## A seventh round: which layer the kNN reads

An exploratory look, on the validation split only, at the checkpoints of rounds 4-6 (20-epoch runs):
the same kNN on the projection MLP's hidden layer (after its ReLU; the head the loss trains on top of
the backbone) scored at or above the backbone on nearly every encoder. The paired table above (one
encoder, two readouts) is that look redone by a command of this script (`digits_recipe.py layers`; `eval.knn_layer`, new, in the
monitor and in `python -m moco_xla.eval knn`). Since its validation figures were seen before this
rule was written, the rule asks for more than the rounds before: ship `eval.knn_layer: mlp_hidden`
only if (1) on `crop0.8_20ep`'s seeds 0-2 (the shipped training) its mean kNN is at least 98.56%
(the bar of rounds 2-6: +1.56 over the stored pixels, +2.56 over the 16-px ones), and (2) on three
fresh seeds of the same training, 3-5, run after this rule, its mean is at least the backbone's;
only then are the test digits read, once per seed.

Over the 27 encoders of the table the hidden layer scored higher on 19, the same on 5 and lower on
3 (mean +0.64). (1) `crop0.8_20ep` seeds 0-2: 99.00 / 99.00 / 98.00, mean 98.67, above 98.56.
(2) Seeds 3-5: 97.67 / 99.00 / 98.33 (mean 98.33) against the backbone's 98.00 / 97.33 / 99.00
(98.11). Both held: **configs/digits.yaml reads the kNN on the MLP's hidden layer**
(`eval.knn_layer: mlp_hidden`; the training is unchanged). On the test digits, alone on the
machine (`quickstart-seed*`; the same runs read on the backbone are the `previous-quickstart-seed*`
rows): 98.52 / 97.59 / 96.67%, **+1.48 / +0.56 / -0.37** over the stored pixels (on the backbone:
+0.37 / +0.56 / -0.93), in 112-119 s. Issue 30's goal for the digits, +1 on every seed, is **not
met**: seed 0 clears it, seed 1 is half a point short, seed 2 half a point below the pixels.

## An eighth round: which encoder, and which layer of the head

Two readouts the seventh round left alone, neither scored before this rule was written: the head's
output (`eval.knn_layer: projection`, the 128-d space in which the loss compares queries and keys at
T 0.1, the temperature the kNN weights its neighbours with), and the key encoder
(`eval.knn_encoder: key`, the momentum average of the query encoder: the "teacher" DINO and BYOL
evaluate; at m 0.995 a 20-epoch validation run of about 140 steps leaves about half of its weight on
the initialisation, 0.995^140 = 0.50, so it may trail), read at the hidden layer or the output. The
rule, fixed before any of them ran: a candidate replaces the shipped readout (query encoder,
`mlp_hidden`) only if (1) on `crop0.8_20ep`'s six seeds (0-5: the shipped training) its mean kNN is
at least 0.50 above the shipped readout's, and it scores below it on at most one of the six; and
(2) over all the encoders of the layers table (rounds 4-6) its mean is at least the shipped
readout's. If more than one passes, the one with the highest mean in (1). Only then are the test
digits read, once per seed (`digits_recipe.py seeds`). The table "one encoder, four readouts" above
holds the figures.

On `crop0.8_20ep`'s six seeds the shipped readout averaged 98.50 (its scores equal the layers
table's `mlp_hidden` column on all 27 encoders: the same command, the same figures). The head's
output: 98.61, +0.11, below the shipped readout on 3 of the 6 seeds; the key encoder's hidden layer:
97.11, -1.39, below on all six; its output: 97.89, -0.61, below on five. Over all 27 encoders:
98.33, 97.38 and 97.90 against 98.47. None passed; configs/digits.yaml is unchanged and the test
digits were not read. The key encoder trails as its share of initial weights predicted; on a run
long enough for the momentum average to forget its initialisation it is a different question,
which `eval.knn_encoder` lets a user ask.

## A ninth round: batch 64, scaled

The first round's batch-64 trial (`b64`) doubled the learning rate to 0.06 where the linear
scaling rule halves it, and kept m 0.99 while doubling the steps; learning rate 0.06 alone later
fell ten points behind at batch 128 (`pbn_lr0.06`), so that trial says nothing about the batch.
`q20_b64` runs the shipped quickstart at batch 64 with the rest scaled: learning rate 0.015, key
momentum 0.9975 (over twice the steps, the same averaging in epochs), Split BN 4 (16 images a
sub-batch, as now), the kNN on the MLP's hidden layer as shipped. The rule, fixed before it ran,
that of rounds 2-6: it replaces the shipped settings only if its three-seed validation mean (seeds
0-2) is at least two validation digits above the shipped quickstart's on the same seeds (98.67, the
layers table's `crop0.8_20ep` seeds 0-2 on the hidden layer), 99.33 or more, within the 3-minute
budget; only then are the test digits read.

`q20_b64` (its rows above read the MLP's hidden layer, where the other trials' monitors read the
backbone) scored 99.00 / 99.00 / 98.00 on seeds 0-2, mean 98.67: the shipped quickstart's own
figures, seed for seed. It did not pass; configs/digits.yaml is unchanged and the test digits were
not read. Scaled as the batch asks, batch 64 neither breaks the recipe, as the first round's
trial seemed to say, nor improves it.

## A tenth round: mnist-dev's levers on the mild crops

On mnist-dev two settings lifted MoCo most (docs/mnist.md): temperature 0.2 in place of 0.1, and
small affine warps of the strokes (`digits_affine`: rotation and shear 10 degrees, shift 10%, scale
0.9-1.1). On the digits both were tried in the first round only, on the preset's harsh crops (0.4-1
of the digit) and 40 epochs, where each fell behind; the crops the quickstart has shipped since the
third round keep 80-100% of the digit, a much easier instance task that a warp or a softer loss may
now suit. `q20_T0.2`, `q20_affine` and `q20_affine_T0.2` (the pair mnist-dev's recipe ships) change
only that on the shipped quickstart (the kNN on the MLP's hidden layer). The rule, fixed before
they ran, that of the ninth round: a candidate replaces the shipped settings only if its three-seed
validation mean (seeds 0-2) is at least 99.33 (two validation digits above the shipped
quickstart's 98.67 on the same seeds), within the 3-minute budget; if more than one passes, the
highest mean, and on a tie the fewer changes; only then are the test digits read, once per seed.

All three fell below the shipped quickstart on the mean (their rows above read the MLP's hidden
layer): temperature 0.2 98.00 / 98.67 / 96.67 (mean 97.78), the affine warps 96.00 / 97.00 / 94.67
(95.89), both 84.33 / 93.33 / 93.33 (90.33), against 99.00 / 99.00 / 98.00 (98.67). None passed;
configs/digits.yaml is unchanged and the test digits were not read. What helped on mnist-dev's
1,200 images of 28 px over 300 epochs did not carry to 957 digits of 8x8 over 20 epochs: T 0.2
trails T 0.1 on every seed, as in the first round, and the warps cost more than either.

## An eleventh round: milder crops still

The third round moved the crops from 40-100% of the digit to 60-100% and 80-100%, and each step
raised the validation mean (+1.33, +1.78, +2.00 over the 16-px pixels); nothing milder was tried.
`q20_crop0.9` (90-100%) and `q20_crop1.0` (the whole digit: at scale 1 no aspect ratio but the
square fits a square digit, so the views differ by the blur alone, the end of the line) continue
it on the shipped quickstart.
The rule, fixed before they ran, that of the ninth and tenth rounds: a candidate replaces the
shipped settings only if its three-seed validation mean (seeds 0-2) is at least 99.33, within the
3-minute budget; if both pass, the higher mean, and on a tie 0.9 (the smaller change); only then
are the test digits read, once per seed.

Crops of 90-100%: 98.67 / 98.67 / 97.67 (mean 98.33); no crop: 90.33 / 96.00 / 94.33 (93.56);
the shipped 80-100%: 99.00 / 99.00 / 98.00 (98.67). Neither passed; configs/digits.yaml is
unchanged and the test digits were not read. The line the third round found ends at 80-100%:
milder crops score lower on every seed, and with the blur alone the two views are nearly the same
image, which the instance task learns little from.

## A twelfth round: centred features

The raw-pixel reference centres the pixels on the bank's mean image before the L2 normalisation
(97.04% on the test digits; 94.1% uncentred, by issue 30); the kNN on MoCo's features did not, and the features
the quickstart reads, after the MLP's ReLU, all lie in the positive orthant, where cosine
similarities crowd together. `eval.knn_centre` (new: the bank's mean feature subtracted from every
feature first; the raw-pixel reference now runs through the same code) gives the features the
reference's treatment. The rule, written before any centred figure was computed, that of the eighth
round: ship `eval.knn_centre: true` only if (1) on `crop0.8_20ep`'s six seeds (the shipped training
and readout) its mean kNN is at least 0.50 above the uncentred readout's (98.50) and it scores below
it on at most one of the six; and (2) over all the encoders of the layers table its mean is at
least the uncentred one's; only then are the test digits read, once per seed. The table "features
centred or not" above holds the figures (its uncentred column reproduces the layers table's
`mlp_hidden` column on all 27 encoders).

(1) Six seeds: 98.67 centred against 98.50, +0.17, below on two of the six (seeds 0 and 4); (2) all
27 encoders: 98.59 against 98.47, higher on 10, equal on 11, lower on 6. (1) failed; configs/digits.yaml
is unchanged and the test digits were not read. Centring moves single encoders by up to 1.3 points
either way and the mean by a tenth of a point: the features' common offset is not what holds the
kNN near the pixels.

## A thirteenth round: the queue's own digits, and the crops' grid

Two levers no round had touched, both on the shipped quickstart. First, the negatives: with ten
balanced digits about a tenth of the queue's 1,024 keys are of the query's own digit, and InfoNCE
pushes the query away from each of them. The debiased InfoNCE of Chuang et al. (2020, "Debiased
Contrastive Learning"; `moco.debias`, new: tau+, the share of same-class keys, here 0.1) subtracts
that share of the positive's term from the negatives' sum. Second, the crops: the digits preset draws
its random resized crop on the stored 8x8 grid, where crops of 80-100% of the digit take about ten
distinct boxes (7 or 8 pixels a side, shifted by whole pixels); `digits_fine` (new) upsamples the
digit to the view's 16 px first and crops there, which moves and scales the crops by half a stored
pixel (several times the distinct views: tests/test_data.py). `q20_debias` and `q20_fine_crops`
change only that. The rule, written before either ran, that of rounds 9-11: a candidate replaces
the shipped settings only if its three-seed validation mean (seeds 0-2) is at least 99.33 (two
validation digits above the shipped quickstart's 98.67 on the same seeds), within the 3-minute
budget; if both pass, the higher mean, on a tie the smaller change (the crops); only then are the
test digits read, once per seed.

The debiased loss: 92.67 / 84.33 / 92.67 (mean 89.89), 5 to 15 points below the shipped quickstart
on every seed (two earlier runs of the same formula, computed in other orders and so rounded
otherwise, averaged 91.44 and 91.11: these runs amplify a rounding into a point or more); the crops
on the fine grid: 99.00 / 98.67 / 98.33 (mean 98.67), the shipped quickstart's mean to the digit.
Neither passed; configs/digits.yaml is unchanged and the test digits were not read. Not measured,
a likely reading: with the positive's term weighted by a tenth of K, the corrected negatives' sum
of a short run often sits at its floor, where the loss stops pushing the query away from the queue;
and the finer crops add views of the same difficulty, not harder ones.

A fourteenth round followed the fine grid, where a crop's scale means what it says (on the 8x8 grid
crops of 60-80% take a few discrete boxes), a little harsher: `q20_fine_crops0.7` and
`q20_fine_crops0.6`, crops of 70-100% and 60-100% of the digit on the 16-px grid. The rule, written
before either ran, that of the thirteenth round (mean of seeds 0-2 at least 99.33; both: the higher
mean, on a tie 0.7). 70-100%: 99.00 / 98.33 / 98.33 (mean 98.56); 60-100%: 99.33 / 97.33 / 97.67
(98.11). Neither passed; configs/digits.yaml is unchanged and the test digits were not read. On either
grid, crops harsher than 80-100% of the digit score lower on the validation mean.

Rounds 13 and 14 ran on another VM than rounds 4-12: an AMD EPYC with AVX-512 (family 25 model 17),
where those had AVX2 (records from before the CPU field named its family and vector unit say "AMD
EPYC" for both). The shipped quickstart, rerun there on the validation split beside them
(`q20_shipped`), scored 98.33 / 98.67 / 98.00 (mean 98.33, against 98.67 on the AVX2 VM): measured
against it on their own VM, no candidate of the two rounds gains more than one validation digit on
the mean, short of the rule's two either way. On the test digits there (`digits_recipe.py seeds 0,1,2
avx512`, alone on the machine, 83-89 s): 98.33 / 97.96 / 97.04%, **+1.30 / +0.93 / +0.00**, not met
either; the same settings on the AVX2 VM scored +1.48 / +0.56 / -0.37 (the `quickstart-seed*` rows).

## A fifteenth round: the key encoder's momentum on a schedule

Every round so far kept the key encoder's momentum constant over the run (0.995 since the second
round, where it beat 0.99, 0.999 and faster ones). MoCo v3 and BYOL raise it to 1 on a half cosine
instead: early in the run the keys follow the query encoder closely, late in the run they hardly
move, so the queue's keys stay consistent while the loss settles. `moco.m_cosine` (new, for v1/v2;
v3 always does it) sets that schedule, the lr staying per epoch. `q20_m_cosine` starts it at the
shipped 0.995, `q20_m_cosine0.99` at v3's 0.99 (mid-run 0.995, the shipped value). The rule, written
before either ran, that of rounds 13-14: a candidate replaces the shipped settings only if its
three-seed validation mean (seeds 0-2) is at least 99.33 (a point above the shipped quickstart's
98.33 on this VM, `q20_shipped`), within the 3-minute budget; if both pass, the higher mean, on a
tie 0.995 (the smaller change); only then are the test digits read, once per seed.

From 0.995: 98.67 / 99.00 / 96.67 (mean 98.11); from 0.99: 99.00 / 98.33 / 98.00 (98.44); the
shipped constant 0.995 on the same VM: 98.33 / 98.67 / 98.00 (98.33). Neither passed;
configs/digits.yaml is unchanged and the test digits were not read. Over about 140 steps the
schedule moves the validation mean by a fraction of a point either way, and the seed-to-seed spread
(2.3 points from 0.995) is larger than either move.

## A sixteenth round: the query encoder's weights averaged over the last epochs

The seed-to-seed spread, not the mean, keeps the goal out of reach: every round since the fourth
has had one seed a point or more below the others. Averaging the weights SGD visits late in a run
(stochastic weight averaging, Izmailov et al. 2018) is the usual way to a flatter, less
seed-dependent solution, and the key encoder is no such average here: at m 0.995 half of its
weight stays on the initialisation after 140 steps (the eighth round read it: 1.4 points below the
query encoder). `train.average_from` (new; `moco_xla/averaging.py`) keeps the uniform mean of the
query encoder's weights at the ends of epochs N to 20, and `eval.knn_encoder: averaged` reads it
(its BN statistics recomputed on the bank's digits, as shipped); the training is the shipped
quickstart's, step for step. `q20_swa10` averages epochs 11-20, `q20_swa5` epochs 16-20. The rule,
written before either ran, that of rounds 13-15: a candidate replaces the shipped settings only if
its three-seed validation mean (seeds 0-2) is at least 99.33 (a point above the shipped quickstart's
98.33 on this VM, `q20_shipped`), within the 3-minute budget; if both pass, the higher mean, on a tie
epochs 16-20 (the average closer to the weights shipped now); only then are the test digits read,
once per seed.

Epochs 11-20: 99.00 / 98.67 / 97.67 (mean 98.44); epochs 16-20: 98.67 / 98.67 / 97.67 (98.33); the
query encoder of the same runs (the shipped readout; the training is the same to the last bit, the
final losses equal `q20_shipped`'s): 98.33 / 98.67 / 98.00 (98.33). Neither passed; configs/digits.yaml
is unchanged and the test digits were not read. The average moves each seed by one validation digit
at most, up on seed 0 and down on seed 2: under cosine decay the weights of the last epochs are
already close to one another, and the spread between seeds comes from where each run goes, not from
the last steps' noise that averaging removes. (Seed 0 of both shared the machine with tests of the
new option, hence their long wall.)

## A seventeenth round: the digits as stored

Every round so far fed the network the digits upsampled from 8x8 to 16 px (`data.image_size: 16`),
where antialiased bilinear interpolation blurs them: the raw-pixel kNN loses a point there (96.00
against 97.00 on the validation split), and four stages of the small ResNet take the 16-px view
down to 2x2. `q20_px8` feeds the digits as stored (`data.image_size=8`: the crops drawn and resized
on the 8x8 grid, stages at 8, 4, 2 and 1 px): a quarter of the positions, so about a quarter of
the compute; `q20_px8_w64` spends the compute saved on width 64 (four times the work per position,
about the shipped quickstart's in all). The rule, written before either ran, that of rounds 13-16:
a candidate replaces the shipped settings only if its three-seed validation mean (seeds 0-2) is at
least 99.33 (a point above the shipped quickstart's 98.33 on this VM, `q20_shipped`), within the
3-minute budget; if both pass, the higher mean, on a tie width 32 (the cheaper); only then are the
test digits read, once per seed.

At 8x8, width 32: 98.00 / 97.67 / 96.00 (mean 97.22), in 38-43 s a run; width 64: 98.33 / 94.67 /
97.67 (96.89), 84-86 s; the shipped quickstart at 16 px on the same VM 98.33 / 98.67 / 98.00 (98.33).
Neither passed; configs/digits.yaml is unchanged and the test digits were not read. The stored grid
costs a point or more on the mean and widens the spread between seeds at either width. Not
measured, a likely reading: the upsampling's blur, which costs the pixels' kNN a point, does not
cost the network, while the 16-px view's finer crops (resized to 16 px, not 8) and its stages'
larger maps are worth more to it than the compute they take. (Seed 0 of both shared the machine with a CI
rehearsal, hence their long wall.)

## An eighteenth round: a view larger than 16 px

The seventeenth round found the network better on the 16-px view than on the stored 8x8 grid; an
eighteenth asks whether a larger view still helps, within the budget (the shipped quickstart takes
83-89 s on this VM, and the work grows with the view's area): `q20_px20` upsamples the digits to
20 px (about 1.6x the compute), `q20_px24_w24` to 24 px at width 24 (2.25x the positions at about
0.56x the work per position: about 1.3x). The crops are still drawn on the stored grid (the digits
preset), then resized to the view. The rule, written before either ran, that of rounds 13-17: a
candidate replaces the shipped settings only if its three-seed validation mean (seeds 0-2) is at
least 99.33 (a point above the shipped quickstart's 98.33 on this VM, `q20_shipped`), within the
3-minute budget (`digits_recipe.py test`, alone on the machine); if both pass, the higher mean, on
a tie the cheaper (24 px at width 24); only then are the test digits read, once per seed.

20 px: 97.67 / 97.33 / 96.00 (mean 97.00); 24 px at width 24: 97.33 / 96.00 / 96.67 (96.67); the
shipped 16 px: 98.33 / 98.67 / 98.00 (98.33). Neither passed; configs/digits.yaml is unchanged and
the test digits were not read. With the seventeenth round, the view's size has its best of the four
tried at the shipped 16 px (8: 97.22, 16: 98.33, 20: 97.00, 24 at width 24: 96.67), on every seed.

## A nineteenth round: a deeper small ResNet

Every round so far trained the same small ResNet depth: one BasicBlock per stage (eight 3x3
convolutions), varying only its width (16, 32, 40). `model.depth` (new) stacks that many blocks in
each stage; depth traded for width at about the shipped compute: `q20_d2_w24`, two blocks per stage
at width 24 (about 1.1x), and `q20_d3_w20`, three at width 20 (about 1.2x). The rule, written before
either ran, that of rounds 13-18: a candidate replaces the shipped settings only if its three-seed
validation mean (seeds 0-2) is at least 99.33 (a point above the shipped quickstart's 98.33 on this
VM, `q20_shipped`), within the 3-minute budget (`digits_recipe.py test`, alone on the machine); if
both pass, the higher mean, on a tie the cheaper (depth 2); only then are the test digits read, once
per seed.

Depth 2 at width 24: 96.67 / 97.33 / 96.67 (mean 96.89); depth 3 at width 20: 92.33 / 93.00 / 92.00
(92.44); the shipped depth 1 at width 32: 98.33 / 98.67 / 98.00 (98.33). Neither passed;
configs/digits.yaml is unchanged and the test digits were not read. In 20 epochs (about 140 steps)
the deeper, narrower networks learn less on every seed, the deepest least: at this budget the
shallow, wide network is the better use of the compute.

## A twentieth round: more, smaller steps

The shipped run takes about 150 optimiser steps (957 training digits of the validation split, batch
128, 20 epochs): few for a network to settle, and the seed-to-seed spread (1-2 points) is as large as
any move of the rounds before. Halving the batch with the rest scaled (`q20_b64`, ninth round, on the
AVX2 VM) matched the shipped settings there seed for seed (98.67). Two trials, written before either ran: `q20_b32`, batch 32 (four times the steps), its learning rate
(0.0075), key momentum (0.99875: the same averaging horizon in epochs) and Split BN (2 splits of 16
images, as now) scaled with it; `q20_b64_fine`, `q20_b64`'s settings with the crops on the 16-px view's
grid (`q20_fine_crops`, 98.67 on this VM in the thirteenth round). The rule, that of rounds 13-19: a
candidate replaces the shipped settings only if its three-seed validation mean (seeds 0-2) is at least
99.33 (a point above the shipped quickstart's 98.33 on this VM, `q20_shipped`), within the 3-minute
budget (`digits_recipe.py test`, alone on the machine); if both pass, the higher mean, on a tie the
cheaper (batch 64); only then are the test digits read, once per seed.

Batch 32: 98.67 / 98.67 / 97.33 (mean 98.22); batch 64 with the fine crops: 99.33 / 98.67 / 98.67
(98.89); the shipped settings: 98.33 / 98.67 / 98.00 (98.33). Neither passed; configs/digits.yaml is
unchanged and the test digits were not read. Four times the steps gained nothing on the mean;
`q20_b64_fine` has the highest mean of the trials on this VM (the fine crops alone: 98.67), by
less than two validation digits.

## A twenty-first round: the nearest neighbour as the positive

Every round so far took the other view of the same digit as the positive; the queue's keys are all
negatives, a tenth of them of the query's own digit. NNCLR (Dwibedi et al. 2021, "With a Little Help
from My Friends") takes as the positive the support set's nearest neighbour of the key, so that a
query is pulled towards another image that looks like its own, which on ten classes is most often the
same digit (the raw pixels' kNN is 97% right here, so even the first steps' neighbours mostly are).
`moco.nn_weight` (new; `moco.nn_positive=true` when this round ran, the same as `nn_weight` 1) makes
the queue that support set: with weight 1 the positive is the queue's key nearest (cosine) to the key, that key is no negative of its query, and the key itself is enqueued as before
(tests/test_moco.py; tests/test_xla_launch.py: no recompilation on 4 XLA:CPU replicas). Two trials,
written before either ran: `q20_nn`, the shipped settings with it; `q20_b64_fine_nn`, the twentieth
round's `q20_b64_fine` with it. The rule, that of rounds 13-20: a candidate replaces the shipped
settings only if its three-seed validation mean (seeds 0-2) is at least 99.33 (a point above the
shipped quickstart's 98.33 on this VM), within the 3-minute budget (`digits_recipe.py test`, alone
on the machine); if both pass, the higher mean, on a tie the cheaper (batch 128); only then are the
test digits read, once per seed.

The shipped settings with it: 87.00 / 90.67 / 62.33 (mean 80.00); `q20_b64_fine` with it: 99.00 /
99.33 / 84.67 (94.33). Neither passed; configs/digits.yaml is unchanged and the test digits were not
read. Where it held, the nearest neighbour as the positive gave the two highest single-seed scores
of the batch-64 trials on this VM; on three of the six runs it fell apart (12 to 35 points below the
pixels): a neighbour of another digit, once taken as the positive, pulls the two digits together,
and the next neighbours are more often wrong.

## A twenty-second round: the key and its nearest neighbour, half each

The nearest neighbour alone lifted the runs where it held and broke the others. The loss can keep the
key as a positive beside it: with `moco.nn_weight` 0.5, half the loss is InfoNCE with the key as the
positive (each image still told apart from the rest, which anchors the features), half InfoNCE with
the queue's nearest key as the positive. Two trials, written before either ran: `q20_nn0.5`, the
shipped settings with it; `q20_b64_fine_nn0.5`, `q20_b64_fine` with it. The rule, that of rounds
13-21: a candidate replaces the shipped settings only if its three-seed validation mean (seeds 0-2) is
at least 99.33, within the 3-minute budget (`digits_recipe.py test`, alone on the machine); if both
pass, the higher mean, on a tie the cheaper (batch 128); only then are the test digits read, once per
seed.

The shipped settings with it: 98.33 / 98.67 / 90.33 (mean 95.78); `q20_b64_fine` with it: 99.33 /
98.33 / 98.00 (98.56). Neither passed; configs/digits.yaml is unchanged and the test digits were not
read. Half the loss on the key kept the batch-64 runs whole, and took with it the gain of the runs
where the neighbour alone held; at batch 128 seed 2 still fell apart.

## A twenty-third round: the neighbour after a warm-up

The runs fell apart from their first steps, where the features are the random network's and the
nearest keys are the least reliable. `moco.nn_warmup_epochs` (new) raises the nearest key's share
of the loss linearly from 0 (the key alone, plain MoCo) to `moco.nn_weight` over that many epochs,
set before every step as a value of the graph, not a constant (tests/test_moco.py; 4 XLA:CPU replicas
compile nothing after warm-up with it). Two trials, written before either ran, on `q20_b64_fine` with
the neighbour alone in the end (`nn_weight` 1, as in `q20_b64_fine_nn`): `q20_b64_fine_nn_w5`, a
5-epoch warm-up, and `q20_b64_fine_nn_w10`, 10 epochs. The rule, that of rounds 13-22: a candidate
replaces the shipped settings only if its three-seed validation mean (seeds 0-2) is at least 99.33,
within the 3-minute budget (`digits_recipe.py test`, alone on the machine); if both pass, the higher
mean, on a tie the shorter warm-up; only then are the test digits read, once per seed.

5 epochs: 99.67 / 99.00 / 98.33 (mean 99.00); 10 epochs: 99.00 / 99.00 / 99.00 (99.00). Neither
passed; configs/digits.yaml is unchanged and the test digits were not read. Warmed up, the neighbour
no longer breaks a run (the six runs: 98.33-99.67), and the two means are the highest of any trial,
a third of a point (one validation digit) short of the rule and 0.11 above `q20_b64_fine` (98.89), the
best trial without the neighbour: within the seed-to-seed spread.

## A twenty-fourth round: the neighbour for longer

With the warm-up the neighbour had 10-15 epochs of the 20 to pull the digits of a kind together. Two
trials, written before either ran, at 30 epochs (within the 3-minute budget: about 1.5x the
compute): `q20_b64_fine_nn_w10_30ep`, the 10-epoch warm-up, then 20 epochs of the neighbour alone;
`q20_b64_fine_nn_w15_30ep`, a warm-up of half the run, as `q20_b64_fine_nn_w10` had. The rule, that
of rounds 13-23: a candidate replaces the shipped settings only if its three-seed validation mean
(seeds 0-2) is at least 99.33, within the 3-minute budget (`digits_recipe.py test`, alone on the
machine); if both pass, the higher mean, on a tie the shorter warm-up; only then are the test digits
read, once per seed.

Warm-up 10: 99.00 / 99.00 / 99.33 (mean 99.11); warm-up 15: 99.67 / 99.00 / 99.33 (**99.33**). The
15-epoch warm-up passed, at the rule's bound itself (one validation digit fewer on one seed and it
would not have), the first trial in twenty-four rounds to pass; as the quickstart on all 1,257
training digits, alone on the machine, seed 0 took 98 s (`digits_recipe.py test`, within the
3-minute budget). **configs/digits.yaml takes its settings**: batch 64, learning rate 0.015, key
momentum 0.9975, Split BN 4, the crops on the 16-px grid (`digits_fine`), 30 epochs, the queue's
nearest key as the positive after a 15-epoch warm-up (`moco.nn_weight: 1`, `moco.nn_warmup_epochs:
15`).

Rounds 20-24 ran on another VM than the rule's reference: an AMD EPYC family 26 model 2 (AVX-512),
where `q20_shipped` and rounds 13-19 had family 25 model 17. The shipped settings rerun on it
(`q20_shipped_f26`): 98.33 / 98.67 / 98.00, the other VM's figures seed for seed, so the rule's bar
(99.33) is a point above them here too. (A first rerun ran while configs/digits.yaml already held
the new settings, which the trials' overrides did not all pin, and scored a run of neither; it was
discarded, and `TRIAL_BASE` now pins every setting the quickstart has changed since the trials
began.)

The test digits, read once per seed with the quickstart as shipped (`digits_recipe.py seeds`, alone
on the machine, 110-121 s): **98.33 / 97.96 / 97.59%, +1.30 / +0.93 / +0.56** over the pixels; the
settings before, on the same VM (`quickstart-f26-seed*`, 68-77 s): 98.33 / 97.96 / 97.04%, +1.30 /
+0.93 / +0.00, the family-25 VM's figures exactly. Seed 2 gained three test digits, seeds 0 and 1
none: issue 30's goal for the digits (+1 on every seed) is still **not met**, seed 1 one test digit
short of it and seed 2 three.

What the next round needs: the shipped settings now score 99.33 on the validation split (two of its
300 digits wrong per seed), so the rule of rounds 13-24 (a point above them) asks for more than the
split can show, and a third of a point, one digit, is its finest step. Choosing further needs a finer
validation: more held-out digits per seed (k-fold splits of the 1,257 training digits, each trial
trained k times) or more seeds per trial, with a rule written for it before it runs.
"""


if __name__ == "__main__":
    cmd, names = sys.argv[1], sys.argv[2:]
    if cmd == "run":
        run(names)
    elif cmd == "stopped":
        for name in names:
            stopped(name)
    elif cmd == "bn":
        bn(names)
    elif cmd == "layers":
        layers(names)
    elif cmd == "readouts":
        readouts(names)
    elif cmd == "centre":
        centre(names)
    elif cmd == "test":
        test(*names)
    elif cmd == "seeds":
        seeds(*names)
    elif cmd == "pixels":
        pixels()
    elif cmd == "report":
        report()
    else:
        raise SystemExit("usage: digits_recipe.py run NAME[@SEED]... | stopped NAME... | bn NAME[@SEED]... | layers NAME[@SEED]... | "
                         "readouts NAME[@SEED]... | centre NAME[@SEED]... | "
                         "test NAME [SEED] | seeds [0,1,2] [MACHINE] | pixels | report")
