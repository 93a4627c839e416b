"""The ``realistic`` generator profile: an authentication log whose normal traffic is as messy as
an enterprise's, so that a detector cannot win by flagging whatever is new or rare.

Next to the ``simple`` profile's habits (``pipeline.generate``) it has:

- people onboarded mid-log: some users' first event is on a later day (their names are new);
- IT admins who log on to many workstations every day (a fresh set each day);
- users who now and then visit a server outside their habits;
- a nightly backup sweep: one service account from the backup server to most hosts, at night;
- hot-desking: some users have no desk and log on from a different shared workstation each day;
- red-team hops whose users and hosts all occur in normal traffic: one campaign on an admin
  account (a chain of hops from a foothold) and one on an ordinary user.

The output has the same LANL columns and labels as the simple profile, and is byte-identical for
a given spec (everything comes from ``numpy.random.default_rng(spec.seed)``, no set ordering).
"""

from __future__ import annotations

import numpy as np

from pipeline.generate import DAY, FAIL_P, HOURLY, KIND_P, GenerateSpec, _machine, split_hosts

BACKUP_ACCOUNT = "BACKUP@DOM1"
ONBOARD_SHARE = 0.2  # users whose first day is a later one
HOTDESK_SHARE = 0.15  # users without a desk of their own
ADMIN_SHARE = 0.05  # at least two admins
EXCURSION_P = 0.02  # a network logon goes to a server outside the user's habits
NIGHT_HOURS = np.array([0, 1, 2, 3, 4])
# Shares of the daily budget left after the scheduled traffic (service jobs, backup, admins).
SHARE = {"human": 0.70, "machine": 0.20, "system": 0.08, "anon": 0.02}


class _World:
    """Fixed topology and roles, drawn once; per-day choices (desks, admin targets) come later."""

    def __init__(self, spec: GenerateSpec, rng: np.random.Generator) -> None:
        if spec.users < 10 or spec.computers < 30:
            raise ValueError("the realistic profile needs at least 10 users and 30 computers")
        n_servers = min(12, max(6, spec.computers // 10))
        self.servers, self.workstations = split_hosts(spec.computers, n_servers, rng)
        self.dcs = self.servers[:2]
        self.backup_server = self.servers[2]
        self.app_servers = self.servers[3:]
        n_ws = len(self.workstations)
        order = [int(u) for u in rng.permutation(spec.users)]
        n_admin = max(2, round(spec.users * ADMIN_SHARE))
        n_hot = max(1, round(spec.users * HOTDESK_SHARE))
        n_new = max(1, round(spec.users * ONBOARD_SHARE)) if spec.days >= 2 else 0
        self.admins = sorted(order[:n_admin])
        self.hotdeskers = sorted(order[n_admin:n_admin + n_hot])
        onboarded = order[n_admin + n_hot:n_admin + n_hot + n_new]
        self.start_day = [0] * spec.users
        for u in onboarded:
            self.start_day[u] = int(rng.integers(1, spec.days))
        # Shared desks: a pool of workstations nobody owns; everybody else has a home desk.
        n_pool = max(3, n_ws // 8)
        perm = [int(i) for i in rng.permutation(n_ws)]
        self.hot_pool = [self.workstations[i] for i in perm[:n_pool]]
        owned = [self.workstations[i] for i in perm[n_pool:]]
        self.home = [owned[k % len(owned)] for k in range(spec.users)]
        self.habits: list[list[str]] = []
        for _ in range(spec.users):
            k = int(rng.integers(1, 4))
            picks = rng.choice(len(self.app_servers), k, replace=False)
            self.habits.append([self.dcs[int(rng.integers(2))]]
                               + [self.app_servers[int(i)] for i in picks])
        self.activity = rng.gamma(2.0, size=spec.users)
        self.machines = [w for w in self.workstations if rng.random() < 0.5] or self.workstations
        self.anon_dsts = [self.servers[int(i)] for i in rng.choice(len(self.servers), 2, replace=False)]
        period = max(300, 300 * round(60 * DAY / max(spec.events_per_day, 1) / 300))
        self.svc = [(f"SVC{j + 1}@DOM1", self.app_servers[j], period * (j + 1)) for j in range(2)]

    def day_activity(self, day: int) -> np.ndarray:
        """Who works on ``day``: users not onboarded yet have no events."""
        weights = self.activity * np.array([s <= day for s in self.start_day], dtype=float)
        return weights / weights.sum()


def _human(w: _World, rng: np.random.Generator, u: int, desk: str) -> list[str]:
    """One event of user u from ``desk``: sessions on it or logons to their servers, now and
    then to a server outside their habits."""
    user = f"U{u + 1}@DOM1"
    habit = w.habits[u]
    srv = habit[int(rng.integers(len(habit)))]
    kind = int(rng.choice(6, p=KIND_P))
    if kind == 0:
        auth = "Kerberos" if rng.random() < 0.7 else "Negotiate"
        logon = "Interactive" if rng.random() < 0.6 else "Unlock"
        return [user, user, desk, desk, auth, logon, "LogOn"]
    if kind == 1:
        return [user, user, desk, desk, "?", "Interactive", "LogOff"]
    if kind == 2:
        if rng.random() < EXCURSION_P:
            srv = w.app_servers[int(rng.integers(len(w.app_servers)))]
        r = rng.random()
        auth = "Kerberos" if r < 0.9 else ("Negotiate" if r < 0.96 else "NTLM")
        return [user, user, desk, srv, auth, "Network", "LogOn"]
    if kind == 3:
        if rng.random() < 0.3:
            return [user, user, desk, habit[0], "Kerberos", "?", "TGT"]
        return [user, user, desk, srv, "Kerberos", "?", "TGS"]
    if kind == 4:
        return [user, user, srv, srv, "?", "Network", "LogOff"]
    return [user, user, desk, habit[-1], "Kerberos", "RemoteInteractive", "LogOn"]


def _admin_day(w: _World, rng: np.random.Generator, base: int) -> list[tuple[int, list[str]]]:
    """Each admin visits a fresh set of 10-25 workstations in working hours (logon, logoff)."""
    out = []
    for u in w.admins:
        user, home = f"U{u + 1}@DOM1", w.home[u]
        n = int(rng.integers(10, 26))
        for i in rng.choice(len(w.workstations), min(n, len(w.workstations)), replace=False):
            dst = w.workstations[int(i)]
            t = base + int(rng.integers(8, 18)) * 3600 + int(rng.integers(3600))
            r = rng.random()
            auth = "Kerberos" if r < 0.75 else ("NTLM" if r < 0.9 else "Negotiate")
            logon = "RemoteInteractive" if rng.random() < 0.3 else "Network"
            out.append((t, [user, user, home, dst, auth, logon, "LogOn"]))
            out.append((t + int(rng.integers(60, 1800)), [user, user, dst, dst, "?", logon, "LogOff"]))
    return out


def _backup_sweep(w: _World, rng: np.random.Generator, base: int) -> list[tuple[int, list[str]]]:
    """One account from the backup server to ~90% of the hosts, one after another, at night."""
    out = []
    t = base + int(rng.integers(1, 3)) * 3600 + int(rng.integers(600))
    for host in w.servers + w.workstations:
        if host == w.backup_server or rng.random() >= 0.9:
            continue
        acct = BACKUP_ACCOUNT
        out.append((t, [acct, acct, w.backup_server, host, "Kerberos", "Network", "LogOn"]))
        out.append((t + int(rng.integers(5, 40)), [acct, acct, host, host, "?", "Network", "LogOff"]))
        t += int(rng.integers(10, 60))
    return out


def _normal_day(spec: GenerateSpec, w: _World, rng: np.random.Generator, day: int) -> list:
    out: list[tuple[int, list[str]]] = []
    base = day * DAY
    for acct, host, period in w.svc:
        for t in range(base + period // 3, base + DAY, period):
            out.append((t, [acct, acct, host, host, "Negotiate", "Batch", "LogOn"]))
            out.append((t + 2, [acct, acct, host, host, "?", "Batch", "LogOff"]))
    out += _backup_sweep(w, rng, base)
    out += _admin_day(w, rng, base)
    # Hot-deskers take a shared desk for the day (a different one most days).
    desk = list(w.home)
    for u in w.hotdeskers:
        desk[u] = w.hot_pool[int(rng.integers(len(w.hot_pool)))]
    budget = max(spec.events_per_day - len(out), 0)
    n = {k: int(rng.poisson(budget * s)) for k, s in SHARE.items()}
    hours = rng.choice(24, size=n["human"], p=HOURLY)
    users = rng.choice(spec.users, size=n["human"], p=w.day_activity(day))
    for h, u in zip(hours, users, strict=True):
        out.append((base + int(h) * 3600 + int(rng.integers(3600)), _human(w, rng, int(u), desk[u])))
    for _ in range(n["machine"]):
        out.append((base + int(rng.integers(DAY)), _machine(w, rng)))
    for _ in range(n["system"]):
        hosts = w.servers if rng.random() < 0.6 else w.workstations
        host = hosts[int(rng.integers(len(hosts)))]
        acct = f"SYSTEM@{host}"
        out.append((base + int(rng.integers(DAY)), [acct, acct, host, host, "Negotiate", "Service",
                                                     "LogOn"]))
    for _ in range(n["anon"]):
        dst = w.anon_dsts[int(rng.integers(2))]
        src = w.workstations[int(rng.integers(len(w.workstations)))]
        acct = f"ANONYMOUS LOGON@{dst}"
        out.append((base + int(rng.integers(DAY)), [acct, acct, src, dst, "NTLM", "Network", "LogOn"]))
    for _, row in out:
        ok = not (row[6] in ("LogOn", "TGS", "TGT") and rng.random() < FAIL_P)
        row.append("Success" if ok else "Fail")
    return out


def _normal_hosts(events: list[tuple[int, list[str]]]) -> list[str]:
    """Every host named in normal traffic, sorted (so choices from it are reproducible)."""
    return sorted({row[i] for _, row in events for i in (2, 3)}, key=lambda c: int(c[1:]))


def _redteam(spec: GenerateSpec, w: _World, rng: np.random.Generator, hosts: list[str]) -> list:
    """Two campaigns whose users and hosts all occur in normal traffic: a compromised admin hops
    from a foothold from host to host (each hop starts where the last one landed, now and then
    back at the foothold); a compromised ordinary user probes servers and desks from the same
    foothold. Each campaign comes in bursts on days after the first (the clean training day)."""
    if spec.days < 2 or spec.redteam_events <= 0:
        return []
    admin = w.admins[int(rng.integers(len(w.admins)))]
    regulars = [u for u in range(spec.users)
                if u not in w.admins and u not in w.hotdeskers and w.start_day[u] == 0]
    victim = regulars[int(rng.integers(len(regulars)))]
    taken = {w.home[admin], w.home[victim], w.backup_server}
    candidates = [h for h in hosts if h not in taken and h in w.workstations]
    foothold = candidates[int(rng.integers(len(candidates)))]
    targets = [h for h in hosts if h not in (foothold, w.backup_server)]
    n_admin = (spec.redteam_events + 1) // 2
    out: list[tuple[int, list[str]]] = []
    for u, count, chain in ((admin, n_admin, True), (victim, spec.redteam_events - n_admin, False)):
        n_bursts = max(1, min(count, 3))
        sizes = np.full(n_bursts, count // n_bursts)
        sizes[: count % n_bursts] += 1
        user = f"U{u + 1}@DOM1"
        for size in sizes:
            day = int(rng.integers(1, spec.days))
            t = day * DAY + int(rng.integers(0, 24)) * 3600 + int(rng.integers(3600))
            src = foothold
            for _ in range(int(size)):
                dst = targets[int(rng.integers(len(targets)))]
                r = rng.random()
                auth = "Kerberos" if r < 0.5 else ("NTLM" if r < 0.85 else "Negotiate")
                logon = "RemoteInteractive" if rng.random() < 0.2 else "Network"
                ok = "Fail" if rng.random() < 0.15 else "Success"
                out.append((min(t, spec.days * DAY - 1), [user, user, src, dst, auth, logon, "LogOn", ok]))
                if chain:  # pivot: the next hop starts from the host just reached
                    src = dst if rng.random() < 0.7 else foothold
                t += int(rng.integers(5, 300))
    return out


def realistic_events(spec: GenerateSpec) -> list[tuple[int, list[str], bool]]:
    """(time, 8 fields after the time, is_redteam) in generation order, normal days first."""
    rng = np.random.default_rng(spec.seed)
    world = _World(spec, rng)
    normal: list[tuple[int, list[str]]] = []
    for day in range(spec.days):
        normal.extend(_normal_day(spec, world, rng, day))
    red = _redteam(spec, world, rng, _normal_hosts(normal))
    return [(t, row, False) for t, row in normal] + [(t, row, True) for t, row in red]
