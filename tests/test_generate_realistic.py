"""The realistic generator profile (every behaviour, asserted on the generated rows) and the
detection benchmark (its baselines' causality, and a --small run end to end)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
from click.testing import CliRunner
from helpers import ROOT

from pipeline.cli import cli
from pipeline.generate import DAY, GenerateSpec, generate_events, write_log
from pipeline.parsing import Event

SPEC = GenerateSpec(users=40, computers=80, days=4, events_per_day=3000, redteam_events=40,
                    seed=5, profile="realistic")


@pytest.fixture(scope="module")
def events():
    return generate_events(SPEC)


def normal_rows(events):
    return [row for row, red in events if not red]


def day(row):
    return int(row[0]) // DAY


def is_person(user):
    return user.startswith("U")


def hosts_per_user_day(rows):
    """(user, day) -> distinct destination hosts of network / remote logons."""
    seen = defaultdict(set)
    for row in rows:
        if row[7] == "LogOn" and row[6] in ("Network", "RemoteInteractive"):
            seen[(row[1], day(row))].add(row[4])
    return seen


def admins(rows):
    """People with >= 10 destinations on every day: the IT admins."""
    per = hosts_per_user_day(rows)
    users = {u for u, _ in per if is_person(u)}
    return {u for u in users if all(len(per.get((u, d), ())) >= 10 for d in range(SPEC.days))}


def test_realistic_profile_is_deterministic_per_seed():
    assert generate_events(SPEC) == generate_events(SPEC)
    other = generate_events(GenerateSpec(**{**SPEC.__dict__, "seed": 6}))
    assert other != generate_events(SPEC)


def test_rows_have_the_lanl_shape_and_are_sorted(events):
    times = [int(row[0]) for row, _ in events]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < SPEC.days * DAY
    assert all(len(row) == 9 and row[8] in ("Success", "Fail") for row, _ in events)
    assert sum(red for _, red in events) == SPEC.redteam_events


def test_some_people_are_onboarded_after_the_first_day(events):
    first = {}
    for row in normal_rows(events):
        if is_person(row[1]):
            first.setdefault(row[1], day(row))
    late = [u for u, d in first.items() if d >= 1]
    assert len(late) >= 2, first
    assert sum(d == 0 for d in first.values()) > len(late)  # most people are there from day 0


def test_admins_log_on_to_many_workstations_every_day(events):
    rows = normal_rows(events)
    found = admins(rows)
    assert len(found) >= 2
    per = hosts_per_user_day(rows)
    ordinary = [len(v) for (u, _), v in per.items() if is_person(u) and u not in found]
    assert max(ordinary) < 10  # the rest keep to a few servers
    # a fresh set each day, not the same rounds
    admin = sorted(found)[0]
    assert per[(admin, 0)] != per[(admin, 1)]


def test_backup_sweep_reaches_most_hosts_at_night(events):
    rows = normal_rows(events)
    hosts = {row[i] for row in rows for i in (3, 4)}
    night = defaultdict(set)
    sources = defaultdict(set)
    for row in rows:
        if row[7] == "LogOn" and int(row[0]) % DAY < 5 * 3600:
            night[(row[1], day(row))].add(row[4])
            sources[row[1]].add(row[3])
    sweepers = {u for (u, d), dsts in night.items() if len(dsts) >= 0.7 * len(hosts)}
    assert len(sweepers) == 1
    (sweeper,) = sweepers
    assert all(len(night[(sweeper, d)]) >= 0.7 * len(hosts) for d in range(SPEC.days))
    assert len(sources[sweeper]) == 1  # one backup server
    assert not any(int(r[0]) % DAY >= 6 * 3600 for r in rows if r[1] == sweeper)


def test_people_now_and_then_visit_a_server_outside_their_habits(events):
    rows = normal_rows(events)
    skip = admins(rows)
    visits = defaultdict(lambda: defaultdict(int))
    for row in rows:
        if is_person(row[1]) and row[1] not in skip and row[6] == "Network" and row[7] == "LogOn":
            visits[row[1]][row[4]] += 1
    excursions = sum(1 for per in visits.values() if sum(per.values()) >= 50
                     for count in per.values() if count <= 2)
    assert excursions >= 3


def test_hot_deskers_use_different_workstations_on_different_days(events):
    desks = defaultdict(set)  # (user, day) -> hosts of interactive logons at the desk
    for row in normal_rows(events):
        if is_person(row[1]) and row[6] in ("Interactive", "Unlock") and row[3] == row[4]:
            desks[(row[1], day(row))].add(row[3])
    per_user = defaultdict(set)
    for (user, _), hosts in desks.items():
        per_user[user] |= hosts
    movers = [u for u, hosts in per_user.items() if len(hosts) >= 2]
    assert len(movers) >= 2
    assert all(len(hosts) == 1 for hosts in desks.values())  # one desk a day


def test_redteam_uses_only_users_and_hosts_of_normal_traffic_one_campaign_on_an_admin(events):
    rows = normal_rows(events)
    hosts = {row[i] for row in rows for i in (3, 4)}
    users = {row[1] for row in rows}
    red = [row for row, is_red in events if is_red]
    assert red and all(r[3] in hosts and r[4] in hosts and r[1] in users for r in red)
    assert all(day(r) >= 1 for r in red)  # the first day stays clean
    red_users = {r[1] for r in red}
    assert red_users & admins(rows), "one campaign runs on an admin account"
    assert red_users - admins(rows), "and one on an ordinary user"


def test_labels_line_up_with_the_log(tmp_path, events):
    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    summary = write_log(SPEC, log, labels)
    lines = log.read_text().splitlines()
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert summary["redteam"] == SPEC.redteam_events and len(rows) == len(lines) - 1
    marked = [lines[int(r["line"]) - 1] for r in rows if r["label"] == "1"]
    assert marked == [",".join(row) for row, red in events if red]


def test_cli_writes_the_realistic_profile(tmp_path):
    args = ["generate", "--profile", "realistic", "--users", "40", "--computers", "80",
            "--events-per-day", "3000", "--redteam-events", "40", "--seed", "5"]
    result = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "a.csv"),
                                      "--labels", str(tmp_path / "a.labels")])
    assert result.exit_code == 0, result.output
    write_log(SPEC, tmp_path / "b.csv", tmp_path / "b.labels")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    bad = CliRunner().invoke(cli, [*args, "--users", "5", "--output", str(tmp_path / "c.csv"),
                                   "--labels", str(tmp_path / "c.labels")])
    assert bad.exit_code == 2 and "--users >= 10" in bad.output and "Traceback" not in bad.output


# ----------------------------------------------------------------------------- the benchmark


@pytest.fixture(scope="module")
def detect():
    spec = importlib.util.spec_from_file_location("detect", ROOT / "benchmarks" / "detect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def event(line, user, src, dst, auth="Kerberos"):
    fields = {"src_user": user, "src_computer": src, "dst_computer": dst, "auth_type": auth}
    return Event(line=line, time=0.0, fields=fields, text_fields=())


def test_baselines_learn_only_from_earlier_windows(detect):
    windows = {0: [event(1, "U1", "C1", "C2"), event(2, "U1", "C1", "C2")],
               1: [event(3, "U1", "C1", "C2"), event(4, "U1", "C1", "C9", "NTLM")]}
    raw = {1: b"U1,C1,C2", 2: b"U1,C1,C2", 3: b"U1,C1,C2", 4: b"U1,C1,C9,NTLM"}
    later = {**windows, 2: [event(5, "U1", "C1", "C9", "NTLM")] * 50}
    raw_later = {**raw, 5: b"U1,C1,C9,NTLM"}
    for score in (lambda w, r: detect.pair_rarity(w, conditional=False),
                  lambda w, r: detect.pair_rarity(w, conditional=True),
                  lambda w, r: detect.byte_trigram(w, r, mask_digits=False)):
        scores = score(windows, raw)
        assert set(scores) == {3, 4}  # the first window is unscored
        assert scores[4] > scores[3]  # an unseen pair / unseen bytes score higher
        with_later = score(later, raw_later)
        assert with_later[3] == scores[3] and with_later[4] == scores[4]  # no look-ahead
        assert with_later[5] < scores[4]  # ... but window 2 has learned window 1's events


@pytest.mark.slow
def test_detect_small_runs_end_to_end(tmp_path):
    out = tmp_path / "detect.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detect.py"), "--small",
                           "--seeds", "1", "--profile", "realistic", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())["realistic"]["seeds"][0]
    assert set(result) == {"pair-rarity", "pair-rarity-cond", "byte-3gram", "byte-3gram-masked",
                           "LM default", "LM default+norm"}
    assert len({r["scored"] for r in result.values()}) == 1  # same windows for every method
    assert len({r["positives"] for r in result.values()}) == 1
    for r in result.values():
        assert 0 < r["positives"] < r["scored"]
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 < r["ap"] <= 1.0 and 0.0 <= r["alert@20"] <= 1.0
    assert "LM default" in done.stdout and "mean over 1 seeds" in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detect.py"), "--small",
                          "--lm", "nonsense"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--lm 'nonsense'" in bad.stderr
