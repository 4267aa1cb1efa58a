"""Where the CLI's client commands find the gateway and their API token.

The gateway: `--url`, else `GATEWAY_URL`, else the default local address. The token:
`--token`, else `GATEWAY_TOKEN`, else the admin token file in the data dir (`--data-dir`,
`GATEWAY_DATA_DIR`), which is what `make run` leaves for a newcomer.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.config import DEFAULT_DATA_DIR
from gateway.keys import ADMIN_TOKEN_FILE

DEFAULT_URL = "http://127.0.0.1:8080"


class MissingToken(Exception):
    """No API token anywhere the CLI looks."""

    def __init__(self) -> None:
        super().__init__("no API token: pass --token or set GATEWAY_TOKEN")


def gateway_url(flag: str | None) -> str:
    return flag or os.environ.get("GATEWAY_URL") or DEFAULT_URL


def api_token(flag: str | None, data_dir: str | None) -> str:
    """The API token to send; MissingToken when there is none."""
    token = flag or os.environ.get("GATEWAY_TOKEN")
    if token:
        return token
    folder = Path(data_dir or os.environ.get("GATEWAY_DATA_DIR") or DEFAULT_DATA_DIR)
    path = folder / ADMIN_TOKEN_FILE
    if not path.exists():
        raise MissingToken
    return path.read_text().strip()
