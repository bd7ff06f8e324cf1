"""The import rule of docs/architecture.md, checked on the source with ``ast``.

Layers, lowest first; a module may import its own package and the packages below:

    trainer.io  <  trainer (the rest)  <  eval, data_tools  (side by side, never each other)  <  bench
    launch stands alone: it imports nothing of the project; nothing imports bench.

Inside ``trainer``: ``trainer.io``, ``trainer.section`` (what every config section
shares) and ``trainer.runtime`` (process group, run lock, preemption) import nothing
else of the project; ``trainer.heads`` / ``trainer.collectives``
(the algorithm) and ``trainer.backbones`` import no orchestration; and the components
(``trainer.engine``, ``trainer.optim``, ``trainer.heads``, ``trainer.data``,
``trainer.backbones``) never import the composition (``trainer.config``) or the loop
(``trainer.loop``, ``trainer.train``): each owns its config section, the composition
sits above them.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("trainer", "eval", "data_tools", "launch", "bench")

# importer prefix -> project prefixes it may import (besides itself); the first match wins
ALLOWED: List[Tuple[str, Tuple[str, ...]]] = [
    ("trainer.io", ()),
    ("trainer.section", ()),
    ("trainer.heads", ("trainer.collectives", "trainer.section")),
    ("trainer.collectives", ()),
    ("trainer.runtime", ()),
    ("trainer.backbones", ("trainer.section",)),
    ("trainer", ("trainer",)),
    ("eval", ("trainer",)),
    ("data_tools", ("trainer",)),
    ("launch", ()),
    ("bench", ("trainer", "eval", "data_tools")),
]

#: the components: each owns its config section and never imports what composes them
COMPONENTS = ("trainer.engine", "trainer.optim", "trainer.heads", "trainer.data", "trainer.backbones")
#: what the components never import: the composition (config) and the loop (loop, its CLI)
ABOVE_COMPONENTS = ("trainer.config", "trainer.loop", "trainer.train")


def _under(mod: str, prefixes: Tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_imports(source: str, mod: str, is_package: bool) -> List[Tuple[int, str]]:
    """(line, imported module) for every import of a project package in ``source`` (module
    ``mod``), at any depth (function-level imports count too)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = mod.split(".") if is_package else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PROJECT]
    return out


def rule_for(mod: str) -> Tuple[str, Tuple[str, ...]]:
    for prefix, allowed in ALLOWED:
        if mod == prefix or mod.startswith(prefix + "."):
            return prefix, allowed
    raise AssertionError(f"{mod}: no layer in ALLOWED (add the new package to the rule)")


def check(path: Path, source: str = None) -> List[str]:
    """Forbidden imports of the module at ``path`` (its text, or ``source`` in its place)."""
    mod = module_name(path)
    own, allowed = rule_for(mod)
    bad = []
    for line, imp in project_imports(path.read_text() if source is None else source, mod, path.name == "__init__.py"):
        if not _under(imp, (own,) + allowed):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {mod} imports {imp} "
                       f"(layer '{own}' may import {', '.join((own,) + allowed)})")
        elif _under(mod, COMPONENTS) and _under(imp, ABOVE_COMPONENTS):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {mod} imports {imp} (a component never imports "
                       f"{', '.join(ABOVE_COMPONENTS)}: its config section lives beside it)")
    return bad


def source_files():
    return sorted(p for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py"))


def test_imports_flow_one_way():
    files = source_files()
    assert len(files) > 50
    bad = [v for f in files for v in check(f)]
    assert not bad, "forbidden imports (docs/architecture.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("where, line", [
    ("trainer/loop.py", "from eval.metrics import verify_embeddings"),
    ("trainer/io/atomic.py", "from trainer.config import Config"),
    ("launch/cli.py", "import trainer.train"),
    ("data_tools/synth.py", "from eval import report"),
    ("trainer/heads/softmax.py", "from trainer.loop import Trainer"),
    ("trainer/heads/partial_fc.py", "from ..config import Config"),
    # components never import the composition or the loop
    ("trainer/engine/ddp.py", "from trainer.config import EngineConfig"),
    ("trainer/engine/base.py", "from ..config import OptimConfig"),
    ("trainer/optim.py", "import trainer.config"),
    ("trainer/data/torch_loader.py", "from trainer.loop import Trainer"),
    ("trainer/data/config.py", "from trainer.train import main"),
    ("trainer/backbones/tiny.py", "from trainer.config import ModelConfig"),
    ("trainer/heads/config.py", "from trainer.optim import OptimConfig"),
    # the config sections' shared module is a leaf
    ("trainer/section.py", "from trainer.data.config import DataConfig"),
    # the runtime (process group, run lock, preemption) knows nothing of the trainer
    ("trainer/runtime/preemption.py", "from trainer.checkpointer import CheckpointManager"),
    ("trainer/runtime/process_group.py", "from trainer.io.atomic import atomic_open"),
    # bench sits on top: nothing imports it, it imports no launch
    ("trainer/loop.py", "from bench.memory import peak_mb"),
    ("eval/cli.py", "import bench.head"),
    ("data_tools/synth.py", "from bench import experiment"),
    ("bench/head.py", "import launch.cli"),
])
def test_rule_catches_a_wrong_import(where, line):
    """The check fails when a forbidden import is added, even inside a function."""
    src = ROOT / where
    assert not check(src)
    bad = check(src, src.read_text() + f"\n\ndef _added():\n    {line}\n")
    assert len(bad) == 1 and where in bad[0], bad


def _own_python_files():
    """The repository's .py files: hidden folders (.venv, .venv-device, .git) and build or run
    outputs are not ours (a virtual environment holds third-party files, some not UTF-8)."""
    skip = {"__pycache__", "build", "dist", "demo_out", "bench_out", "work_dirs", "runs", "device_dryrun_out"}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT).parts
        if not any(part.startswith(".") or part in skip for part in rel[:-1]):
            yield p


def test_relative_engine_config_import_is_allowed():
    """``trainer.engine.config`` is the engine's own section, not the composition: allowed
    (the rule matches module names, not the word "config")."""
    src = ROOT / "trainer/engine/ddp.py"
    assert not check(src, src.read_text() + "\n\ndef _added():\n    from .config import EngineConfig\n")


def test_loading_a_config_does_not_import_torch():
    """The composition and every section load (and check a YAML) without torch."""
    code = ("import sys; import trainer.config as c; cfg = c.load_config(None, ['loss.margin=adaface', "
            "'engine.name=deepspeed', 'data.backend=torch']); c.to_yaml(cfg); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_no_sys_path_edits_outside_tests():
    hits = [f"{p.relative_to(ROOT)}" for p in _own_python_files()
            if "tests" not in p.parts and "sys.path" in p.read_text()]
    assert not hits, hits
    # the walk sees the project's modules, and not a virtual environment's
    files = {str(p.relative_to(ROOT)) for p in _own_python_files()}
    assert "trainer/loop.py" in files and not any(f.startswith(".venv") for f in files)
