"""DICOMweb clients of the node (``dicomweb-client``): STOW-RS to destinations, WADO-RS from sources.

Credentials are read when a client is made, not when the configuration is
loaded, so a rotated token or password file takes effect without a restart,
and no secret sits in the node's configuration objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from medsegagent.node.config import WebEndpoint


class CredentialsError(RuntimeError):
    """A token or password the configuration points to cannot be read."""


def _secret(env: str | None, path: Path | None, what: str) -> str:
    """The secret in environment variable ``env`` or file ``path`` (surrounding whitespace removed)."""
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise CredentialsError(f"the {what} variable ${env} is not set")
        return value
    assert path is not None, "the configuration guarantees a variable or a file"
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise CredentialsError(f"cannot read the {what} from {path}: {exc.strerror}") from None
    if not value:
        raise CredentialsError(f"the {what} file {path} is empty")
    return value


def http_session(endpoint: WebEndpoint) -> requests.Session:
    """A ``requests`` session that authenticates and verifies TLS as ``endpoint`` says.

    Raises
    ------
    CredentialsError
        When the token or password cannot be read.
    """
    if endpoint.username:
        password = _secret(endpoint.password_env, endpoint.password_file, "password")
        session = create_session_from_user_pass(endpoint.username, password)
    else:
        session = create_session()
        if endpoint.token_env or endpoint.token_file:
            token = _secret(endpoint.token_env, endpoint.token_file, "token")
            session.headers["Authorization"] = f"Bearer {token}"
    session.verify = str(endpoint.ca_certificates) if endpoint.ca_certificates else endpoint.tls_verify
    return session


def web_client(endpoint: WebEndpoint) -> DICOMwebClient:
    """A ``DICOMwebClient`` for ``endpoint`` that makes one attempt per call.

    Retrying is the caller's: the outbox has its own back-off and give-up
    time, and a retrieve fails its job with a reason the administrator can act on.
    """
    client = DICOMwebClient(endpoint.url, session=http_session(endpoint), timeout=endpoint.timeout_s)
    client.set_http_retry_params(retry=False)
    return client
