"""The package layers point one way, and no module imports itself through others.

Every module is read with ``ast``: imports inside functions count, relative
imports are resolved, ``from pkg import name`` counts as importing the
submodule ``pkg.name`` when one exists (else ``pkg``), and a package whose
``__init__`` calls ``import_submodules`` imports all its submodules. A
submodule that imports its own parent package (whose ``__init__`` imports the
submodule) is therefore a cycle.
"""
import ast
import os
from typing import Dict, List, Set

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lower numbers are lower layers; a module may import its own layer or lower ones only.
# The longest matching prefix gives a module's layer.
KD_CLS_LAYERS = {
    "kd_cls": 0,
    "kd_cls.registry": 0,
    "kd_cls.config": 0,
    "kd_cls.hooks": 0,
    "kd_cls.checkpoint_io": 0,
    "kd_cls.losses": 0,
    "kd_cls.nn": 1,
    "kd_cls.data": 1,
    "kd_cls.optim": 1,
    "kd_cls.testing": 1,
    "kd_cls.models": 2,
    "kd_cls.distillers": 3,
    "kd_cls.engine": 4,
}


def _modules(package: str, repo: str = REPO) -> Dict[str, str]:
    """``{dotted module name: file path}`` of every module under ``package``."""
    out = {}
    root = os.path.join(repo, package)
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), repo)[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            out[name] = os.path.join(d, f)
    return out


def _imports(name: str, path: str, known: Set[str]) -> Set[str]:
    """The project modules ``name`` imports (anywhere in the file)."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path).read(), path)
    found: Set[str] = set()

    def add(target: str) -> None:
        # the deepest existing project module on the dotted path
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                found.add(cand)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_pkg else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for a in node.names:
                add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "import_submodules", "_import_submodules"
        ) and is_pkg:
            found.update(m for m in known if m.rsplit(".", 1)[0] == name)
    found.discard(name)
    return found


def _graph(packages: List[str], repo: str = REPO) -> Dict[str, Set[str]]:
    mods: Dict[str, str] = {}
    for p in packages:
        mods.update(_modules(p, repo))
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    best = max((p for p in KD_CLS_LAYERS if module == p or module.startswith(p + ".")), key=len)
    return KD_CLS_LAYERS[best]


@pytest.mark.parametrize("packages", [["kd_cls"], ["kd_cls", "kd_det"]], ids=["kd_cls", "kd_cls+kd_det"])
def test_no_import_cycles(packages):
    cycles = _cycles(_graph(packages))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_kd_cls_layers_point_down():
    upward = []
    for mod, deps in _graph(["kd_cls"]).items():
        for dep in deps:
            if _layer(dep) > _layer(mod):
                upward.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    assert not upward, "; ".join(sorted(upward))


def test_kd_cls_never_imports_detectron2_or_kd_det():
    offenders = []
    for name, path in _modules("kd_cls").items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("detectron2", "kd_det")]
    assert not offenders, offenders


def test_the_checker_sees_a_parent_package_cycle(tmp_path):
    """The rule the tests above rely on: a registry importing its own parent package is a cycle."""
    pkg = tmp_path / "demo_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .registry import REG\n")
    (pkg / "registry.py").write_text("def get():\n    import demo_pkg\n    return demo_pkg\nREG = {}\n")
    assert _cycles(_graph(["demo_pkg"], str(tmp_path))) == [["demo_pkg", "demo_pkg.registry"]]
    (pkg / "registry.py").write_text("REG = {}\n")
    assert _cycles(_graph(["demo_pkg"], str(tmp_path))) == []
