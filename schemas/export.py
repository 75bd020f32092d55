"""Export the contract: one JSON Schema per event and an AsyncAPI 3.0 document.

``python -m schemas export`` writes them; ``python -m schemas export --check`` exits 1
when the committed files differ from what the models produce (CI runs it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from schemas.catalog import TOPICS, Topic
from schemas.events import ALL_EVENTS, Event

HERE = Path(__file__).resolve().parent
JSON_DIR = HERE / "json"
ASYNCAPI = HERE / "asyncapi.yaml"


def _message_name(event: type[Event]) -> str:
    return event.__name__


def json_schema(event: type[Event]) -> dict[str, Any]:
    schema = event.model_json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:frs-broker:{event.TYPE}", **schema}


def _channel_id(topic: Topic) -> str:
    return topic.name.replace(".", "_")


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for event in ALL_EVENTS:
        schema = event.model_json_schema(
            mode="serialization", ref_template="#/components/schemas/{model}"
        )
        for name, definition in schema.pop("$defs", {}).items():
            schemas[name] = definition
        schemas[event.__name__] = schema
        messages[_message_name(event)] = {
            "name": event.__name__,
            "title": event.TYPE,
            "summary": (event.__doc__ or event.__name__).strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/CloudEventHeaders"},
            "payload": {"$ref": f"#/components/schemas/{event.__name__}"},
            "bindings": {"kafka": {"key": {"type": "string"}, "bindingVersion": "0.5.0"}},
        }
    for topic in TOPICS:
        cid = _channel_id(topic)
        channels[cid] = {
            "address": topic.name,
            "description": topic.description,
            "messages": {
                _message_name(e): {"$ref": f"#/components/messages/{_message_name(e)}"}
                for e in topic.events
            },
            "bindings": {"kafka": {
                "topic": topic.name,
                "partitions": topic.partitions,
                "topicConfiguration": {
                    "cleanup.policy": [topic.cleanup],
                    "retention.ms": topic.retention_ms,
                },
                "bindingVersion": "0.5.0",
            }},
        }
        if topic.events:
            operations[f"publish_{cid}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{cid}"},
                "summary": f"Events on {topic.name}, keyed by {topic.key}.",
            }
    schemas["CloudEventHeaders"] = {
        "type": "object",
        "description": "CloudEvents 1.0 Kafka binary mode attributes (ce_* headers).",
        "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_time"],
        "properties": {
            "ce_specversion": {"type": "string", "const": "1.0"},
            "ce_id": {"type": "string"},
            "ce_source": {"type": "string"},
            "ce_type": {"type": "string"},
            "ce_subject": {"type": "string", "description": "probe id (or registry entry id)"},
            "ce_time": {"type": "string", "format": "date-time"},
            "ce_causationid": {"type": "string", "description": "id of the causing event"},
            "ce_traceparent": {"type": "string", "description": "W3C trace context"},
            "content-type": {"type": "string", "const": "application/json"},
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "frs-broker events",
            "version": "1.0.0",
            "description": "Events exchanged by frs-broker services over Apache Kafka, as "
                           "CloudEvents 1.0 in Kafka binary mode. Generated from schemas/; "
                           "do not edit by hand.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def rendered() -> dict[Path, str]:
    files = {
        JSON_DIR / f"{e.TYPE}.json": json.dumps(json_schema(e), indent=2, sort_keys=True) + "\n"
        for e in ALL_EVENTS
    }
    files[ASYNCAPI] = yaml.safe_dump(asyncapi(), sort_keys=False, width=100)
    return files


def write() -> list[Path]:
    JSON_DIR.mkdir(exist_ok=True)
    files = rendered()
    for stale in set(JSON_DIR.glob("*.json")) - set(files):
        stale.unlink()
    for path, text in files.items():
        path.write_text(text)
    return sorted(files)


def drift() -> list[str]:
    """Files whose committed text differs from the models (or that should not exist)."""
    files = rendered()
    out = [str(p.relative_to(HERE.parent)) for p, text in files.items()
           if not p.exists() or p.read_text() != text]
    out += [str(p.relative_to(HERE.parent)) for p in JSON_DIR.glob("*.json") if p not in files]
    return sorted(out)
