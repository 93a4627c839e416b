"""YAML configuration -> frozen dataclasses, validated up front.

Every error names the key path (``model.rnn.hidden_size: expected a positive integer, got "abc"``)
so a typo fails at start-up instead of hours into a run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml

from nn.masking import DEFAULT_PATTERNS as DEFAULT_MASK_PATTERNS
from nn.masking import pattern_problem as mask_pattern_problem
from pipeline.logs import redact


class ConfigError(ValueError):
    """A configuration problem, with the offending key path in the message."""


class _NotFinite(ConfigError):
    """inf / nan where a number belongs: said as such, not as the key's range phrase."""


def _range_check(phrase: str, accept):
    """A value check: returns ``phrase`` (what was expected) when ``accept`` refuses the value."""

    def check(value: Any) -> str | None:
        return None if accept(value) else phrase

    check.phrase = phrase
    return check


_positive = _range_check("a positive number", lambda v: v > 0)
_non_negative = _range_check("a non-negative number", lambda v: v >= 0)
_probability = _range_check("a number in [0, 1)", lambda v: 0 <= v < 1)
_percent = _range_check("a percentage in (0, 100]", lambda v: 0 < v <= 100)
_fraction = _range_check("a fraction in [0, 1]", lambda v: 0 <= v <= 1)
_year = _range_check("0 (the current year) or a year in 1970..2200", lambda v: v == 0 or 1970 <= v <= 2200)


def _time_format(value: str) -> str | None:
    """A strptime format must read back a time it wrote: ``%Q`` (no such directive) failed on
    every line, in words that hid the format."""
    if value in ("epoch", "iso8601"):
        return None
    sample = datetime(2001, 2, 3, 4, 5, 6, 7000, tzinfo=timezone.utc)
    try:
        datetime.strptime(sample.strftime(value), value)
    except ValueError as exc:
        return f"'epoch', 'iso8601' or a strptime format that reads the times it writes ({exc})"
    return None


def _check(fn):
    """Field metadata: an extra value check returning what was expected, or None when fine."""
    return {"check": fn}


@dataclass(frozen=True)
class CsvConfig:
    # Column names in file order; also the header row's names when the file has one.
    columns: list[str] = field(
        default_factory=lambda: [
            "time", "src_user", "dst_user", "src_computer", "dst_computer",
            "auth_type", "logon_type", "auth_orientation", "success",
        ]
    )
    delimiter: str = ","
    # "auto": the first line is a header when it equals the column names; true / false force it.
    header: Literal["auto", True, False] = "auto"
    # Lines starting with this are skipped, not errors (e.g. "#" for Zeek's #fields headers).
    comment_prefix: str = ""


@dataclass(frozen=True)
class TextConfig:
    # Regex for free-text lines. A named group ``time`` is the event time; every other named
    # group becomes a field (usable as an entity). Empty: the whole line is the event, no time.
    pattern: str = ""


@dataclass(frozen=True)
class JsonConfig:
    # JSON lines: the field paths to read ("a.b.c" walks nested objects; a key that itself
    # contains dots, like Zeek's "id.orig_h", is matched whole first). Each path is a field name.
    fields: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InputConfig:
    format: Literal["csv", "text", "json"] = "csv"
    csv: CsvConfig = field(default_factory=CsvConfig)
    text: TextConfig = field(default_factory=TextConfig)
    json: JsonConfig = field(default_factory=JsonConfig)
    # Field holding the event time; empty string: no event time, windows count lines instead.
    time_field: str = "time"
    # "epoch" (seconds, may be fractional), "iso8601", or a strptime format like "%d/%b/%Y:%H:%M:%S %z".
    time_format: str = field(default="epoch", metadata=_check(_time_format))
    # Entity name -> field; entities are carried to the scores for ranking by user / host.
    entities: dict[str, str] = field(
        default_factory=lambda: {
            "user": "src_user", "src_host": "src_computer", "dst_host": "dst_computer",
        }
    )
    # Fields the model reads, in order. Empty: every field except the time field.
    model_fields: list[str] = field(default_factory=list)
    # Year for time formats without one (syslog's "%b %d %H:%M:%S"); 0: the current year (UTC).
    default_year: int = field(default=0, metadata=_check(_year))
    # Replay fails (exit 1, nothing written) when more than this fraction of the lines is
    # malformed, or when no line is an event: the config does not fit the file.
    max_malformed_fraction: float = field(default=0.5, metadata=_check(_fraction))
    # An event time more than this many seconds ahead of the wall clock (when the line is parsed)
    # is refused as a far-future time, so one forged event cannot drag the watermark ahead.
    max_future_seconds: float = field(default=86400.0, metadata=_check(_non_negative))


@dataclass(frozen=True)
class WindowConfig:
    # Event-time window length in seconds (when events have a time).
    size_seconds: float = field(default=86400.0, metadata=_check(_positive))
    # Events per window when the input has no time field.
    size_lines: int = field(default=10000, metadata=_check(_positive))
    # Streaming only: how far behind the newest event a window may still receive events.
    allowed_lateness_seconds: float = field(default=0.0, metadata=_check(_non_negative))


@dataclass(frozen=True)
class WordTokenizerConfig:
    # "field": each field value is one token (LANL style); "whitespace": split values into words.
    split: Literal["field", "whitespace"] = "field"
    max_vocab_per_field: int = field(default=5000, metadata=_check(_positive))
    min_count: int = field(default=1, metadata=_check(_positive))
    # Unseen values hash (stably) into this many per-field buckets instead of one shared UNK.
    oov_buckets: int = field(default=8, metadata=_check(_positive))
    # Each field gets id slots up front (its first-window values + max(ceil(grow_reserve x them),
    # 16), at most max_vocab_per_field); values first seen in a later window take free slots
    # (nn/tokenizers.py WordTokenizer.grow). False: frozen after the first window (the default:
    # benchmarks/detect.py on the realistic profile ranks better without growth; README).
    grow: bool = False
    grow_reserve: float = field(default=1.0, metadata=_check(_non_negative))


@dataclass(frozen=True)
class BpeTokenizerConfig:
    vocab_size: int = field(default=1000, metadata=_check(_positive))
    min_frequency: int = field(default=2, metadata=_check(_positive))


_sim_threshold = _range_check("a number in (0, 1]", lambda v: 0 < v <= 1)
_drain_depth = _range_check("an integer >= 3 (drain3's tree depth)", lambda v: v >= 3)


@dataclass(frozen=True)
class TemplateTokenizerConfig:
    """``tokenizer.template``: drain3 templates mined from the first window (nn/templates.py)."""

    # drain3: a line joins a template when at least this fraction of its tokens equal it.
    sim_threshold: float = field(default=0.4, metadata=_check(_sim_threshold))
    depth: int = field(default=4, metadata=_check(_drain_depth))
    max_children: int = field(default=100, metadata=_check(_positive))
    max_templates: int = field(default=1000, metadata=_check(_positive))
    # "word": the template id, then one token per parameter word; "none": the template id only.
    parameters: Literal["word", "none"] = "word"
    # The first window's most frequent words that get ids (as parameters, or in unknown lines).
    max_word_vocab: int = field(default=5000, metadata=_check(_positive))
    oov_buckets: int = field(default=8, metadata=_check(_positive))


@dataclass(frozen=True)
class MaskPattern:
    # The mask token is "<name>" (letters, digits, _; starting with a letter).
    name: str = ""
    # Python regular expression; its matches in the model's text become "<name>".
    regex: str = ""


@dataclass(frozen=True)
class MaskConfig:
    # Replace variable parts of the model's text by mask tokens before tokenizing (nn/masking.py).
    enabled: bool = False
    # Applied in order; a later pattern never sees what an earlier one masked.
    patterns: list[MaskPattern] = field(
        default_factory=lambda: [MaskPattern(n, r) for n, r in DEFAULT_MASK_PATTERNS]
    )

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, pattern in enumerate(self.patterns):
            problem = mask_pattern_problem(pattern.name, pattern.regex)
            if problem is None and pattern.name in seen:
                problem = (f"name: {pattern.name!r} is already the name of patterns[{seen[pattern.name]}]; "
                           f"give each pattern its own name")
            if problem:
                raise ConfigError(f"tokenizer.mask.patterns[{i}].{problem}")
            seen[pattern.name] = i


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["char", "word", "bpe", "template"] = "word"
    # Longest event in tokens (without BOS/EOS); longer events are truncated.
    max_tokens: int = field(default=120, metadata=_check(_positive))
    word: WordTokenizerConfig = field(default_factory=WordTokenizerConfig)
    bpe: BpeTokenizerConfig = field(default_factory=BpeTokenizerConfig)
    template: TemplateTokenizerConfig = field(default_factory=TemplateTokenizerConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)


@dataclass(frozen=True)
class RnnSection:
    """The config file's ``model.rnn`` (the model's own dataclass is ``nn.rnn.RNNLMConfig``)."""

    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    hidden_size: int = field(default=128, metadata=_check(_positive))
    n_layer: int = field(default=1, metadata=_check(_positive))
    # Forward state at t-1 and backward state at t+1 predict token t.
    bidirectional: bool = False
    dropout: float = field(default=0.0, metadata=_check(_probability))
    # Attention over the event's earlier tokens' states (Brown et al. 2018): none, fixed, syntax.
    attention: Literal["none", "fixed", "syntax"] = "syntax"


@dataclass(frozen=True)
class GptSection:
    """The config file's ``model.gpt`` (the model's own dataclass is ``nn.gpt.GPTConfig``)."""

    n_layer: int = field(default=2, metadata=_check(_positive))
    n_head: int = field(default=4, metadata=_check(_positive))
    n_embd: int = field(default=128, metadata=_check(_positive))
    dropout: float = field(default=0.0, metadata=_check(_probability))


@dataclass(frozen=True)
class ContextSection:
    """The config file's ``model.context``: entity context (pipeline/context.py)."""

    # An entity name of input.entities (e.g. "user"): each event is read after that entity's
    # last ``events`` events from earlier windows. Empty: off.
    entity: str = ""
    events: int = field(default=4, metadata=_check(_positive))


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["rnn", "gpt"] = "rnn"
    rnn: RnnSection = field(default_factory=RnnSection)
    gpt: GptSection = field(default_factory=GptSection)
    context: ContextSection = field(default_factory=ContextSection)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = field(default=2, metadata=_check(_positive))
    batch_size: int = field(default=64, metadata=_check(_positive))
    learning_rate: float = field(default=1e-2, metadata=_check(_positive))
    weight_decay: float = field(default=0.0, metadata=_check(_non_negative))
    grad_clip: float = field(default=1.0, metadata=_check(_non_negative))
    # Events scored per forward pass (no gradients, so larger than the training batch).
    score_batch_size: int = field(default=256, metadata=_check(_positive))
    # The same on a GPU, where big batches are what makes scoring fast.
    score_batch_size_gpu: int = field(default=4096, metadata=_check(_positive))
    # A window with more events than this is trained in chunks of this size, one after another.
    max_chunk_events: int = field(default=200_000, metadata=_check(_positive))
    # Train on a deterministic sample of at most this many events per window (0: all of them);
    # every event is still scored.
    sample_events: int = field(default=0, metadata=_check(_non_negative))
    # Leave this fraction of each window's events out of its training: those the alerter's score
    # ranks highest (pipeline/surprising.py), so an attack is not learnt as normal (0: none).
    exclude_top_fraction: float = field(default=0.01, metadata=_check(_probability))
    # auto: CUDA when torch sees a GPU, else the CPU; cuda without a GPU fails at start-up.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Forward passes in fp32, or bf16 autocast (fp32 master weights) for GPU speed.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Torch intra- and inter-op threads; 0: the default policy (pipeline/compute.py). A set
    # OMP_NUM_THREADS wins over both.
    threads: int = field(default=0, metadata=_check(_non_negative))


@dataclass(frozen=True)
class SessionsConfig:
    # An entity name of input.entities (e.g. "session", a block id): when its window closes, each
    # session (its events in the window, in event order) is read as one sequence of template ids
    # and scored by a small LM of earlier windows' sessions (pipeline/sessions.py). Empty: off.
    entity: str = ""
    # Hidden size of that LM (a one-layer LSTM with tied embeddings; 128 chosen by
    # benchmarks/detect.py --profile sessions over 32 and 64).
    hidden_size: int = field(default=128, metadata=_check(_positive))
    # A session longer than this many events is read in parts of this many (bounds the sequence).
    max_events: int = field(default=256, metadata=_check(_positive))


@dataclass(frozen=True)
class ScoresConfig:
    # Also write each event's tokens and per-token losses, so an analyst sees what surprised
    # the model (larger score files and records).
    explain: bool = False


@dataclass(frozen=True)
class TopicsConfig:
    raw: str = "salka.raw"
    tokens: str = "salka.tokens"
    windows: str = "salka.windows"
    scores: str = "salka.scores"
    dead_letters: str = "salka.dead-letters"
    late: str = "salka.late"
    alerts: str = "salka.alerts"
    # Compacted: the trainer announces each model here (window, file, sha256, fingerprint).
    models: str = "salka.models"
    # Session scores (Avro salka.SessionScore, from the trainer when sessions.entity is set),
    # keyed by window and session.
    sessions: str = "salka.sessions"
    # Partitions of raw, tokens and windows when salka creates them (scale tokenizers and
    # scorers up to this many).
    partitions: int = field(default=3, metadata=_check(_positive))
    replication_factor: int = field(default=1, metadata=_check(_positive))


@dataclass(frozen=True)
class StreamingConfig:
    # Consumer groups are "<group_prefix>.<stage>".
    group_prefix: str = "salka"
    # Windower state and trainer checkpoints live here.
    state_dir: str = "salka-state"
    # The archiver writes one gzip CSV per window here.
    archive_dir: str = "salka-archive"
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # Seconds between offset commits of a busy stage (stateful stages also commit per window).
    commit_interval_seconds: float = field(default=1.0, metadata=_check(_positive))
    # Messages taken per consume() call.
    poll_batch: int = field(default=500, metadata=_check(_positive))
    # A scorer's consume() calls take up to this many: over a backlog, the events it scores
    # together, in length order (a larger group pads its batches less).
    score_poll_batch: int = field(default=2000, metadata=_check(_positive))
    # How long one consume() call waits to fill that batch: every stage a record passes adds
    # up to this much latency when records trickle in.
    poll_wait_seconds: float = field(default=0.05, metadata=_check(_positive))
    # Trainer checkpoints kept; a damaged newest one falls back to the one before.
    keep_checkpoints: int = field(default=3, metadata=_check(_positive))
    # Where the trainer puts each window's model for the scorers: a directory (empty:
    # <state_dir>/models) or an fsspec URL such as s3://bucket/salka/models. Scorers read it.
    model_store: str = ""
    # The trainer, archiver and alerter hold at most this many records of a window in memory
    # while it fills; the rest waits on disk in sorted runs (<state_dir>/spill), in event order.
    spill_events: int = field(default=50_000, metadata=_check(_positive))
    # Whether an end-of-input control record on the raw topic (what `pipeline produce` sends after
    # a file) closes its partition's windows. On a shared log bus set false: any writer of the
    # raw topic could otherwise close every open window and send later events to the late topic;
    # the tokenizer then dead-letters such records, and windows close as event time moves on.
    end_of_input: bool = True
    # The windower's watermark stops waiting for a tokens partition that has had no event for
    # this many seconds while others had some (a partition no source writes to, a dead source),
    # until its next event; 0: wait for every partition, however long. Windows close as the
    # other partitions' event time moves on; that partition's events in them come late.
    idle_partition_seconds: float = field(default=300.0, metadata=_check(_non_negative))


def model_store_location(streaming: StreamingConfig) -> str:
    """Where the trainer writes models and scorers read them (``streaming.model_store``)."""
    return streaming.model_store or str(Path(streaming.state_dir) / "models")


@dataclass(frozen=True)
class AlertingConfig:
    # Flag an event whose loss is at or above this percentile of the previous window's losses.
    window_percentile: float = field(default=99.9, metadata=_check(_percent))
    # Flag an event whose loss is this many robust standard deviations above its entity's median.
    z_threshold: float = field(default=4.0, metadata=_check(_positive))
    # Losses an entity needs in its history (earlier windows) before its z-score counts.
    min_history: int = field(default=20, metadata=_check(_positive))
    # Most recent losses kept per entity (bounds the alerter's memory).
    history: int = field(default=500, metadata=_check(_positive))
    # Added to the scaled MAD so that a constant history does not give infinite z-scores.
    mad_floor: float = field(default=0.05, metadata=_check(_positive))
    # At most this many alerts per entity per window (the first; the first window: the highest).
    max_alerts_per_entity: int = field(default=3, metadata=_check(_positive))
    # Entity histories kept at most (least recently seen evicted first): bounds the alerter's
    # memory to about max_entities x 0.3 KB, and its scratch file of kept losses (under
    # <state_dir>/spill/alerter) to about 2 x max_entities x history x 8 B.
    max_entities: int = field(default=100_000, metadata=_check(_positive))
    # An entity absent for more than this many windows loses its history.
    entity_ttl_windows: int = field(default=30, metadata=_check(_positive))
    # Entities (names in input.entities) whose own history normalises the score that events are
    # ranked and alerted by (pipeline/normalise.py); empty: the raw loss; "auto": [user] when
    # input.entities has a user, else [] (resolved when the config loads).
    normalise: Literal["auto"] | list[str] = "auto"
    # Pseudo-losses of the population mean in an entity's mean (shrinkage for little history).
    normalise_prior: float = field(default=100.0, metadata=_check(_non_negative))
    # Earlier events after which an entity's surprise counts half (0 events: score 0).
    normalise_trust: float = field(default=1.0, metadata=_check(_positive))


@dataclass(frozen=True)
class MetricsConfig:
    # Port for /metrics, /healthz and /readyz of `pipeline run` (--metrics-port); 0: off.
    port: int = field(default=0, metadata=_check(_range_check("a port in 0..65535 (0: off)",
                                                                lambda v: 0 <= v <= 65535)))
    # Address to listen on ("0.0.0.0": every interface, as a container needs).
    host: str = "0.0.0.0"
    # /healthz answers 503 when the stage loop has not iterated for this many seconds.
    stuck_seconds: float = field(default=300.0, metadata=_check(_positive))


def _kafka_settings(value: Any) -> str | None:
    bad = [k for k, v in value.items() if not isinstance(v, (str, int, float, bool))]
    if bad:
        return f"plain values (not {bad[0]!r} as a mapping or list)"
    if "bootstrap.servers" in value and not str(value["bootstrap.servers"]).strip():
        return "bootstrap.servers as host:port[,host:port...] (not empty; or KAFKA_BOOTSTRAP_SERVERS)"
    return None


@dataclass(frozen=True)
class Config:
    seed: int = 1234
    input: InputConfig = field(default_factory=InputConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    # librdkafka settings, passed through unchanged (security.protocol, sasl.*, ssl.* ...).
    kafka: dict[str, Any] = field(
        default_factory=lambda: {"bootstrap.servers": "127.0.0.1:9092"},
        metadata=_check(_kafka_settings),
    )
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    alerting: AlertingConfig = field(default_factory=AlertingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        if self.model.kind == "gpt" and self.model.gpt.n_embd % self.model.gpt.n_head:
            raise ConfigError(
                f"model.gpt.n_embd: expected a multiple of model.gpt.n_head "
                f"({self.model.gpt.n_head}), got {self.model.gpt.n_embd}"
            )
        context = self.model.context.entity
        if context and context not in self.input.entities:
            raise ConfigError(
                f"model.context.entity: expected one of input.entities "
                f"{sorted(self.input.entities)}, got {context!r}; name an entity, or \"\" for no context"
            )
        sessions = self.sessions.entity
        if sessions and sessions not in self.input.entities:
            raise ConfigError(
                f"sessions.entity: expected one of input.entities {sorted(self.input.entities)}, "
                f"got {sessions!r}; name an entity, or \"\" for no session scores"
            )
        if sessions and self.tokenizer.kind != "template":
            raise ConfigError(
                f"sessions.entity: needs tokenizer.kind: template (a session is read as its "
                f"events' template ids), got {self.tokenizer.kind!r}; set tokenizer.kind: template"
            )
        source, known, remedy = _known_fields(self.input)
        for key, name in self._field_refs():
            if name and name not in known:
                raise ConfigError(
                    f"{key}: expected one of {source} {sorted(known)}, got {name!r}; {remedy}"
                )
        self._check_normalise()

    def _field_refs(self) -> list[tuple[str, str]]:
        refs = [("input.time_field", self.input.time_field)]
        refs += [(f"input.entities.{k}", v) for k, v in self.input.entities.items()]
        refs += [(f"input.model_fields[{i}]", v) for i, v in enumerate(self.input.model_fields)]
        return refs

    def _check_normalise(self) -> None:
        if self.alerting.normalise == "auto":  # frozen: resolved once, here
            resolved = ["user"] if "user" in self.input.entities else []
            object.__setattr__(self, "alerting", dataclasses.replace(self.alerting,
                                                                    normalise=resolved))
        for i, name in enumerate(self.alerting.normalise):
            if name not in self.input.entities:
                raise ConfigError(f"alerting.normalise[{i}]: expected one of input.entities "
                                  f"{sorted(self.input.entities)}, got {name!r}; fix the name, "
                                  f"or use [] for the raw loss")


def _known_fields(config: InputConfig) -> tuple[str, set[str], str]:
    """Where the input's field names come from, the names, and how to add one: every key that
    names a field (time, entities, model fields) must name one of these, or it would silently
    read as empty."""
    if config.format == "csv":
        return ("input.csv.columns", set(config.csv.columns),
                "fix the name or add the column to input.csv.columns")
    if config.format == "json":
        if not config.json.fields:
            raise ConfigError("input.json.fields: expected the field paths to read "
                              "(e.g. [timestamp, user.name]) when input.format is json")
        return ("input.json.fields", set(config.json.fields),
                "fix the name or add its path to input.json.fields")
    try:
        groups = set(re.compile(config.text.pattern).groupindex) if config.text.pattern else set()
    except re.error as exc:
        raise ConfigError(
            f"input.text.pattern: not a valid regular expression: {exc.msg} at position {exc.pos} "
            f"of {config.text.pattern!r}; fix it (Python re syntax, fields are (?P<name>...))"
        ) from exc
    # "text" is always there: the whole line, unless the pattern has a group of that name.
    return ("the named groups of input.text.pattern", groups | {"text"},
            "fix the name or add a group (?P<name>...) to input.text.pattern "
            "(input.time_field may be empty: no event time)")


# ---------------------------------------------------------------------------- loading


def _describe(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {_describe(value)}")
        return _build(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        # bool is an int subclass: compare by type too, so 1 never passes for True.
        if not any(value == c and type(value) is type(c) for c in choices):
            shown = ", ".join(_describe(c) for c in choices)
            raise ConfigError(f"{path}: expected one of {shown}, got {_describe(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        key_tp, val_tp = typing.get_args(tp)
        return {
            _convert(key_tp, k, f"{path}"): _convert(val_tp, v, f"{path}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        _require_finite(value, path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if tp is Any:
        _require_finite(value, path)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module


def _require_finite(value: Any, path: str) -> None:
    """YAML reads .inf / .nan as floats; no setting means them (an infinite lateness never
    closes a window), so refuse them wherever they appear, free-form sections included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotFinite(f"{path}: expected a finite number, got {_describe(value)}")
    if isinstance(value, dict):
        for key, item in value.items():
            _require_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _require_finite(item, f"{path}[{index}]")


# Keys renamed since a release: an old config gets the new name, not just "unknown key".
RENAMED_KEYS = {"model.rnn.layers": "model.rnn.n_layer"}


def compared_sections(config: dict) -> dict:
    """The model, tokenizer and seed sections of a config dict, as checkpoints and model
    fingerprints compare them (what decides a model's numbers besides its data). Keys added
    since the first models count only when used (model.context with an entity, an attention
    other than none, tokenizer.template with the template kind), so that a checkpoint or model
    made before they existed, or with other values while unused, still matches."""
    model, tokenizer = dict(config["model"]), dict(config["tokenizer"])
    if not (model.get("context") or {}).get("entity"):
        model.pop("context", None)
    rnn = dict(model.get("rnn") or {})
    if rnn.get("attention", "none") == "none":
        rnn.pop("attention", None)
    model["rnn"] = rnn
    if tokenizer.get("kind") != "template":
        tokenizer.pop("template", None)
    return {"model": model, "tokenizer": tokenizer, "seed": config["seed"]}


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for name in unknown:
        where = f"{path}.{name}" if path else str(name)
        if where in RENAMED_KEYS:
            raise ConfigError(f"{where}: renamed to {RENAMED_KEYS[where]}; rename the key in your config")
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        check = fields[name].metadata.get("check")
        try:
            converted = _convert(hints[name], value, key)
            expected = check(converted) if check else None
        except ConfigError as exc:
            if not check or not hasattr(check, "phrase") or isinstance(exc, _NotFinite):
                raise
            expected = check.phrase
        if expected:
            if hints[name] is int:
                expected = expected.replace("number", "integer")
            # redact: a kafka: mapping may hold sasl.password and the like (never echoed).
            raise ConfigError(f"{key}: expected {expected}, got {_describe(redact(value))}")
        kwargs[name] = converted
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value read as YAML, else as a plain string)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key in path")
    return parts, parse_value(raw)


def parse_value(raw: str) -> Any:
    """A --set or environment value: read as YAML (3600 -> int, [a, b] -> list), else a string."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw  # not YAML (e.g. a strptime format starting with %): take it as a string


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "kafka" and len(parts) > 2:
            # A librdkafka setting is one key with dots in it (kafka.bootstrap.servers).
            parts = ["kafka", ".".join(parts[1:])]
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(parts[: depth + 1])}: is not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = apply_overrides(data or {}, list(overrides))
    return _build(Config, data, "")


def yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: file:line:column and the parser's own words (its default
    message spans several lines and quotes the source)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {what}{f' ({context})' if context else ''}; fix the YAML syntax there"


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (the same safe subset) that refuses a key given twice in one mapping:
    YAML's last-one-wins would drop the whole first ``model:`` section without a word. Checked
    as the document is read, before merges (``<<: *base``) are applied: a key a merge brings in
    may still be overridden, at any depth."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[object, yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                # The key as the mapping will hold it: 1 and 01 (and 1.0), true and yes collide.
                first = seen.setdefault(self.construct_scalar_key(key_node), key_node.start_mark)
                if first is not key_node.start_mark:
                    raise yaml.composer.ComposerError(
                        None, None, f"key {key_node.value!r} given twice (first on line "
                        f"{first.line + 1}): the second would replace the first; keep one",
                        key_node.start_mark)
        return node

    def construct_scalar_key(self, node: yaml.ScalarNode) -> object:
        try:
            return self.construct_object(node)
        except yaml.YAMLError:  # its own error comes when the document is built
            return (node.tag, node.value)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                environ: Mapping[str, str] | None = None) -> Config:
    """Read YAML (safe loading only: UniqueKeyLoader), then the environment (``SALKA__SECTION__KEY``, see
    pipeline/configenv.py), then ``overrides``, and validate. ``path=None`` means built-in
    defaults; ``environ=None`` means ``os.environ``."""
    from pipeline.configenv import apply_environment

    data: Any = {}
    if path is not None:
        path = Path(path)
        try:
            # UniqueKeyLoader is a SafeLoader: what yaml.safe_load reads, and no more
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a YAML config (not UTF-8 text at byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_problem(path, exc)) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return apply_environment(data, overrides, os.environ if environ is None else environ)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
