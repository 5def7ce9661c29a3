"""pyproject.toml against the requirements files and the package: the same dependencies, and a
wheel that holds every subpackage, the page's files, the flower names and the commands."""
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from conftest import PROJECT

PYPROJECT = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]


def requirements(name):
    """The requirement lines of a requirements file, comments and -r includes left out."""
    lines = (PROJECT / name).read_text().splitlines()
    return sorted(requirement for line in lines
                  if (requirement := re.sub(r"\s*#.*", "", line).strip())
                  and not requirement.startswith("-r"))


def test_requirements_files_and_pyproject_name_the_same_packages():
    extras = PYPROJECT["optional-dependencies"]
    assert requirements("requirements.txt") == sorted(PYPROJECT["dependencies"] + extras["serve"])
    assert requirements("requirements-export.txt") == sorted(extras["export"])
    assert requirements("requirements-test.txt") == sorted(extras["test"])


def test_the_wheel_holds_the_package_its_files_and_the_commands(tmp_path):
    source = tmp_path / "source"  # setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(PROJECT / "flower_classifier", source / "flower_classifier",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(source)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = tmp_path.glob("flower_classifier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {path.relative_to(PROJECT).as_posix()
               for path in (PROJECT / "flower_classifier").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert package <= names
    assert not {name for name in names if not name.startswith("flower_classifier")}
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("train", "predict", "serve", "export", "check_data", "download_flowers",
                    "studio"):
        assert f"flower_classifier.cli.{command}:run" in text


def test_the_package_keeps_the_projects_flower_names():
    assert ((PROJECT / "flower_classifier" / "data" / "cat_to_name.json").read_bytes()
            == (PROJECT / "cat_to_name.json").read_bytes())
