"""A local demo environment: one simulated HTTPS vendor answering on the results webhook.

`python -m services.simulators.demo --dir .state/demo --webhook-port 8444` writes a local CA,
the webhook's TLS certificate and the vendor's shared secret (0600), then prints the
environment the services need as `export` lines and, last, the vendor simulator's command
line. deploy/up.sh and the end-to-end tests use it, so both run the same wiring."""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from services.kit.private_files import write_private
from services.simulators.tls import SimulatorCA

PROVIDER_ID = "fed-ngi"


@dataclass(frozen=True)
class DemoEnv:
    service_env: dict[str, str]
    vendor_args: list[str]


def setup(directory: Path, webhook_port: int, vendor_port: int = 0) -> DemoEnv:
    directory.mkdir(parents=True, exist_ok=True)
    ca = SimulatorCA("frs demo CA")
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    cert, key = ca.server().write(directory, "webhook")
    secret = secrets.token_urlsafe(32)
    secrets_file = directory / "webhook-secrets.json"
    write_private(secrets_file, json.dumps({PROVIDER_ID: secret}).encode())
    env = {
        "FRS_RESULTS_WEBHOOK_PORT": str(webhook_port),
        "FRS_RESULTS_WEBHOOK_CERT_FILE": str(cert),
        "FRS_RESULTS_WEBHOOK_KEY_FILE": str(key),
        "FRS_RESULTS_WEBHOOK_SECRETS_FILE": str(secrets_file),
        # The vendor simulator writes its own CA here; dispatch must trust it.
        "FRS_DISPATCH_CA_FILE": str(directory / "vendor-pki" / "vendor-ca.crt"),
    }
    vendor = [
        sys.executable, "-m", "services.simulators.vendor", "--port", str(vendor_port),
        "--pki-dir", str(directory / "vendor-pki"),
        "--webhook-url", f"https://127.0.0.1:{webhook_port}",
        # One word with its value: a secret that starts with "-" (token_urlsafe gives one
        # in 64) is taken by argparse for an option (CI: the vendor exited at start).
        "--webhook-provider-id", PROVIDER_ID, f"--webhook-secret={secret}",
        "--webhook-ca-file", str(directory / "ca.crt"),
    ]
    return DemoEnv(env, vendor)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.simulators.demo",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--webhook-port", type=int, default=8444)
    parser.add_argument("--vendor-port", type=int, default=8443)
    args = parser.parse_args()
    demo = setup(args.dir, args.webhook_port, args.vendor_port)
    for name, value in demo.service_env.items():
        sys.stdout.write(f"export {name}={shlex.quote(value)}\n")
    sys.stdout.write(f"VENDOR_CMD=({shlex.join(demo.vendor_args)})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
