"""The serving endpoint's door: only gateways the coordinator admits get in.

Every request but ``/health`` must carry a serving token (``protocol/serving_tokens.py``) as
``Authorization: Bearer <token>``: signed by the coordinator this node joined, for this node,
and within its lifetime give or take ``skew_s``. Anything else is answered before the app sees
it, in OpenAI's error shape: 401 ``missing_serving_token``, ``invalid_serving_token`` or
``expired_serving_token``; 403 ``wrong_audience`` for a token made out to another node. A
client that reaches a node directly, skipping the gateway (and its keys, budgets and usage
records), is turned away here. The gateways get their tokens from the coordinator, with the
routes (``coordinator/gateways.py``, which also says how revocation is bounded).

Pure ASGI, checked before the body is read; a token that verified once is remembered (its
lifetime is still checked on every request), so the signature costs a gateway's token once per
rotation, not once per request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from protocol import serving_tokens
from protocol.errors import ExpiredError, Forbidden, ProtocolError
from protocol.peer_limits import RateLimit
from protocol.service.api_errors import APIError

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health"})
"""What answers without a token; everything else is closed (fail closed for new paths)."""
MAX_REMEMBERED = 1024


class ServingDoor:
    """ASGI middleware in front of a node's serving app."""

    def __init__(
        self,
        app: Any,
        coordinator_key: bytes,
        peer_id: str,
        skew_s: float = serving_tokens.DEFAULT_SKEW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app, self.coordinator_key, self.peer_id = app, coordinator_key, peer_id
        self.skew_s, self.clock = skew_s, clock
        self._verified: dict[str, serving_tokens.ServingToken] = {}
        self._log_limit = RateLimit(60.0)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            self.check(_bearer(scope))
        except APIError as e:
            client = (scope.get("client") or ("?", 0))[0]
            if self._log_limit.allow((client, e.code)):
                log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client,
                            e.message)  # fmt: skip
            return await _answer(send, e)
        await self.app(scope, receive, send)

    def check(self, presented: str) -> serving_tokens.ServingToken:
        """The token's fields if it opens this node now; else the ``APIError`` to answer."""
        if not presented:
            raise APIError(401, "this endpoint answers only gateways the coordinator admits: "
                           "send requests through a gateway", "missing_serving_token")  # fmt: skip
        now = self.clock()
        try:
            token = self._verified.get(presented)
            if token is None:
                token = serving_tokens.verify(
                    presented, self.coordinator_key, self.peer_id, now, self.skew_s
                )
                if len(self._verified) >= MAX_REMEMBERED:
                    self._verified.clear()
                self._verified[presented] = token
            elif not token.issued_at - self.skew_s <= now <= token.expires_at + self.skew_s:
                raise ExpiredError(f"the serving token expired {now - token.expires_at:.0f} s ago")
        except ExpiredError as e:
            self._verified.pop(presented, None)
            raise APIError(401, str(e), "expired_serving_token") from None
        except Forbidden as e:
            raise APIError(403, str(e), "wrong_audience") from None
        except ProtocolError as e:  # malformed, or not signed by our coordinator
            raise APIError(401, str(e), "invalid_serving_token") from None
        return token


def _bearer(scope: Any) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" else ""
    return ""


async def _answer(send: Any, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
