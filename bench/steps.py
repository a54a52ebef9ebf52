"""Interpreted steps per reply: what the service's Python does for one webhook, counted, not timed.

`python -m bench.steps [--messages 1000]` starts the fake platform and `switchboard serve` (the
bench's one-state echo flow, SQLite), warms the service up with 300 webhooks, then counts, for the
next N webhooks and their replies, every bytecode instruction the service's event-loop thread runs
and every Python call it makes (`sys.settrace` with opcode events), by function. It prints the
totals per reply and the functions and modules that take the most.

Why: on a shared 2-core VM a wall-clock A/B of one change moves ±15 % between identical runs,
while the service's CPU is ~80 % the interpreter's; the count moves ~1 % between runs (batches of
the group commit differ a little) and says where a reply's steps go. It does not see C (SQLite,
orjson, the kernel), nor the store's writer thread. The tracer slows the service ~20 times, so
nothing here is a speed. Timing stays with `python -m bench`.

The service runs in this module's `--serve` mode: `switchboard serve` with SIGUSR1 (count from
now) and SIGUSR2 (stop counting, write the counts as JSON) handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from bench.procs import LOAD_CORE, OPENER, SERVER_CORE, BenchError, Proc, free_port, running
from bench.scenarios import PLATFORM, REPO, find_switchboard, write_service_files

WARMUP = 300
#: rough cost of a call, in instructions, for the ranking (a call's setup and teardown)
CALL_WEIGHT = 8


def serve(argv: list[str], out: Path) -> None:
    """`switchboard serve argv...`, counting the main thread's opcodes between SIGUSR1 and SIGUSR2."""
    opcodes: collections.Counter[CodeType] = collections.Counter()
    calls: collections.Counter[CodeType] = collections.Counter()

    def step(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            opcodes[frame.f_code] += 1
        return step

    def enter(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        calls[frame.f_code] += 1
        return step

    def start(*_: object) -> None:
        sys.settrace(enter)

    def stop(*_: object) -> None:
        sys.settrace(None)
        rows = [
            [code.co_filename, code.co_firstlineno, code.co_name, opcodes[code], calls[code]]
            for code in set(opcodes) | set(calls)
        ]
        out.write_text(json.dumps(rows))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from middleware.cli import main

    sys.argv = ["switchboard", *argv]
    main()


async def send(port: int, count: int, prefix: str, connections: int = 32) -> None:
    """`count` generic-platform webhooks over keep-alive connections, each answered before the next."""
    todo = iter(range(count))
    body = '{"message_id":"%s-%d","conversation_id":"c-%d","sender":{"id":"u-%d"},"type":"text","text":"hello"}'

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for n in todo:
            k = n % 100
            data = (body % (prefix, n, k, k)).encode()
            writer.write(
                b"POST /webhooks/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (PLATFORM.encode(), len(data), data)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"webhook answered {head[:40]!r}")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))


def replies(fake_base: str) -> int:
    with OPENER.open(f"{fake_base}/count", timeout=10) as resp:
        return int(json.loads(resp.read())["messages"])


def wait_replies(fake_base: str, count: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while replies(fake_base) < count:
        if time.monotonic() > deadline:
            raise BenchError(f"{count} replies did not arrive in {timeout:.0f}s")
        time.sleep(0.2)


def report(rows: list[list[Any]], messages: int, top: int) -> None:
    def where(filename: str) -> str:
        for marker in ("/site-packages/", "/lib/python3"):
            if marker in filename:
                return filename.split(marker, 1)[1]
        return filename.removeprefix(str(REPO) + "/")

    opcodes = sum(r[3] for r in rows)
    calls = sum(r[4] for r in rows)
    print(f"per reply: {opcodes / messages:.0f} opcodes, {calls / messages:.0f} Python calls ({messages} replies)")

    def cost(r: list[Any]) -> int:
        return int(r[3] + CALL_WEIGHT * r[4])

    print(f"\nfunctions (opcodes, calls per reply; ranked by opcodes + {CALL_WEIGHT} x calls):")
    for r in sorted(rows, key=cost, reverse=True)[:top]:
        print(f"{r[3] / messages:8.1f} {r[4] / messages:6.2f}  {where(r[0])}:{r[1]} {r[2]}")
    modules: collections.Counter[str] = collections.Counter()
    for r in rows:
        modules[where(r[0])] += cost(r)
    print("\nmodules (opcodes + calls weighted, per reply):")
    for name, total in modules.most_common(top):
        print(f"{total / messages:8.0f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000, help="webhooks counted (default 1000)")
    parser.add_argument("--top", type=int, default=30, help="functions and modules listed (default 30)")
    parser.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:  # the service's side: OUT, then switchboard's arguments
        serve(args.serve[1:], Path(args.serve[0]))
        return
    if find_switchboard() is None:
        raise SystemExit("no `switchboard` command: `make run` installs it")
    with tempfile.TemporaryDirectory(prefix="switchboard-steps-") as tmp:
        folder = Path(tmp)
        fake_port = free_port()
        fake_cmd = [sys.executable, "-m", "bench.fake_platform", "--port", str(fake_port)]
        fake = Proc.start("fake platform", fake_cmd, LOAD_CORE, folder / "fake.log", cwd=REPO)
        fake_base = f"http://127.0.0.1:{fake_port}"
        with running([fake]):
            fake.wait_http(f"{fake_base}/healthz")
            port = free_port()
            config = write_service_files(folder / "service", fake_base, f"sqlite:///{folder}/store.db")
            out = folder / "steps.json"
            cmd = [sys.executable, "-m", "bench.steps", "--serve", str(out), "serve", "--config", str(config)]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
            service = Proc.start("switchboard", cmd, SERVER_CORE, folder / "serve.log", cwd=REPO)
            with running([service]):
                service.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
                asyncio.run(send(port, WARMUP, "w"))
                wait_replies(fake_base, WARMUP)
                service.popen.send_signal(signal.SIGUSR1)
                time.sleep(0.2)
                asyncio.run(send(port, args.messages, "m"))
                wait_replies(fake_base, WARMUP + args.messages)
                service.popen.send_signal(signal.SIGUSR2)
                for _ in range(100):
                    if out.exists() and out.stat().st_size:
                        break
                    time.sleep(0.1)
                rows = json.loads(out.read_text())
    report(rows, args.messages, args.top)


if __name__ == "__main__":
    main()
