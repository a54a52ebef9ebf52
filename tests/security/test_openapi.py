"""schemathesis against the admin API's own document, /api/v1/openapi.json, in process (ASGI, with the
app's lifespan): valid and invalid requests generated from the document; no 500, every status and
header as documented, invalid input refused, no operation answering without the bearer token.
Bounded: a fixed number of examples per operation, derandomized (HYPOTHESIS_PROFILE=explore: more)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis import GenerationMode
from schemathesis.python import asgi
from starlette.applications import Starlette

from middleware.app import create_app
from middleware.settings import settings_from_text
from middleware.web.api import OPENAPI
from tests.security import strategies  # noqa: F401  (the repeatable hypothesis profile)

TOKEN = "admin-token-for-schemathesis"
EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "ignored_auth",
    "unsupported_method",
]

FLOW = """\
flow: echo
states:
  start:
    routes:
      - do: [{reply: "echo {{ message.text }}"}]
"""


def build_app(folder: Path) -> Starlette:
    (folder / "flows").mkdir()
    (folder / "flows" / "echo.yaml").write_text(FLOW)
    config = f"""\
        store:
          url: "sqlite:///{folder}/sb.db"
        flows: {folder / "flows"}
        reload: false
        admin:
          token: {TOKEN}
        handoff:
          queues:
            tier1: {{}}
        platforms:
          myapp:
            type: generic
            post_message_url: http://127.0.0.1:9/messages
        outbox:
          max_attempts: 1
    """
    return create_app(settings_from_text(textwrap.dedent(config), "<openapi test>"))


# Built at import (nothing opens before its lifespan starts, on the first call) so that every operation
# schemathesis makes from the document is bound to it: calls go in process through the ASGI transport.
FOLDER = Path(tempfile.mkdtemp(prefix="sb-openapi-"))
APP = build_app(FOLDER)
#: the document as the code holds it; `test_the_served_document_is_the_one_tested` ties it to what is served
schema = schemathesis.openapi.from_dict(OPENAPI)
schema.app = APP
# the token as configuration, so that schemathesis knows the calls are authenticated (and `ignored_auth`
# can try them without it)
schema.config.update(base_url="http://testserver", headers={"Authorization": f"Bearer {TOKEN}"})
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def admin_client() -> Iterator[Any]:
    with asgi.get_client(APP) as client:
        # a conversation the document's examples name (`myapp:c-1`), so some calls find one
        body = {"message_id": "m-1", "conversation_id": "c-1", "sender": {"id": "u-1"}, "text": "hi"}
        assert client.post("/webhooks/myapp", json=body).status_code == 200
        yield client
    asgi.shutdown_lifespans()
    shutil.rmtree(FOLDER, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=300 if EXPLORE else 25)
def test_admin_api_matches_its_document(case: Any, admin_client: Any) -> None:
    case.call_and_validate(checks=_checks())


def _checks() -> list[Any]:
    from schemathesis.checks import CHECKS as REGISTRY

    return list(REGISTRY.get_by_names(CHECKS))


def test_the_served_document_is_the_one_tested(admin_client: Any) -> None:
    response = admin_client.get("/api/v1/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(json.dumps(OPENAPI))
    assert OPENAPI["openapi"].startswith("3.1")
