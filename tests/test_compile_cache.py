"""The persistent XLA compilation cache on the 4-replica rehearsal: a first run writes every graph
into $MOCO_XLA_COMPILE_CACHE, a second run of the same config finds every one of them there.

XLA:CPU cannot load an executable back ("Deserializing serialized executable not supported"): here a
found graph counts as PersistentCacheDeserializeFailure and is compiled again; a TPU loads it
(PersistentCacheHit). What this checks is what a restart depends on: the same keys, run after run."""
from __future__ import annotations

import os

import pytest
import torch

import xla_fns
from xla_replicas import run_replicas

N, STEPS = 2, 2

pytestmark = pytest.mark.needs_xla  # torch_xla's persistent cache on XLA:CPU replicas


def test_second_run_finds_every_graph_in_the_cache(tmp_path, tiny_cfg, monkeypatch):
    cache = tmp_path / "xla_cache"
    monkeypatch.setenv("MOCO_XLA_COMPILE_CACHE", str(cache))
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # compile fast: the keys are what count
    tiny_cfg.model.width = 4
    first = run_replicas(xla_fns.cached_steps, N, tiny_cfg, STEPS)
    written = sorted(os.listdir(cache))
    c1 = first[0]["cache"]
    assert c1["PersistentCacheMiss"] > 0 and len(written) == c1["PersistentCacheMiss"], (c1, written)
    second = run_replicas(xla_fns.cached_steps, N, tiny_cfg, STEPS)
    c2 = second[0]["cache"]
    assert c2["PersistentCacheMiss"] == 0, c2  # every graph's key was in the cache
    assert c2["PersistentCacheHit"] + c2["PersistentCacheDeserializeFailure"] == c1["PersistentCacheMiss"], c2
    assert sorted(os.listdir(cache)) == written
    for a, b in zip(first[0]["q"], second[0]["q"]):  # the same training either way
        assert torch.equal(a, b)


def test_cache_directory_must_be_local(monkeypatch):
    import pytest
    from moco_xla.errors import UserError
    from moco_xla.runtime.xla import initialize_compile_cache
    monkeypatch.setenv("MOCO_XLA_COMPILE_CACHE", "gs://bucket/cache")
    with pytest.raises(UserError, match="local directory"):
        initialize_compile_cache()
    monkeypatch.setenv("MOCO_XLA_COMPILE_CACHE", "off")
    assert initialize_compile_cache() is None
