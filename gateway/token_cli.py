"""`gateway token create NAME [--viewer]`, `gateway token list`, `gateway token revoke ID`.

Client commands of a running gateway (the admin token, as for `gateway job`). The new token is
printed once, on its own line, so a script can capture it: `TOKEN=$(gateway token create x)`.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `token` commands."""
    from gateway.cli import _client_options

    token = subparsers.add_parser("token", help="create, list and revoke API tokens")
    commands = token.add_subparsers(title="token commands")
    create = commands.add_parser(
        "create", help="create an API token (admin, or --viewer: read-only); prints it once"
    )
    create.add_argument("name")
    create.add_argument(
        "--viewer", action="store_true", help="read-only: pages and reads, no writes"
    )
    create.set_defaults(run=_create)
    listing = commands.add_parser("list", help="list API tokens (never their values)")
    listing.set_defaults(run=_list)
    revoke = commands.add_parser("revoke", help="revoke a token: its sessions end too")
    revoke.add_argument("token_id")
    revoke.set_defaults(run=_revoke)
    for sub in (create, listing, revoke):
        _client_options(sub)


def _create(args: argparse.Namespace) -> int:
    from gateway.cli import _call

    scope = "viewer" if args.viewer else "admin"
    created = _call(args, "POST", "/api/v1/tokens", json={"name": args.name, "scope": scope})
    print(
        f"created {scope} token {created['name']} ({created['id']}); it is shown only now:",
        file=sys.stderr,
    )
    print(created["token"])
    return 0


def _list(args: argparse.Namespace) -> int:
    from gateway.cli import _call

    page = _call(args, "GET", "/api/v1/tokens", params={"limit": 500})
    for token in page["items"]:
        revoked = f"  revoked {token['revoked_at']}" if token["revoked_at"] else ""
        print(f"{token['id']}  {token['scope']:<6} {token['name']}{revoked}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from gateway.cli import _call

    _call(args, "DELETE", f"/api/v1/tokens/{args.token_id}")
    print(f"revoked {args.token_id}", file=sys.stderr)
    return 0
