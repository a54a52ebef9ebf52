"""JSON Schema of flows and of the config, for editors (the YAML language server) and `switchboard schema`.

Flow files carry `# yaml-language-server: $schema=...` or a `$schema:` key pointing at the
flow schema; the schema is built from the same registries the loader uses, so it never
lists a key the loader refuses.
"""

from __future__ import annotations

from typing import Any

from middleware.engine.actions import ACTIONS
from middleware.engine.conditions import CONDITIONS
from middleware.engine.loader import EVENTS, MATCH_KEYS
from middleware.platforms import PLATFORM_TYPES
from middleware.settings import Settings

DURATION = {"type": ["string", "number"], "description": "500ms, 1.5s, 10m, 2h, 1d or seconds"}


def _doc(cls: type) -> str:
    return (cls.__doc__ or "").strip().split("\n\n")[0]


def flow_schema() -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {key: {"description": _doc(cls)} for key, cls in CONDITIONS.items()},
    }
    actions_list = {"type": "array", "items": {"$ref": "#/$defs/action"}}
    action: dict[str, Any] = {
        "oneOf": [
            {"type": "string", "enum": ["stop", "return", "resolve"]},
            *(
                {
                    "type": "object",
                    "required": [key],
                    "additionalProperties": False,
                    "properties": {key: {"description": _doc(cls)}},
                }
                for key, cls in ACTIONS.items()
            ),
        ]
    }
    route = {
        "type": "object",
        "required": ["do"],
        "additionalProperties": False,
        "properties": {
            "when": {"$ref": "#/$defs/condition"},
            "do": actions_list,
            "miss": {"type": "boolean", "description": "this route means the bot did not understand"},
            "description": {"type": "string"},
        },
    }
    state = {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {
            "enter": actions_list,
            "routes": {"type": "array", "items": {"$ref": "#/$defs/route"}},
            "timeout": {
                "type": "object",
                "required": ["after", "do"],
                "properties": {"after": DURATION, "do": actions_list},
                "additionalProperties": False,
            },
            "description": {"type": "string"},
        },
    }
    properties: dict[str, Any] = {
        "$schema": {"type": "string"},
        "flow": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$", "description": "the flow's unique name"},
        "description": {"type": "string"},
        "match": {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: {} for k in MATCH_KEYS},
            "description": "which conversations the flow serves",
        },
        "vars": {"type": "object", "description": "variables every conversation starts with"},
        "always": {"type": "array", "items": {"$ref": "#/$defs/route"}},
        "states": {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/$defs/state"}},
        "start": {"type": "string"},
        "hours": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {"timezone": {"type": "string"}, "holidays": {"type": "array"}},
            },
        },
        "on": {"type": "object", "additionalProperties": False, "properties": {e: actions_list for e in EVENTS}},
        "fallback": {
            "type": "object",
            "required": ["after", "do"],
            "additionalProperties": False,
            "properties": {"after": {"type": "integer", "minimum": 1}, "do": actions_list},
        },
        "coalesce": {
            "type": "object",
            "required": ["window"],
            "additionalProperties": False,
            "properties": {"window": DURATION, "cancel_inflight": {"type": "boolean"}},
        },
        "nlu": {"type": "string", "description": "connector asked for intents before routing"},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://switchboard.dev/schema/flow.json",
        "title": "Switchboard flow",
        "type": "object",
        "required": ["flow", "states"],
        "additionalProperties": False,
        "properties": properties,
        "$defs": {"condition": condition, "action": action, "route": route, "state": state},
    }


def config_schema() -> dict[str, Any]:
    schema = Settings.model_json_schema()
    schema["properties"].pop("source", None)
    platforms = [cls.Config.model_json_schema() for cls in PLATFORM_TYPES.values()]
    schema["properties"]["platforms"] = {"type": "object", "additionalProperties": {"anyOf": platforms}}
    schema["title"] = "Switchboard config"
    return schema


def schema_document() -> dict[str, Any]:
    return {"flow": flow_schema(), "config": config_schema()}
