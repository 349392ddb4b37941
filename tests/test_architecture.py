"""The package's shape: data -> plan -> model -> run -> commands, imports flowing one way.

Every `import`/`from ... import` in ptlm (top level or inside functions, which is where cycles
hide) is read with ast and checked against the allowed direction below."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ptlm"
MAX_FUNCTION_LINES = 80  # a screen, docstring included

# layer -> the ptlm layers it may import (besides itself). Leaves shared by all: errors, units,
# hub (whether the Hugging Face hub can be reached: data's tokenizers and model's configs ask).
ALLOWED = {
    "errors": set(),
    "units": {"errors"},
    "hub": {"errors"},
    "data": {"errors", "units", "hub"},
    "plan": {"errors", "units"},
    "model": {"errors", "units", "plan", "hub"},
    "run": {"errors", "units", "plan", "model", "data", "hub"},
    "commands": {"errors", "units", "plan", "model", "data", "run", "cli", "hub"},
    "cli": {"errors", "units", "commands"},
    "__init__": set(),
    "__main__": {"cli"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def ptlm_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ptlm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ptlm":  # from ptlm import x: x is a module, or the package's own
                found += [(node.lineno, f"ptlm.{a.name}") for a in node.names
                          if not a.name.startswith("__")]
            elif node.module.split(".")[0] == "ptlm":
                found.append((node.lineno, node.module))
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def test_every_import_follows_the_allowed_direction():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        layer = layer_of(mod)
        assert layer in ALLOWED, f"{mod}: a new top-level module; give it a layer in ALLOWED"
        for line, target in ptlm_imports(path):
            other = layer_of(target)
            if other != layer and other not in ALLOWED[layer] and target != "ptlm":
                bad.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {target} ({other})")
    assert not bad, "imports against data/plan -> model -> run -> commands:\n" + "\n".join(bad)



# Inside ptlm.run: the machine plumbing (ranks, locks, op builds, hardware, injected faults)
# knows nothing of training; the tools (probe, memtrace, generate) use the run's pieces, which
# never import them. Everything else in ptlm/run/ is the training step's "core".
RUN_PARTS = {"machine": {"machine"}, "core": {"core", "machine"},
             "tools": {"tools", "core", "machine"}}


def run_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["ptlm", "run"]:
        return None
    return parts[2] if len(parts) > 2 and parts[2] in RUN_PARTS else "core"


def test_inside_run_imports_flow_from_machine_to_core_to_tools():
    bad = []
    for path in sorted((PKG / "run").rglob("*.py")):
        part = run_part(module_name(path))
        for line, target in ptlm_imports(path):
            other = run_part(target)
            if other is not None and other not in RUN_PARTS[part]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({part}) imports {target} ({other})")
    assert not bad, "imports against run's machine -> core -> tools:\n" + "\n".join(bad)


def test_the_run_checker_sees_a_wrong_way_import(tmp_path):
    """The check above can fail: a machine module importing the trainer is flagged."""
    assert run_part("ptlm.run.machine.lock") == "machine"
    assert run_part("ptlm.run.trainer") == "core" and run_part("ptlm.run") == "core"
    assert run_part("ptlm.run.tools.probe") == "tools" and run_part("ptlm.plan") is None
    assert "core" not in RUN_PARTS["machine"] and "tools" not in RUN_PARTS["core"]


def test_no_function_of_the_package_is_longer_than_a_screen():
    """Long functions hide their steps: each piece of work gets a name (MAX_FUNCTION_LINES)."""
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, long


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            if node.module == "tests":
                found += [(node.lineno, f"tests.{a.name}") for a in node.names]
    return found


def test_tests_import_helpers_not_other_tests_and_bench_imports_no_tests():
    """A test file is not another one's library: shared helpers live in tests/support.py (and
    tests/families.py); bench/ has its own (bench/common.py, bench/matrix_reference.py)."""
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] != "tests":
                continue
            if path.parent.name == "bench" or (len(parts) > 1 and parts[1].startswith("test_")):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, bad

def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ptlm.run import trainer\n    import ptlm.commands.plan\n")
    assert [t for _, t in ptlm_imports(f)] == ["ptlm.run", "ptlm.commands.plan"]


def test_no_module_of_the_package_is_top_level_except_the_entry_points():
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == {"__init__", "__main__", "cli", "errors", "units", "hub"}, top


@pytest.mark.parametrize("module", ["ptlm.plan", "ptlm.plan.planner", "ptlm.plan.dsconfig",
                                    "ptlm.plan.probe_cache", "ptlm.data.prepare",
                                    "ptlm.commands.prepare", "ptlm.commands.plan"])
def test_pure_layers_do_not_import_torch(module):
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'deepspeed', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert json.loads(out) == [], f"import {module} loaded {json.loads(out)[:5]}..."


def test_no_absolute_path_of_a_machine_in_the_repo():
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT,
                           check=True).stdout.split()
    needles = ("/work/", "/root/", "/tmp/pytest", "shared/notes")
    hits = []
    for name in files:
        p = ROOT / name
        if p.suffix not in {".py", ".md", ".sh", ".cfg", ".toml", ".json", ".txt", ".yaml"} \
                or name == "tests/test_architecture.py":
            continue
        text = p.read_text(errors="replace")
        hits += [f"{name}: {n}" for n in needles if n in text]
    assert not hits, hits
