"""Which build of pipeline/scorewire.py runs: the one setup.py compiles with mypyc
(``pipeline._scorewire_c``), or the Python source. Standard library only: setup.py imports this
module too, before salka's dependencies are installed."""

from __future__ import annotations

import hashlib
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

# What the compiled build depends on, by path from the project root: scorewire.py, and those
# whose declared types it relies on (tokenwire's Avro helpers, serde's MAGIC and codec).
COMPILED_FROM = ("pipeline/scorewire.py", "pipeline/tokenwire.py", "pipeline/serde.py")


def pure_python_asked() -> bool:
    """SALKA_PURE_PYTHON, any value but empty or 0: setup.py compiles nothing, stages use none."""
    return os.environ.get("SALKA_PURE_PYTHON", "") not in ("", "0")


def sources_sha256(root: Path | None = None) -> str:
    """The files of COMPILED_FROM under ``root`` (None: where this package lies), hashed: what
    setup.py writes into the build, and what the build is checked against when imported."""
    root = Path(__file__).parent.parent if root is None else root
    digest = hashlib.sha256()
    for path in COMPILED_FROM:
        digest.update(hashlib.sha256((root / path).read_bytes()).digest())
    return digest.hexdigest()


def compiled_scorewire() -> ModuleType | None:
    """pipeline._scorewire_c if it was built from the files of COMPILED_FROM as they are now (an
    edited module is never shadowed by a stale build) and SALKA_PURE_PYTHON does not say no."""
    if pure_python_asked():
        return None
    try:
        from pipeline import _scorewire_c as compiled
    except Exception:  # noqa: BLE001 (none, or one that fails to load: the Python source it is)
        return None
    if not str(compiled.__file__).endswith(tuple(EXTENSION_SUFFIXES)):
        return None  # the generated source, not built
    try:
        built_from = sources_sha256()
    except OSError:  # no source files to compare (a frozen or zipped install): play safe
        return None
    return compiled if getattr(compiled, "SOURCE_SHA256", None) == built_from else None
