"""The agent side, shared by the admin API, the built-in inbox and the `switchboard agent` command.

- Agent-side events (a message to the user, claim, resolve, release, transfer, a note) enter the
  conversation's ordered stream like any inbound message: stored in the inbox table, then applied
  by the handoff state machine in the conversation's turn (`submit_agent_event`).
- Queue summaries: waiting and assigned conversations per queue, the longest wait, capacity.
- Inbox accounts: passwords hashed with argon2id (argon2-cffi); hashing runs in a thread.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from middleware.handoff import AGENT_EVENTS
from middleware.model import Inbound, Sender

if TYPE_CHECKING:
    from middleware.services import Services
    from middleware.store import Store

#: the longest text an agent may send or note
MAX_TEXT = 10_000
#: what an agent name may be: it is shown to users' agents and kept in the audit trail
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8
#: what a skill may be (a language such as `id`, a topic such as `refunds`)
SKILL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")

_hasher = PasswordHasher()
_dummy_hash: str | None = None


async def submit_agent_event(
    s: Services,
    key: str,
    event: str,
    agent: str,
    *,
    text: str | None = None,
    queue: str | None = None,
    reason: str | None = None,
    event_id: str | None = None,
) -> bool:
    """Queue an agent-side event (`agent.message`, `agent.assigned`, ...) for the conversation `key`
    (platform:conversation_id). It is applied in the conversation's order by the handoff state
    machine: an agent's message goes out through the outbox like any reply. Returns False for a
    duplicate `event_id` (a retried request), True otherwise."""
    if event not in AGENT_EVENTS:
        raise ValueError(f"unknown agent event {event!r}")
    platform, _, conversation_id = key.partition(":")
    payload: dict[str, Any] = {"event": event, "agent": agent}
    for name, value in (("text", text), ("queue", queue), ("reason", reason)):
        if value is not None:
            payload[name] = value
    message = Inbound(
        platform=platform,
        message_id=f"agent:{event_id or uuid.uuid4().hex}",
        conversation_id=conversation_id,
        sender=Sender(agent, agent, {"role": "agent"}),
        type="event",
        payload=payload,
    )
    (new,) = await s.store.accept([message])
    if new:
        s.dispatcher.accepted(1)
        s.dispatcher.notify(key)
    return new


async def queue_summary(s: Services) -> list[dict[str, Any]]:
    """Every configured queue (and any other that still holds conversations): conversations
    waiting and with an agent, the longest wait in seconds and since when, capacity, priority, skills."""
    counts = {row["queue"]: row for row in await s.store.queue_counts()}
    now = time.time()
    out = []
    for name, queue in s.settings.handoff.queues.items():
        row = counts.pop(name, {"queue": name, "waiting": 0, "with_agent": 0})
        _waited(row, now)
        row.update({"capacity": queue.capacity, "priority": queue.priority, "skills": list(queue.skills)})
        out.append(row)
    for row in counts.values():  # conversations in queues no longer in the config
        _waited(row, now)
        out.append(row)
    return out


def can_take(queue_skills: Sequence[str], agent_skills: Sequence[str]) -> bool:
    """Whether an agent may see and claim a queue's waiting conversations: the queue asks for no
    skill, or for one the agent has (case-insensitive)."""
    if not queue_skills:
        return True
    return bool({q.lower() for q in queue_skills} & {a.lower() for a in agent_skills})


def queue_skills(s: Services, queue: str | None) -> tuple[str, ...]:
    """The skills a queue asks for (none for a queue no longer in the config)."""
    found = s.settings.handoff.queues.get(queue or "default")
    return found.skills if found is not None else ()


def queue_priority(s: Services, queue: str | None) -> int:
    found = s.settings.handoff.queues.get(queue or "default")
    return found.priority if found is not None else 0


def _waited(row: dict[str, Any], now: float) -> None:
    since = row.pop("oldest_waiting_since", None)
    row["longest_wait_seconds"] = round(now - since, 1) if since else 0.0
    row["waiting_since"] = since


# -- accounts ------------------------------------------------------------------------------


class AccountError(ValueError):
    """A name or password that cannot be an account's."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise AccountError("an agent name is 1 to 64 letters, digits and . _ @ -, starting with a letter or digit")
    return name


def parse_skills(text: str) -> tuple[str, ...]:
    """`id,en, refunds` -> ("id", "en", "refunds"): comma-separated, blanks and repeats dropped."""
    out: list[str] = []
    for skill in (part.strip() for part in text.split(",")):
        if not skill:
            continue
        if not SKILL_PATTERN.match(skill):
            raise AccountError(
                f"a skill is 1 to 40 letters, digits and . _ -, starting with a letter or digit; got {skill!r}"
            )
        if skill not in out:
            out.append(skill)
    return tuple(out)


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password has at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise AccountError("a password has at most 1024 characters")
    return password


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def add_agent(
    store: Store, name: str, password: str, *, replace: bool = False, skills: Sequence[str] | None = None
) -> bool:
    """Create an inbox account (or, with `replace`, set a new password and end its sessions);
    False if it exists and `replace` is not given. `skills`: what the agent can take (None keeps
    a replaced account's)."""
    check_name(name)
    check_password(password)
    if skills is not None:
        skills = parse_skills(",".join(skills))
    return await store.save_agent(name, await hash_password(password), replace=replace, skills=skills)


async def verify_agent(store: Store, name: str, password: str) -> bool:
    """True if the name and password match an account. Unknown names cost the same time as wrong
    passwords (a hash is checked either way), so sign-in does not tell which names exist."""
    global _dummy_hash
    stored = await store.agent_password_hash(name) if NAME_PATTERN.match(name) else None
    if stored is None:
        if _dummy_hash is None:
            _dummy_hash = await hash_password(uuid.uuid4().hex)
        await _verify(_dummy_hash, password)
        return False
    if not await _verify(stored, password):
        return False
    if _hasher.check_needs_rehash(stored):  # the library's parameters grew: keep the account up to date
        await store.save_agent(name, await hash_password(password), replace=True)
    return True


async def _verify(stored: str, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)
