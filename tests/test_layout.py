"""The project's rooms, read from the code: the root holds the commands and the design card's
files; the library is one package whose subpackages import only downwards, with no cycle (lazy
imports inside functions count too); benchmarks import no command script; no module shadows
another; modules and functions stay small."""
import ast
import tomllib

import pytest
from conftest import PROJECT

PACKAGE = "flower_classifier"
# The subpackages, lowest first: each imports only from those before it (peers on one floor
# never import each other). The package's own __init__ is the top: it names the public API.
FLOORS = [("utils",), ("data",), ("models",), ("reports",), ("datacheck",),
          ("training", "inference"), ("export", "serve"), ("studio",), ("cli",)]
COMMANDS = {"train", "predict", "serve", "export", "check_data", "download_flowers", "studio"}
DESIGN_CARD_MODULES = {"model_utils", "data_utils"}  # the assignment's public names
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path):
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGE_FILES = {module_name(path): path for path in (PROJECT / PACKAGE).rglob("*.py")}
ROOT_FILES = {path.stem: path for path in PROJECT.glob("*.py")}
BENCHMARK_FILES = {path.stem: path for path in (PROJECT / "benchmarks").glob("*.py")}


def imported_modules(path):
    """Every module path imported anywhere in the file (functions included); `from a.b import
    c` gives a.b.c too where that is a module of the package. A relative import gives ".",
    which no test allows in the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." if node.level else node.module
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names
                      if f"{base}.{alias.name}" in PACKAGE_FILES}
    return found


def package_imports(name):
    """The package modules that module `name` imports (itself left out)."""
    return {module for module in imported_modules(PACKAGE_FILES[name])
            if module in PACKAGE_FILES} - {name}


GRAPH = {name: package_imports(name) for name in PACKAGE_FILES}


def floor_of(name):
    """The FLOORS index of a package module, None for the package's own __init__."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    return next(index for index, floor in enumerate(FLOORS) if parts[1] in floor)


def test_every_subpackage_has_a_floor():
    subpackages = {name.split(".")[1] for name in PACKAGE_FILES if "." in name}
    assert subpackages == {name for floor in FLOORS for name in floor}


def test_the_package_never_imports_a_root_module_and_names_its_own_modules_in_full():
    root = set(ROOT_FILES) | set(BENCHMARK_FILES) | {"."}
    offenders = {name: sorted({module.split(".")[0] or "." for module in imported_modules(path)}
                              & root)
                 for name, path in PACKAGE_FILES.items()}
    assert not {name: found for name, found in offenders.items() if found}


def test_subpackages_import_only_downwards():
    upward = []
    for name, imports in GRAPH.items():
        here = floor_of(name)
        for module in imports:
            there = floor_of(module)
            if there is None or (here is not None and there >= here
                                 and module.split(".")[1] != name.split(".")[1]):
                upward.append(f"{name} -> {module}")
    assert not upward, f"imports that do not go down a floor: {sorted(upward)}"


def test_no_import_cycle():
    def reaches(start, target, seen):
        for module in GRAPH[start]:
            if module == target or (module not in seen and reaches(module, target,
                                                                   seen | {module})):
                return True
        return False

    circular = sorted(name for name in GRAPH if reaches(name, name, {name}))
    assert not circular, f"modules on an import cycle: {circular}"


def test_the_root_holds_only_the_commands_and_the_design_cards_files():
    assert set(ROOT_FILES) == COMMANDS | DESIGN_CARD_MODULES
    for name in ("cat_to_name.json", "requirements.txt", "README.md", "pyproject.toml"):
        assert (PROJECT / name).is_file()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_is_its_docstring_and_the_packages_parser_and_main(command):
    """No logic at the root: the docstring (the usage), imports from the package, and the
    `__main__` guard; get_args_parser and main come from flower_classifier.cli."""
    tree = ast.parse(ROOT_FILES[command].read_text(encoding="utf-8"))
    docstring, *rest = tree.body
    assert isinstance(docstring, ast.Expr) and f"python {command}.py" in docstring.value.value
    kinds = {type(node) for node in rest}
    assert kinds <= {ast.ImportFrom, ast.If}
    sources = {node.module for node in rest if isinstance(node, ast.ImportFrom)}
    assert sources == {f"{PACKAGE}.cli.{command}", f"{PACKAGE}.cli.runner"}


def test_the_design_cards_modules_only_name_the_packages_parts():
    for name in DESIGN_CARD_MODULES:
        tree = ast.parse(ROOT_FILES[name].read_text(encoding="utf-8"))
        for node in tree.body[1:]:
            assert isinstance(node, (ast.ImportFrom, ast.Assign)), (name, ast.dump(node)[:60])


def test_console_commands_name_each_cli_modules_run():
    scripts = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts.values()) == {f"{PACKAGE}.cli.{command}:run" for command in COMMANDS}


def test_benchmarks_import_no_command_script():
    offenders = {name: sorted({module.split(".")[0] for module in imported_modules(path)}
                              & (COMMANDS | DESIGN_CARD_MODULES))
                 for name, path in BENCHMARK_FILES.items()}
    assert not {name: found for name, found in offenders.items() if found}


def test_no_module_shadows_another():
    """A benchmark or a test named like a root module, or a root module named like the
    package, would be imported in its place from the other's folder."""
    tests = {path.stem for path in (PROJECT / "tests").glob("*.py")}
    top_level = [set(ROOT_FILES) | {PACKAGE}, set(BENCHMARK_FILES), tests]
    for index, names in enumerate(top_level):
        for others in top_level[index + 1:]:
            assert not names & others, sorted(names & others)


def test_modules_and_functions_stay_small():
    long_modules = {name: lines for name, path in PACKAGE_FILES.items()
                    if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules
    long_functions = []
    for name, path in {**PACKAGE_FILES, **ROOT_FILES}.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name != "get_args_parser"  # an argparse table
                    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES):
                long_functions.append(f"{name}.{node.name}")
    assert not long_functions
