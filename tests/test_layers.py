"""The import rule of docs/architecture.md, checked on the source: imports flow one way, there are
no cycles, no job's logic imports another job's, and nothing in the library imports the demo."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lower layers never import higher ones; modules of one layer may import each other (acyclically).
LAYERS = [
    ("aver.constants", "aver.faults", "aver.io", "aver.console"),
    ("aver.models", "aver.audio", "aver.losses", "aver.metrics"),
    ("aver.tracking", "aver.faces", "aver.data"),
    ("aver.train", "aver.pipelines"),
    ("aver.cli",),
]
# Shared by the job modules of a package; everything else there is one job's own logic.
SHARED = {"aver.train.harness", "aver.train.batches", "aver.pipelines.ledger", "aver.pipelines.stages", "aver.pipelines.cluster", "aver.pipelines.report"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in layer):
            return i
    return None


def aver_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(imported at module level, imported anywhere) aver modules of one file."""
    tree = ast.parse(path.read_text())
    top, every = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            names += [f"{node.module}.{a.name}" for a in node.names
                      if (ROOT / (node.module + "." + a.name).replace(".", "/")).with_suffix(".py").exists()]
        names = {n for n in names if n == "aver" or n.startswith("aver.")}
        every |= names
        if node in tree.body:
            top |= names
    return top, every


def library() -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(p): aver_imports(p) for p in sorted((ROOT / "aver").rglob("*.py"))}


def test_imports_flow_one_way():
    bad = []
    for mod, (_, every) in library().items():
        for imp in every:
            if mod.startswith("aver.demo"):
                if rank(imp) is not None and rank(imp) > 2:
                    bad.append(f"{mod} -> {imp} (the demo uses the library's lower layers only)")
                continue
            if imp.startswith("aver.demo"):
                bad.append(f"{mod} -> {imp} (nothing in the library imports the demo)")
            elif rank(mod) is not None and rank(imp) is not None and rank(imp) > rank(mod):
                bad.append(f"{mod} -> {imp} (layer {rank(mod)} importing layer {rank(imp)})")
    assert not bad, "\n".join(bad)


def test_no_job_imports_another_jobs_module():
    bad = []
    for mod, (_, every) in library().items():
        for imp in every:
            for pkg in ("aver.train.", "aver.pipelines."):
                if imp.startswith(pkg) and imp != mod and imp not in SHARED and mod.startswith(("aver.train.",
                                                                                                "aver.pipelines.")):
                    bad.append(f"{mod} -> {imp}")
            if mod.startswith("aver.train.") and imp.startswith("aver.pipelines"):
                bad.append(f"{mod} -> {imp}")
            if mod.startswith("aver.pipelines.") and imp.startswith("aver.train"):
                bad.append(f"{mod} -> {imp}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    # Function-local imports count too: they hide a cycle, they do not remove it.
    graph = {mod: {i for i in every if i != mod and i in library_names} for mod, (_, every) in lib.items()}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()

    for mod in graph:
        visit(mod)
    assert not cycles, cycles


lib = library()
library_names = set(lib)


def test_rule_is_checked_on_every_module():
    # Guards against a test that passes because it reads nothing: every library module is ranked.
    unranked = [m for m in lib if m not in ("aver",) and not m.startswith("aver.demo") and rank(m) is None]
    assert not unranked, unranked
    assert len(lib) >= 30
