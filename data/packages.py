"""Installed Python packages: where they live, which distribution owns a file, its licence.

Used by the `python` corpus (data.sources), which reads the source of the running
interpreter's site-packages. The licence of a file is its distribution's, read from
the installed metadata (`importlib.metadata`), in this order of preference:
  1. License-Expression (an SPDX expression, PEP 639),
  2. License, when it is a short name rather than the licence's full text,
  3. the "License ::" trove classifiers (their last part, joined with " OR "),
  4. the first line of a full licence text in License, when short enough to be a title,
  5. "unknown".
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import sysconfig
from pathlib import Path

STDLIB_LICENSE = "PSF-2.0"
STDLIB_PACKAGE = "stdlib"
UNKNOWN = "unknown"
_MAX_NAME_CHARS = 80  # a License field longer than this (or multi-line) is a full text


@dataclasses.dataclass(frozen=True)
class Owner:
    package: str  # the distribution's name, or the top-level folder for an unowned file
    license: str


def site_packages_dirs() -> list[Path]:
    """The site-packages folders of the running interpreter: purelib, platlib, then any
    site-packages / dist-packages folder on sys.path; existing ones, each once, in order."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"]]
    candidates += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    dirs, seen = [], set()
    for candidate in candidates:
        path = Path(candidate)
        if path.is_dir() and path.resolve() not in seen:
            seen.add(path.resolve())
            dirs.append(path)
    return dirs


def license_of(metadata: importlib.metadata.PackageMetadata) -> str:
    """The licence string of one distribution's metadata (see the module docstring)."""
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression
    text = (metadata.get("License") or "").strip()
    if text.upper() == "UNKNOWN":
        text = ""
    if text and "\n" not in text and len(text) <= _MAX_NAME_CHARS:
        return text
    classifiers = [
        c.split("::")[-1].strip()
        for c in metadata.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    if classifiers:
        return " OR ".join(classifiers)
    first_line = text.splitlines()[0].strip() if text else ""
    if first_line and len(first_line) <= _MAX_NAME_CHARS:
        return first_line
    return UNKNOWN


def file_owners(site_dir: Path) -> dict[Path, Owner]:
    """{absolute path: Owner} for every file the distributions installed in `site_dir`
    list in their RECORD (files outside `site_dir`, e.g. scripts, are left out)."""
    root = site_dir.resolve()
    owners: dict[Path, Owner] = {}
    for dist in importlib.metadata.distributions(path=[str(site_dir)]):
        name = dist.metadata.get("Name") or UNKNOWN
        owner = Owner(name, license_of(dist.metadata))
        for file in dist.files or []:
            path = (root / file).resolve()
            if path.is_relative_to(root):
                owners.setdefault(path, owner)
    return owners


def owner_of(path: Path, site_dir: Path, owners: dict[Path, Owner]) -> Owner:
    """The owner of `path`; a file no distribution lists is named after its top-level
    folder (or module), with an unknown licence."""
    owner = owners.get(path.resolve())
    if owner is not None:
        return owner
    top = path.relative_to(site_dir).parts[0]
    return Owner(top.removesuffix(".py"), UNKNOWN)
