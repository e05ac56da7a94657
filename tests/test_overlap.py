"""GPU-speed work on real gloo processes: gradient averaging that overlaps backward, channels-last,
torch.compile, and the bench's side-by-side reference (the official MoCo builder under DDP)."""
from __future__ import annotations

import pytest
import torch

from conftest import run_gloo
import overlap_fns
from moco_xla.config import load_config
from moco_xla.models import use_channels_last


@pytest.mark.parametrize("world,channels_last,sync_bn", [(2, True, False), (4, False, True)])
def test_overlapped_gradients_equal_the_flat_all_reduce(tiny_cfg, world, channels_last, sync_bn):
    """Symmetric MoCo (the query encoder runs twice before one backward), buckets small enough
    that there are several: each step's gradients equal the one-flattened-all_reduce average.
    2 replicas: channels-last weights (the averaged gradients are copied back in their NHWC
    layout) and compiled encoders (train.compile, aot_eager); 4: SyncBN, whose backward
    all_reduces too, so those collectives interleave with the buckets'."""
    tiny_cfg.model.channels_last = channels_last
    tiny_cfg.train.compile, tiny_cfg.train.compile_backend = world == 2, "aot_eager"
    if sync_bn:
        tiny_cfg.model.sync_bn, tiny_cfg.model.bn_splits = True, 1
    res = run_gloo(overlap_fns.overlapped_vs_flat, world, tiny_cfg, 3, 16 << 10)
    for r in res:
        assert (min(r["nhwc_grads"]) > 0) == channels_last
        assert len(r["overlapped"]) == len(r["flat"]) == 3
        for flat, overlapped in zip(r["flat"], r["overlapped"]):
            for a, b in zip(flat, overlapped):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert max(g.abs().max() for g in r["flat"][-1]) > 0
        last = r["reports"][-1]
        assert len(last["bucket_numel"]) > 2 and sum(last["bucket_numel"]) == sum(p.numel() for p in r["q"])
        # the first bucket's all_reduce started while most gradients were still to come
        assert last["ready_at_launch"][0] < last["gradients"][0] // 2
        assert last["ready_at_launch"] == sorted(last["ready_at_launch"])  # started in bucket order
    for r in res[1:]:  # every replica trained the same weights
        for name in ("q", "k"):
            for a, b in zip(res[0][name], r[name]):
                assert torch.equal(a, b)
        assert torch.equal(res[0]["queue"], r["queue"])


def test_bench_reference_trains_like_moco_xla():
    """The bench's restated official step (DDP, its shuffle, per-tensor momentum, int(ptr) queue)
    computes what moco_xla computes: same losses, weights and queue after three steps."""
    (r,) = run_gloo(overlap_fns.official_matches_moco_xla, 1, 3)
    for ours, official in r["losses"]:
        torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-5)
    for a, b in r["q"]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(*r["queue"], rtol=1e-4, atol=1e-5)
    assert torch.equal(*r["ptr"]) and int(r["ptr"][0]) == 3 * 16


def test_bench_side_by_side_runs_on_two_gloo_processes():
    from moco_xla.bench import comparison_for, official_line, run_comparison
    c = comparison_for("cpu", quick=True)
    r = run_comparison("cpu", c)
    assert "error" not in r, r
    assert r["world"] == 2 and len(r["round_ratios"]) == c.rounds
    assert r["moco_xla_images_per_s_per_replica"] > 0 and r["official_images_per_s_per_replica"] > 0
    assert r["ratio"] == pytest.approx(r["official_step_s"] / r["moco_xla_step_s"])
    assert r["overlap_over_flat"] == pytest.approx(r["flat_step_s"] / r["moco_xla_step_s"])
    assert "ratio" in official_line("cpu", r, {"arch": "small_resnet"})


def test_channels_last_is_for_cuda_resnets_unless_asked():
    cfg = load_config("tiny").model
    assert use_channels_last(cfg, torch.device("cuda")) and not use_channels_last(cfg, torch.device("cpu"))
    cfg.channels_last = True
    assert use_channels_last(cfg, torch.device("cpu"))
    cfg.channels_last = False
    assert not use_channels_last(cfg, torch.device("cuda"))


def test_channels_last_and_compiled_tiny_runs_end_to_end(tmp_path):
    """The tiny config end to end on the CPU backend with model.channels_last=true, eager and with
    train.compile=true (aot_eager: dynamo and AOTAutograd, no kernel generation, seconds on a CPU):
    both train, checkpoint and run kNN, the checkpointed convolutions are NHWC, the encoders were
    compiled, and the compiled run lands on the eager run's loss."""
    from moco_xla.runtime import make_runtime
    from moco_xla.train import train
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    summaries = {}
    for compiled in (False, True):
        cfg = load_config("tiny", ["model.channels_last=true", "train.compile=" + str(compiled).lower(),
                                   "train.compile_backend=aot_eager", "train.epochs=1",
                                   "train.max_steps_per_epoch=2"])
        summaries[compiled] = train(cfg, make_runtime("cpu"), tmp_path / str(compiled))
        assert torch.isfinite(torch.tensor(summaries[compiled]["final_loss"]))
        assert summaries[compiled]["knn_top1"] is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # query and key encoder
    assert summaries[True]["final_loss"] == pytest.approx(summaries[False]["final_loss"], rel=1e-4)
    torch._dynamo.reset()
    ckpt = torch.load(sorted((tmp_path / "True" / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    convs = [v for k, v in ckpt["model"].items() if k.startswith("encoder_q.") and v.dim() == 4
             and v.shape[1] > 1 and v.shape[2] > 1]  # (1x1 and 1-channel kernels are both layouts)
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
                         for v in convs)
