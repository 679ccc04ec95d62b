"""Registry logins: explicit credentials or `docker login`'s config file, and the token dance.

Registries such as ghcr.io answer 401 with `WWW-Authenticate: Bearer realm=..,service=..,scope=..`;
the client fetches a token from the realm (with basic credentials when it has them) and retries.
Credential helpers (`credsStore`) are not run: in CI, `docker/login-action` writes plain `auths`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import httpx

from aotlm.registry.errors import RegistryError

DEFAULT_DOCKER_CONFIG = Path("~/.docker/config.json")
_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def docker_credentials(host: str, config: Path | None = None) -> Credentials | None:
    """The `auths` entry for `host` in a docker config file, if there is one."""
    path = (config or DEFAULT_DOCKER_CONFIG).expanduser()
    if not path.is_file():
        return None
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except (ValueError, AttributeError) as e:
        raise RegistryError(f"{path}: not a valid docker config file ({e})") from e
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key) if isinstance(auths, dict) else None
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return Credentials(user, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


class RegistryAuth(httpx.Auth):
    """Answers Basic and Bearer challenges; remembers the last header that worked."""

    requires_response_body = True

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        self.header: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.header:
            request.headers["Authorization"] = self.header
        response = yield request
        if response.status_code != 401:
            return
        scheme, _, rest = response.headers.get("www-authenticate", "").partition(" ")
        params = dict(_PARAM.findall(rest))
        if scheme.lower() == "basic" and self.credentials:
            self.header = self.credentials.basic()
        elif scheme.lower() == "bearer" and "realm" in params:
            token_request = httpx.Request(
                "GET",
                params["realm"],
                params={k: v for k, v in params.items() if k in ("service", "scope")},
                headers={"Authorization": self.credentials.basic()} if self.credentials else {},
            )
            token_response = yield token_request
            if token_response.status_code != 200:
                return
            body = token_response.json()
            token = body.get("token") or body.get("access_token")
            if not isinstance(token, str):
                return
            self.header = f"Bearer {token}"
        else:
            return
        request.headers["Authorization"] = self.header
        yield request
