"""Server settings for tests that start services in-process where security is not the subject.

Loopback, port 0 (a free port, reported by `start()`), authorisation off (AuthConfig.no_auth):
a policy or trainer service would otherwise refuse to start without credentials. The security
of the real services is tested in tests/test_service_security.py.
"""

from __future__ import annotations

from typing import Any

from rlhf.config.security import AuthConfig
from rlhf.config.server import ServerConfig
from rlhf.defaults import LOOPBACK

NO_AUTH_FLAG = "--no-auth"
"""What a test adds to `rlhf policy|trainer serve` for the same effect in a process."""


def open_config(**kwargs: Any) -> ServerConfig:
    """ServerConfig on 127.0.0.1 port 0 with authorisation off; `kwargs` set other fields."""
    return ServerConfig(**{"host": LOOPBACK, "port": 0, "auth": AuthConfig(no_auth=True), **kwargs})
