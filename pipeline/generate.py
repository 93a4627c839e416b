"""Deterministic synthetic authentication logs in the LANL "auth" CSV format.

Real LANL data is large and licence-gated, so tests, demos and benchmarks need a small log with
the same shape: per-user habits a language model can learn, a daily rhythm, background
machine/service noise, and a few labelled red-team lateral-movement events that are unusual only
as *combinations* of existing users, hosts and auth types (never as unseen strings).

Everything is drawn from ``numpy.random.default_rng(spec.seed)`` and no set/hash ordering is
used, so a given spec yields byte-identical output in any process.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_text

COLUMNS = (
    "time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,auth_orientation,success"
).split(",")
DAY = 86_400
# Relative human activity by hour of day: quiet nights, a morning ramp, a lunch dip, evening fade.
HOURLY = np.array(
    [1, 1, 1, 1, 1, 2, 4, 10, 22, 28, 28, 26, 18, 24, 28, 27, 24, 16, 8, 5, 4, 3, 2, 1], dtype=float
)
HOURLY /= HOURLY.sum()
# Shares of the daily normal budget left after the fixed service-account schedule.
SHARE = {"human": 0.68, "machine": 0.20, "system": 0.10, "anon": 0.02}
# Human event kinds: local logon, local logoff, network logon, ticket, server logoff, RDP.
KIND_P = np.array([0.20, 0.12, 0.40, 0.14, 0.11, 0.03])
FAIL_P = 0.015
PROFILES = ("simple", "realistic")  # realistic: pipeline/generate_realistic.py


@dataclass(frozen=True)
class GenerateSpec:
    """Size and seed of a synthetic log; frozen so it can key caches and be logged verbatim."""

    users: int = 60  # human user accounts U1..Un@DOM1
    computers: int = 120  # workstations/servers C1..Cm
    days: int = 4
    events_per_day: int = 6000  # approximate normal events per day
    redteam_events: int = 60  # planted lateral-movement events in total
    seed: int = 7
    profile: str = "simple"  # simple, or realistic (pipeline.generate_realistic)


def split_hosts(computers: int, n_servers: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(servers, workstations): ``n_servers`` of C1..C<computers> drawn as servers, in host order."""
    chosen = np.sort(rng.choice(computers, n_servers, replace=False))
    servers = {int(i) for i in chosen}
    return [f"C{i + 1}" for i in chosen], [f"C{i + 1}" for i in range(computers) if i not in servers]


class _World:
    """Fixed topology (servers, homes, habits), drawn once so every day reuses the same habits."""

    def __init__(self, spec: GenerateSpec, rng: np.random.Generator) -> None:
        if spec.users < 3 or spec.computers < 16:
            raise ValueError("need at least 3 users and 16 computers for a meaningful topology")
        n_servers = min(10, max(5, spec.computers // 12))
        self.servers, self.workstations = split_hosts(spec.computers, n_servers, rng)
        self.dcs = self.servers[:2]
        perm = rng.permutation(len(self.workstations))
        self.home = [self.workstations[perm[u % len(perm)]] for u in range(spec.users)]
        for u in range(spec.users):  # a few users share a desk (shift work, hot-desking)
            if rng.random() < 0.05:
                self.home[u] = self.home[int(rng.integers(spec.users))]
        others = self.servers[2:]
        self.habits: list[list[str]] = []
        for _ in range(spec.users):
            k = int(rng.integers(1, 4))
            picks = rng.choice(len(others), k, replace=False)
            self.habits.append([self.dcs[int(rng.integers(2))]] + [others[i] for i in picks])
        self.activity = rng.gamma(2.0, size=spec.users)
        self.activity /= self.activity.sum()
        self.machines = [w for w in self.workstations if rng.random() < 0.5] or self.workstations
        self.anon_dsts = [self.servers[int(i)] for i in rng.choice(len(self.servers), 2, replace=False)]
        # Batch jobs every `period` s (2 rows each) come to ~5% of the daily budget.
        period = max(300, 300 * round(60 * DAY / max(spec.events_per_day, 1) / 300))
        self.svc = [(f"SVC{j + 1}@DOM1", self.servers[2 + j], period * (j + 1)) for j in range(2)]


def _human(w: _World, rng: np.random.Generator, u: int) -> list[str]:
    """One habitual event of user u: home-machine sessions or Kerberos to their own servers."""
    user, home = f"U{u + 1}@DOM1", w.home[u]
    habit = w.habits[u]
    srv = habit[int(rng.integers(len(habit)))]
    kind = int(rng.choice(6, p=KIND_P))
    if kind == 0:
        auth = "Kerberos" if rng.random() < 0.7 else "Negotiate"
        logon = "Interactive" if rng.random() < 0.6 else "Unlock"
        return [user, user, home, home, auth, logon, "LogOn"]
    if kind == 1:
        return [user, user, home, home, "?", "Interactive", "LogOff"]
    if kind == 2:
        r = rng.random()
        auth = "Kerberos" if r < 0.96 else ("Negotiate" if r < 0.99 else "NTLM")
        return [user, user, home, srv, auth, "Network", "LogOn"]
    if kind == 3:
        if rng.random() < 0.3:
            return [user, user, home, habit[0], "Kerberos", "?", "TGT"]
        return [user, user, home, srv, "Kerberos", "?", "TGS"]
    if kind == 4:
        return [user, user, srv, srv, "?", "Network", "LogOff"]
    return [user, user, home, habit[-1], "Kerberos", "RemoteInteractive", "LogOn"]


def _machine(w: _World, rng: np.random.Generator) -> list[str]:
    """Computer-account traffic: domain members talking to the DCs, flat over the day."""
    host = w.machines[int(rng.integers(len(w.machines)))]
    acct, dc = f"{host}$@DOM1", w.dcs[int(rng.integers(2))]
    r = rng.random()
    if r < 0.6:
        return [acct, acct, host, dc, "Kerberos", "Network", "LogOn"]
    if r < 0.85:
        return [acct, acct, host, dc, "Kerberos", "?", "TGS" if r < 0.75 else "TGT"]
    if r < 0.95:
        return [acct, acct, host, host, "MICROSOFT_AUTHENTICATION_PACKAGE_V1_0", "Network", "LogOn"]
    return [acct, acct, host, host, "?", "?", "AuthMap"]


def _normal_day(spec: GenerateSpec, w: _World, rng: np.random.Generator, day: int) -> list:
    """All normal events of one day as (time, fields) pairs, in generation order."""
    out: list[tuple[int, list[str]]] = []
    base = day * DAY
    for acct, host, period in w.svc:  # fixed-schedule batch jobs: logon, then logoff a bit later
        for t in range(base + period // 3, base + DAY, period):
            out.append((t, [acct, acct, host, host, "Negotiate", "Batch", "LogOn"]))
            out.append((t + 2, [acct, acct, host, host, "?", "Batch", "LogOff"]))
    budget = max(spec.events_per_day - len(out), 0)
    n = {k: int(rng.poisson(budget * s)) for k, s in SHARE.items()}
    hours = rng.choice(24, size=n["human"], p=HOURLY)
    users = rng.choice(spec.users, size=n["human"], p=w.activity)
    for h, u in zip(hours, users, strict=True):
        out.append((base + int(h) * 3600 + int(rng.integers(3600)), _human(w, rng, int(u))))
    for _ in range(n["machine"]):
        out.append((base + int(rng.integers(DAY)), _machine(w, rng)))
    for _ in range(n["system"]):
        hosts = w.servers if rng.random() < 0.6 else w.workstations
        host = hosts[int(rng.integers(len(hosts)))]
        acct = f"SYSTEM@{host}"
        out.append(
            (
                base + int(rng.integers(DAY)),
                [acct, acct, host, host, "Negotiate", "Service", "LogOn"],
            )
        )
    for _ in range(n["anon"]):
        dst = w.anon_dsts[int(rng.integers(2))]
        src = w.workstations[int(rng.integers(len(w.workstations)))]
        acct = f"ANONYMOUS LOGON@{dst}"
        out.append(
            (base + int(rng.integers(DAY)), [acct, acct, src, dst, "NTLM", "Network", "LogOn"])
        )
    for _, row in out:
        if row[6] in ("LogOn", "TGS", "TGT") and rng.random() < FAIL_P:
            row.append("Fail")
        else:
            row.append("Success")
    return out


def _redteam(spec: GenerateSpec, w: _World, rng: np.random.Generator) -> list:
    """Lateral movement: compromised users hop from a foothold to hosts outside their habits."""
    if spec.days < 2 or spec.redteam_events <= 0:
        return []  # day 1 is the clean training day, so a one-day log carries no attack
    victims = [int(u) for u in rng.choice(spec.users, int(rng.integers(2, 4)), replace=False)]
    victim_homes = [w.home[u] for u in victims]
    pool = [c for c in w.workstations if c not in victim_homes]
    footholds = [
        pool[int(i)] for i in rng.choice(len(pool), int(rng.integers(1, 3)), replace=False)
    ]
    targets = {}
    for u in victims:
        used = [w.home[u], *w.habits[u], *footholds]
        targets[u] = (
            [c for c in w.workstations if c not in used],
            [c for c in w.servers if c not in used],
        )
    n_bursts = min(spec.redteam_events, 4)
    sizes = np.full(n_bursts, spec.redteam_events // n_bursts)
    sizes[: spec.redteam_events % n_bursts] += 1
    out: list[tuple[int, list[str]]] = []
    for b, size in enumerate(sizes):
        day = 1 + (b + int(rng.integers(spec.days - 1))) % (spec.days - 1)
        t = day * DAY + int(rng.integers(1, 23)) * 3600 + int(rng.integers(3600))
        src = footholds[b % len(footholds)]
        for _ in range(int(size)):
            u = victims[int(rng.integers(len(victims)))]
            ws, srv = targets[u]
            hosts = srv if (rng.random() < 0.4 and srv) or not ws else ws
            dst = hosts[int(rng.integers(len(hosts)))]
            r = rng.random()
            auth = "NTLM" if r < 0.8 else ("Negotiate" if r < 0.9 else "Kerberos")
            ok = "Fail" if rng.random() < 0.2 else "Success"
            user = f"U{u + 1}@DOM1"
            out.append(
                (min(t, spec.days * DAY - 1), [user, user, src, dst, auth, "Network", "LogOn", ok])
            )
            t += int(rng.integers(5, 180))
    return out


def generate_events(spec: GenerateSpec) -> list[tuple[list[str], bool]]:
    """Rows (9 string fields, in column order) sorted by time, each with is_redteam.

    The sort is stable, so events sharing a second keep their generation order and the output
    stays identical across runs.
    """
    if spec.profile not in PROFILES:
        raise ValueError(f"unknown generator profile {spec.profile!r}; use one of {', '.join(PROFILES)}")
    if spec.profile == "realistic":
        from pipeline.generate_realistic import realistic_events

        events = realistic_events(spec)
    else:
        rng = np.random.default_rng(spec.seed)
        world = _World(spec, rng)
        events = []
        for day in range(spec.days):
            events.extend((t, row, False) for t, row in _normal_day(spec, world, rng, day))
        events.extend((t, row, True) for t, row in _redteam(spec, world, rng))
    events.sort(key=lambda e: e[0])
    return [([str(t), *row], red) for t, row, red in events]


def write_log(spec: GenerateSpec, log_path: Path, labels_path: Path, header: bool = True) -> dict:
    """Write the CSV log (with a header row as line 1 when header=True) and a labels CSV
    `line,label` (header row `line,label`, then one row per event: its physical 1-based line
    number in the log file, as `grep -n` counts, so with header the first event is line 2;
    label 1 for red-team, 0 otherwise). Return a summary dict: events, redteam, users,
    computers, days.

    Labels live in a separate file so the log itself looks exactly like LANL input, while
    evaluation can still join scores to ground truth by line number.
    """
    events = generate_events(spec)
    log_path, labels_path = Path(log_path), Path(labels_path)
    first = 2 if header else 1
    with atomic_text(log_path) as f:
        writer = csv.writer(f, lineterminator="\n")
        if header:
            writer.writerow(COLUMNS)
        writer.writerows(row for row, _ in events)
    with atomic_text(labels_path) as f:
        f.write("line,label\n")
        f.writelines(f"{first + i},{int(red)}\n" for i, (_, red) in enumerate(events))
    return {
        "events": len(events),
        "redteam": sum(red for _, red in events),
        "users": spec.users,
        "computers": spec.computers,
        "days": spec.days,
    }
