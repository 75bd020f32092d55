"""Shared runtime: what a service declares (app), how it runs (runtime, processor,
publisher), registries, settings, Kafka options, clock, metrics, logging, private files."""
