"""The project's rooms: library modules never import a command-line script, and no two modules
import each other, directly or round a circle (lazy imports inside functions count too)."""
import ast

from conftest import PROJECT

MODULES = {path.stem for path in PROJECT.glob("*.py")}


def is_script(name):
    """A module with a top-level `if __name__ == "__main__":` block."""
    tree = ast.parse((PROJECT / f"{name}.py").read_text(encoding="utf-8"))
    return any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
               for node in tree.body)


SCRIPTS = {name for name in MODULES if is_script(name)}


def project_imports(name):
    """The project modules that module `name` imports anywhere in its code."""
    tree = ast.parse((PROJECT / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & MODULES) - {name}


GRAPH = {name: project_imports(name) for name in MODULES}


def test_the_scripts_are_found():
    assert {"train", "predict", "serve", "export"} <= SCRIPTS
    assert {"trainer", "tasks", "model_utils", "data_utils"} <= MODULES - SCRIPTS


def test_no_module_imports_a_script():
    offenders = {name: sorted(GRAPH[name] & SCRIPTS) for name in MODULES if GRAPH[name] & SCRIPTS}
    assert not offenders, f"modules importing a script: {offenders}"


def test_no_import_cycle():
    def reaches(start, target, seen):
        for module in GRAPH[start]:
            if module == target or (module not in seen and reaches(module, target,
                                                                   seen | {module})):
                return True
        return False

    circular = sorted(name for name in MODULES if reaches(name, name, {name}))
    assert not circular, f"modules on an import cycle: {circular}"
