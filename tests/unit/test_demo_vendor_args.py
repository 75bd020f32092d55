"""The demo's vendor command line carries any webhook secret, one starting with "-" too
(token_urlsafe gives one in 64; argparse took it for an option and the vendor exited)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.simulators import demo
from services.simulators.vendor import _parser


def test_a_secret_starting_with_a_dash_reaches_the_vendor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo.secrets, "token_urlsafe", lambda _n: "-starts-with-a-dash")
    args = demo.setup(tmp_path, webhook_port=8444).vendor_args
    parsed = _parser().parse_args(args[args.index("services.simulators.vendor") + 1:])
    assert parsed.webhook_secret == "-starts-with-a-dash"
