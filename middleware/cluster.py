"""Who this process is among the nodes sharing one store.

- `node_id` names the node for people and logs: the config's `node_id`, or `hostname:port`.
- `incarnation` is random per process start; the lease owner written on conversations is
  `<incarnation>@<node_id>`, so two processes never share an owner, whatever their names.
- The `node` table holds, per node id, the process using it now and its heartbeat. At start-up a
  process takes its node id over only if the process registered there is gone:
  - on the same machine (same kernel boot, pid and network namespaces, host name): its pid no
    longer runs (or runs another program started later), so it is known dead at once;
  - elsewhere: its heartbeat is older than a lease (`dispatch.lease_seconds`), or it shut down.
  Taking over ends the leases of the replaced incarnation at once: a node restarted under its own
  name resumes its conversations without waiting for them to expire.
- If the id is in use by a live process: a default id (`hostname:port`, not unique when hosts
  share a name) becomes `hostname:port~<incarnation>`; a configured one is waited for (a replaced
  pod whose old process is still dying) up to two leases, then start-up fails with a clear error.
- A process whose heartbeat finds its row taken over (it stalled past its lease and another
  process took the id) stops working at once (`Dispatcher.superseded`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from middleware.store import Store

log = logging.getLogger("switchboard.cluster")


class NodeIdInUse(Exception):
    """A configured node id is used by a live process; two processes must not share one."""


@dataclass(frozen=True, slots=True)
class Node:
    node_id: str
    incarnation: str
    host: str

    @property
    def owner(self) -> str:
        """The lease owner this process writes: unique per process start."""
        return f"{self.incarnation}@{self.node_id}"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def host_fingerprint() -> str:
    """Equal for two processes only if each can see whether the other's pid is alive."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    pidns = _link("/proc/self/ns/pid")
    netns = _link("/proc/self/ns/net")
    name = socket.gethostname()
    if boot and pidns and netns:
        return f"{name}|{boot}|{pidns}|{netns}"
    return f"{name}|unique-{secrets.token_hex(8)}"  # no /proc: never "the same machine"


def process_start(pid: int) -> int | None:
    """A process's start time in clock ticks after boot (field 22 of /proc/PID/stat); None if gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def row_alive(row: Any, host: str, stale_after: float, now: float | None = None) -> bool:
    """Is the process registered in this node row still running?"""
    if row.state == "down":
        return False
    if row.host == host:
        start = process_start(int(row.pid))
        return start is not None and start == int(row.pid_start)
    return float(row.seen_at) > (now if now is not None else time.time()) - stale_after


async def join(store: Store, node_id: str, *, configured: bool, lease_seconds: float) -> Node:
    """Register this process under `node_id` (or a unique variant of a default id); see the module doc."""
    incarnation = secrets.token_hex(4)
    host = host_fingerprint()
    pid = os.getpid()
    start = process_start(pid) or 0
    give_up = time.monotonic() + 2 * lease_seconds
    warned = False

    def busy(row: Any) -> bool:
        return row_alive(row, host, lease_seconds)

    while True:
        row = await store.take_node(node_id, incarnation, host, pid, start, busy)
        if row is None:
            node = Node(node_id, incarnation, host)
            log.info("joined as node", extra={"node": node_id, "owner": node.owner})
            return node
        if row.get("race"):
            await asyncio.sleep(0.05)
            continue
        if not configured:
            unique = f"{node_id}~{incarnation}"
            log.warning(
                "node id %s is in use by another live process (pid %s); this one is %s. "
                "Give every node its own node_id in the config.",
                node_id,
                row.get("pid"),
                unique,
            )
            node_id = unique
            continue
        if row.get("host") == host:
            raise NodeIdInUse(
                f"node_id {node_id!r} is in use by process {row.get('pid')} on this machine; "
                "give every process its own node_id"
            )
        if time.monotonic() > give_up:
            raise NodeIdInUse(
                f"node_id {node_id!r} is in use by a live process on another machine (last seen "
                f"{time.time() - float(row.get('seen_at', 0)):.0f}s ago); give every process its own node_id"
            )
        if not warned:
            log.warning(
                "node id %s is in use by a process on another machine; waiting for it to stop (up to %.0fs)",
                node_id,
                2 * lease_seconds,
            )
            warned = True
        await asyncio.sleep(min(1.0, lease_seconds / 4))


__all__ = ["Node", "NodeIdInUse", "host_fingerprint", "join", "process_start", "row_alive"]
