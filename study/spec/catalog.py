"""Finding a study file: a path, or the name of a built-in study (``search_spaces/<name>.yaml``,
shipped as package data, so ``nlstm-study --space smoke`` works from any folder, installed or not)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from study.spec.errors import SpecError


def builtin_studies() -> dict[str, Path]:
    """Name -> file of every built-in study."""
    folder = Path(str(files("search_spaces")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_study_file(space: str | Path) -> Path:
    """``space`` itself if it is a file, else the built-in study of that name (``smoke`` or ``smoke.yaml``)."""
    path = Path(space).expanduser()
    if path.is_file():
        return path
    builtin = builtin_studies()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and name in builtin:
        return builtin[name]
    if path.exists():
        raise SpecError(path, "", "not a file")
    raise SpecError(path, "", f"no such file, nor a built-in study ({', '.join(builtin)})")
