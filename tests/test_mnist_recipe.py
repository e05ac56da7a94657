"""moco_xla/configs/mnist_fewlabels.yaml is the recipe benchmarks/mnist_recipe.py measured (its chosen trial)."""
from __future__ import annotations

import importlib.util

from conftest import ROOT
from moco_xla.config import load_config


def recipe_module():
    spec = importlib.util.spec_from_file_location("mnist_recipe", ROOT / "benchmarks" / "mnist_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_config_equals_the_chosen_trial():
    recipe = recipe_module()
    run_only = ("data.root", "data.val_size", "data.workers", "checkpoint.", "train.log_every", "eval.knn_every")
    trial = [o for o in recipe.BASE + recipe.TRIALS[recipe.CHOSEN][1] if not o.startswith(run_only)]
    measured, shipped = load_config("mnist", trial).to_dict(), load_config("mnist_fewlabels").to_dict()
    for section in ("data", "model", "moco", "train"):
        for key, value in measured[section].items():
            if f"{section}.{key}" not in ("data.root", "data.workers") and section + "." + key not in run_only:
                assert shipped[section][key] == value, (section, key)
    assert shipped["eval"]["knn_k"] == 200 and shipped["eval"]["knn_t"] == 0.1
