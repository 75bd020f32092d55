"""Intake: submission gate, sanitizer and quality, vault, purge, and the policy gate."""
