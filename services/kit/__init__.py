"""Shared runtime: settings, Kafka bus, DLQ, registries, metrics, logging, lifecycle."""
