"""What a non-editable install (the docker images, `pip install .`) ships beside the Python files: the
C sources the CPU path builds on the user's machine, and the evaluation sets, each matched by
pyproject.toml's package-data."""

import tomllib
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("serving", "decoding", "kernels", "training")
SHIPPED = ("*.c", "*.h", "*.jsonl")


def _package_data() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]


def _glob_match(parts: tuple[str, ...], pattern: str) -> bool:
    """As setuptools' globs: `*` stays within one folder."""
    pieces = pattern.split("/")
    return len(pieces) == len(parts) and all(fnmatch(part, piece) for part, piece in zip(parts, pieces))


def test_every_c_source_and_data_file_is_in_the_package_data():
    data = _package_data()
    files = [p for folder in FOLDERS for pattern in SHIPPED for p in (REPO / folder).rglob(pattern)]
    assert any(p.suffix == ".c" for p in files)
    missing = []
    for path in files:
        relative = path.relative_to(REPO)
        # a pattern belongs to the nearest package above the file, and may name sub-folders ("data/*.jsonl")
        matched = any(_glob_match(relative.parts[depth:], pattern)
                      for depth in range(1, len(relative.parts))
                      for pattern in data.get(".".join(("counterpoint", *relative.parts[:depth])), []))
        if not matched:
            missing.append(str(relative))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
