"""Fixtures of the fault tests (`make test-faults`; every test here is marked `faults`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from tests.conftest import Server
from tests.fakes.platform import FakePlatform
from tests.faults.cluster import Node, PrivatePostgres


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the fault tests' own (the machine's cluster on 5432 is left alone)."""
    # not under pytest's temporary folder: that one is private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="switchboard-faults-pg-"))
    pg = PrivatePostgres(root)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        if pg.running():
            pg.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg(private_pg: PrivatePostgres) -> PrivatePostgres:
    """The private server, running (a test that stopped it may have failed before starting it)."""
    if not private_pg.running():
        private_pg.start()
    return private_pg


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    """Nodes a test made; whatever runs of them is killed at teardown."""
    made: list[Node] = []
    yield made
    for node in made:
        node.close()


@pytest.fixture
async def platform() -> AsyncIterator[tuple[Server, FakePlatform]]:
    fake = FakePlatform()
    async with Server(fake.app()) as server:
        yield server, fake


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A client for the load: httpx's API over aiohttp's pool (httpx's own pool is slow under load)."""
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=30) as client:
        yield client
