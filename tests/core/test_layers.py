"""Arrows point down only (DESIGN.md, "The shape in one picture"): the layers below never import the
layers above, the packages of one layer never import each other, a command never imports another
command, and no module imports itself back through others. Every import statement counts, including
those inside functions (the lazy imports that keep `mlc --help` fast) and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

MLC = Path(__file__).resolve().parents[2] / "mlc"

# Top to bottom. A module may import from its own package, from anything in a lower layer, and from its
# own layer only where the layer is one package (base) or the import stays inside one package.
LAYERS: list[tuple[str, list[str]]] = [
    ("cli and commands", ["mlc.cli", "mlc.__main__", "mlc.cliutil", "mlc.commands"]),
    ("runs, models, distributed", ["mlc.runs", "mlc.models", "mlc.distributed"]),
    ("io", ["mlc.io"]),
    ("kernels", ["mlc.kernels"]),
    # errors, options, paths, dtypes, console, the bundled data, the plugin registry and its contracts
    ("base", ["mlc"]),
]
INDEPENDENT = {"runs, models, distributed"}  # sibling packages that must not import each other


def modules(root: Path = MLC) -> dict[str, Path]:
    """Every module of the package at root (a directory named mlc) by dotted name."""
    found = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imports(path: Path, known: dict[str, Path], type_only: bool = True) -> list[tuple[str, int]]:
    """(imported mlc module, line) for every import statement in a file, resolved to a module of the package.

    type_only=False leaves out the imports under `if TYPE_CHECKING:` (they never run).
    """

    def resolve(name: str) -> str:
        while name not in known and "." in name:
            name = name.rpartition(".")[0]
        return name

    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    if not type_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(resolve(a.name), node.lineno) for a in node.names if a.name.split(".")[0] == "mlc"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "mlc":
            # `from mlc import options` imports the module mlc.options; `from mlc.x import name` imports mlc.x.
            out += [(resolve(f"{node.module}.{a.name}"), node.lineno) for a in node.names]
    return out


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the package within the layer) of a module: the longest matching prefix wins."""
    best = (-1, "", "")
    for i, (_, packages) in enumerate(LAYERS):
        for p in packages:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best[1]):
                best = (i, p, p)
    i, package, _ = best
    if package == "mlc.commands":
        parts = module.split(".")
        package = ".".join(parts[:3])  # each command is its own package: mlc.commands.<name>
    return i, package


def violations(known: dict[str, Path]) -> list[str]:
    """Every import that points up a layer, across independent packages, or from one command to another."""
    wrong = []
    for module, path in sorted(known.items()):
        here, package = layer_of(module)
        for target, line in imports(path, known):
            there, target_package = layer_of(target)
            where = f"{module}:{line} imports {target}"
            if there < here:
                wrong.append(f"{where}: {LAYERS[here][0]} is below {LAYERS[there][0]}")
            elif there == here and package != target_package:
                if package.startswith("mlc.commands.") and target_package.startswith("mlc.commands."):
                    wrong.append(f"{where}: a command imports another command (move what they share down)")
                elif LAYERS[here][0] in INDEPENDENT:
                    wrong.append(f"{where}: {package} and {target_package} are independent")
    return wrong


def test_no_module_imports_a_higher_layer_or_a_sibling_package():
    wrong = violations(modules())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """No module imports itself back through others when it runs (imports for type checkers only are left out)."""
    known = modules()
    graph = {m: {t for t, _ in imports(p, known, type_only=False) if t != m} for m, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_finds_upward_sideways_and_command_to_command_imports(tmp_path: Path):
    """The rules catch what they are for, on a made-up tree with one import of each kind."""
    files = {
        "mlc/__init__.py": "",
        "mlc/errors.py": "",
        "mlc/kernels/packing.py": "def f():\n    from mlc.models.load import load_model\n",  # up, inside a function
        "mlc/models/load.py": "from mlc import errors\nfrom mlc.runs.refs import resolve\n",  # sideways
        "mlc/runs/refs.py": "import mlc.kernels.packing\n",  # down: fine
        "mlc/commands/merge/plan.py": "from mlc.commands.train import loop\nfrom mlc.commands.merge import api\n",
        "mlc/commands/merge/api.py": "",
        "mlc/commands/train/loop.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(modules(tmp_path / "mlc"))
    assert [f.split(":")[0] + " -> " + f.split(" imports ")[1].split(":")[0] for f in found] == [
        "mlc.commands.merge.plan -> mlc.commands.train.loop",
        "mlc.kernels.packing -> mlc.models.load",
        "mlc.models.load -> mlc.runs.refs",
    ]
