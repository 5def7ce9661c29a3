"""Display names of the class folders (cat_to_name.json: {"1": "pink primrose", ...}).

    from flower_classifier.data.class_names import load_category_names, display_names
    names = display_names(classes, load_category_names("cat_to_name.json"))
"""
import json
from pathlib import Path

from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError, error_reason


def load_category_names(path):
    """The JSON mapping of class folder names to display names, checked with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"category names file {path} not found")
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read {path} ({error_reason(error)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(names, dict):
        raise UserError(f"{path} must hold a JSON object mapping class folder names to names, "
                        'like {"1": "pink primrose"}')
    return {str(key): str(value) for key, value in names.items()}


def display_names(classes, category_names):
    """The display name of each class folder name, the folder name where the mapping has none."""
    return [category_names.get(name, name) for name in classes]


def check_category_names(category_names, classes):
    """Warn when a category names file leaves classes unnamed: a wrong file is a common slip."""
    missing = [name for name in classes if name not in category_names]
    if category_names and missing:
        warn(f"the category names file has no name for {len(missing)} of {len(classes)} classes "
             f"({', '.join(missing[:5])}); showing their folder names")


def check_class_names(classes, names, source="the category names file"):
    """A UserError for a class whose name is empty, or the same as another class's (ignoring
    case and spaces at the ends): a new class folder named like an old class, or a name given
    twice, would make two classes that no one can tell apart. names: the display names."""
    seen = {}
    for folder, name in zip(classes, names):
        if not folder.strip() or not name.strip():
            where = f"its folder {folder!r}" if not folder.strip() else source
            raise UserError(f"class {folder!r} has an empty name (in {where}); give the class a "
                            "name")
        other = seen.setdefault(name.strip().casefold(), folder)
        if other != folder:
            raise UserError(f"classes {other!r} and {folder!r} are both named {name.strip()!r}; "
                            f"rename one of the folders, or give it another name in {source}")
