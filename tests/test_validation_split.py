"""data.val_size: a seeded, class-balanced validation split carved out of the training images."""
from __future__ import annotations

import collections

import pytest

from moco_xla import data
from moco_xla.config import load_config
from moco_xla.errors import UserError


def split_indices(cfg) -> tuple[list[int], list[int]]:
    bundle = data.build(cfg)
    assert bundle.bank.base is bundle.pretrain.base  # pre-training and the kNN bank: the same images
    return list(bundle.bank.base.indices), list(bundle.test.base.indices)


def test_val_split_replaces_the_test_set_with_held_out_training_images():
    cfg = load_config("tiny", ["data.val_size=200"])
    full = data.build(load_config("tiny"))
    keep, val = split_indices(cfg)
    assert len(val) == 200 and len(keep) == len(full.bank) - 200 and not set(keep) & set(val)
    counts = collections.Counter(int(full.bank.base.labels[i]) for i in val)
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1  # class-balanced
    assert split_indices(cfg) == (keep, val)  # the same split every run
    bundle = data.build(cfg)
    img, label = bundle.test[0]
    ref_img, ref_label = full.bank[val[0]]  # a training image under the evaluation transform
    assert label == ref_label and bool((img == ref_img).all())


@pytest.mark.parametrize("value, message", [(-1, "'data.val_size' must be >= 0, got -1"),
                                             (5000, "data.val_size=5000 must be in 1..1256")])
def test_bad_val_size_is_a_one_line_error(value, message):
    with pytest.raises(UserError, match=message):
        data.build(load_config("tiny", [f"data.val_size={value}"]))
