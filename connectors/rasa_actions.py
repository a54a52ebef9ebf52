"""Switchboard as a Rasa action server: `POST /rasa/webhook`, built on rasa-sdk's `ActionExecutor`.

Point the Rasa bot's `endpoints.yml` at it (`action_endpoint: {url:
http://switchboard:8080/rasa/webhook, token: ...}`). Safe by default: a call is served only for a
`rasa` connector whose `actions.token` it carries as `?token=`, or one with
`actions.allow_unauthenticated: true` (a warning at start-up); with neither configured the endpoint
answers 403 to every call. It answers Rasa's action-server protocol as rasa-sdk's own webhook does
(rasa_sdk/endpoint.py): 200 `{"events", "responses"}`; 400 when an action rejects; 404 `{"error": "No
registered action found for name 'x'.", "action_name"}`; 449 when the request carries no `domain`
(Rasa resends it with one); 500 with the request body when an action raises.

Built-in actions, acting on the Switchboard conversation whose key is the tracker's sender id (the
`rasa` connector sends the conversation key as `sender`):

- `action_handoff`: hand off to the queue in the `handoff_queue` slot, else the connector's
  `actions.handoff_queue`; the reason from the `handoff_reason` slot;
- `action_resolve`: the conversation is done;
- `action_set_variable`: copy slots to conversation variables (`actions.variable_slots`, or every
  filled slot but Rasa's own).

A user's own rasa-sdk actions (the modules in `actions.modules`) run here too and may call
`handoff(tracker, ...)`, `set_variable(tracker, ...)` and `resolve(tracker)` from this module.

How a requested action reaches the turn: Rasa calls this endpoint while the `rasa` connector's REST
call is in flight. The connector opens a pending entry for its sender before the call
(`begin_turn`), the actions above record into it, and the connector takes what was recorded right
after the REST call returns (`end_turn`) and applies it with the replies. This registry is in
process memory: Rasa must reach the action endpoint of the same Switchboard process that made the
REST call (one node, or Rasa's action_endpoint pointing at each node's own address). A request for
a conversation with no turn in flight in this process is answered normally, its Switchboard actions
are dropped, and a warning says so. For several nodes behind one load balancer, have the action
emit a custom payload instead (`dispatcher.utter_message(json_message={"switchboard": {"handoff":
"tier1"}})`): it travels back in the REST answer, which the connector turns into the same actions.
"""

from __future__ import annotations

import hmac
import importlib
import logging
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from middleware.model import Action, Handoff, Resolve, SetVariable
from middleware.platforms.base import Rejected, loads_json

if TYPE_CHECKING:
    from rasa_sdk.executor import ActionExecutor

    from connectors.rasa import RasaConnector

log = logging.getLogger("switchboard.connectors.rasa")

VAR_NAME = re.compile(r"^(user\.)?[A-Za-z_][A-Za-z0-9_]*$")
#: slots Rasa fills itself, never copied by action_set_variable
RASA_SLOTS = frozenset({"requested_slot", "session_started_metadata"})
#: a pending entry older than this is left over from a turn that died; it is dropped
STALE_AFTER = 600.0


@dataclass
class PendingTurn:
    connector: RasaConnector
    started: float = field(default_factory=time.monotonic)
    actions: list[Action] = field(default_factory=list)


_PENDING: dict[str, PendingTurn] = {}


def begin_turn(sender: str, connector: RasaConnector) -> PendingTurn:
    """Open the entry the action endpoint records into while the REST call for `sender` runs."""
    now = time.monotonic()
    for key in [k for k, p in _PENDING.items() if now - p.started > STALE_AFTER]:
        del _PENDING[key]
    pending = PendingTurn(connector, now)
    _PENDING[sender] = pending
    return pending


def end_turn(sender: str, pending: PendingTurn) -> list[Action]:
    """Close the entry; the Switchboard actions the action server recorded for this turn."""
    if _PENDING.get(sender) is pending:
        del _PENDING[sender]
    return list(pending.actions)


def request(sender: str, action: Action) -> bool:
    """Record a Switchboard action for the turn in flight for `sender`; False (and a warning) if none."""
    pending = _PENDING.get(sender)
    if pending is None:
        log.warning(
            "rasa action for %r dropped: no rasa connector turn is in flight for it in this process "
            "(the action endpoint and the connector must run in the same Switchboard process)",
            sender,
        )
        return False
    pending.actions.append(action)
    return True


def handoff(tracker: Any, queue: str = "default", reason: str = "rasa") -> bool:
    """From a rasa-sdk action: hand the tracker's conversation to a human queue."""
    return request(str(tracker.sender_id), Handoff(queue, reason))


def set_variable(tracker: Any, name: str, value: Any) -> bool:
    """From a rasa-sdk action: set a conversation variable (`user.NAME` for user scope)."""
    if not VAR_NAME.match(name):
        raise ValueError(f"bad variable name {name!r}: letters, digits, _ (user.NAME for user scope)")
    return request(str(tracker.sender_id), SetVariable(name, value))


def resolve(tracker: Any, reason: str = "rasa") -> bool:
    """From a rasa-sdk action: the conversation is done."""
    return request(str(tracker.sender_id), Resolve(reason))


ActionFn = Callable[[Any, Any, dict[str, Any]], Any]


def builtin_actions(connector: RasaConnector) -> dict[str, ActionFn]:
    cfg = connector.config.actions

    async def action_handoff(dispatcher: Any, tracker: Any, domain: dict[str, Any]) -> list[dict[str, Any]]:
        queue = tracker.get_slot(cfg.queue_slot) or cfg.handoff_queue
        reason = tracker.get_slot(cfg.reason_slot) or "rasa action_handoff"
        handoff(tracker, str(queue), str(reason))
        return []

    async def action_resolve(dispatcher: Any, tracker: Any, domain: dict[str, Any]) -> list[dict[str, Any]]:
        resolve(tracker, "rasa action_resolve")
        return []

    async def action_set_variable(dispatcher: Any, tracker: Any, domain: dict[str, Any]) -> list[dict[str, Any]]:
        slots: Mapping[str, Any] = tracker.slots or {}
        own = RASA_SLOTS | {cfg.queue_slot, cfg.reason_slot}
        names = cfg.variable_slots or [k for k, v in slots.items() if v is not None and k not in own]
        for name in names:
            if VAR_NAME.match(name):
                set_variable(tracker, name, slots.get(name))
            else:
                log.warning("slot %r is not a valid variable name; not copied", name)
        return []

    return {
        "action_handoff": action_handoff,
        "action_resolve": action_resolve,
        "action_set_variable": action_set_variable,
    }


def build_executor(connector: RasaConnector) -> ActionExecutor:
    """rasa-sdk's executor with the connector's action modules, then the built-ins not overridden."""
    from rasa_sdk.executor import ActionExecutor

    executor = ActionExecutor()
    for module in connector.config.actions.modules:
        try:
            importlib.import_module(module)
            executor.register_package(module)
        except (ImportError, SystemExit) as exc:  # rasa-sdk exits the process on an import error
            raise RuntimeError(f"connector {connector.name!r}: cannot import rasa actions {module!r}: {exc}") from exc
    for name, fn in builtin_actions(connector).items():
        if name not in executor.actions:
            executor.register_function(name, fn)
    return executor


def _rasa_connectors(request: Request) -> list[RasaConnector]:
    from connectors.rasa import RasaConnector

    services = getattr(request.app.state, "services", None)
    if services is None:
        return []
    return [c for c in services.engine.resources.connectors.values() if isinstance(c, RasaConnector)]


def _authorised(connector: RasaConnector, given: bytes) -> bool:
    token = connector.config.actions.token
    if token:
        return hmac.compare_digest(given, token.encode())
    return connector.config.actions.allow_unauthenticated


def _error(status: int, message: str, action: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if action is not None:
        body["action_name"] = action
    return JSONResponse({**body, **extra}, status_code=status)


#: an action call carries a tracker (events, slots): generous, but bounded, compressed or not
MAX_CALL_BYTES = 4 * 1024 * 1024


async def webhook(request: Request) -> Response:
    """`POST /rasa/webhook`: one action call from Rasa, answered as rasa-sdk's webhook answers it."""
    from rasa_sdk.interfaces import ActionExecutionRejection, ActionMissingDomainException, ActionNotFoundException

    configured = _rasa_connectors(request)
    if not configured:
        return _error(404, "no rasa connector is configured in this Switchboard")
    if not any(c.config.actions.token or c.config.actions.allow_unauthenticated for c in configured):
        return _error(
            403,
            "the rasa action endpoint is off: set the rasa connector's actions.token "
            "(or actions.allow_unauthenticated: true)",
        )
    given = request.query_params.get("token", "").encode()
    # the connectors this call may act for: its token's, and those that take calls without one
    connectors = [c for c in configured if _authorised(c, given)]
    if not connectors:
        return _error(401, "missing or bad token (endpoints.yml action_endpoint: token)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_CALL_BYTES:
            return _error(413, f"action call larger than {MAX_CALL_BYTES} bytes")
    try:
        # rasa-sdk accepts deflate-compressed action calls (rasa_sdk/endpoint.py); inflated at most to the limit
        if request.headers.get("content-encoding") == "deflate":
            inflate = zlib.decompressobj()
            raw = inflate.decompress(raw, MAX_CALL_BYTES)
            if inflate.unconsumed_tail:
                return _error(413, f"action call inflates past {MAX_CALL_BYTES} bytes")
        body = loads_json(raw)
    except (Rejected, zlib.error):
        body = None
    if not isinstance(body, dict):
        return _error(400, "Invalid body request")
    tracker = body.get("tracker")
    tracker = tracker if isinstance(tracker, dict) else {}
    sender = str(body.get("sender_id") or tracker.get("sender_id") or "")
    pending = _PENDING.get(sender)
    connector = pending.connector if pending is not None and pending.connector in connectors else connectors[0]
    try:
        result = await connector.executor.run(body)
    except ActionExecutionRejection as exc:
        return _error(400, exc.message, exc.action_name)
    except ActionNotFoundException as exc:
        log.error("rasa asked for an unknown action: %s", exc)
        return _error(404, exc.message, exc.action_name)
    except ActionMissingDomainException as exc:
        return _error(449, exc.message, exc.action_name)
    except Exception as exc:
        log.exception("rasa action %r failed", body.get("next_action"))
        return _error(500, str(exc), request_body=body)
    return JSONResponse(result.model_dump() if result is not None else None)


__all__ = ["begin_turn", "build_executor", "end_turn", "handoff", "request", "resolve", "set_variable", "webhook"]
