"""Static checks of docker/: the Dockerfile, the compose file and the container config.

No Docker engine needed: the files are parsed and cross-checked against the CLI, the config
loader and the repository tree.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml
from click.testing import CliRunner
from helpers import key_comments

from pipeline.cli import STAGES, cli
from pipeline.config import Config, load_config, model_store_location

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CONFIG_IN_CONTAINER = "/etc/salka/config.yaml"
DATA_DIR = PurePosixPath("/var/lib/salka")


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load((DOCKER / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in (DOCKER / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def instruction_args(args: str) -> list[str]:
    """Exec (JSON array) or shell form -> list of words."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def is_salka(service: dict) -> bool:
    return service.get("image", "").startswith("salka:") or "build" in service


def effective_config(service: dict) -> Config:
    """The config a salka service runs with: config.docker.yaml under its environment."""
    return load_config(DOCKER / "config.docker.yaml", environ=env_of(service))


def as_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def shell_invocations(script: str) -> list[list[str]]:
    """argv of every ``pipeline ...`` command in a shell script; commands are split on ; && || | &
    (quotes respected), and a redirection ends a command's argv."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    redirected = False
    for token in lexer:
        if token and set(token) <= set("();<>|&"):
            if token in (";", "&&", "||", "|", "&", "(", ")"):
                commands.append([])
                redirected = False
            else:  # > >> < >& ...: the rest up to the next separator is not argv
                redirected = True
        elif not redirected:
            commands[-1].append(token)
    found = []
    for words in commands:
        while words and words[0] in ("exec", "command"):
            words = words[1:]
        if words and words[0] == "pipeline":
            found.append(words[1:])
    return found


def pipeline_invocations(services: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(where, argv after ``pipeline``) for every pipeline run by compose or the Dockerfile."""
    found = []
    for name, service in services.items():
        if not is_salka(service):  # kafka, prometheus, grafana
            continue
        entrypoint = as_list(service.get("entrypoint"))
        command = as_list(service.get("command"))
        if not entrypoint or entrypoint == ["pipeline"]:  # the image's ENTRYPOINT ["pipeline"]
            found.append((f"compose service {name}", command))
        elif entrypoint[0] in ("sh", "/bin/sh", "bash", "/bin/bash") and entrypoint[-1] == "-c":
            for script in command[:1]:
                found += [(f"compose service {name}", argv) for argv in shell_invocations(script)]
        else:
            pytest.fail(f"compose service {name}: unexpected entrypoint {entrypoint}")
    for keyword, args in dockerfile_instructions():
        if keyword == "RUN":
            found += [("Dockerfile RUN", argv) for argv in shell_invocations(args)]
    return found


def check_invocation(where: str, argv: list[str]) -> str:
    """The argv names an existing subcommand and only options it has; returns the subcommand."""
    global_options = {opt for param in cli.params for opt in param.opts + param.secondary_opts}
    words = list(argv)
    while words and words[0].startswith("-"):
        assert words[0] in global_options | {"--help", "-h"}, f"{where}: unknown option {words[0]}"
        words = words[1:]
    if not words:
        return ""  # `pipeline --help`
    name, rest = words[0], words[1:]
    assert name in cli.commands, f"{where}: `pipeline {name}` is not a subcommand of pipeline.cli.cli"
    command = cli.commands[name]
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    for word in rest:
        if word.startswith("-"):
            assert word.split("=", 1)[0] in known | {"--help", "-h"}, (
                f"{where}: `pipeline {name}` has no option {word}")
    if name == "run":
        positional = [w for i, w in enumerate(rest)
                      if not w.startswith("-") and (i == 0 or rest[i - 1] not in known)]
        assert positional and positional[0] in STAGES, f"{where}: `pipeline run` needs a stage"
    return name


def stage_services(services: dict[str, dict]) -> dict[str, tuple[str, dict]]:
    """stage -> (service name, service) for the services whose command is ``run <stage>``."""
    found: dict[str, tuple[str, dict]] = {}
    for name, service in services.items():
        command = as_list(service.get("command"))
        for i in range(len(command) - 1):
            if command[i] == "run" and command[i + 1] in STAGES:
                assert command[i + 1] not in found, f"two services run {command[i + 1]}"
                found[command[i + 1]] = (name, service)
    return found


# ---------------------------------------------------------------------------- compose


def test_compose_file_parses(compose):
    assert compose["services"]
    for name, service in compose["services"].items():
        assert isinstance(service, dict), name
        assert "image" in service or "build" in service, f"{name}: neither image nor build"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_service_running_it(services, stage):
    found = stage_services(services)
    assert stage in found, f"no compose service runs `pipeline run {stage}`"
    name, service = found[stage]
    assert as_list(service.get("entrypoint")) in ([], ["pipeline"]), name
    command = as_list(service["command"])
    assert command[:2] == ["run", stage]
    assert command[command.index("--config") + 1] == CONFIG_IN_CONTAINER
    config = effective_config(service)  # validates the SALKA__ variables too
    assert config.kafka["bootstrap.servers"] == "kafka:9092"
    assert config.metrics.port > 0, f"{name}: metrics off"
    depends = service["depends_on"]
    assert isinstance(depends, dict) and depends["kafka"]["condition"] == "service_healthy", name
    assert depends["create-topics"]["condition"] == "service_completed_successfully", name


def test_stage_services_share_the_data_volume_and_mount_the_config_read_only(compose, services):
    config = load_config(DOCKER / "config.docker.yaml", environ={})
    for stage, (name, service) in stage_services(services).items():
        mounts = {}
        for volume in service["volumes"]:
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode)
        source, _ = mounts[str(DATA_DIR)]
        assert source in compose["volumes"], f"{name}: {source} is not a named volume"
        for directory in (config.streaming.state_dir, config.streaming.archive_dir):
            assert DATA_DIR in PurePosixPath(directory).parents, f"{stage}: {directory} not in the volume"
        source, mode = mounts[CONFIG_IN_CONTAINER]
        assert mode == ["ro"], f"{name}: config not mounted read-only"
        assert (DOCKER / source).resolve() == (DOCKER / "config.docker.yaml").resolve()
    sources = {v.split(":")[0] for _, s in stage_services(services).values() for v in s["volumes"]
               if v.split(":")[1] == str(DATA_DIR)}
    assert len(sources) == 1, f"stages do not share one state/archive volume: {sources}"


@pytest.mark.parametrize("stage", ["tokenizer", "scorer"])
def test_stateless_stages_run_several_replicas(services, stage):
    name, service = stage_services(services)[stage]
    replicas = (service.get("deploy") or {}).get("replicas", 1)
    assert replicas >= 2, f"{name}: deploy.replicas {replicas}"
    # one consumer group over topics.partitions partitions (tokens / windows): more sit idle
    assert replicas <= Config().topics.partitions
    assert "container_name" not in service  # a fixed name forbids more than one replica
    for stateful in ("windower", "trainer", "archiver", "alerter"):
        assert (stage_services(services)[stateful][1].get("deploy") or {}).get("replicas", 1) == 1


def test_docker_readme_shows_how_to_scale_scorers_and_where_the_model_store_lives():
    text = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "--scale scorer=3" in text
    assert "salka-model-store" in text and "model_store" in text
    assert "issue 13" not in text, "docker/README.md still says the scorer does not exist yet"


def test_create_topics_is_a_one_shot_service(services):
    runs = [(n, s) for n, s in services.items() if as_list(s.get("command"))[:1] == ["create-topics"]]
    assert len(runs) == 1, "no (or several) `pipeline create-topics` services"
    name, service = runs[0]
    assert name == "create-topics"  # the stages depend on it by this name
    assert str(service.get("restart", "no")) == "no"
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert effective_config(service).kafka["bootstrap.servers"] == "kafka:9092"


def test_demo_producer_is_behind_a_profile(services):
    producer = services.get("producer")
    if producer is None:
        pytest.skip("no producer service")
    assert "demo" in producer.get("profiles", [])
    used = [argv[0] for where, argv in pipeline_invocations({"producer": producer})
            if where.startswith("compose")]
    assert used == ["generate", "produce"]


def test_every_pipeline_subcommand_used_exists(services):
    invocations = pipeline_invocations(services)
    used = {check_invocation(where, argv) for where, argv in invocations}
    assert {"run", "create-topics"} <= used, used


def test_kafka_service_is_apache_kafka_in_kraft_mode(compose, services):
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:"), kafka["image"]
    env = env_of(kafka)
    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    assert env["KAFKA_NODE_ID"]
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node}@")
    listeners = set(env["KAFKA_LISTENERS"].split(","))
    assert {"PLAINTEXT://:9092", "CONTROLLER://:9093"} <= listeners
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key
    text = (DOCKER / "docker-compose.yml").read_text(encoding="utf-8").lower()
    assert "zookeeper" not in text
    assert "zookeeper" not in (DOCKER / "Dockerfile").read_text(encoding="utf-8").lower()


def test_kafka_healthcheck_asks_the_broker(services):
    test = services["kafka"]["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else test
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in text
    assert "--bootstrap-server localhost:9092" in text


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_user_entrypoint_volume():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    last = {keyword: args for keyword, args in instructions}
    assert json.loads(last["ENTRYPOINT"]) == ["pipeline"]
    assert json.loads(last["CMD"]) == ["--help"]
    volumes = [v for keyword, args in instructions if keyword == "VOLUME" for v in instruction_args(args)]
    assert str(DATA_DIR) in volumes


def test_dockerfile_installs_cpu_torch_before_salka_with_constraints():
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    torch_at = [i for i, r in enumerate(runs) if re.search(
        r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu(\s|$)", r)]
    salka_at = [i for i, r in enumerate(runs) if re.search(r"pip install -c constraints\.txt \.(\s|$)", r)]
    assert torch_at, "torch==2.13.0 is not installed from the PyTorch CPU index"
    assert salka_at, "salka is not installed with -c constraints.txt"
    assert torch_at[0] < salka_at[0], "salka is installed before the CPU torch"
    assert "cu1" not in " ".join(runs), "a CUDA wheel index is named"
    pins = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    assert "torch==2.13.0" in pins, "constraints.txt and the Dockerfile disagree on torch"


def test_every_copied_path_exists_in_the_repo():
    copies = 0
    for keyword, args in dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        words = instruction_args(args)
        if any(w.startswith("--from") for w in words):
            continue  # from another stage or image, not the build context
        words = [w for w in words if not w.startswith("--")]
        assert len(words) >= 2, f"{keyword} {args}"
        for source in words[:-1]:
            assert not source.startswith(("/", "..")), f"{source}: outside the build context"
            assert (ROOT / source).exists(), f"{keyword} {source}: not in the repository"
            copies += 1
    assert copies


def test_dockerfile_builds_the_compiled_scorewire_and_checks_it():
    """setup.py compiles pipeline/scorewire.py when it and a C compiler are there: the image
    copies it, has gcc while salka installs, and fails to build if the module was not compiled."""
    copies = [instruction_args(args) for keyword, args in dockerfile_instructions() if keyword == "COPY"]
    assert any("setup.py" in words[:-1] for words in copies), "setup.py is not copied"
    install = next(args for keyword, args in dockerfile_instructions()
                   if keyword == "RUN" and re.search(r"pip install -c constraints\.txt \.", args))
    assert install.index("install -y --no-install-recommends gcc") < install.index("pip install")
    assert "assert s.COMPILED" in install


def test_dockerfile_ships_the_docker_config_where_compose_points():
    copies = [instruction_args(args) for keyword, args in dockerfile_instructions() if keyword == "COPY"]
    assert ["docker/config.docker.yaml", CONFIG_IN_CONTAINER] in copies


# ---------------------------------------------------------------------------- config.docker.yaml


def test_docker_config_loads_and_points_at_the_compose_broker():
    config = load_config(DOCKER / "config.docker.yaml", environ={})
    assert config.kafka["bootstrap.servers"] == "kafka:9092"
    assert config.streaming.state_dir == "/var/lib/salka/state"
    assert config.streaming.archive_dir == "/var/lib/salka/archive"
    assert config.topics.replication_factor == 1
    # Everything else is the shipped config.yaml (= the defaults).
    shipped = load_config(ROOT / "config.yaml", environ={})
    expected = dataclasses.replace(
        shipped, kafka={**shipped.kafka, "bootstrap.servers": "kafka:9092"},
        streaming=dataclasses.replace(shipped.streaming, state_dir=config.streaming.state_dir,
                                      archive_dir=config.streaming.archive_dir))
    assert config == expected


def test_docker_config_validates_through_the_cli():
    """`pipeline ... --config` applies the same validation as the stages at start-up."""
    from pipeline.cli import with_config

    seen = []

    @click.command()
    @with_config
    def probe(config):
        seen.append(config)

    result = CliRunner().invoke(probe, ["--config", str(DOCKER / "config.docker.yaml")])
    assert result.exit_code == 0, result.output
    assert seen[0].kafka["bootstrap.servers"] == "kafka:9092"


def test_docker_config_keeps_every_key_and_comment_of_config_yaml():
    shipped = key_comments(ROOT / "config.yaml")
    docker = key_comments(DOCKER / "config.docker.yaml")
    assert set(docker) == set(shipped)
    for key, has_comment in shipped.items():
        if has_comment:
            assert docker[key], f"{key}: comment dropped in config.docker.yaml"


# ---------------------------------------------------------------------------- volumes, metrics, Grafana


def mounts_of(service: dict) -> dict[str, str]:
    """container path -> source (a named volume, or a path relative to docker/)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def test_state_models_and_archive_are_named_volumes_owned_by_the_image_user(compose, services):
    from pipeline.status import checkpoint_directory

    declared = set(compose["volumes"])
    used = {source for s in services.values() for source in mounts_of(s).values()
            if not source.startswith((".", "/"))}
    assert used == declared, f"declared but unused / used but undeclared: {used ^ declared}"
    made = [path for keyword, args in dockerfile_instructions() if keyword == "RUN"
            for command in re.findall(r"mkdir -p ([^&;]*)", args) for path in command.split()]
    for name, service in stage_services(services).values():
        config = effective_config(service)
        mounts = mounts_of(service)
        wanted = {"state": config.streaming.state_dir,
                  "trainer checkpoints": str(checkpoint_directory(config)),
                  "model store": model_store_location(config.streaming),
                  "archive": config.streaming.archive_dir}
        for what, directory in wanted.items():
            assert directory in mounts, f"{name}: no volume for the {what} at {directory}"
            assert mounts[directory] in declared, f"{name}: {directory} is not a named volume"
            # a fresh named volume copies the image's directory, owner included: it must exist
            assert any(p == directory or p.startswith(directory + "/") for p in made), (
                f"Dockerfile does not create {directory} for uid 10001")
        assert len({mounts[d] for d in wanted.values()}) == 4, f"{name}: one volume for two of them"


def mount_modes(service: dict) -> dict[str, list[str]]:
    """container path -> mount options (``ro``...)."""
    return {v.split(":")[1]: v.split(":")[2:] for v in service.get("volumes", [])}


def test_trainer_writes_the_model_store_and_scorers_read_the_same_volume_read_only(services):
    found = stage_services(services)
    (_, trainer), (name, scorer) = found["trainer"], found["scorer"]
    config = effective_config(trainer)
    assert config.streaming.model_store == "", "the compose file uses the default store"
    store = model_store_location(config.streaming)
    assert store == "/var/lib/salka/state/models"
    assert model_store_location(effective_config(scorer).streaming) == store
    assert mounts_of(scorer)[store] == mounts_of(trainer)[store]
    assert "ro" not in mount_modes(trainer)[store], "the trainer cannot write its models"
    assert mount_modes(scorer)[store] == ["ro"], f"{name}: model store not mounted read-only"
    # everything else a scorer mounts is what every salka service mounts
    others = {path: source for path, source in mounts_of(scorer).items() if path != store}
    assert others == {path: source for path, source in mounts_of(trainer).items() if path != store}


def test_every_stage_serves_metrics_on_an_exposed_port_with_a_health_check(services):
    for name, service in stage_services(services).values():
        port = effective_config(service).metrics.port
        assert port > 0, name
        assert str(port) in [str(p) for p in service.get("expose", [])], f"{name}: port {port} not exposed"
        # host ports would collide between replicas (--scale tokenizer=3)
        assert not service.get("ports"), f"{name}: publishes host ports"
        test = service["healthcheck"]["test"]
        text = " ".join(test) if isinstance(test, list) else test
        assert f"127.0.0.1:{port}/healthz" in text, f"{name}: healthcheck does not ask /healthz on {port}"


def prometheus_config(services) -> tuple[dict, dict]:
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    flag = next(a for a in as_list(prometheus.get("command")) if a.startswith("--config.file="))
    source = mounts_of(prometheus)[flag.split("=", 1)[1]]
    return prometheus, yaml.safe_load((DOCKER / source).read_text(encoding="utf-8"))


def test_prometheus_scrapes_every_stage_replica_on_its_metrics_port(services):
    _, config = prometheus_config(services)
    targets = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            # type A: every replica of a scaled service, not one address
            assert sd.get("type") == "A", job["job_name"]
            targets |= {(name, int(sd["port"])) for name in sd["names"]}
        for static in job.get("static_configs", []):
            targets |= {(t.split(":")[0], int(t.split(":")[1])) for t in static["targets"]}
    wanted = {(name, effective_config(service).metrics.port)
              for name, service in stage_services(services).values()}
    assert targets == wanted, f"missing: {wanted - targets}; unknown: {targets - wanted}"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards_directory(services):
    prometheus, _ = prometheus_config(services)
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    mounts = mounts_of(grafana)
    provisioning = DOCKER / mounts["/etc/grafana/provisioning"]
    assert provisioning.is_dir()
    sources = [yaml.safe_load(p.read_text()) for p in sorted((provisioning / "datasources").glob("*.yml"))]
    datasources = [d for s in sources for d in s["datasources"]]
    assert [d["type"] for d in datasources] == ["prometheus"]
    url = datasources[0]["url"]
    host, port = url.removeprefix("http://").split(":")
    assert host in services and services[host] is prometheus
    assert any(str(p).split(":")[-1] == port for p in prometheus.get("ports", [])), url
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.yml"))
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers, "no dashboards provider"
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounts, f"provider path {path} is not mounted into grafana"
        directory = DOCKER / mounts[path]
        dashboards = sorted(directory.glob("*.json"))
        assert dashboards, f"{directory}: no dashboard JSON"
        for dashboard in dashboards:
            data = json.loads(dashboard.read_text(encoding="utf-8"))
            assert data.get("uid") and data.get("panels"), dashboard.name
    home = env_of(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        folder, _, file = home.rpartition("/")
        assert (DOCKER / mounts[folder] / file).is_file(), home


def test_status_runs_in_any_salka_service(services):
    """docker/README.md runs `pipeline status` through the create-topics service: it needs the
    broker setting and the checkpoint volume the trainer writes to."""
    from pipeline.status import checkpoint_directory

    create, trainer = services["create-topics"], stage_services(services)["trainer"][1]
    config = effective_config(create)
    directory = str(checkpoint_directory(config))
    assert mounts_of(create).get(directory) == mounts_of(trainer)[directory]
    check_invocation("docker/README.md", ["status", "--config", CONFIG_IN_CONTAINER, "--json"])
