"""Why a Kafka call failed, in one line that says what to do.

aiokafka reports every failure to connect as ``KafkaConnectionError("Unable to bootstrap
...")`` and logs the real cause (refused, TLS, SASL) on its ``aiokafka`` logger with the
exception as the last argument. ``ConnectionDiagnosis`` keeps that exception (and keeps
aiokafka's log lines off the terminal), so the four failures a user meets get four
different messages: nothing listening, TLS failure, authentication failed, not
authorized (with principal, operation and topic)."""

from __future__ import annotations

import logging
import ssl
import traceback
from typing import Any

PROFILE_HINT = "run with --as ROLE (profiles written by deploy/up.sh; `frs profile list`)"


class ConnectionDiagnosis(logging.Handler):
    """Keeps the last connection error aiokafka logged."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if args and isinstance(args[-1], BaseException):
            self.last = args[-1]

    def install(self) -> ConnectionDiagnosis:
        logger = logging.getLogger("aiokafka")
        logger.addHandler(self)
        logger.propagate = False  # one line from frs, not aiokafka's retries
        return self


def _operation(exc: BaseException) -> str:
    """Which right was missing, from where in aiokafka the refusal was raised."""
    modules = " ".join(frame.filename for frame in traceback.extract_tb(exc.__traceback__))
    if "producer" in modules:
        return "WRITE"
    if "consumer" in modules or "fetcher" in modules:
        return "READ"
    return "DESCRIBE"


def explain(exc: BaseException, settings: Any, last: BaseException | None) -> str | None:
    """A one-line message for a Kafka failure, or None when ``exc`` is not one."""
    from aiokafka.errors import (
        ClusterAuthorizationFailedError,
        GroupAuthorizationFailedError,
        KafkaConnectionError,
        SaslAuthenticationFailed,
        TopicAuthorizationFailedError,
    )

    where = settings.kafka_bootstrap
    protocol = settings.kafka_security_protocol
    user = settings.kafka_sasl_username or "(certificate or anonymous)"
    if isinstance(exc, TopicAuthorizationFailedError | GroupAuthorizationFailedError
                  | ClusterAuthorizationFailedError):
        kind = {TopicAuthorizationFailedError: "topic", GroupAuthorizationFailedError: "group",
                ClusterAuthorizationFailedError: "cluster"}[type(exc)]
        target = ", ".join(str(a) for a in exc.args)
        operation = _operation(exc)
        what = f"{operation} {kind} {target}" if target else (
            # An idempotent producer is refused at the cluster when it may write no topic.
            "WRITE any topic" if operation == "WRITE" else f"{operation} the {kind}")
        return (f"not authorized: principal User:{user} may not {what} (the broker's ACLs; "
                f"`frs acl table` lists who may do what): {PROFILE_HINT} with a role that may")
    if not isinstance(exc, KafkaConnectionError | ConnectionError | OSError):
        return None
    cause = last or exc
    if isinstance(cause, SaslAuthenticationFailed):
        return (f"authentication failed at {where} for SCRAM user {user!r}: the user or its "
                "password is wrong; check FRS_KAFKA_SASL_USERNAME and the password file "
                "(FRS_KAFKA_SASL_PASSWORD_FILE), or " + PROFILE_HINT)
    if isinstance(cause, ssl.SSLError):
        reason = getattr(cause, "reason", None) or type(cause).__name__
        return (f"TLS handshake with Kafka at {where} failed ({reason}): check "
                "FRS_KAFKA_CA_FILE (the CA that signed the broker's certificate) and the "
                "client certificate and key, or " + PROFILE_HINT)
    if isinstance(cause, ConnectionRefusedError) or "Connect call failed" in str(cause):
        return (f"cannot reach Kafka at {where}: nothing listens there; check the address "
                "(FRS_KAFKA_BOOTSTRAP or the profile's) and that the broker runs "
                "(deploy/kafka/broker.sh status)")
    if isinstance(cause, KafkaConnectionError) and "closed" in str(cause):
        return (f"Kafka at {where} closed the connection during the handshake: it does not "
                f"speak {protocol} there (the secured bus needs TLS and SCRAM): "
                + PROFILE_HINT)
    return (f"cannot talk to Kafka at {where} ({type(cause).__name__}: {cause}): check "
            "FRS_KAFKA_BOOTSTRAP and that the broker runs (deploy/kafka/broker.sh status)")
