"""The command root and the packages users import start without the model stack: `kbloop --help`, the bot's
acknowledgements and the store's commands must not pay for loading torch, transformers or gradio."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_command_root_and_packages_import_without_the_model_stack_or_gradio():
    code = ("import sys, kbloop.cli, kbloop.cli.app, bot, playground, store\n"
            "print(','.join(m for m in ('torch', 'transformers', 'peft', 'gradio') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at start-up: {proc.stdout.strip()}"


def test_model_code_sets_passive_openmp_waiting_before_torch_loads_unless_the_user_chose():
    code = ("import os, sys, finetune.training.config\n"
            "assert 'torch' not in sys.modules\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "passive"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_WAIT_POLICY": "active"})
    assert proc.stdout.strip() == "active"


# --------------------------------------------------------------------------------------------------
# No circle of imports, and every arrow runs bot|playground -> finetune -> store (ARCHITECTURE.md)

PACKAGES = ("store", "finetune", "bot", "playground", "kbloop")
# What each top-level package must not import, anywhere in its files (inside functions too).
FORBIDDEN = {
    "store": {"finetune", "bot", "playground", "kbloop"},
    "finetune": {"bot", "playground"},
    "bot": {"playground"},
    "playground": {"bot"},
}


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name; a package's __init__ under the package's name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, *, top_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (top_level: not inside a function, nor under
    `if TYPE_CHECKING:`), else every import statement in the file."""
    if not top_level:
        return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, (ast.With, ast.ClassDef)):
            todo += node.body
    return found


def _imports(name: str, path: Path, modules: dict, *, top_level: bool) -> set[str]:
    """The project modules `name` imports. `from P import N` counts P (its __init__ runs, its namespace is read)
    and P.N when that is a module; relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), top_level=top_level):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            candidates = []
            for alias in node.names:  # `import a.b.c`: the deepest project module it names
                parts = alias.name.split(".")
                candidates += [next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                                     if ".".join(parts[:i]) in modules), alias.name)]
        found.update(c for c in candidates if c in modules and c != name)
    return found


def _graph(*, top_level: bool = True) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, top_level=top_level) for name, path in modules.items()}


def _grouped(graph: dict[str, set[str]], group) -> dict[str, set[str]]:
    """The graph between groups of modules (`group(name)`, None to leave a module out); edges inside a group dropped."""
    out: dict[str, set[str]] = {}
    for name, deps in graph.items():
        if group(name) is None:
            continue
        out.setdefault(group(name), set())
        out[group(name)] |= {group(d) for d in deps if group(d) is not None and group(d) != group(name)}
    return out


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the path that closes it (a -> b -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _say(cycle: list[str] | None) -> str:
    return "" if cycle is None else " -> ".join(cycle)


def test_no_module_imports_itself_around_a_circle():
    cycle = _a_cycle(_graph())
    print("module cycle:", _say(cycle) or "none")
    assert cycle is None, f"import cycle between modules: {_say(cycle)}"


def test_finetunes_subpackages_import_each_other_one_way_only():
    def subpackage(name: str) -> str | None:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "finetune" and len(parts) > 1 else None

    graph = _grouped(_graph(), subpackage)
    cycle = _a_cycle(graph)
    print("finetune subpackage cycle:", _say(cycle) or "none")
    assert cycle is None, f"import cycle between finetune's subpackages: {_say(cycle)}"
    # The order ARCHITECTURE.md describes: each subpackage imports only those before it.
    order = ["finetune.model", "finetune.serving", "finetune.training", "finetune.evaluation", "finetune.registry",
             "finetune.jobs"]
    upward = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                    if a in order and b in order and order.index(b) > order.index(a))
    assert not upward, "\n".join(upward)


def test_the_top_level_packages_import_each_other_one_way_only():
    graph = _grouped(_graph(), lambda name: name.split(".")[0])
    cycle = _a_cycle(graph)
    print("package cycle:", _say(cycle) or "none")
    assert cycle is None, f"import cycle between packages: {_say(cycle)}"


def test_every_arrow_runs_bot_or_playground_to_finetune_to_store():
    wrong = sorted(f"{name} imports {dep}" for name, deps in _graph(top_level=False).items() for dep in deps
                   if dep.split(".")[0] in FORBIDDEN.get(name.split(".")[0], ()))
    print("\n".join(wrong) or "no import against the layering")
    assert not wrong, "imports against bot|playground -> finetune -> store:\n" + "\n".join(wrong)


def test_the_cycle_check_finds_a_circle_and_names_it():
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b"}, "b": set()}) is None
