"""Code stamps: small files whose content changes only when the code a step depends on changes.

Snakemake reruns a job when an input file is newer than its outputs. Each job takes as inputs the stamps
of what it runs — its notebook with every memstudy module the notebook imports (followed through the
package, lazy imports inside functions included), the model's code, the data loaders' versions — and
:func:`write_stamps` rewrites a stamp only when its content changes. So editing the StyleGAN code
reruns StyleGAN jobs, not DDPM ones, and editing a figure reruns only the notebooks that draw it.

The dependencies are read from the source (``ast``), not by importing it: a stamp costs milliseconds.
A test checks that they cover every module Python really loads for each notebook.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import nbformat

from memstudy.atomic import atomic_path
from memstudy.workflow.plan import NOTEBOOKS

PACKAGE_DIR = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = PACKAGE_DIR / "notebooks"
#: Each model's own module: the other model's jobs do not depend on it. The shared training and
#: sampling modules import it at run time, so the model steps' stamps add it by name.
MODEL_MODULES = {"ddpm": "memstudy.models.ddpm", "stylegan": "memstudy.models.stylegan"}
#: Where the stamp of a step's code starts: what the model steps run, beyond their notebook.
MODEL_ENTRY_POINTS = ("memstudy.models.training", "memstudy.models.sampling")
#: The data layer reaches a model only through the ImageSet it loads, whose content the data versions
#: stand for: a refactor of a loader must not retrain every model.
DATA_LOADERS = tuple(
    f"memstudy.data.{name}"
    for name in (
        "datasets",
        "brats",
        "chestxray",
        "phantoms",
        "brain_phantom",
        "cxr_phantom",
        "phantom_tools",
    )
)
#: The constants that change whenever a loader's or a phantom's output changes (a test in
#: tests/test_data_fingerprints.py fails when an output changes without its version).
DATA_VERSIONS = {
    "memstudy/data/brats.py": "PIPELINE_VERSION",
    "memstudy/data/chestxray.py": "PIPELINE_VERSION",
    "memstudy/data/brain_phantom.py": "BRAIN_PHANTOM_VERSION",
    "memstudy/data/cxr_phantom.py": "CXR_PHANTOM_VERSION",
}


def module_file(module: str) -> Path | None:
    """The source file of a memstudy module or package (None when there is none)."""
    parts = module.split(".")
    if parts[0] != "memstudy":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lazy_exports(package: str) -> dict[str, str]:
    """``{name: module}`` of a package that imports its names on first use (an ``_EXPORTS`` table of
    module → names in its ``__init__.py``, as ``memstudy.models`` and ``memstudy.figures`` have)."""
    path = module_file(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            return {name: module for module, names in table.items() for name in names}
    return {}


def _resolve(package: str, name: str) -> str | None:
    """The module that ``package.name`` loads: a submodule, a lazily exported name's module, or none."""
    if module_file(f"{package}.{name}") is not None:
        return f"{package}.{name}"
    return lazy_exports(package).get(name)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"
    )


def imported_modules(source: str, module: str = "") -> set[str]:
    """memstudy modules that ``source`` imports anywhere (module level or inside functions).

    ``from package import name`` and ``package.name`` (after ``from memstudy import package``) count
    the module that provides ``name``, lazily exported names included. Imports only for type
    checkers (``if TYPE_CHECKING:``) do not count: they never run.
    """
    tree = ast.parse(source)
    for node in ast.walk(tree):  # drop type-checking blocks before walking
        if hasattr(node, "body") and isinstance(node.body, list):
            node.body = [child for child in node.body if not _is_type_checking(child)]
    path = module_file(module) if module else None
    package = module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    aliases: dict[str, str] = {}  # local name → memstudy package or module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            for alias in node.names:
                target = _resolve(base, alias.name)
                if target:
                    found.add(target)
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            target = _resolve(aliases[node.value.id], node.attr)
            if target:
                found.add(target)
    return {name for name in found if module_file(name) is not None}


def _with_parents(module: str) -> list[str]:
    # Importing memstudy.a.b runs memstudy/a/__init__.py first.
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_closure(modules: Iterable[str], exclude: Iterable[str] = ()) -> list[Path]:
    """Source files of ``modules`` and of every memstudy module they import, transitively, sorted.

    ``exclude`` names modules left out, together with what only they import.
    """
    excluded = set(exclude)
    seen: set[str] = set()
    todo = [parent for module in modules for parent in _with_parents(module)]
    while todo:
        name = todo.pop()
        if name in seen or name in excluded:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen.add(name)
        for imported in imported_modules(path.read_text(), name):
            todo.extend(_with_parents(imported))
    return sorted(module_file(name) for name in seen)


def notebook_modules(notebook: str | os.PathLike) -> set[str]:
    """memstudy modules imported by a notebook's code cells (IPython magics and shell lines skipped)."""
    cells = [cell.source for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"]
    lines = "\n".join(cells).splitlines()
    # One source for the whole notebook: a name imported in one cell is used in later ones.
    return imported_modules("\n".join(line for line in lines if not line.lstrip().startswith(("%", "!"))))


def digest(files: Iterable[Path], extra: str = "") -> str:
    """sha256 of the files' paths (relative to the package's parent) and contents, and ``extra``."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.relative_to(PACKAGE_DIR.parent).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()


def data_versions() -> dict[str, str]:
    """The loaders' pipeline versions, the phantoms' generator versions and nilearn's release."""
    versions = {}
    for relative, name in DATA_VERSIONS.items():
        tree = ast.parse((PACKAGE_DIR.parent / relative).read_text())
        values = [
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets)
        ]
        if len(values) != 1:
            raise RuntimeError(f"{relative}: expected one module-level {name} = <literal>")
        versions[f"{relative}:{name}"] = str(values[0])
    versions["nilearn"] = metadata.version("nilearn")
    return versions


def other_models(model: str | None) -> list[str]:
    """The modules of the models other than ``model`` (none for steps that are not per model)."""
    return [module for name, module in MODEL_MODULES.items() if model is not None and name != model]


def compute_stamps(models: Iterable[str]) -> dict[str, str]:
    """Every stamp's content, by stamp name.

    ``data``: the data versions. ``models-<model>``: the model's training and sampling code.
    ``notebook-<stem>[-<model>]``: a step's notebook and the memstudy code it imports (for the train
    and sample notebooks, one stamp per model without the other model's module).
    """
    stamps = {"data": json.dumps(data_versions(), sort_keys=True)}
    models = list(models)
    for model in models:
        # Training and sampling import the model's module at run time (models.training.model_module).
        code = module_closure(
            [*MODEL_ENTRY_POINTS, MODEL_MODULES[model]], exclude=[*other_models(model), *DATA_LOADERS]
        )
        stamps[f"models-{model}"] = digest(code)
    for notebook in (NOTEBOOKS_DIR / name for name in NOTEBOOKS.values()):  # the steps' notebooks only
        per_model = notebook.stem.startswith(("02_", "03_"))
        for model in models if per_model else [None]:
            modules = notebook_modules(notebook) | ({MODEL_MODULES[model]} if model else set())
            files = module_closure(modules, exclude=other_models(model))
            name = f"notebook-{notebook.stem}" + (f"-{model}" if model else "")
            stamps[name] = digest(files, extra=notebook.read_text())
    return stamps


def write_stamps(folder: str | os.PathLike, stamps: dict[str, str]) -> dict[str, Path]:
    """Write each stamp to ``folder/<name>``, touching only those whose content changed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, content in stamps.items():
        path = folder / name
        if not path.is_file() or path.read_text() != content:
            with atomic_path(path) as tmp:
                Path(tmp).write_text(content)
        paths[name] = path
    return paths
