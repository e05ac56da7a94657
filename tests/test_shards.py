"""``python -m moco_xla.shards`` and streaming local shards: layout, exactly-once coverage, resume, bad shards."""
from __future__ import annotations

import collections
import io
import json
import tarfile

import pytest
import torch

from data_fixtures import write_image_folder, write_mnist
from moco_xla import data, shards
from moco_xla.config import load_config
from moco_xla.data.images import decode_bytes
from moco_xla.data.shardset import epoch_order, pieces
from moco_xla.data.streams import delivered, eval_worker_batches, pretrain_range
from moco_xla.errors import UserError
from shard_helpers import CLASSES, image_index, shard_set, write_indexed


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def epoch_indices(root, world: int, batch: int, workers: int, epoch: int, seed: int = 0, **kw):
    """Sample indices per replica delivered in one epoch, and each replica's step count."""
    per_rank, steps = [], []
    for rank in range(world):
        loader = data.pretrain_loader(shard_set(root, **kw), batch, rank, world, seed, workers)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert all(torch.equal(q, k) for q, k in batches)  # identity views of the same sample
        per_rank.append(torch.cat([image_index(q) for q, _ in batches]).tolist())
        steps.append((len(loader), len(batches)))
    return per_rank, steps


# ------------------------------------------------------------------ writer

def test_cli_writes_webdataset_layout_with_true_labels(tmp_path, capsys):
    write_mnist(tmp_path / "src", n=50, test_n=12)
    out = tmp_path / "out"
    assert shards.main(["--dataset", "mnist", "--root", str(tmp_path / "src"), "--out", str(out),
                        "--shard-size", "16", "--quiet"]) == 0
    assert "train: 50 samples in 4 shards" in capsys.readouterr().out
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert (m["dataset"], m["total"], m["image_format"], m["channels"]) == ("mnist", 50, "png", 1)
    assert [s["count"] for s in m["shards"]] == [16, 16, 16, 2]
    source = data.build(load_config("tiny", ["data.dataset=mnist", f"data.root={tmp_path / 'src'}"])).bank.base
    keys = []
    for s in m["shards"]:
        members = tar_members(out / "train" / s["name"])
        names = sorted(members)
        assert all(n.endswith((".png", ".cls")) for n in names) and len(names) == 2 * s["count"]
        for name in names:
            if name.endswith(".png"):
                key = name[:-4]
                img, label = source[int(key)]  # keys are the source index: the pair must match it
                assert torch.equal(decode_bytes(members[name], 1), img)
                assert int(members[f"{key}.cls"]) == label
                keys.append(key)
    assert sorted(int(k) for k in keys) == list(range(50))
    assert keys != sorted(keys)  # written in a seeded shuffled order
    assert json.loads((out / "test" / "manifest.json").read_text())["total"] == 12


def test_cli_copies_jpeg_bytes_unchanged(tmp_path):
    write_image_folder(tmp_path / "src", classes=2, per_class=3, size=16, fmt="jpg")
    out = tmp_path / "out"
    assert shards.main(["--dataset", "folder", "--root", str(tmp_path / "src"), "--out", str(out),
                        "--split", "train", "--quiet", "--test-fraction", "0.34"]) == 0
    members = tar_members(out / "train" / "shard-000000.tar")
    files = sorted((tmp_path / "src").rglob("*.jpg"))
    jpgs = [v for k, v in members.items() if k.endswith(".jpg")]
    assert len(jpgs) == 4 and all(any(f.read_bytes() == j for f in files) for j in jpgs)
    assert not (out / "test").exists()


def test_shards_are_reproducible_plain_tar_headers(tmp_path):
    """Packing the same data twice gives the same bytes, and each member has one plain header (no
    PAX extended header, which a float mtime makes tarfile write and every read then parses)."""
    write_image_folder(tmp_path / "src", classes=2, per_class=3, size=16, fmt="jpg")
    for out in ("a", "b"):
        assert shards.main(["--dataset", "folder", "--root", str(tmp_path / "src"), "--out", str(tmp_path / out),
                            "--split", "train", "--quiet", "--test-fraction", "0.34"]) == 0
    a, b = (tmp_path / out / "train" / "shard-000000.tar" for out in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as t:
        members = t.getmembers()
    assert len(members) == 8 and all(m.pax_headers == {} and m.mtime == 0 for m in members)
    assert b"path=" not in a.read_bytes() and b"mtime=" not in a.read_bytes()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert shards.main(["--dataset", "mnist", "--root", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: data.root {tmp_path / 'nope'} does not exist"
    assert shards.main(["--dataset", "digits", "--out", str(tmp_path), "--shard-size", "0"]) == 2
    assert "--shard-size must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ planning

@pytest.mark.parametrize("counts", [[17] * 11 + [16], [5, 40, 1, 9, 33, 2, 60]])
@pytest.mark.parametrize("world,workers,batch", [(1, 1, 8), (2, 2, 8), (4, 3, 4), (3, 5, 2)])
def test_plan_reads_each_sample_once(counts, world, workers, batch):
    total, order = sum(counts), epoch_order(len(counts), seed=3, epoch=1)
    steps = total // (world * batch)
    offsets = {s: sum(counts[t] for t in order[:order.index(s)]) for s in order}
    read = []
    for rank in range(world):
        for w in range(workers):
            start, stop = pretrain_range(rank, batch, steps, w, workers)
            assert (stop - start) % batch == 0
            for s, skip, take in pieces(counts, order, start, stop):
                assert 0 <= skip and skip + take <= counts[s]
                read += range(offsets[s] + skip, offsets[s] + skip + take)
    assert sorted(read) == list(range(steps * world * batch))


def test_resume_positions_follow_the_dataloader_round_robin():
    assert delivered([3, 3], 3) == ([2, 1], 1)
    assert delivered([1, 3], 3) == ([1, 2], 1)  # worker 0 runs out: the rest come from worker 1
    assert delivered([2, 2, 1], 4) == ([2, 1, 1], 1)
    assert delivered([2, 2], 0) == ([0, 0], 0)
    # eval: worker 0 owns batches 0 and 2 (8 + 5 valid samples), worker 1 batch 1, read after them
    assert eval_worker_batches(count=21, per=24, batch=8, worker=0, workers=2) == (0, [8, 5])
    assert eval_worker_batches(count=21, per=24, batch=8, worker=1, workers=2) == (13, [8])


# ------------------------------------------------------------------ streaming local shards

@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    write_indexed(str(root), n=203, shard_size=17, test_n=45)
    return str(root)


def test_two_replicas_two_workers_cover_every_sample_once(indexed):
    per_epoch = []
    for epoch in (0, 1):
        per_rank, steps = epoch_indices(indexed, world=2, batch=8, workers=2, epoch=epoch)
        assert steps == [(12, 12), (12, 12)]  # 203 // 16 steps on both replicas
        seen = collections.Counter(per_rank[0] + per_rank[1])
        assert len(seen) == 192 and set(seen.values()) == {1}  # 11 dropped, none twice
        assert not set(per_rank[0]) & set(per_rank[1])
        per_epoch.append(per_rank[0] + per_rank[1])
    assert per_epoch[0] != per_epoch[1] and set(per_epoch[0]) != set(per_epoch[1])  # reshuffled
    again, _ = epoch_indices(indexed, world=2, batch=8, workers=2, epoch=1)
    assert again[0] + again[1] == per_epoch[1]  # seeded: the same epoch twice is identical


def test_labels_travel_with_their_images(indexed):
    loader = data.eval_loader(shard_set(indexed, views=False), 16, 0, 1, workers=0)
    for x, y, valid in loader:
        assert torch.equal(y[valid], image_index(x)[valid] % CLASSES)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_without_repeats(indexed, workers):
    full = data.pretrain_loader(shard_set(indexed), 8, 1, 2, seed=5, workers=workers)
    full.set_epoch(3)
    batches = [image_index(q).tolist() for q, _ in full]
    resumed = data.pretrain_loader(shard_set(indexed), 8, 1, 2, seed=5, workers=workers)
    resumed.set_epoch(3, 5)
    assert [image_index(q).tolist() for q, _ in resumed] == batches[5:]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_stream_matches_gathered_order(indexed, workers):
    n, world, batch = 37, 2, 8
    xs, ys, vs = [], [], []
    for rank in range(world):
        for x, y, v in data.eval_loader(shard_set(indexed, "test", views=False), batch, rank, world, workers, n):
            xs.append(image_index(x)), ys.append(y), vs.append(v)
    x, y, v = torch.cat(xs), torch.cat(ys), torch.cat(vs)
    order = data.gathered_order(n, world, batch)
    assert len(x) == 48 and int(v.sum()) == n and v[order].all()
    assert len(set(x[order].tolist())) == n and torch.equal(y[order], x[order] % CLASSES)
    assert (y[~v] == -1).all()


# ------------------------------------------------------------------ bad shards

def rewrite_member(path, key_suffix: str, new: bytes | None) -> None:
    """Replace (or with None drop) the first member ending in ``key_suffix`` of a tar shard."""
    members = list(tar_members(path).items())
    name = next(n for n, _ in members if n.endswith(key_suffix))
    with tarfile.open(path, "w") as t:
        for n, blob in members:
            if n == name and new is None:
                continue
            blob = new if n == name else blob
            info = tarfile.TarInfo(n)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))


@pytest.fixture
def small(tmp_path):
    write_indexed(str(tmp_path), n=64, shard_size=16, test_n=16)
    return tmp_path


def all_epoch(root, policy):
    ss = shard_set(str(root), policy=policy)
    loader = data.pretrain_loader(ss, 8, 0, 1, seed=0, workers=0)
    loader.set_epoch(0)
    return list(loader), ss.skips.total


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"shard .*shard-000001.tar: truncated or corrupt tar"),
    ("image", r"shard-000001.tar:\d+.png: cannot decode image"),
    ("label", r"shard-000001.tar:\d+.png: no label member \(\d+.cls\)"),
    ("label_range", r"shard-000001.tar:\d+.png: label 99 is outside 0..4"),
])
def test_bad_shard_errors_name_the_member_or_skip(small, damage, message):
    shard = small / "train" / "shard-000001.tar"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:3000])
    elif damage == "image":
        rewrite_member(shard, ".png", b"\x89PNG\r\n\x1a\nbroken")
    elif damage == "label":
        rewrite_member(shard, ".cls", None)
    else:
        rewrite_member(shard, ".cls", b"99")
    with pytest.raises(UserError, match=message) as e:
        all_epoch(small, "error")
    assert "\n" not in str(e.value)
    with pytest.warns(RuntimeWarning, match=message):
        batches, skipped = all_epoch(small, "skip")
    assert len(batches) == 8 and all(q.shape == (8, 1, 8, 8) for q, _ in batches)  # steps stay equal
    if damage == "truncate":
        assert 1 <= skipped <= 16
    else:
        assert skipped == 1


def test_worker_errors_surface_as_one_line(small):
    (small / "train" / "shard-000002.tar").write_bytes(b"")
    loader = data.pretrain_loader(shard_set(str(small)), 8, 0, 1, seed=0, workers=2)
    loader.set_epoch(0)
    with pytest.raises(UserError, match="shard-000002.tar: truncated or corrupt tar") as e:
        list(loader)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_shard_root_checks(small):
    cfg = load_config("tiny", [f"data.root={small}"])
    data.check(cfg)  # digits shards: fine
    cfg.data.dataset = "mnist"
    with pytest.raises(UserError, match=f"{small} holds shards of 'digits' but data.dataset is 'mnist'"):
        data.check(cfg)
    cfg.data.dataset = "digits"
    (small / "test" / "manifest.json").unlink()
    with pytest.raises(UserError, match="test/manifest.json does not exist"):
        data.check(cfg)
    (small / "train" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="train/manifest.json is not valid JSON"):
        data.check(cfg)
