"""Avro schemas (one .avsc per record type salka writes to Kafka), shipped as package data."""

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
