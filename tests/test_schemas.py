"""The self-contained schemas (schemas/standalone/) are up to date, and another Avro library (the
Apache `avro` package) reads what salka's serde wrote from those files alone."""

from __future__ import annotations

import io
import random

import avro.io
import avro.schema
import pytest

from pipeline.serde import HEADER_LEN, MAGIC, codec, windowed_event_value
from schemas.standalone import STANDALONE_DIR, standalone_schemas

SOURCE = {"topic": "salka.raw", "partition": 2, "offset": 2**40 + 3}
TOKENIZED = {"source": SOURCE, "line": 17, "event_time": 1_700_000_000.25,
             "fields": [{"name": "src_user", "value": "U1@DOM1"}, {"name": "x", "value": "Ü\u202e\x00"}],
             "token_ids": [1, 40, 41, 2], "raw": "1700000000,U1@DOM1,..."}
SAMPLES = {
    "salka.SourceRef": SOURCE,
    "salka.Field": {"name": "user", "value": "\U0001f600"},
    "salka.TokenizedEvent": TOKENIZED,
    "salka.WindowedEvent": {"window": 19675, "event": {**TOKENIZED, "token_ids": None, "line": None}},
    "salka.WindowComplete": {"window": -3, "count": 400, "watermark": None, "stage": "windower"},
    "salka.LateEvent": {"window": 5, "watermark": 7200.0, "lateness_seconds": 12.5, "event": TOKENIZED},
    "salka.ScoredEvent": {"source": SOURCE, "line": None, "event_time": None, "window": 0,
                          "entities": {"user": "U1", "src_host": "C1"}, "loss": 2.5, "loss_total": 30.0,
                          "raw": "r", "tokens": ["a", "b"], "token_losses": [0.5, 0.25],
                          "late": True},
    "salka.ModelAnnouncement": {"trained_through": 19675, "serves_through": 19676,
                                "url": "file:///models/model-19675.pt", "sha256": "cd" * 32,
                                "fingerprint": "0123456789abcdef", "time_ms": 1_700_000_000_000},
    "salka.EntityStat": {"kind": "pair", "entity": "C1->C2", "events": 12, "median": 1.0, "mad": 0.1,
                         "z": 7.5},
    "salka.Alert": {"source": SOURCE, "line": 3, "event_time": 3600.0, "window": 0, "raw": "x",
                    "loss": 9.0, "window_percentile": 99.99, "entities": {"user": "U1"},
                    "entity_stats": [{"kind": "user", "entity": "U1", "events": 40, "median": 1.0,
                                      "mad": 0.02, "z": 12.0}], "reasons": ["loss 9.000"]},
    "salka.DeadLetter": {"stage": "tokenizer", "source": SOURCE, "line": 9, "reason": "bad time",
                         "payload": b"\x00\xff", "time_ms": 1_700_000_000_000},
    "salka.SessionScore": {"window": 19675, "session": "blk_-160\u00fc", "events": 7, "first_line": 3,
                           "last_line": 2**40, "first_time": 1_700_000_000.5, "last_time": None,
                           "loss": 0.75, "loss_total": None},
}


def test_standalone_schemas_are_up_to_date():
    expected = standalone_schemas()
    on_disk = {p.name: p.read_text() for p in STANDALONE_DIR.glob("*.avsc")}
    assert on_disk == expected, "schemas changed: regenerate with `python -m schemas.standalone`"
    assert set(expected) == {f"{name}.avsc" for name in codec().schemas}
    assert set(SAMPLES) == set(codec().schemas), "every schema needs a sample record below"
    with pytest.raises(Exception, match="salka.SourceRef"):  # control: the per-type file alone
        avro.schema.parse((STANDALONE_DIR.parent / "salka.Alert.avsc").read_text())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_apache_avro_reads_salka_records_from_the_standalone_file_alone(name):
    text = (STANDALONE_DIR / f"{name}.avsc").read_text()
    schema = avro.schema.parse(text)  # fails on any reference to a type the file does not define
    # Same canonical form as salka's writer schema: the single-object header identifies it.
    fp = codec().fingerprints[name]
    assert schema.fingerprint("CRC-64-AVRO") == fp
    record = SAMPLES[name]
    value = codec().encode(name, record)
    assert value[:2] == MAGIC and value[2:HEADER_LEN] == fp
    decoded = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(value[HEADER_LEN:])))
    assert decoded == codec().decode(value)[1]
    assert decoded == {**{f.name: None for f in schema.fields}, **record}


@pytest.mark.parametrize("window", [0, 1, -1, 63, 64, -65, 19675, 2**40, -(2**63), 2**63 - 1])
def test_windowed_event_value_is_the_encoded_record(window):
    """The windower forwards an event's bytes without decoding them again."""
    rng = random.Random(window)
    event = {**TOKENIZED, "token_ids": [rng.randrange(300) for _ in range(rng.randrange(50))]}
    tokenized = codec().encode("salka.TokenizedEvent", event)
    expected = codec().encode("salka.WindowedEvent", {"window": window, "event": event})
    assert windowed_event_value(window, tokenized) == expected
