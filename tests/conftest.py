import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LANL_LINE = "3600,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"


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
