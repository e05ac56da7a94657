"""A static scan of the step path for host syncs and data-dependent shapes.

The runtime check (GraphWatch, tests/test_xla_training.py) catches a sync when XLA
runs; this scan catches it in review, before anyone runs a TPU: inside the code that
runs every step, no ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``print``, no
``float``/``int``/``bool`` of a tensor, and no op whose output shape depends on the data.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "moco_xla"
HOST_READS = {"item", "tolist", "cpu", "numpy"}
DYNAMIC_SHAPE = {"nonzero", "unique", "masked_select", "unique_consecutive", "argwhere"}
CASTS = {"float", "int", "bool", "print"}
# Functions that run every training step (or every eval batch), by file.
STEP_FUNCTIONS = {
    "moco.py": {"forward", "contrastive_loss", "query", "key", "dequeue_and_enqueue",
                "momentum_update_key_encoder"},
    "shuffle.py": {"shared_permutation", "shuffle_gather", "unshuffle_gather", "shuffle_all_to_all",
                   "unshuffle_all_to_all", "shuffled_keys"},
    "models.py": {"forward"},
    "eval/knn.py": {"knn_predict", "embed", "knn_accuracy"},
    "eval/precise_bn.py": {"recompute", "_stats"},
    "guards.py": {"observe"},  # StopGuard.observe: every step
}
TENSOR_NAMES = {"loss", "stats", "acc", "sums", "im_q", "im_k", "logits", "keys", "k", "q"}


def problems(tree: ast.AST, where: str) -> list[str]:
    """Host reads, tensor casts and dynamic-shape ops anywhere under ``tree``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in HOST_READS | DYNAMIC_SHAPE:
            found.append(f"{where}:{node.lineno} .{f.attr}()")
        elif isinstance(f, ast.Name) and f.id in CASTS and _mentions_tensor(node):
            found.append(f"{where}:{node.lineno} {f.id}(...) of a tensor")
        elif isinstance(f, ast.Name) and f.id == "print":
            found.append(f"{where}:{node.lineno} print()")
    return found


def _mentions_tensor(call: ast.Call) -> bool:
    names = {n.id for a in call.args for n in ast.walk(a) if isinstance(n, ast.Name)}
    return bool(names & TENSOR_NAMES) or (call.func.id == "print")


def step_loop(tree: ast.AST) -> ast.For:
    """train.py's training-step loop: the ``for`` over ``rt.device_loader(...)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and "device_loader" in ast.unparse(node.iter):
            return node
    raise AssertionError("train.py has no `for ... in rt.device_loader(...)` step loop")


def scan_train_loop(source: str) -> list[str]:
    loop = step_loop(ast.parse(source))
    return [p for stmt in loop.body for p in problems(stmt, "train.py loop")]


def scan_step_functions() -> list[str]:
    found = []
    for name, funcs in STEP_FUNCTIONS.items():
        tree = ast.parse((ROOT / name).read_text())
        seen = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in funcs:
                seen.add(node.name)
                found += problems(node, f"{name} {node.name}")
        assert seen == funcs, f"{name}: step functions renamed? missing {funcs - seen}"
    return found


def test_training_step_loop_reads_nothing_back():
    assert scan_train_loop((ROOT / "train.py").read_text()) == []


def test_step_functions_read_nothing_back():
    assert scan_step_functions() == []


def test_scan_catches_a_reintroduced_item():
    source = (ROOT / "train.py").read_text()
    anchor = "\n        bar.update(1)\n"
    assert anchor in source
    broken = source.replace(anchor, anchor + "        print(f'loss {loss.item():.3f}')\n", 1)
    found = scan_train_loop(broken)
    assert any(".item()" in p for p in found) and any("print" in p for p in found), found
    broken = source.replace(anchor, anchor + "        lv = float(stats['loss'])\n", 1)
    assert any("float(...)" in p for p in scan_train_loop(broken))


def test_scan_catches_a_data_dependent_shape():
    tree = ast.parse("def forward(x):\n    return x[x.nonzero()]\n")
    assert problems(tree, "t") == ["t:2 .nonzero()"]
