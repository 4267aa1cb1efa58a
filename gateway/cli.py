"""The `gateway` command: `serve`, the `job` client and `continue` for external systems' scripts.

Client commands talk HTTP to a running gateway (`--url`, `GATEWAY_URL`) with an API token
(`--token`, `GATEWAY_TOKEN`, else the admin token file in the data dir).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx

from gateway import __version__, logs, runner
from gateway.api.common import Context
from gateway.client import DEFAULT_URL, MissingToken, api_token, gateway_url
from gateway.config import Settings
from gateway.errors import ConfigError, StoreError, TransferRefused

if TYPE_CHECKING:
    from gateway.app import StartupInfo

CLIENT_TIMEOUT_S = 30.0
CONTINUE_ATTEMPTS = 5
# Idle keep-alive connections stay open longer than clients' and load balancers' own idle
# limits (httpx 5 s, AWS ALB 60 s), so the server is never the one closing a connection a
# client is about to reuse (the client would see the request fail).
KEEP_ALIVE_S = 65
GC_YOUNG_THRESHOLD = 20_000  # allocations between two young-generation collections (default 700)


class CommandError(Exception):
    """A client command failed; the message is printed and the exit code is 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        result: int = args.run(args)
    except (CommandError, ConfigError, StoreError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run the gateway (API, sweeper)")
    serve.add_argument("--host", help="listen address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port, 0 for any (GATEWAY_PORT, 8080)")
    serve.add_argument("--data-dir", help="data directory (GATEWAY_DATA_DIR, ./gateway-data)")
    serve.add_argument("--db", help="sqlite:///path or postgresql://... (GATEWAY_DB)")
    serve.add_argument("--public-url", help="base of continue URLs (GATEWAY_PUBLIC_URL)")
    serve.add_argument("--sweep-interval-s", type=float, help="GATEWAY_SWEEP_INTERVAL_S")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="apply the database migrations, then exit")
    migrate.add_argument("--data-dir", help="data directory (GATEWAY_DATA_DIR, ./gateway-data)")
    migrate.add_argument("--db", help="sqlite:///path or postgresql://... (GATEWAY_DB)")
    migrate.set_defaults(run=_migrate)

    export = commands.add_parser("export", help="write the whole database to a file (stop first)")
    export.add_argument("file", help="JSON Lines file to write (- for stdout, .gz compresses)")
    import_ = commands.add_parser("import", help="load an export into a new, empty database")
    import_.add_argument("file", help="a `gateway export` file (- for stdin)")
    for sub, run in ((export, _export), (import_, _import)):
        sub.add_argument("--data-dir", help="data directory (GATEWAY_DATA_DIR, ./gateway-data)")
        sub.add_argument("--db", help="sqlite:///path or postgresql://... (GATEWAY_DB)")
        sub.set_defaults(run=run)

    job = commands.add_parser("job", help="create and inspect jobs").add_subparsers(title="job")
    create = job.add_parser("create", help="create a job; prints it (with continue_url)")
    create.add_argument("name")
    create.add_argument("--kind", choices=["external", "script"], default="external")
    create.add_argument("--script", action="append", help="a script line (repeatable)")
    create.add_argument("--async", dest="is_async", action="store_true")
    create.add_argument("--callback-timeout-s", type=int)
    create.add_argument("--heartbeat-timeout-s", type=int)
    create.add_argument("--timeout-s", type=int)
    create.add_argument("--var", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--continue-on-get", action="store_true")
    create.set_defaults(run=_job_create)
    get = job.add_parser("get", help="show a job")
    get.add_argument("job_id")
    get.set_defaults(run=_job_get)
    listing = job.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state")
    listing.add_argument("--pipeline-id")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=_job_list)
    cancel = job.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=_job_cancel)
    retry = job.add_parser("retry", help="retry a finished job (prints the new continue_url)")
    retry.add_argument("job_id")
    retry.set_defaults(run=_job_retry)
    for sub in (create, get, listing, cancel, retry):
        _client_options(sub)

    cont = commands.add_parser("continue", help="call a continue URL: finish the job")
    cont.add_argument("url")
    cont.add_argument("--failed", action="store_true", help="report failure")
    cont.add_argument("--exit-code", type=int)
    cont.add_argument("--message")
    cont.add_argument("--output", action="append", default=[], metavar="KEY=VALUE")
    cont.add_argument("--result", help="any JSON kept on the job")
    cont.add_argument("--idempotency-key", help="default: a fresh one, reused on retries")
    cont.set_defaults(run=_continue)
    runner.add_commands(commands)
    from gateway import pipeline_cli, token_cli

    pipeline_cli.add_commands(commands)
    token_cli.add_commands(commands)
    return parser


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"gateway address (GATEWAY_URL, {DEFAULT_URL})")
    parser.add_argument("--token", help="API token (GATEWAY_TOKEN, else the data dir's)")
    parser.add_argument("--data-dir", help="where to find the admin token (GATEWAY_DATA_DIR)")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    logs.configure(args.log_level)
    probe = Settings.from_env(host=args.host, port=args.port if args.port else None)
    sock = socket.socket(socket.AF_INET6 if ":" in probe.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = probe.port if args.port is None else args.port
    sock.bind((probe.host, port))
    settings = Settings.from_env(
        host=args.host,
        port=sock.getsockname()[1],
        data_dir=args.data_dir,
        db=args.db,
        public_url=args.public_url,
        sweep_interval_s=args.sweep_interval_s,
    )
    app = create_app(settings)
    if settings.host in ("0.0.0.0", "::") and not settings.public_url:
        logging.getLogger("gateway").warning(
            "listening on all interfaces without GATEWAY_PUBLIC_URL; continue URLs use localhost"
        )
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    # uvicorn re-raises the stop signal once it has shut down gracefully; a no-op handler lets
    # a clean stop exit 0 instead of dying by that signal.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: None)
    logging.getLogger("uvicorn.error").addFilter(_QuietRefusal(app))
    _settle_garbage_collector()
    try:
        _gateway_server(config, app, settings).run(sockets=[sock])
    except SystemExit:
        if app.state.refusal is None:
            raise
        print(f"gateway: {app.state.refusal}", file=sys.stderr, flush=True)
        return 1
    print("gateway stopped", flush=True)
    return 0


def _announce(settings: Settings, info: StartupInfo) -> None:
    """Where the gateway listens and how to authenticate, once it is ready."""
    print(f"gateway {__version__} listening on http://{settings.host}:{settings.port}", flush=True)
    print(f"continue URLs start with {settings.base_url}/continue/", flush=True)
    print(f"dashboard at {settings.base_url}/ (sign in with an API token)", flush=True)
    if info.admin_token_path is None:
        print("admin token: GATEWAY_ADMIN_TOKEN", flush=True)
        return
    created = " (new)" if info.admin_token_created else ""
    print(
        f"admin token{created} in {info.admin_token_path}: send it as"
        f" 'Authorization: Bearer <token>'",
        flush=True,
    )
    if settings.postgres_dsn is not None:
        logging.getLogger("gateway").warning(
            "the admin token was generated into the data dir; replicas on one database take"
            " the admin token over from each other: set the same GATEWAY_ADMIN_TOKEN on every"
            " replica (docs/operations.md)"
        )


class _QuietRefusal(logging.Filter):
    """Drops uvicorn's error lines (a traceback, "Application startup failed") once the
    gateway refused to start (another secret key, a newer schema): `_serve` says why in one
    line instead. Nothing is added to the path of a request."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self._app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return self._app.state.refusal is None


def _settle_garbage_collector() -> None:
    """Move what start-up allocated (modules, the app) out of the collector's sight and collect
    the young generation less often: each request allocates thousands of short-lived objects,
    and the default threshold (700) makes the collector run every few requests, which shows as
    latency tails under load (bench/callbacks.py: p99 at 50 clients 35-40 ms -> 15-24 ms)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def _migrate(args: argparse.Namespace) -> int:
    """Open the store (which migrates it, or refuses a schema newer than this code) and close."""
    from gateway.store import open_store

    settings = Settings.from_env(data_dir=args.data_dir, db=args.db)

    async def run() -> None:
        store = open_store(settings)
        await store.open()
        await store.close()

    asyncio.run(run())
    print("the database schema is up to date", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    """`gateway export FILE`; a refusal exits 2 (see gateway/transfer.py)."""
    from gateway import transfer

    settings = Settings.from_env(data_dir=args.data_dir, db=args.db)
    try:
        summary = transfer.export_file(settings, args.file)
    except TransferRefused as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    where = sys.stderr if args.file == transfer.STDIO else sys.stdout
    print(
        f"exported {summary.total} rows of {summary.store} schema version"
        f" {summary.schema_version} to {args.file}",
        file=where,
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    """`gateway import FILE`; a refusal exits 2 and changes nothing."""
    from gateway import transfer

    settings = Settings.from_env(data_dir=args.data_dir, db=args.db)
    try:
        summary = transfer.import_file(settings, args.file)
    except TransferRefused as exc:
        print(f"gateway: {exc}; nothing was imported", file=sys.stderr)
        return 2
    print(
        f"imported {summary.total} rows (schema version {summary.schema_version}) into"
        f" {summary.store}; start it with the GATEWAY_SECRET_KEY of the exported gateway",
        flush=True,
    )
    return 0


def _gateway_server(config: Any, app: Any, settings: Settings) -> Any:
    """A uvicorn server that says where it listens once it is ready, and releases long polls
    and ends event streams the moment a stop is asked for: the graceful shutdown waits for
    open requests, and those would hold it."""
    import uvicorn

    ctx: Context = app.state.ctx

    class GatewayServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            self._gateway_loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            if self.started:
                _announce(settings, app.state.startup)

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = getattr(self, "_gateway_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(ctx.close)
            super().handle_exit(sig, frame)

    return GatewayServer(config)


def _client(args: argparse.Namespace) -> httpx.Client:
    try:
        token = api_token(args.token, args.data_dir)
    except MissingToken as exc:
        raise CommandError(str(exc)) from None
    return httpx.Client(
        base_url=gateway_url(args.url),
        headers={"Authorization": f"Bearer {token}"},
        timeout=CLIENT_TIMEOUT_S,
    )


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    with _client(args) as client:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CommandError(f"cannot reach the gateway: {exc}") from None
    return _answer(response)


def _answer(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = {"error": "http_error", "detail": response.text[:200]}
    if response.is_error:
        raise CommandError(f"{response.status_code} {body.get('error')}: {body.get('detail')}")
    return body


def _print(body: Any) -> int:
    print(json.dumps(body, indent=2))
    return 0


def _pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"{what} must be KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _job_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "kind": args.kind}
    optional = {
        "script": args.script,
        "callback_timeout_s": args.callback_timeout_s,
        "heartbeat_timeout_s": args.heartbeat_timeout_s,
        "timeout_s": args.timeout_s,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.is_async:
        body["async"] = True
    if args.continue_on_get:
        body["continue_on_get"] = True
    if args.var:
        body["variables"] = _pairs(args.var, "--var")
    return _print(_call(args, "POST", "/api/v1/jobs", json=body))


def _job_get(args: argparse.Namespace) -> int:
    return _print(_call(args, "GET", f"/api/v1/jobs/{args.job_id}"))


def _job_list(args: argparse.Namespace) -> int:
    params = {"limit": args.limit, "state": args.state, "pipeline_id": args.pipeline_id}
    page = _call(args, "GET", "/api/v1/jobs", params={k: v for k, v in params.items() if v})
    for job in page["items"]:
        print(f"{job['id']}  {job['state']:<9} {job['name']}")
    return 0


def _job_cancel(args: argparse.Namespace) -> int:
    return _print(_call(args, "POST", f"/api/v1/jobs/{args.job_id}/cancel"))


def _job_retry(args: argparse.Namespace) -> int:
    return _print(_call(args, "POST", f"/api/v1/jobs/{args.job_id}/retry"))


def _continue(args: argparse.Namespace) -> int:
    """POST the terminal call, retrying transport errors with the same Idempotency-Key so a lost
    reply is answered by the gateway's replay, never a second transition."""
    body: dict[str, Any] = {}
    if args.failed:
        body["status"] = "failed"
    if args.exit_code is not None:
        body["exit_code"] = args.exit_code
    if args.message is not None:
        body["message"] = args.message
    if args.output:
        body["outputs"] = _pairs(args.output, "--output")
    if args.result is not None:
        try:
            body["result"] = json.loads(args.result)
        except ValueError:
            raise CommandError("--result must be JSON") from None
    # A malformed URL is no transient error: refuse it now rather than retry it for 25 s
    # (and never echo it: the URL holds the token).
    try:
        url = httpx.URL(args.url)
    except httpx.InvalidURL:
        url = httpx.URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise CommandError("the continue URL must be an http:// or https:// URL")
    key = args.idempotency_key or uuid.uuid4().hex
    last_error: Exception | None = None
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for attempt in range(CONTINUE_ATTEMPTS):
            try:
                response = client.post(url, json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError as exc:
                last_error = exc
                time.sleep(min(2.0**attempt, 10.0))
                continue
            return _print(_answer(response))
    raise CommandError(f"cannot reach the gateway: {last_error}")
