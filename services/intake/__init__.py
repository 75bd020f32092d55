"""Intake: submission gate, sanitizer and quality, purge (through services.vault), and the
policy gate."""
