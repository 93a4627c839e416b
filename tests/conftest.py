import os
from pathlib import Path

import helpers
import pytest
from helpers import ROOT, delete_topics


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


@pytest.fixture(autouse=True)
def _delete_created_topics(request):
    """After a broker test, delete the topics its stream_config calls created on the shared
    broker (unique per test, so nothing piles up on an external cluster). Tests that run a
    broker of their own lose theirs with it."""
    helpers.created.clear()
    yield
    made, helpers.created[:] = list(helpers.created), []
    if "kafka_bootstrap" not in request.fixturenames:
        return
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    for config in made:
        if config.kafka.get("bootstrap.servers") == bootstrap:
            delete_topics(config)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Model tests on one torch thread (pytestmark usefixtures): fast and steady on a shared
    machine, whatever other tests set."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
