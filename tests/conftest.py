import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LANL_LINE = "3600,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
