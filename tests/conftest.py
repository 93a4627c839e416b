import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LANL_LINE = "3600,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"


def key_comments(path: Path) -> dict[str, bool]:
    """Every key path of a YAML file (a.b.c) -> whether a comment line comes right before it."""
    stack: list[tuple[int, str]] = []
    commented: dict[str, bool] = {}
    previous = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^( *)([A-Za-z_]+):", line)
        if match:
            indent, name = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, name))
            commented[".".join(n for _, n in stack)] = previous.lstrip().startswith("#")
        if line.strip():
            previous = line
    return commented


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """A real broker: the external cluster in KAFKA_BOOTSTRAP_SERVERS, else an embedded Tansu."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    from pipeline.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap
