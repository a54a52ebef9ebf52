"""The `switchboard` command: serve, check, chat, test, graph, schema, agent, migrate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
from pathlib import Path

from middleware.yamlfile import ConfigError, Problem

DEFAULT_CONFIG = Path("config/switchboard.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description="Bot orchestration middleware.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the webhooks, APIs and flows of a config")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-json", action="store_true", help="one JSON object per log line")

    check = sub.add_parser("check", help="validate flows and configs; file:line:col: message per problem")
    check.add_argument("paths", nargs="*", type=Path)

    chat = sub.add_parser("chat", help="talk to a flow in the terminal")
    chat.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    chat.add_argument("--flows", type=Path, help="a flows folder or file instead of the config's")
    chat.add_argument("--flow", help="talk to this flow only")
    chat.add_argument("--no-trace", action="store_true", help="hide the per-turn trace")

    test = sub.add_parser("test", help="run conversation tests (*.test.yaml)")
    test.add_argument("paths", nargs="*", type=Path, default=[Path("flows")])
    test.add_argument("--flows", type=Path, help="the flows folder (default: each test file's folder)")

    graph = sub.add_parser("graph", help="a flow's states and transitions as Mermaid (or SVG with --svg)")
    graph.add_argument("flow", help="a flow name or a flow file")
    graph.add_argument("--flows", type=Path, default=Path("flows"))
    graph.add_argument("--svg", action="store_true", help="render SVG with Graphviz's dot")
    graph.add_argument("--dot", action="store_true", help="print Graphviz DOT")

    schema = sub.add_parser("schema", help="JSON Schema of flows and config, for editors")
    schema.add_argument("--out", type=Path, help="write flow.json and config.json into this folder")

    agent = sub.add_parser("agent", help="accounts of the built-in agent inbox (/inbox)")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    agent_add = agent_sub.add_parser("add", help="add an agent (asks for the password twice)")
    agent_add.add_argument("name")
    agent_add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    agent_add.add_argument("--replace", action="store_true", help="set a new password if the agent exists")
    agent_add.add_argument(
        "--skills",
        help="comma-separated skills (languages, topics), e.g. id,en: the agent takes queues asking for one of them",
    )
    agent_list = agent_sub.add_parser("list", help="list the agents")
    agent_remove = agent_sub.add_parser("remove", help="remove an agent and end its sessions")
    agent_remove.add_argument("name")
    for p in (agent_add, agent_list, agent_remove):
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)

    migrate = sub.add_parser(
        "migrate",
        help="upgrade the store's schema to this version's (once per cluster, before rolling the nodes)",
        description="Upgrade (or with --to an older revision, downgrade) the configured store's schema. "
        "--check exits 0 when the database is at this version's head, 1 when it is behind (or empty), "
        "2 when it is at a revision this version does not know or cannot be read.",
    )
    migrate.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    migrate.add_argument("--to", default="head", metavar="REV", help="a revision, head (default) or base")
    migrate_mode = migrate.add_mutually_exclusive_group()
    migrate_mode.add_argument("--check", action="store_true", help="change nothing: say where the database is")
    migrate_mode.add_argument("--history", action="store_true", help="list this version's revisions")
    migrate_mode.add_argument(
        "--sql", action="store_true", help="print the SQL from --from (default: nothing) to --to; no connection"
    )
    migrate_mode.add_argument("--new", metavar="MESSAGE", help="contributors: autogenerate a new migration script")
    migrate.add_argument("--from", dest="start", metavar="REV", help="with --sql: the revision the database is at")

    args = parser.parse_args(argv)
    if args.command == "migrate":
        return _migrate(args)
    if args.command == "agent":
        return asyncio.run(_agent(args))
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args.paths)
    if args.command == "test":
        return asyncio.run(_test(args.paths, args.flows))
    if args.command == "graph":
        return _graph(args)
    if args.command == "schema":
        from middleware.schema import schema_document

        document = schema_document()
        if args.out is None:
            print(json.dumps(document, indent=2))
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        for name, part in document.items():
            (args.out / f"{name}.json").write_text(json.dumps(part, indent=2) + "\n")
        print(f"wrote {', '.join(f'{n}.json' for n in document)} to {args.out}", file=sys.stderr)
        return 0
    return asyncio.run(_chat(args))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from middleware import logs, runtime
    from middleware.app import create_app
    from middleware.server_protocol import OneWriteHttpToolsProtocol
    from middleware.settings import load_settings
    from middleware.shutdown import CONNECTIONS_SECONDS, GracefulServer

    logs.configure(args.log_level, args.log_json)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    server = settings.server.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    settings = settings.model_copy(update={"server": server})
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    runtime.tune()
    # Bind before the lifespan starts: a second `serve` on a port in use must not start working
    # (claiming leases as this node) before it finds out it cannot listen.
    try:
        sock = socket.create_server((server.host, server.port), reuse_port=False)
    except OSError as exc:
        print(f"cannot listen on {server.host}:{server.port}: {exc.strerror}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http=OneWriteHttpToolsProtocol,
        timeout_graceful_shutdown=CONNECTIONS_SECONDS,
    )
    # SIGTERM drains first (503s, turns finished or handed to other nodes): middleware/shutdown.py
    host, port = sock.getsockname()[:2]
    logging.getLogger("switchboard").info("running on http://%s:%d (Ctrl-C to stop)", host, port)
    # uvicorn re-raises the Ctrl-C it handled once it has shut down (`uvicorn.run` swallows it too)
    with contextlib.suppress(KeyboardInterrupt):
        GracefulServer(config, app).run(sockets=[sock])
    return 0


def _check(paths: list[Path]) -> int:
    from middleware.engine.loader import Known, check_flows, flow_files
    from middleware.settings import literal_secrets, settings_from_doc
    from middleware.yamlfile import load_yaml

    targets = paths or [DEFAULT_CONFIG]
    problems: list[Problem] = []
    #: reported, but not failing the check: secrets written in a config instead of ${ENV}
    warnings: list[Problem] = []
    checked = 0
    for path in targets:
        if not path.exists():
            problems.append(Problem(str(path), 1, 1, "no such file or folder"))
            continue
        if path.is_file() and _is_config(path):
            try:
                doc = load_yaml(path)
                warnings += literal_secrets(doc)
                settings = settings_from_doc(doc, warn=False)
            except ConfigError as exc:
                problems += exc.problems
                continue
            known = Known(connectors=frozenset(settings.connectors), queues=frozenset(settings.handoff.queues))
            problems += check_flows(settings.flows, known)
            checked += 1 + len(flow_files(settings.flows))
        else:
            problems += check_flows(path)
            checked += len(flow_files(path)) if path.is_dir() else 1
    for p in sorted(set(problems)):
        print(p)
    for w in sorted(set(warnings)):
        print(f"{w.file}:{w.line}:{w.col}: warning: {w.message}")
    also = f", {len(set(warnings))} warning(s)" if warnings else ""
    if problems:
        print(f"{len(set(problems))} problem(s){also}", file=sys.stderr)
        return 1
    print(f"ok: {checked} file(s) checked{also}", file=sys.stderr)
    return 0


def _is_config(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # unreadable, not UTF-8, not YAML, a bad tag: checked as a flow, which reports where
        return False
    return isinstance(data, dict) and "flow" not in data and ("platforms" in data or "store" in data)


def _graph(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from middleware.engine import load_flows
    from middleware.engine.graph import dot, mermaid

    source = Path(args.flow)
    root = source if source.suffix in (".yaml", ".yml") and source.exists() else args.flows
    try:
        flows = load_flows(root)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    name = next(iter(flows)) if root == source else args.flow
    if name not in flows:
        print(f"no flow named {name!r}; loaded: {', '.join(sorted(flows))}", file=sys.stderr)
        return 1
    flow = flows[name]
    if not args.svg:
        print(dot(flow) if args.dot else mermaid(flow), end="")
        return 0
    if shutil.which("dot") is None:
        print("--svg needs Graphviz's `dot` (Debian: apt-get install graphviz)", file=sys.stderr)
        return 1
    svg = subprocess.run(["dot", "-Tsvg"], input=dot(flow), capture_output=True, text=True, check=False)
    if svg.returncode != 0:
        print(svg.stderr, file=sys.stderr)
        return 1
    print(svg.stdout, end="")
    return 0


async def _test(paths: list[Path], flows: Path | None) -> int:
    from middleware import logs
    from middleware.conversation_tests import run_files, test_files

    logs.configure("error")
    files = test_files(paths)
    if not files:
        print(f"no conversation tests (*.test.yaml) under {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    outcome = await run_files(files, flows)
    for problem in outcome.problems:
        print(problem)
    for failure in outcome.failures:
        print(f"FAIL {failure.where}: {failure.title}")
        for line in failure.lines:
            print(f"    {line}")
    failed = len(outcome.failures) + len(outcome.problems)
    print(
        f"{outcome.passed} passed, {len(outcome.failures)} failed"
        + (f", {len(outcome.problems)} problems" if outcome.problems else "")
    )
    return 1 if failed else 0


async def _agent(args: argparse.Namespace) -> int:
    import getpass

    from middleware.agents import AccountError, add_agent, check_name, check_password, parse_skills
    from middleware.migrate import SchemaError
    from middleware.settings import load_settings
    from middleware.store import Store, StoreUnavailable

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    password = ""
    skills: tuple[str, ...] | None = None
    if args.agent_command == "add":
        try:
            check_name(args.name)
            if args.skills is not None:
                skills = parse_skills(args.skills)
            if args.password_stdin:
                password = (await asyncio.to_thread(sys.stdin.readline)).rstrip("\r\n")
            else:
                password = await asyncio.to_thread(getpass.getpass, f"password for {args.name}: ")
                again = await asyncio.to_thread(getpass.getpass, "again: ")
                if again != password:
                    print("the passwords differ", file=sys.stderr)
                    return 1
            check_password(password)
        except AccountError as exc:
            print(exc, file=sys.stderr)
            return 1
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 1
    store = Store(settings.store.url, batch_max=settings.store.batch_max, gather=settings.store.commit_gather_ms / 1000)
    try:
        await store.start(migrate=settings.store.migrate)
        if args.agent_command == "add":
            if not await add_agent(store, args.name, password, replace=args.replace, skills=skills):
                print(f"agent {args.name!r} exists; --replace sets a new password", file=sys.stderr)
                return 1
            print(f"agent {args.name!r} {'updated' if args.replace else 'added'}", file=sys.stderr)
        elif args.agent_command == "list":
            for row in await store.agents():
                print(row["name"] + (f"\tskills: {','.join(row['skills'])}" if row["skills"] else ""))
        elif not await store.remove_agent(args.name):
            print(f"no agent {args.name!r}", file=sys.stderr)
            return 1
        else:
            print(f"agent {args.name!r} removed", file=sys.stderr)
    except StoreUnavailable as exc:
        print(f"store unavailable: {exc}", file=sys.stderr)
        return 1
    except SchemaError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from middleware import migrate
    from middleware.settings import load_settings

    if args.history:
        head = migrate.head()
        for rev, doc in migrate.history():
            print(f"{rev}  {doc.splitlines()[0] if doc else ''}{'  (head)' if rev == head else ''}")
        return 0
    if args.new:
        print(f"wrote {migrate.new_revision(args.new)}: review it, then test it on both databases", file=sys.stderr)
        return 0
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2 if args.check else 1
    url = settings.store.url
    try:
        if args.sql:
            print(migrate.offline_sql(url, args.to, args.start), end="")
            return 0
        if args.check:
            if migrate.sqlite_missing(url):
                print(f"database is empty (no file yet), this version needs revision {migrate.head()}")
                return 1
            with migrate.transaction(url) as conn:
                state = migrate.state(conn)
            print(state.describe() + ("" if state.current or state.newer else ": run `switchboard migrate`"))
            return 0 if state.current else 2 if state.newer else 1
        with migrate.transaction(url) as conn:
            before, after = migrate.upgrade(conn, args.to)
    except migrate.SchemaError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"store unavailable: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
        return 2
    stamped = "" if before.versioned or before.revision is None else f" (recognised as {before.revision}, stamped)"
    order = [rev for rev, _ in migrate.history()]

    def position(rev: str | None) -> int:
        return -1 if rev is None else order.index(rev)

    if before.revision == after.revision:
        print(f"database already at revision {after.revision or 'nothing'}{stamped}")
    else:
        way = "downgraded" if position(after.revision) < position(before.revision) else "upgraded"
        print(f"database {way} from {before.revision or 'nothing'} to {after.revision or 'nothing'}{stamped}")
    return 0


async def _chat(args: argparse.Namespace) -> int:
    from middleware.chat import run_chat

    return await run_chat(args.config, args.flows, flow=args.flow, trace=not args.no_trace)


if __name__ == "__main__":
    sys.exit(main())
