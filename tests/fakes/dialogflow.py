"""A fake Dialogflow (ES v2 and CX v3 detectIntent) and a fake Google OAuth token endpoint.

Shapes, from Google's documentation (answers recorded in tests/data/dialogflow, see SOURCES.md):

- ES: `POST /v2/{session=projects/*/agent/sessions/*}:detectIntent` with `{"queryInput": {"text":
  {"text", "languageCode"}}, "queryParams": {"contexts", "payload", "timeZone"}}`, answering
  `{"responseId", "queryResult": {"queryText", "parameters", "fulfillmentText", "fulfillmentMessages",
  "outputContexts", "intent", "intentDetectionConfidence", "languageCode"}}`:
  https://cloud.google.com/dialogflow/es/docs/reference/rest/v2/projects.agent.sessions/detectIntent ,
  https://cloud.google.com/dialogflow/es/docs/reference/rest/v2/QueryResult .
- CX: `POST /v3/{session=projects/*/locations/*/agents/*/sessions/*}:detectIntent` with
  `{"queryInput": {"text": {"text"}, "languageCode"}, "queryParams": {"parameters"}}`, answering
  `{"responseId", "queryResult": {"text", "parameters", "responseMessages", "currentPage", "match"}}`:
  https://cloud.google.com/dialogflow/cx/docs/reference/rest/v3/projects.locations.agents.sessions/detectIntent .
  Session ids longer than 36 characters are refused with 400, as the API documents.
- Both answer 401 `UNAUTHENTICATED` without a bearer token this fake issued.
- OAuth, https://developers.google.com/identity/protocols/oauth2/service-account#httprest :
  `POST /token` with `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=JWT`; the JWT is
  RS256-signed by the service account's key, its header names the key (`kid`), its claims carry `iss`
  (the account's email), `scope`, `aud` (https://oauth2.googleapis.com/token), `iat` and `exp` (one
  hour later). The fake checks all of that, and the signature, before it issues a token.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.engines import FakeEngine

DATA = Path(__file__).resolve().parent.parent / "data" / "dialogflow"
AUDIENCE = "https://oauth2.googleapis.com/token"
ES_SESSION = re.compile(
    r"^projects/[^/]+(/locations/[^/]+)?/agent(/environments/[^/]+/users/[^/]+)?/sessions/([^/:]+)$"
)
CX_SESSION = re.compile(r"^projects/[^/]+/locations/[^/]+/agents/[^/]+(/environments/[^/]+)?/sessions/([^/:]+)$")


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class ServiceAccount:
    """A service account's key (generated per test run) and its JSON key file's content."""

    email: str = "switchboard-test@acme-support.iam.gserviceaccount.com"
    key_id: str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def info(self, token_uri: str) -> dict[str, str]:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {
            "type": "service_account",
            "project_id": "acme-support",
            "private_key_id": self.key_id,
            "private_key": pem,
            "client_email": self.email,
            "client_id": "104729384756102938475",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        }


@dataclass
class FakeDialogflow(FakeEngine):
    account: ServiceAccount = field(default_factory=ServiceAccount)
    expires_in: int = 3600
    tokens: list[str] = field(default_factory=list)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    #: statuses the token endpoint answers before it issues tokens again
    token_fail: deque[int] = field(default_factory=deque)
    #: tokens the API no longer accepts (revoked)
    revoked: set[str] = field(default_factory=set)
    #: text -> recorded answer file (ES or CX); default: the docs' example with this text
    answers: dict[str, str] = field(default_factory=dict)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/token", self._token, methods=["POST"]),
                Route("/v2/{session:path}", self._detect, methods=["POST"]),
                Route("/v3/{session:path}", self._detect, methods=["POST"]),
            ]
        )

    def _check_assertion(self, assertion: str) -> str | None:
        """Why the JWT is not a valid service-account grant assertion, or None."""
        parts = assertion.split(".")
        if len(parts) != 3:
            return "not a JWT"
        header, claims = json.loads(_b64(parts[0])), json.loads(_b64(parts[1]))
        if header.get("alg") != "RS256" or header.get("typ") != "JWT" or header.get("kid") != self.account.key_id:
            return f"bad header {header}"
        if claims.get("iss") != self.account.email or claims.get("aud") != AUDIENCE:
            return f"bad iss/aud {claims}"
        scopes = str(claims.get("scope", "")).split()
        if "https://www.googleapis.com/auth/dialogflow" not in scopes and not any(
            "cloud-platform" in s for s in scopes
        ):
            return f"no dialogflow scope in {scopes}"
        now = time.time()
        if not (now - 300 <= claims.get("iat", 0) <= now + 300) or claims.get("exp", 0) - claims.get("iat", 0) != 3600:
            return f"bad iat/exp {claims}"
        try:
            self.account.key.public_key().verify(
                _b64(parts[2]), f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return "bad signature"
        return None

    async def _token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        self.token_requests.append(form)
        if self.token_fail:
            status = self.token_fail.popleft()
            return JSONResponse({"error": "invalid_grant", "error_description": "scripted"}, status_code=status)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        problem = self._check_assertion(form.get("assertion", ""))
        if problem is not None:
            return JSONResponse({"error": "invalid_grant", "error_description": problem}, status_code=400)
        token = f"ya29.fake-{len(self.tokens) + 1}"
        self.tokens.append(token)
        answer = recorded("token_response.json")
        answer.update(access_token=token, expires_in=self.expires_in)
        return JSONResponse(answer)

    async def _detect(self, request: Request) -> Response:
        rec = await self.record(request)
        session = request.path_params["session"]
        cx = request.url.path.startswith("/v3/")
        match = (CX_SESSION if cx else ES_SESSION).match(session.removesuffix(":detectIntent"))
        if not session.endswith(":detectIntent") or match is None:
            return JSONResponse({"error": {"code": 404, "status": "NOT_FOUND"}}, status_code=404)
        if len(match.groups()[-1]) > 36:
            message = "Session id should be at most 36 characters long."
            return JSONResponse({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}, 400)
        token = rec.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.tokens or token in self.revoked:
            error = {
                "code": 401,
                "message": "Request had invalid authentication credentials.",
                "status": "UNAUTHENTICATED",
            }
            return JSONResponse({"error": error}, status_code=401)
        failed = await self.failure()
        if failed is not None:
            return failed
        text = rec.body["queryInput"]["text"]["text"]
        name = self.answers.get(text, "cx_detect_intent_text.json" if cx else "es_detect_intent_text.json")
        answer = copy.deepcopy(recorded(name))
        answer["queryResult"]["text" if cx else "queryText"] = text
        return JSONResponse(answer)
