"""Ready-made configs for common log formats: ``examples/*.yaml``, read from the package.

``pipeline/examples`` links to the repository's ``examples/`` folder, and the files are package
data, so ``pipeline init --format NAME`` works from a checkout and from an installed wheel alike.
"""

from __future__ import annotations

from importlib import resources

DEFAULT_FORMAT = "lanl"


def _folder():
    return resources.files("pipeline") / "examples"


def format_names() -> list[str]:
    """Every shipped example, by name (the file name without .yaml), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in _folder().iterdir() if p.name.endswith(".yaml"))


def example_config(name: str) -> str:
    """The YAML text of one example; KeyError naming the choices when there is none."""
    if name not in format_names():
        raise KeyError(f"no example config {name!r} (choose from {', '.join(format_names())})")
    return (_folder() / f"{name}.yaml").read_text(encoding="utf-8")
