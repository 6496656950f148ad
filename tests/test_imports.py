"""Every import in src/posttrain points down the layer order, and no modules import each other in a circle.

Checked on the source with `ast`, so imports inside functions count too (a lazy import of a
higher layer is still an upward dependency). The order is written once, below; a top-level
module or package that is not in it fails the test, so a new one has to be placed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "posttrain"
PACKAGE = "posttrain"

# lowest first; a module may import its own layer and the layers before it
LAYERS = [
    ["config", "fileio", "registry", "hf_imports", "ports"],
    ["models", "quantized", "adapters", "kernels"],
    ["stage", "plan", "data"],
    ["generate"],
    ["eval"],
    ["train"],
    ["reason"],
    ["rl"],
    ["compress"],
    ["stages"],
    ["pipeline"],
    ["serve", "ui"],
    ["cli"],
]


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a submodule where `from pkg import sub` names one)
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{_shown(self.path)}:{self.line}"


def _shown(path: Path) -> str:
    """The path from the current directory when it is below it (src/posttrain/x.py), else as is."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def find_imports(root: Path, package: str = PACKAGE) -> tuple[dict[str, Path], list[Import]]:
    """(every module under root, every import of a module of the package): module level and in function bodies."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root, package): f for f in files}
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module
                # `from pkg import sub` imports the submodule when there is one, else names from pkg
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target == package or target.startswith(package + "."):
                    found.append(Import(name, target, path, node.lineno))
    return modules, found


def layer_of(module: str, layers: list[list[str]], package: str = PACKAGE) -> int | None:
    """Index of the module's layer (by its top-level name under the package); the package root is the lowest."""
    if module == package:
        return 0
    top = module.split(".")[1]
    return next((i for i, group in enumerate(layers) if top in group), None)


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """One cycle (as its chain of imports) per strongly connected group of modules (Tarjan)."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.source != imp.target:
            graph.setdefault(imp.source, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_shortest_cycle(graph, set(group), group[0]) for group in groups]


def _shortest_cycle(graph: dict[str, dict[str, Import]], members: set[str], start: str) -> list[Import]:
    """Breadth-first from `start` back to itself inside its group: the chain of imports of the shortest cycle."""
    parent: dict[str, Import | None] = {start: None}
    queue = [start]
    for v in queue:
        for w, imp in sorted(graph.get(v, {}).items()):
            if w == start:
                chain = [imp]
                while parent[v] is not None:
                    chain.append(parent[v])
                    v = parent[v].source
                return chain[::-1]
            if w in members and w not in parent:
                parent[w] = imp
                queue.append(w)
    raise AssertionError(f"{start} is in a cycle group but no cycle leads back to it")


def check(root: Path, layers: list[list[str]] = LAYERS, package: str = PACKAGE) -> list[str]:
    """Every problem, one line each: modules in no layer, upward imports (file:line), import cycles."""
    modules, imports = find_imports(root, package)
    problems = []
    for module, path in modules.items():
        if layer_of(module, layers, package) is None:
            problems.append(f"{_shown(path)}: module {module} is in no layer: "
                            f"place {module.split('.')[1]!r} in LAYERS (tests/test_imports.py)")
    for imp in imports:
        mine, theirs = layer_of(imp.source, layers, package), layer_of(imp.target, layers, package)
        if theirs is None and imp.target not in modules:
            problems.append(f"{imp.where}: {imp.source} imports {imp.target}, which is no module of {package}")
        elif mine is not None and theirs is not None and theirs > mine:
            problems.append(f"{imp.where}: upward import: {imp.source} (layer {mine}: {', '.join(layers[mine])}) "
                            f"imports {imp.target} (layer {theirs}: {', '.join(layers[theirs])})")
    # cycles within the layers first (only the cycle check catches those), then the rest of the graph,
    # where each strongly connected group is named by one cycle (its upward imports are listed above)
    sideways = [imp for imp in imports if (layer_of(imp.target, layers, package) or 0)
                <= (layer_of(imp.source, layers, package) or 0)]
    cycles = find_cycles(sideways)
    cycles += [chain for chain in find_cycles(imports) if chain not in cycles]
    for chain in cycles:
        path = " -> ".join([chain[0].source] + [imp.target for imp in chain])
        problems.append(f"import cycle: {path} (" + ", ".join(imp.where for imp in chain) + ")")
    return problems


def test_every_import_points_down_the_layers_and_none_forms_a_cycle():
    problems = check(SRC)
    assert not problems, f"{len(problems)} layering problem(s):\n" + "\n".join(problems)


def test_the_checker_finds_upward_imports_cycles_and_unplaced_modules(tmp_path):
    """A small fake package: the checker must fail on each kind of problem, naming file and line."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "config.py": "import os\n",
        "data/__init__.py": "",
        "data/formats.py": "from pkg.config import x\nfrom . import rows\n",  # down, and within the layer
        "data/rows.py": "def f():\n    from ..cli import main\n",  # upward, relative, inside a function
        "generate/__init__.py": "",
        "generate/engine.py": "from pkg.generate import speculative\n",
        "generate/speculative.py": "def g():\n    import pkg.generate.engine\n",  # engine <-> speculative
        "cli.py": "import pkg.generate.engine\nfrom pkg import config\n",
        "extra.py": "",  # not placed in any layer
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    layers = [["config"], ["data"], ["generate"], ["cli"]]
    problems = check(root, layers, package="pkg")
    assert problems == [
        f"{root / 'extra.py'}: module pkg.extra is in no layer: place 'extra' in LAYERS (tests/test_imports.py)",
        f"{root / 'data/rows.py'}:2: upward import: pkg.data.rows (layer 1: data) imports pkg.cli (layer 3: cli)",
        "import cycle: pkg.generate.engine -> pkg.generate.speculative -> pkg.generate.engine "
        f"({root / 'generate/engine.py'}:1, {root / 'generate/speculative.py'}:2)",
    ]
    # a clean tree passes
    (root / "extra.py").unlink()
    (root / "data/rows.py").write_text("from ..config import z\n")
    (root / "generate/speculative.py").write_text("")
    assert check(root, layers, package="pkg") == []
