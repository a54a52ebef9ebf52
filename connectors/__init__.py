"""AI engines and bots, one module each, behind one small interface (`connectors.base.Connector`).

`CONNECTOR_TYPES` maps a config `type:` to its class; a user's own connector is named by a
dotted path (`type: mypackage.module.MyConnector`).
"""

from __future__ import annotations

import importlib

from connectors.base import Connector, ConnectorConfig
from connectors.canned import CannedConnector
from connectors.dialogflow import DialogflowConnector
from connectors.http import HttpBotConnector
from connectors.llm import LlmConnector
from connectors.rasa import RasaConnector

CONNECTOR_TYPES: dict[str, type[Connector]] = {
    "canned": CannedConnector,
    "dialogflow": DialogflowConnector,
    "http": HttpBotConnector,
    "llm": LlmConnector,
    "rasa": RasaConnector,
}


def connector_class(type_name: str) -> type[Connector]:
    """The class for a config `type:`: a built-in name or a dotted path to a Connector subclass."""
    if type_name in CONNECTOR_TYPES:
        return CONNECTOR_TYPES[type_name]
    if "." not in type_name:
        known = ", ".join(sorted(CONNECTOR_TYPES)) or "none"
        raise LookupError(f"unknown connector type {type_name!r}; built in: {known}; or a dotted path to a class")
    module_name, _, class_name = type_name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"cannot import {module_name!r} for connector type {type_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Connector):
        raise LookupError(f"{type_name!r} is not a Connector subclass")
    return cls


__all__ = ["CONNECTOR_TYPES", "Connector", "ConnectorConfig", "connector_class"]
