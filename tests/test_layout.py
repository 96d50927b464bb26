"""The package layout: every path a user is told about resolves, and no module imports itself back.

- each ``class_path`` in ``configs/`` names an importable class;
- each dotted ``flowmap_lit.…`` name in README.md, docs/, data/README.md and the notebooks
  imports (as a module, or as an attribute of one);
- each ``python -m flowmap_lit…`` command in them runs its ``--help``;
- no module of ``flowmap_lit`` imports, at module level or on first use inside a function, one that
  imports it back (directly or through others).
"""

import ast
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowmap_lit"
DOCS = [ROOT / "README.md", ROOT / "data/README.md", *sorted((ROOT / "docs").glob("*.md"))]


def class_paths(tree) -> list[str]:
    if isinstance(tree, dict):
        own = [tree["class_path"]] if isinstance(tree.get("class_path"), str) else []
        return own + [p for v in tree.values() for p in class_paths(v)]
    if isinstance(tree, list):
        return [p for v in tree for p in class_paths(v)]
    return []


def resolve(dotted: str):
    """The module or attribute ``dotted`` names (the longest importable module prefix, then getattr)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def doc_texts() -> dict[str, str]:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in DOCS}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        texts[str(nb.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells)
    return texts


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_config_class_paths_import(config):
    paths = class_paths(yaml.safe_load((ROOT / config).read_text()))
    for path in paths:
        module, _, name = path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), path


def test_documented_names_import():
    names = set()
    for text in doc_texts().values():
        names |= set(re.findall(r"\bflowmap_lit(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))
        for module, imported in re.findall(r"from (flowmap_lit[\w.]*) import ([\w, ]+)", text):
            names |= {f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()}
    names = {n.rstrip(".") for n in names if not n.endswith((".py", ".yaml"))}
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"documented names that do not import: {missing}"


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_documented_commands_use_the_one_form_and_run(capsys):
    """Docs spell every command ``python -m flowmap_lit COMMAND`` (or ``flowmap-lit COMMAND``), never a
    module path, and each documented command answers ``--help``."""
    from flowmap_lit.cli import COMMANDS, TRAINING, main

    commands, module_forms = set(), []
    for name, text in doc_texts().items():
        module_forms += [f"{name}: {m}" for m in re.findall(r"python -m flowmap_lit\.[\w.]+", text)]
        commands |= set(re.findall(r"(?:python -m flowmap_lit|flowmap-lit) ([a-z]+)\b", text))
    assert not module_forms, f"module-path command forms in the docs: {module_forms}"
    assert {"fit", "sample", "prepare"} <= commands
    unknown = sorted(commands - set(TRAINING) - set(COMMANDS))
    assert not unknown, f"documented commands that do not exist: {unknown}"
    for command in sorted(commands):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
    capsys.readouterr()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULE_STRING = re.compile(r"flowmap_lit(\.[A-Za-z_][A-Za-z0-9_]*)*")


def imported_modules(path: Path) -> set[str]:
    """``flowmap_lit`` names ``path`` imports anywhere: import statements at module level, inside
    functions and under ``if TYPE_CHECKING:`` (relative imports resolved), and imports by name: every
    string constant that is exactly a dotted ``flowmap_lit`` path (``importlib.import_module("…")``,
    a registry of commands, a lazy-import table), docstrings aside. A ``__main__`` block of a module
    that was once a command is its redirect to the command line, not a dependency."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            if "__main__" not in ast.dump(node.test):
                self.generic_visit(node)

        def visit_Import(self, node):
            found.update(a.name for a in node.names if a.name.startswith("flowmap_lit"))

        def visit_ImportFrom(self, node):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("flowmap_lit"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # submodules imported by name

        def visit_Constant(self, node):
            if isinstance(node.value, str) and id(node) not in docstrings and MODULE_STRING.fullmatch(node.value):
                found.add(node.value)

    Visitor().visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports. A module importing its own package (running the
    package's ``__init__``, which may import the module back) is how packages work, not a cycle."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dep in imported_modules(path):
            while dep and dep not in modules:  # "pkg.mod.Name" -> "pkg.mod"
                dep = dep.rpartition(".")[0]
            if dep and dep != name and not name.startswith(dep + "."):
                deps.add(dep)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

    def dfs(node, stack):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                dfs(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
    return cycles


def test_no_import_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the check can fail
    graph = import_graph()
    assert "flowmap_lit.teachers.analytic" in graph["flowmap_lit.teachers.mixture"]  # and sees imports
    assert "flowmap_lit.data.imagenet" in graph["flowmap_lit.data.prepare"]  # including those inside functions
    assert "flowmap_lit.commands.sample" in graph["flowmap_lit.cli"]  # and those made by name
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def design_layers() -> dict[str, int]:
    """``{module or package: layer}`` from the "Layers" list of docs/design.md section 7
    (lines ``- Layer N (name): `flowmap_lit.a`, `flowmap_lit.b`, ...``)."""
    text = (ROOT / "docs/design.md").read_text()
    layers = {}
    for number, names in re.findall(r"^- Layer (\d+)[^:]*:(.*)$", text, re.M):
        for name in re.findall(r"`(flowmap_lit[\w.]*)`", names):
            layers[name] = int(number)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of ``module`` or of the nearest package above it that is listed (the root package
    counts only for itself, so a new module that no layer lists is reported, not placed on top)."""
    name = module
    while name and (name != "flowmap_lit" or module == "flowmap_lit"):
        if name in layers:
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def layer_violations(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports from a lower layer to a higher one, and modules no layer holds."""
    out = []
    for module, deps in sorted(graph.items()):
        own = layer_of(module, layers)
        if own is None:
            out.append(f"{module} is in no layer of docs/design.md section 7")
            continue
        for dep in sorted(deps):
            theirs = layer_of(dep, layers)
            if theirs is not None and theirs > own:
                out.append(f"{module} (layer {own}) imports {dep} (layer {theirs})")
    return out


def test_layers_hold():
    layers = design_layers()
    assert layers.get("flowmap_lit.interpolant") == 0 and layers.get("flowmap_lit.commands") == max(layers.values())
    assert layer_violations({"flowmap_lit.interpolant": {"flowmap_lit.commands"}}, layers)  # the check can fail
    graph = import_graph()
    assert not layer_violations(graph, layers), "\n".join(layer_violations(graph, layers))
    for module, deps in graph.items():  # no library module reaches the command line
        if not module.startswith(("flowmap_lit.commands", "flowmap_lit.cli", "flowmap_lit.__main__")) \
                and module not in ("flowmap_lit", "flowmap_lit._moved"):
            assert not {d for d in deps if d.startswith(("flowmap_lit.commands", "flowmap_lit.cli"))}, module
