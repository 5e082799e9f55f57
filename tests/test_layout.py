"""The package's import graph: no cycles, arrows pointing one way between rooms, and every module
importable on its own.

The graph is read statically from the source (every `import`, at module level or inside a
function), so a cycle hidden behind a lazy import is caught too.
"""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("serving", "decoding", "kernels", "training")

# A module may import its own room and rooms of a lower rank, never a higher one.
RANKS = {
    "counterpoint.kernels": 0,
    "counterpoint.decoding": 0,
    "counterpoint.serving.cache": 0,
    "counterpoint.serving.native": 0,  # builds the C files of the CPU path, for models and attention alike
    "counterpoint.serving.models": 1,
    "counterpoint.serving.quant": 1,  # quantized weights: read by the model loader, reads its name maps
    "counterpoint.serving.attention": 1,
    "counterpoint.serving.engine": 2,
    "counterpoint.serving.api": 3,
    "counterpoint.serving.llm": 3,
    "counterpoint.serving.flags": 3,
    "counterpoint.serving.bench": 4,
    "counterpoint.serving.eval": 4,
    "counterpoint.serving.cli": 5,
    "counterpoint.serving.__main__": 5,
    "counterpoint.serving": 5,  # the package itself (its lazy `LLM`)
    "counterpoint.training": 4,
}


def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            parts = ("counterpoint",) + path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The counterpoint modules that `name` imports. `from pkg import x` points at module pkg.x
    when that is a module, else at pkg."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + int(is_package)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    return {t for t in targets if t in known and t != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def rank(module: str) -> int:
    room = max((r for r in RANKS if module == r or module.startswith(r + ".")), key=len)
    return RANKS[room]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_correctly():
    edges = graph()
    assert "counterpoint.serving.engine.scheduler" in edges["counterpoint.serving.engine.engine"]
    assert "counterpoint.decoding.params" in edges["counterpoint.decoding"]  # a package's own import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_arrows_point_one_way_between_rooms():
    wrong = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets) if rank(b) > rank(a)]
    assert not wrong, "imports against the layering (api -> engine -> attention/models/quant -> kernels):\n" + \
        "\n".join(wrong)


def test_decoding_never_imports_serving():
    wrong = [f"{a} -> {b}" for a, targets in graph().items() if a.startswith("counterpoint.decoding")
             for b in targets if b.startswith("counterpoint.serving")]
    assert not wrong


def test_every_module_imports_cleanly():
    """All modules in one fresh interpreter (conftest sets TRITON_INTERPRET where there is no GPU)."""
    names = sorted(m for m in modules() if not m.endswith(".__main__"))  # __main__ runs the CLI
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]



def test_the_top_level_folders_shadow_no_installed_package():
    """`python -m` puts the working directory first on sys.path, so from the repo root the folders are
    top-level names too. kernels/ is a namespace folder (no __init__.py) because transformers imports
    Hugging Face's `kernels` package, and a regular package here would be found first and break it."""
    code = "from transformers.models.llama import modeling_llama\nimport importlib.util\n" \
           "print(importlib.util.find_spec('kernels') and importlib.util.find_spec('kernels').origin)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stdout.strip().startswith(str(REPO)), proc.stdout
