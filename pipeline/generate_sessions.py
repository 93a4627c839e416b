"""The ``sessions`` generator profile: a free-text service log in which every line belongs to a
session (like HDFS block ids), and an anomaly is a session whose *sequence* of steps is wrong.

Each session runs one workflow (upload, download, delete) through the services gateway, auth,
index and store; its lines carry variable parts (client IPs and ports, block ids, sizes,
durations, file names), and sessions interleave in time. Normal traffic has benign irregularity
too: a failed-then-retried login, a slow-disk warning, a variable number of data packets.

Anomalous sessions (``redteam_events`` of them) have a step missing, an extra step (a step of
another workflow, or a repeated one) or two steps swapped. Every anomalous line is made from a
template that normal sessions use as well: no single line gives an anomaly away, only the
session's order does. Labels: per line (``line,label,session``: a line is 1 when its session
is anomalous, HDFS-style) and per session (``session,label,kind`` in ``<labels>.sessions.csv``).

Byte-identical for a given spec: everything comes from ``numpy.random.default_rng(spec.seed)``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_text
from pipeline.generate import DAY, HOURLY, GenerateSpec

START = 1709510400  # 2024-03-04T00:00:00Z: dates, so the log reads as a real one
AUTH_METHODS = ("password", "token", "kerberos")
RETRY_P = 0.02  # a login fails once, then succeeds (normal)
SLOW_DISK_P = 0.02  # a store step logs a slow-disk warning (normal)
WORKFLOW_P = {"upload": 0.45, "download": 0.45, "delete": 0.10}
ANOMALY_KINDS = ("missing", "extra", "reordered")
STEPS_PER_SESSION = 7.5  # about, to turn events_per_day into sessions per day

# The text config that reads this log (examples/sessions.yaml uses the same pattern).
LINE_PATTERN = (r"^(?P<time>\S+) (?P<host>\S+) (?P<level>[A-Z]+) (?P<service>[a-z]+) "
                r"\[(?P<session>[^\]]+)\] (?P<msg>.*)$")

Step = tuple[str, str, str]  # (level, service, message)


class _World:
    """Users with habits (home address, auth method, their files) and the storage hosts."""

    def __init__(self, spec: GenerateSpec, rng: np.random.Generator) -> None:
        self.users = [f"u{i + 1:03d}" for i in range(spec.users)]
        self.hosts = [f"dn{i + 1:02d}" for i in range(max(3, spec.computers // 8))]
        self.gateways = [f"gw{i + 1}" for i in range(2)]
        self.home_ip = [f"10.{int(rng.integers(1, 20))}.{int(rng.integers(0, 255))}."
                        f"{int(rng.integers(2, 254))}" for _ in self.users]
        self.method = [AUTH_METHODS[int(rng.choice(3, p=[0.6, 0.3, 0.1]))] for _ in self.users]
        self.files = [[f"{name}{int(rng.integers(1, 999))}.{ext}"
                       for name, ext in zip(rng.choice(["report", "photo", "backup", "notes", "data"], 4),
                                            rng.choice(["pdf", "jpg", "tar", "txt", "csv"], 4))]
                      for _ in self.users]


class _Session:
    """One session's variable parts, drawn once, so its lines agree with each other."""

    def __init__(self, w: _World, rng: np.random.Generator) -> None:
        u = int(rng.integers(len(w.users)))
        self.user, self.method = w.users[u], w.method[u]
        self.ip = w.home_ip[u] if rng.random() < 0.9 else \
            f"172.16.{int(rng.integers(0, 255))}.{int(rng.integers(2, 254))}"
        self.port = int(rng.integers(1024, 65535))
        self.path = f"/data/{self.user}/{w.files[u][int(rng.integers(4))]}"
        self.block = int(rng.integers(10**9, 10**10))
        self.host = w.hosts[int(rng.integers(len(w.hosts)))]
        self.version = int(rng.integers(1, 40))
        self.packets = int(rng.integers(1, 6))
        self.packet_bytes = [int(rng.integers(512, 65537)) for _ in range(self.packets)]
        self.digest = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, 8))


def _ms(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high))


# Steps: message makers over (session, rng). Each workflow is a sequence of them.
def accepted(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "gateway", f"Accepted connection from {s.ip}:{s.port} user={s.user}"


def authenticated(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "auth", f"User {s.user} authenticated via {s.method} in {_ms(rng, 2, 90)} ms"


def auth_failed(s: _Session, rng: np.random.Generator) -> Step:
    return "WARN", "auth", f"Authentication failed for user {s.user}: bad credentials"


def allocated(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "store", f"Allocated block blk_{s.block} on {s.host} size={sum(s.packet_bytes)}"


def received(k: int) -> Callable[[_Session, np.random.Generator], Step]:
    def step(s: _Session, rng: np.random.Generator) -> Step:
        return ("INFO", "store", f"Received packet {k} of blk_{s.block} ({s.packet_bytes[k]} bytes) "
                                 f"in {_ms(rng, 1, 200)} ms")
    return step


def sent(k: int) -> Callable[[_Session, np.random.Generator], Step]:
    def step(s: _Session, rng: np.random.Generator) -> Step:
        return ("INFO", "store", f"Sent packet {k} of blk_{s.block} ({s.packet_bytes[k]} bytes) to {s.ip} "
                                 f"in {_ms(rng, 1, 200)} ms")
    return step


def checksum(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "store", f"Checksum verified for blk_{s.block}: {s.digest}"


def committed(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "index", f"Committed {s.path} version {s.version}"


def lookup(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "index", f"Lookup {s.path} -> blk_{s.block} on {s.host}"


def deleted(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "store", f"Deleted blk_{s.block} from {s.host}"


def removed(s: _Session, rng: np.random.Generator) -> Step:
    return "INFO", "index", f"Removed {s.path} version {s.version}"


def slow_disk(s: _Session, rng: np.random.Generator) -> Step:
    return "WARN", "store", f"Slow disk on {s.host}: {_ms(rng, 500, 5000)} ms for blk_{s.block}"


def closed(s: _Session, rng: np.random.Generator) -> Step:
    total = sum(s.packet_bytes)
    return ("INFO", "gateway",
            f"Closed connection from {s.ip}:{s.port} after {_ms(rng, 20, 9000)} ms, {total} bytes")


def workflow(kind: str, s: _Session, rng: np.random.Generator) -> list:
    """The normal step sequence of a ``kind`` session (benign retries and warnings included)."""
    login = [auth_failed, authenticated] if rng.random() < RETRY_P else [authenticated]
    if kind == "upload":
        middle = [allocated, *(received(k) for k in range(s.packets)), checksum, committed]
    elif kind == "download":
        middle = [lookup, *(sent(k) for k in range(s.packets))]
    else:
        middle = [lookup, deleted, removed]
    if rng.random() < SLOW_DISK_P:
        middle.insert(int(rng.integers(1, len(middle) + 1)), slow_disk)
    return [accepted, *login, *middle, closed]


def corrupt(steps: list, kind: str, rng: np.random.Generator) -> list:
    """The session's steps with one sequence anomaly of ``kind``; every step stays a normal one."""
    steps = list(steps)
    inner = range(1, len(steps) - 1) if len(steps) > 2 else range(len(steps))
    names = [step.__qualname__ for step in steps]  # received(0) and received(1): one template
    if kind == "missing":  # a step the session has once (not a packet): no login, no commit, ...
        del steps[int(rng.choice([i for i in range(1, len(steps)) if names.count(names[i]) == 1]))]
    elif kind == "extra":  # another workflow's step, or one of its own again
        other = [deleted, removed, committed, lookup, allocated, checksum]
        extra = other[int(rng.integers(len(other)))] if rng.random() < 0.6 else steps[int(rng.choice(inner))]
        steps.insert(int(rng.integers(1, len(steps))), extra)
    else:  # reordered: two neighbouring steps that differ swap places
        pairs = [i for i in range(len(steps) - 1) if names[i] != names[i + 1]]
        i = int(rng.choice(pairs))
        steps[i], steps[i + 1] = steps[i + 1], steps[i]
    return steps


def _timestamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def session_events(spec: GenerateSpec) -> tuple[list[tuple[int, str, str]], dict[str, str]]:
    """(time in ms, line, session id) sorted by time, and each session's kind ("normal" or an
    anomaly kind), in order of first appearance."""
    rng = np.random.default_rng(spec.seed)
    w = _World(spec, rng)
    per_day = max(1, round(spec.events_per_day / STEPS_PER_SESSION))
    n_sessions = per_day * spec.days
    chosen = rng.choice(n_sessions, min(spec.redteam_events, n_sessions), replace=False)
    anomalous = {int(i) for i in chosen}
    kinds = list(WORKFLOW_P)
    lines: list[tuple[int, str, str]] = []
    labels: dict[str, str] = {}
    for n in range(n_sessions):
        day = n // per_day
        start = ((START + day * DAY) * 1000 + int(rng.choice(24, p=HOURLY)) * 3_600_000
                 + _ms(rng, 0, 3_600_000))
        sid = f"S{n:06d}-{int(rng.integers(16**6)):06x}"
        s = _Session(w, rng)
        steps = workflow(kinds[int(rng.choice(len(kinds), p=list(WORKFLOW_P.values())))], s, rng)
        kind = "normal"
        if n in anomalous:
            kind = ANOMALY_KINDS[int(rng.integers(len(ANOMALY_KINDS)))]
            steps = corrupt(steps, kind, rng)
        labels[sid] = kind
        gateway = w.gateways[int(rng.integers(len(w.gateways)))]
        t = start
        for step in steps:
            level, service, message = step(s, rng)
            host = gateway if service in ("gateway", "auth") else s.host if service == "store" else "idx1"
            lines.append((t, f"{_timestamp(t)} {host} {level} {service} [{sid}] {message}", sid))
            t += _ms(rng, 1, 1500)
    lines.sort(key=lambda x: x[0])  # stable: steps of one session at the same ms keep their order
    return lines, labels


def session_labels_path(labels_path: Path) -> Path:
    """Where the per-session labels go: ``labels.csv`` -> ``labels.sessions.csv``."""
    return labels_path.with_name(f"{labels_path.stem}.sessions{labels_path.suffix or '.csv'}")


def write_sessions(spec: GenerateSpec, log_path: Path, labels_path: Path) -> dict:
    """Write the log, its line labels (``line,label,session``; line numbers as ``grep -n``
    counts, the log has no header) and the session labels; return a summary."""
    lines, kinds = session_events(spec)
    log_path, labels_path = Path(log_path), Path(labels_path)
    with atomic_text(log_path) as f:
        f.writelines(f"{text}\n" for _, text, _ in lines)
    with atomic_text(labels_path) as f:
        f.write("line,label,session\n")
        f.writelines(f"{i},{int(kinds[sid] != 'normal')},{sid}\n" for i, (_, _, sid) in enumerate(lines, 1))
    with atomic_text(session_labels_path(labels_path)) as f:
        f.write("session,label,kind\n")
        f.writelines(f"{sid},{int(kind != 'normal')},{kind}\n" for sid, kind in kinds.items())
    anomalous = sum(kind != "normal" for kind in kinds.values())
    return {"events": len(lines), "redteam": sum(kinds[sid] != "normal" for _, _, sid in lines),
            "sessions": len(kinds), "anomalous_sessions": anomalous}
