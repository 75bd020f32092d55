"""Provider simulators for tests, benchmarks and ``deploy/up.sh``: an HTTPS vendor and an
SMTP provider inbox. Never imported by service code."""
