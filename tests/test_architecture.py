"""The package's shape, checked: the layer table of docs/design.md, no flags in the library, short functions.

A module under lightflax/ may import lightflax modules of its own layer or a lower one
(the table in docs/design.md, section "Layers", is the single source of truth: a new
module fails here until it has a row). No module under lightflax/ may import absl
flags or the entry layer (experiments/, launch.py), and no function may grow past
80 lines.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lightflax"
MAX_FUNCTION_LINES = 80


def layer_table():
    """{module name or 'pkg.*' prefix: level} from docs/design.md's layer table."""
    text = (REPO / "docs" / "design.md").read_text()
    table = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|[^|]*\|(.*)\|\s*$", line)
        if m:
            for name in re.findall(r"`([\w.*]+)`", m.group(2)):
                table[name] = int(m.group(1))
    assert table, "docs/design.md has no layer table (rows '| level | layer | `module`, ... |')"
    return table


def level_of(module, table):
    if module in table:
        return table[module]
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i]) + ".*"
        if prefix in table:
            return table[prefix]
    return None


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "csrc" not in p.parts)


def imports(path):
    """(imported module, line) for every import in the file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def lightflax_imports(path, known):
    """lightflax modules imported by ``path`` (``from lightflax import x`` names module x)."""
    found = set()
    for name, line in imports(path):
        if name == "lightflax" or name.startswith("lightflax."):
            while name not in known and "." in name:  # from lightflax.data import Split -> lightflax.data
                name = name.rsplit(".", 1)[0]
            found.add((name, line))
    return found


def test_every_module_has_a_layer():
    table = layer_table()
    missing = [module_name(p) for p in sources() if level_of(module_name(p), table) is None]
    assert not missing, f"add these modules to the layer table in docs/design.md: {missing}"


def test_imports_point_down_the_layers():
    table = layer_table()
    known = {module_name(p) for p in sources()}
    upward = []
    for path in sources():
        me = module_name(path)
        for dep, line in lightflax_imports(path, known):
            mine, theirs = level_of(me, table), level_of(dep, table)
            if dep != me and theirs is not None and mine is not None and theirs > mine:
                upward.append(f"{path.relative_to(REPO)}:{line} ({me}, layer {mine}) imports {dep} (layer {theirs})")
    assert not upward, "imports pointing up the layers of docs/design.md:\n" + "\n".join(upward)


def test_the_library_reads_no_flags_and_never_imports_the_entry_layer():
    bad = []
    for path in sources():
        for name, line in imports(path):
            if name in ("absl.flags", "experiments", "launch") or name.startswith(("absl.flags.", "experiments.")):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
        if re.search(r"\bFLAGS\b", path.read_text()):
            bad.append(f"{path.relative_to(REPO)} mentions FLAGS")
    assert not bad, "flags belong to launch.py and experiments/:\n" + "\n".join(bad)


def test_functions_stay_short():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} has {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("source, expected", [
    ("from absl import flags\n", ["absl.flags"]),
    ("import lightflax.train as t\n", ["lightflax.train"]),
    ("def f():\n    from lightflax import models\n", ["lightflax.models"]),
])
def test_the_checks_see_imports(tmp_path, source, expected):
    """The import scanner finds top-level, aliased and function-level imports (the checks can fail)."""
    path = tmp_path / "m.py"
    path.write_text(source)
    names = [n for n, _ in imports(path)]
    assert all(e in names for e in expected), names
