"""The ``pipeline`` command: one subcommand per verb, wiring only."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import click

from pipeline.config import Config, ConfigError, load_config
from pipeline.errors import ConfigProblem, SalkaGroup
from pipeline.outpaths import check_outputs

log = logging.getLogger("pipeline")


def with_config(command):
    """Add ``--config`` and ``--set`` and pass the validated Config as ``config``."""

    @click.option("--config", "config_path", type=click.Path(dir_okay=False),
                  help="YAML config (default: built-in defaults, the same as config.yaml).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="Override one config key, e.g. --set model.kind=gpt (repeatable).")
    @functools.wraps(command)
    def wrapper(config_path, overrides, **kwargs):
        try:
            config = load_config(config_path, overrides)
        except ConfigError as exc:
            raise ConfigProblem(str(exc)) from exc
        return command(config=config, **kwargs)

    return wrapper


def workdir_config(workdir: str) -> Config:
    """The effective config a ``pipeline demo`` wrote into its work directory."""
    try:
        return load_config(Path(workdir) / "effective-config.yaml")
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from exc


def start_torch(config: Config, role: str) -> None:
    """Device check and torch threads (pipeline/compute.py) before any work; a device that is
    not there is a config problem (one line, exit 2)."""
    from pipeline.compute import start_torch as start

    try:
        start(config.training, role)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from exc


@click.group(cls=SalkaGroup,
             context_settings={"auto_envvar_prefix": "SALKA", "help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines as text, or one JSON object a line (time, level, stage, message, "
                   "window, partition, offset ...) for a log shipper.")
def cli(verbose: int, quiet: bool, log_format: str) -> None:
    """salka: score every log event by how surprised a language model is by it."""
    from pipeline.logs import configure_logging

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    configure_logging(level, log_format)


@cli.command("generate", short_help="Write a synthetic LANL-style auth log with planted red-team events.")
@with_config
@click.option("--output", "output", type=click.Path(dir_okay=False), required=True, help="Log file to write.")
@click.option("--labels", "labels", type=click.Path(dir_okay=False), required=True,
              help="Labels CSV (line,label) to write.")
@click.option("--users", default=60, show_default=True, type=click.IntRange(min=3))
@click.option("--computers", default=120, show_default=True, type=click.IntRange(min=16))
@click.option("--days", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--events-per-day", default=6000, show_default=True, type=click.IntRange(min=100))
@click.option("--redteam-events", default=60, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--profile", default="simple", show_default=True,
              type=click.Choice(["simple", "realistic", "sessions"]),
              help="simple: tidy habits; realistic: onboarding, admins, backup sweep, hot-desking, "
                   "red team over known hosts (needs --users >= 10, --computers >= 30); sessions: a "
                   "free-text service log of sessions, --redteam-events of them with missing / extra "
                   "/ reordered steps (pipeline/generate_sessions.py; examples/sessions.yaml).")
@click.option("--no-header", is_flag=True, help="Do not write a header row.")
def generate_command(config: Config, output, labels, users, computers, days, events_per_day, redteam_events,
                     seed, profile, no_header) -> None:
    """Write a synthetic authentication log (LANL format) and its labels file."""
    from pipeline.generate import GenerateSpec, write_log

    outputs = {"--output": output, "--labels": labels}
    if profile == "sessions":
        from pipeline.generate_sessions import session_labels_path

        outputs["the session labels"] = session_labels_path(Path(labels))
    check_outputs({}, outputs)
    if profile == "realistic" and (users < 10 or computers < 30):
        raise click.BadParameter("the realistic profile needs --users >= 10 and --computers >= 30",
                                 param_hint="--profile")
    spec = GenerateSpec(users=users, computers=computers, days=days,
                        events_per_day=events_per_day, redteam_events=redteam_events, seed=seed,
                        profile=profile)
    if profile == "sessions":  # a text log (no header), labels per line and per session
        from pipeline.generate_sessions import write_sessions

        summary = write_sessions(spec, Path(output), Path(labels))
        click.echo(f"wrote {summary['events']} lines of {summary['sessions']} sessions "
                   f"({summary['anomalous_sessions']} anomalous) to {output}; labels in {labels} "
                   f"and {session_labels_path(Path(labels))}", err=True)  # stdout may be --output
        return
    summary = write_log(spec, Path(output), Path(labels), header=not no_header)
    click.echo(f"wrote {summary['events']} events ({summary['redteam']} red-team) to {output}; "
               f"labels in {labels}", err=True)  # stdout may be --output (/dev/stdout)
    if redteam_events and not summary["redteam"]:
        click.echo("no red-team events planted: the first day is the clean day a model trains on "
                   "(its window is never scored); use --days 2 or more", err=True)


@cli.command("replay", short_help="Score a log file offline, window by window.")
@with_config
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="Scores file (gzip CSV).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: only on a terminal).")
@click.option("--save-model", "save_model", type=click.Path(dir_okay=False),
              help="Also checkpoint the final model here (for pipeline report --model).")
@click.option("--sessions", "sessions_path", type=click.Path(dir_okay=False),
              help="Also write each session's score here (gzip CSV; needs sessions.entity).")
def replay_command(config: Config, input_path, output_path, progress, save_model,
                   sessions_path) -> None:
    """Score each event-time window with the model trained on the windows before it, then
    train on it; write one row per event to a gzip CSV."""
    from pipeline.replay import replay

    if sessions_path and not config.sessions.entity:
        raise click.BadParameter("session scores need sessions.entity in the config (an entity "
                                 "of input.entities, with tokenizer.kind: template)",
                                 param_hint="--sessions")
    check_outputs({"--input": input_path},
                  {"--output": output_path, "--save-model": save_model, "--sessions": sessions_path})
    start_torch(config, "replay")
    count, report = replay(input_path, output_path, config, progress=progress, save_model=save_model,
                           sessions_output=sessions_path)
    click.echo(f"scored {count} events into {output_path} "
               f"({len(report.errors)} malformed lines skipped)", err=True)
    if sessions_path:
        click.echo(f"session scores in {sessions_path}", err=True)


def _format_choices() -> list[str]:
    from pipeline.formats import format_names

    return format_names()


@cli.command("init", short_help="Print a ready-made config for a log format (examples/).")
@click.option("--format", "format_name", default="lanl", show_default=True,
              type=click.Choice(_format_choices()), help="Which example config.")
def init_command(format_name: str) -> None:
    """Print the example config for FORMAT, to save and adapt:
    pipeline init --format apache > my.yaml"""
    from pipeline.formats import example_config

    click.echo(example_config(format_name), nl=False)


@cli.command("check", short_help="Show what a config reads from the first lines of a log.")
@with_config
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(min=1),
              help="Lines to read from the start of the file.")
def check_command(config: Config, input_path, limit: int) -> None:
    """Parse the first N lines and print, for each, its fields, event time, window, entities,
    what the model reads and its tokens, or why it is malformed. Exit 1 when replay would stop."""
    from pipeline.check import STOP, check_lines

    lines = check_lines(config, input_path, limit)
    for line in lines:
        click.echo(line)
    if lines[-1].startswith(STOP):
        raise SystemExit(1)


@cli.command("eval", short_help="ROC AUC, average precision, precision@k of a scores file.")
@with_config
@click.option("--scores", "scores_path", type=click.Path(exists=True), required=True,
              help="Scores file, or an archive directory.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="line,label CSV with the same line numbering as the scores.")
@click.option("-k", "ks", multiple=True, type=click.IntRange(min=1), default=(10, 50, 100),
              show_default=True, help="k for precision@k (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(config: Config, scores_path, labels_path, ks, as_json) -> None:
    """Evaluate a scores file against labels: by the raw loss, and by the entity-normalised score
    that top and the alerts rank by (alerting.normalise; the loss only when that is [])."""
    from pipeline.evaluate import evaluate, format_report

    result = evaluate(scores_path, labels_path, tuple(ks), config.alerting)
    click.echo(json.dumps(result, indent=2) if as_json else format_report(result))
    if "error" in result:  # "cannot evaluate": no metric came out (said in the report)
        raise SystemExit(1)


def scores_source(command):
    """``--scores FILE`` or ``--archive DIR``: the same rows either way."""

    @click.option("--scores", "scores_path", type=click.Path(exists=True),
                  help="Scores file written by pipeline replay.")
    @click.option("--archive", "archive_dir", type=click.Path(exists=True, file_okay=False),
                  help="Archive directory written by the archiver stage.")
    @functools.wraps(command)
    def wrapper(scores_path, archive_dir, **kwargs):
        if bool(scores_path) == bool(archive_dir):
            raise click.UsageError("give exactly one of --scores FILE and --archive DIR")
        if scores_path and Path(scores_path).is_dir():
            raise click.BadParameter(f"{scores_path} is a directory; an archive directory goes to "
                                     f"--archive DIR", param_hint="--scores")
        from pipeline.scorefile import read_scores

        return command(rows=read_scores(scores_path or archive_dir), **kwargs)

    return wrapper


def _is_stdout(path: str) -> bool:
    """Whether ``path`` is this process's standard output (/dev/stdout, /proc/self/fd/1, ...)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except OSError:
        return False


def _read_paths(**given) -> dict:
    """Option -> path of the files a scores command reads: ``given`` (keyword: the option's
    parameter name), and the scores file or the archive's window files ``scores_source`` read."""
    params = click.get_current_context().params
    archive = params.get("archive_dir")
    from pipeline.scorefile import window_files

    paths: dict = {"--scores": params.get("scores_path"),
                   "--archive": window_files(archive) if archive else None}
    paths.update({f"--{name.removesuffix('_path')}": path for name, path in given.items()})
    return paths


@cli.command("top", short_help="The most anomalous events, users or hosts.")
@with_config
@scores_source
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--by", default="event", show_default=True,
              help="event, user, host, or any entity column (e.g. src_host).")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="The scored log file, to show raw lines.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Also write the table to this CSV file for a spreadsheet (formula-safe cells).")
def top_command(config: Config, rows, limit, by, input_path, csv_path) -> None:
    """Print the most anomalous events (or entities ranked by their worst event) first: by the
    entity-normalised score (alerting.normalise), or by loss when that is []."""
    from pipeline.ranking import format_top, write_top_csv

    check_outputs(_read_paths(input_path=input_path), {"--csv": csv_path})
    try:
        if not (csv_path and _is_stdout(csv_path)):  # --csv /dev/stdout: the CSV alone
            click.echo(format_top(rows, limit, by, input_path, config.alerting))
        if csv_path:
            count = write_top_csv(csv_path, rows, limit, by, input_path, config.alerting)
            click.echo(f"wrote {count} rows to {csv_path}", err=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from exc
    except OSError as exc:
        raise click.FileError(csv_path, exc.strerror) from exc


@cli.command("report", short_help="One self-contained HTML report with plots.")
@with_config
@scores_source
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False),
              help="line,label CSV: adds ROC and precision-recall curves, AUC per window.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="The scored log file, to show the top events' raw lines.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), required=True)
@click.option("-n", "top_n", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              help="A checkpoint with RNN attention (trainer checkpoint or replay --save-model): "
                   "shows what the top events' worst tokens attended to; needs --input.")
def report_command(config: Config, rows, labels_path, input_path, output_path, top_n, model_path) -> None:
    """Write an HTML file (no network needed to view it): loss distribution per window, top
    events with per-token highlighting (when scores.explain was on), top users and hosts with
    their trend over windows, and with labels ROC / precision-recall curves."""
    from pipeline.evaluate import read_labels
    from pipeline.htmlreport import build_report

    check_outputs(_read_paths(input_path=input_path, labels_path=labels_path, model_path=model_path),
                  {"--output": output_path})
    labels = read_labels(labels_path) if labels_path else None
    attention, refusals = None, ()
    if model_path:
        if not input_path:
            raise click.UsageError("--model needs --input (the scored log file): attention is "
                                   "recomputed from the top events' raw lines")
        from pipeline.attentionview import AttentionUnavailable, attention_for_rows

        attention, refusals = functools.partial(attention_for_rows, config, model_path), AttentionUnavailable
    try:
        summary = build_report(rows, Path(output_path), labels=labels, raw_lines=input_path,
                               top_n=top_n, attention=attention, alerting=config.alerting)
    except refusals as exc:  # the --model checkpoint cannot explain: one line
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {output_path}: {summary['events']} events, {summary['plots']} plots", err=True)


STAGES = ("tokenizer", "windower", "trainer", "scorer", "archiver", "alerter")


def make_stage(name: str, config: Config):
    if name == "tokenizer":
        from pipeline.stages.tokenizer import TokenizerStage as stage
    elif name == "windower":
        from pipeline.stages.windower import WindowerStage as stage
    elif name == "trainer":
        from pipeline.stages.trainer import TrainerStage as stage
    elif name == "scorer":
        from pipeline.stages.scorer import ScorerStage as stage
    elif name == "alerter":
        from pipeline.stages.alerter import AlerterStage as stage
    else:
        from pipeline.stages.archiver import ArchiverStage as stage
    return stage(config)


@cli.command("run", short_help="Run one streaming stage until SIGTERM / Ctrl-C.")
@with_config
@click.argument("stage", type=click.Choice(STAGES))
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics, /healthz and /readyz on this port (default: metrics.port; 0: off).")
def run_command(config: Config, stage: str, metrics_port: int | None) -> None:
    """Run STAGE as a consumer-group member: consume, process, produce, flush, commit.

    SIGTERM or Ctrl-C finishes the current batch, flushes, commits and exits 0."""
    from pipeline.logs import set_stage
    from pipeline.metrics import MetricsPortError, start_metrics
    from pipeline.runner import StageRunner

    set_stage(stage)
    if stage in ("trainer", "scorer"):  # the stages that run models
        start_torch(config, "stage")
    if stage == "trainer":  # now, not when its first window closes (a day later, by default)
        from pipeline.config import model_store_location
        from pipeline.modelstore import check_writable

        check_writable(model_store_location(config.streaming))
    try:  # before the runner: a port taken fails at once, not after the broker answers
        metrics = start_metrics(config, stage, metrics_port)
    except MetricsPortError as exc:
        raise ConfigProblem(str(exc)) from exc
    raise SystemExit(StageRunner(config, lambda: make_stage(stage, config), metrics=metrics).run())


@cli.command("produce", short_help="Publish a log file to the raw topic, one record per line.")
@with_config
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Records per second (default: as fast as possible).")
@click.option("--end-marker/--no-end-marker", default=None,
              help="Send an end-of-input control record to every partition at the end, so the "
                   "last windows close (default: streaming.end_of_input, true unless set false).")
def produce_command(config: Config, input_path, rate, end_marker) -> None:
    """Publish LOG to topics.raw: value = raw line, key and header salka.line = line number,
    timestamp = event time.

    A line too large for one Kafka message is dead-lettered (cut, with its size and SHA-256) and
    the rest goes on. Exits 1 when a record reached neither the raw nor the dead-letter topic, or
    the file could not be read to its end (what was sent is flushed and counted); 130 / 143 when
    interrupted (the same)."""
    # An absent broker: one line and exit 1, in seconds (create_topics asks it first).
    # Before the first record: a broker that creates topics on first use would make the raw
    # topic (and the dead-letter topic, where a line too large for Kafka goes) with its own
    # partition count, which the stages refuse. Those two only: a producer may be allowed no
    # more, and without the dead-letter topic it can still publish.
    _create_topics(config, "produce: ", only=[config.topics.raw])
    try:
        _create_topics(config, "produce: ", only=[config.topics.dead_letters])
    except click.ClickException as exc:
        click.echo(f"produce: warning: {exc.message}; a line too large for Kafka cannot be "
                   f"dead-lettered", err=True)
    from pipeline.interrupt import interruptible
    from pipeline.produce import ProduceError, ProduceInterrupted, produce_file

    try:
        with interruptible("produce"):  # SIGTERM too: the records sent so far are flushed
            report = produce_file(config, input_path, rate=rate, end_marker=(
                config.streaming.end_of_input if end_marker is None else end_marker))
    except ProduceError as exc:
        error = click.ClickException(f"{input_path}: {exc}")
        if isinstance(exc, ProduceInterrupted):
            error.exit_code = 128 + exc.signum
        raise error from exc
    click.echo(f"produced {report.records} records to {config.topics.raw} in {report.seconds:.1f}s",
               err=True)
    if report.dead_lettered:
        lines = ", ".join(map(str, report.dead_lettered[:10]))
        more = f" and {len(report.dead_lettered) - 10} more" if len(report.dead_lettered) > 10 else ""
        click.echo(f"{len(report.dead_lettered)} line(s) too large for Kafka dead-lettered to "
                   f"{config.topics.dead_letters}: line {lines}{more}", err=True)


@cli.command("create-topics", short_help="Create salka's topics if they do not exist.")
@with_config
def create_topics_command(config: Config) -> None:
    """Create the raw, tokens, windows, scores, dead-letter and late topics."""
    created = _create_topics(config)
    click.echo(f"created: {', '.join(created) if created else 'nothing (all exist)'}", err=True)


def _create_topics(config: Config, said: str | None = None, only: list[str] | None = None) -> list[str]:
    """salka's missing topics created (``only``: those of them; ``said``: announce them with
    this prefix); a topic with another partition count, or a creation the broker refuses (no
    permission, say), is one line and exit 1."""
    from confluent_kafka import KafkaException

    from pipeline.kafka import TopicMismatch, create_topics

    try:
        created = create_topics(config, only=only)
    except TopicMismatch as exc:
        raise click.ClickException(str(exc)) from exc
    except KafkaException as exc:
        raise click.ClickException(f"cannot create topics: {exc.args[0].str()}; create them as "
                                   f"`pipeline create-topics` would (partitions: topics.partitions), "
                                   f"or ask whoever administers the cluster") from exc
    if said is not None and created:
        click.echo(f"{said}created the missing topics {', '.join(created)}", err=True)
    return created


@cli.command("status", short_help="Lag of every stage's consumer group, and the last trained window.")
@with_config
@click.option("--workdir", type=click.Path(file_okay=False, exists=True),
              help="A demo work directory (a demo run with KAFKA_BOOTSTRAP_SERVERS): use its "
                   "effective config.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status_command(config: Config, workdir, as_json: bool) -> None:
    """Per stage consumer group: each input partition's committed offset, end offset and lag;
    then the window the trainer's newest checkpoint (in streaming.state_dir) trained through.
    Exits 1 with one line when the broker cannot be reached."""
    from pipeline.status import collect

    report = collect(workdir_config(workdir) if workdir is not None else config)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.format())


@cli.command("broker", short_help="Run the embedded Kafka-protocol broker (Tansu) on 127.0.0.1.")
@with_config
@click.option("--port", default=9092, show_default=True, type=click.IntRange(1, 65535))
@click.option("--storage", default="memory://tansu/", show_default=True,
              help="Tansu storage engine URL (memory:// is not durable; s3://bucket/ is).")
def broker_command(config: Config, port: int, storage: str) -> None:
    """Run an embedded broker until Ctrl-C / SIGTERM (for demos and tests; not for production)."""
    import signal
    import time

    from pipeline.broker import STORAGE_SCHEMES, EmbeddedBroker, port_in_use, storage_note

    if not storage.startswith(STORAGE_SCHEMES):
        raise click.BadParameter(f"{storage!r}: the embedded broker stores in memory://NAME/ or "
                                 f"s3://BUCKET/", param_hint="--storage")
    if port_in_use(port):
        raise click.ClickException(f"port {port} on 127.0.0.1 is already in use (another broker?): "
                                   f"stop it, or pick another with --port")
    # SIGTERM as Ctrl-C: the handler must not take a lock (an Event.set() run while the main
    # thread sat in Event.wait() on the same lock deadlocked about one stop in five).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    broker = EmbeddedBroker(port=port, storage=storage)
    try:  # a signal may come at any point once the process exists: stopped whatever happens
        try:
            broker.start()
        except TimeoutError as exc:
            raise click.ClickException(f"{exc}: check --storage {storage} (s3:// needs AWS_ENDPOINT "
                                       f"and credentials in the environment)") from exc
        click.echo(f"broker listening on {broker.bootstrap}; {storage_note(storage)} "
                   f"(Ctrl-C to stop)", err=True)
        while True:
            time.sleep(0.5)
            if broker.process.poll() is not None:
                raise click.ClickException(f"broker exited with code {broker.process.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


@cli.command("audit", short_help="Reconcile raw records against archive, dead letters and late.")
@with_config
@click.option("--workdir", type=click.Path(file_okay=False, exists=True),
              help="A demo work directory: use its effective config and archive.")
@click.option("--archive", "archive_dir", type=click.Path(file_okay=False, exists=True),
              help="Archive directory (default: streaming.archive_dir).")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="Also reconcile against the log file that was produced, line by line, so that "
                   "records the broker lost or stored twice show up.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def audit_command(config: Config, workdir, archive_dir, input_path, as_json) -> None:
    """Check that every raw record ended exactly once: as an archive row, a dead letter or a late
    event. Exits 1 when any record is lost, archived twice or in two places, or (with --input)
    when a line of the file is missing, duplicated or unexpected."""
    from pipeline.kafka import require_reachable

    if workdir is not None:
        config = workdir_config(workdir)
    require_reachable(config)  # an absent broker said in one line, in seconds
    from pipeline.audit import audit

    report = audit(config, Path(archive_dir) if archive_dir else None,
                   Path(input_path) if input_path else None)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.format())
    raise SystemExit(0 if report.ok else 1)


@cli.command("demo", short_help="The whole streaming pipeline end to end on an embedded broker.")
@with_config
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="Log to stream (default: generate a synthetic auth log with labels).")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False),
              help="line,label CSV for --input, to report AUC.")
@click.option("--workdir", type=click.Path(file_okay=False), default="demo", show_default=True,
              help="Where data, state, logs and the score archive go.")
@click.option("--tokenizers", default=2, show_default=True, type=click.IntRange(1, 16),
              help="Tokenizer processes to run.")
def demo_command(config: Config, input_path, labels_path, workdir, tokenizers) -> None:
    """Start a broker, every stage as its own process, stream the log through, wait until every
    event is archived, print a summary, and stop everything."""
    from pipeline.check import require_fit
    from pipeline.demo import run_demo
    from pipeline.evaluate import read_labels

    # The user's files are checked before a broker and five processes start, not after the run.
    if labels_path and not input_path:
        raise click.UsageError("--labels goes with --input (the generated log brings its own labels)")
    if input_path:
        require_fit(config, input_path)
    if labels_path:
        read_labels(labels_path)
    raise SystemExit(run_demo(config, Path(workdir), input_path and Path(input_path),
                              labels_path and Path(labels_path), tokenizers=tokenizers))


@cli.command("alerts", short_help="The alerter's decisions over a scores file or archive, offline.")
@with_config
@click.option("--scores", "scores_path", type=click.Path(exists=True), required=True,
              help="Scores file (replay output) or archive directory.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="The scored log file, to show each alert's raw line.")
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False),
              help="line,label CSV: also print the precision of the top n alerts.")
def alerts_command(config: Config, scores_path, input_path, limit, labels_path) -> None:
    """Apply the alerting rules (config section alerting) window by window, exactly as the
    alerter stage does, and print the highest-loss alerts with their reasons."""
    from pipeline.alertview import offline_report
    from pipeline.evaluate import read_labels

    labels = read_labels(labels_path) if labels_path else None
    click.echo(offline_report(scores_path, config.alerting, limit, input_path, labels))


def main() -> None:
    cli()
