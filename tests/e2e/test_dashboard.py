"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a real
`gateway serve`. Sign-in, live updates from the event stream, retry, redelivery, the Parked
countdown, the viewer scope and CSRF.

Screenshots go to $GATEWAY_SCREENSHOT_DIR (a temporary directory by default); with
GATEWAY_UPDATE_SCREENSHOTS=1 the 1280 px ones are also copied into docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.conftest import ServerProcess, start_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
WAIT_S = 10.0

expect.set_options(timeout=10_000)


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request and answers 200."""

    server: ThreadingHTTPServer
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def webhook_ids(self) -> list[str]:
        with self.lock:
            return [r["webhook-id"] for r in self.received]


def _receiver() -> Receiver:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            receiver = holder["receiver"]
            with receiver.lock:
                receiver.received.append(
                    {"webhook-id": self.headers.get("webhook-id", ""), "body": body}
                )
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["receiver"] = receiver = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver


def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` until it holds, failing after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling with a deadline, not synchronisation by sleep


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hook = _receiver()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the module (webhooks may reach loopback); tests make their own
    jobs and pipelines."""
    started = start_server(
        tmp_path_factory.mktemp("dashboard") / "data",
        env={"GATEWAY_WEBHOOK_ALLOW_NETS": "127.0.0.0/8"},
    )
    yield started
    started.proc.kill()
    started.proc.wait(timeout=10)
    if started.proc.stdout:
        started.proc.stdout.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless. Missing: skip, except under CI=true where it fails."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Page, str], None]:
    """Save a screenshot of the page under a name (and into docs/ when asked to)."""
    folder = Path(os.environ.get("GATEWAY_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    update_docs = os.environ.get("GATEWAY_UPDATE_SCREENSHOTS") == "1"

    def shoot(page: Page, name: str) -> None:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True, animations="disabled")
        if update_docs:
            DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, DOCS_SCREENSHOTS / path.name)

    return shoot


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def new_context(browser: Browser, server: ServerProcess, **options: Any) -> BrowserContext:
    options.setdefault("viewport", DESKTOP)
    context = browser.new_context(base_url=server.url, **options)
    context.set_default_timeout(10_000)
    return context


def sign_in(page: Page, token: str, path: str = "/") -> None:
    """Open `path`, get sent to the sign-in form, sign in, and land back on `path`."""
    page.goto(path)
    page.wait_for_url("**/login?next=*")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)


@pytest.fixture
def admin_page(browser: Browser, server: ServerProcess) -> Iterator[Page]:
    context = new_context(browser, server)
    page = context.new_page()
    sign_in(page, server.token)
    yield page
    context.close()


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code in (200, 201, 202), response.text
    body: dict[str, Any] = response.json()
    return body


def test_sign_in_refuses_wrong_and_runner_tokens_then_returns_to_the_page(
    browser: Browser, server: ServerProcess, api: httpx.Client
) -> None:
    """A signed-out page redirects to /login; a wrong token and a runner token are refused
    with a message; an API token signs in and lands on the page asked for."""
    runner_token = created(api.post("/api/v1/runners", json={"description": "r"}))["token"]
    context = new_context(browser, server)
    page = context.new_page()
    page.goto("/parked")
    expect(page).to_have_url(f"{server.url}/login?next=%2Fparked")
    page.fill("input[name=token]", "gw_not-a-token")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("not a valid API token")
    page.fill("input[name=token]", runner_token)
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("Runner tokens cannot sign in")
    page.fill("input[name=token]", server.token)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server.url}/parked")
    expect(page.get_by_role("heading", name="Parked")).to_be_visible()
    cookie = next(c for c in context.cookies() if c["name"] == "gateway_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{server.url}/login")
    page.goto("/jobs")
    expect(page).to_have_url(f"{server.url}/login?next=%2Fjobs")
    context.close()


def test_a_pipeline_goes_running_waiting_success_live(
    admin_page: Page,
    api: httpx.Client,
    server: ServerProcess,
    receiver: Receiver,
    browser: Browser,
    shots: Callable[[Page, str], None],
) -> None:
    """The pipeline page follows an async job through running and waiting, and turns it green
    when its callback arrives, all without a reload."""
    pipeline = created(
        api.post(
            "/api/v1/pipelines",
            json={
                "name": "provision-rack-42",
                "state_webhook_url": receiver.url,
                "jobs": {
                    "build": {"script": ["make image"]},
                    "provision": {"script": ["./provision.sh"], "async": True, "needs": ["build"]},
                    "smoke-test": {"script": ["./smoke.sh"], "needs": ["provision"]},
                    "approve": {"kind": "external", "needs": ["provision"]},
                    "announce": {"kind": "external", "needs": ["smoke-test", "approve"]},
                },
            },
        )
    )
    urls = {job["name"]: job.get("continue_url") for job in pipeline["jobs"]}
    runner = created(api.post("/api/v1/runners", json={"description": "rack runner"}))
    page = admin_page
    page.goto(f"/pipelines/{pipeline['id']}")
    page.evaluate("window.__notReloaded = true")
    state = page.locator("#pipeline-state .badge")
    expect(state).to_have_attribute("data-state", "pending")
    expect(page.locator("#live-indicator")).to_have_attribute("data-live", "open")

    def card(name: str) -> Any:
        return page.locator(f"article.jobcard[data-job='{name}']")

    def run(name: str, *, succeed: bool = True) -> dict[str, Any]:
        handout = created(
            httpx.post(
                f"{server.url}/api/v1/runner/jobs/request",
                json={"wait_s": 5},
                headers={"Authorization": f"Bearer {runner['token']}"},
            )
        )
        assert handout["name"] == name
        job_url = f"{server.url}/api/v1/runner/jobs/{handout['id']}"
        headers = {"Job-Token": handout["token"]}
        created(httpx.put(job_url, json={"state": "running"}, headers=headers))
        expect(card(name)).to_have_attribute("data-state", "running")
        expect(state).to_have_attribute("data-state", "running")
        log = f"$ {handout['script'][0]}\nstep 1/2 done\nstep 2/2 done\n".encode()
        created(
            httpx.patch(
                f"{job_url}/trace",
                content=log,
                headers={**headers, "Content-Range": f"0-{len(log) - 1}"},
            )
        )
        created(httpx.put(job_url, json={"state": "success", "exit_code": 0}, headers=headers))
        return handout

    run("build")
    expect(card("build")).to_have_attribute("data-state", "success")
    provision = run("provision")
    expect(card("provision")).to_have_attribute("data-state", "waiting")
    expect(state).to_have_attribute("data-state", "waiting")
    expect(card("provision").locator("[data-deadline]")).to_be_visible()
    expect(page.locator(".hint")).to_contain_text("parked")

    continue_url = next(
        v["value"] for v in provision["variables"] if v["key"] == "CI_JOB_CONTINUE_URL"
    )
    inventory = b'{"rack": 42, "nodes": ["n01", "n02", "n03"]}\n'
    created(
        httpx.put(
            f"{continue_url}/artifacts/inventory.json",
            content=inventory,
            headers={"Content-Type": "application/json"},
        )
    )
    created(
        httpx.post(
            continue_url,
            json={
                "outputs": {"RACK_IP": "10.20.0.42"},
                "result": {"rack": 42, "nodes": 16, "firmware": "2.14.1"},
                "message": "16 nodes provisioned",
            },
        )
    )
    expect(card("provision")).to_have_attribute("data-state", "success")
    color = card("provision").locator(".badge").evaluate("el => getComputedStyle(el).color")
    assert color == "rgb(26, 127, 55)"  # the success green, not the waiting amber
    expect(card("approve")).to_have_attribute("data-state", "pending")
    run("smoke-test")
    expect(card("smoke-test")).to_have_attribute("data-state", "success")
    expect(state).to_have_attribute("data-state", "waiting")
    shots(page, "pipeline")
    dark = new_context(browser, server, color_scheme="dark")
    dark_page = dark.new_page()
    sign_in(dark_page, server.token, f"/pipelines/{pipeline['id']}")
    expect(dark_page.locator("#pipeline-state .badge")).to_have_attribute("data-state", "waiting")
    shots(dark_page, "pipeline-dark")
    dark.close()
    created(httpx.post(urls["approve"] or "", json={}))
    created(httpx.post(urls["announce"] or "", json={}))
    expect(state).to_have_attribute("data-state", "success")
    for name in ("build", "provision", "smoke-test", "approve", "announce"):
        expect(card(name)).to_have_attribute("data-state", "success")
    assert page.evaluate("window.__notReloaded") is True

    page.goto(f"/jobs/{provision['id']}")
    expect(page.locator("#trace")).to_contain_text("step 2/2 done")
    expect(page.locator("table.kv")).to_contain_text("10.20.0.42")
    expect(page.locator("pre.json")).to_contain_text('"firmware": "2.14.1"')
    download = page.get_by_role("link", name="inventory.json")
    expect(download).to_have_attribute(
        "href", f"/api/v1/jobs/{provision['id']}/artifacts/inventory.json"
    )
    fetched = page.request.get(download.get_attribute("href") or "")
    assert fetched.body() == inventory
    expect(page.locator("ol.timeline li[data-state='waiting']")).to_have_count(1)
    expect(page.locator("ol.timeline li[data-state='success']")).to_have_count(1)
    expect(page.locator("tr[data-delivery-state='pending']")).to_have_count(0)
    expect(page.locator("tr[data-delivery-state='succeeded']").first).to_be_visible()
    shots(page, "job")
    page.goto("/")
    expect(page.locator(f"tr[data-pipeline-id='{pipeline['id']}'] .badge")).to_have_attribute(
        "data-state", "success"
    )
    shots(page, "pipelines")


def test_retry_a_failed_job_from_its_page(admin_page: Page, api: httpx.Client) -> None:
    """A failed external job shows Retry (not Cancel); Retry shows the new attempt's continue
    URL once, and that URL is live."""
    job = created(api.post("/api/v1/jobs", json={"name": "hpc-batch"}))
    failed = httpx.post(
        job["continue_url"], json={"status": "failed", "message": "node lost", "exit_code": 3}
    )
    assert failed.json()["state"] == "failed"
    page = admin_page
    page.goto(f"/jobs/{job['id']}")
    expect(page.locator("#job-state .badge")).to_have_attribute("data-state", "failed")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    page.get_by_role("button", name="Retry").click()
    url = page.locator("#notices code.continue-url")
    expect(url).to_contain_text("/continue/")
    new_url = url.inner_text()
    expect(page.get_by_role("button", name="Retry")).to_have_count(0)
    expect(page.locator(".hint")).to_contain_text("retried")
    page.locator("#notices").get_by_role("link", name="attempt 2").click()
    expect(page.locator("#job-state .badge")).to_have_attribute("data-state", "pending")
    expect(page.locator("h1")).to_contain_text("attempt 2")
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    assert httpx.get(new_url).json()["state"] == "pending"


def test_redeliver_a_webhook_from_the_job_page(
    admin_page: Page, api: httpx.Client, receiver: Receiver
) -> None:
    """Redeliver sends the same event again (same webhook-id); the page shows the new delivery
    and its attempt."""
    job = created(
        api.post("/api/v1/jobs", json={"name": "notify", "state_webhook_url": receiver.url})
    )
    created(httpx.post(job["continue_url"], json={}))
    page = admin_page
    page.goto(f"/jobs/{job['id']}")
    rows = page.locator("tr[data-delivery-id]")
    expect(rows).to_have_count(2)
    expect(page.locator("tr[data-delivery-state='succeeded']")).to_have_count(2)
    success_row = rows.filter(has_text="job.success")
    message_id = success_row.locator("[title='webhook-id']").inner_text()
    success_row.get_by_role("button", name="Redeliver").click()
    expect(page.locator("#notices")).to_contain_text("Redelivery of job.success queued")
    expect(rows).to_have_count(3)
    expect(page.locator("tr[data-delivery-state='succeeded']")).to_have_count(3)
    wait_until(lambda: receiver.webhook_ids().count(message_id) == 2, "the redelivery")


def test_the_parked_page_counts_down(
    admin_page: Page,
    api: httpx.Client,
    shots: Callable[[Page, str], None],
    browser: Browser,
    server: ServerProcess,
) -> None:
    """Every parked job is listed, longest waiting first, with which deadline is next and a
    time left that counts down in the page."""
    first = created(
        api.post("/api/v1/jobs", json={"name": "argo-sync", "callback_timeout_s": 5400})
    )
    second = created(
        api.post(
            "/api/v1/jobs",
            json={
                "name": "human-approval",
                "callback_timeout_s": 86400,
                "heartbeat_timeout_s": 900,
            },
        )
    )
    page = admin_page
    page.goto("/parked")
    first_row = page.locator(f"tr[data-job-id='{first['id']}']")
    second_row = page.locator(f"tr[data-job-id='{second['id']}']")
    expect(first_row.locator(".deadline-name")).to_have_text("callback timeout")
    expect(second_row.locator(".deadline-name")).to_have_text("heartbeat timeout")
    ids = page.locator("tr[data-job-id]").evaluate_all("rows => rows.map(r => r.dataset.jobId)")
    assert ids.index(first["id"]) < ids.index(second["id"])
    left = first_row.locator("[data-deadline]")
    before = left.inner_text()
    assert before.startswith(("1h 29m", "1h 30m"))
    expect(left).not_to_have_text(before)
    shots(page, "parked")

    phone = new_context(browser, server, viewport=PHONE, is_mobile=True, device_scale_factor=2)
    phone_page = phone.new_page()
    sign_in(phone_page, server.token, "/parked")
    expect(phone_page.locator(f"tr[data-job-id='{first['id']}'] [data-deadline]")).to_be_visible()
    shots(phone_page, "parked-phone")
    phone.close()


def test_a_viewer_sees_pages_but_no_buttons_and_cannot_write(
    browser: Browser, server: ServerProcess, api: httpx.Client
) -> None:
    """A viewer token signs in and reads every page, sees no Cancel or Retry, and its writes
    (bearer or session) are refused with 403."""
    viewer = created(api.post("/api/v1/tokens", json={"name": "wall-screen", "scope": "viewer"}))
    running = created(api.post("/api/v1/jobs", json={"name": "waits"}))
    finished = created(api.post("/api/v1/jobs", json={"name": "failed-one"}))
    httpx.post(finished["continue_url"], json={"status": "failed"})
    context = new_context(browser, server)
    page = context.new_page()
    sign_in(page, viewer["token"], "/")
    expect(page.locator(".who .scope")).to_contain_text("read-only")
    for path in ("/jobs", "/parked", "/runners", "/webhooks"):
        page.goto(path)
        expect(page.locator("main h1").first).to_be_visible()
    page.goto(f"/jobs/{running['id']}")
    expect(page.locator("#job-state .badge")).to_have_attribute("data-state", "pending")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    page.goto(f"/jobs/{finished['id']}")
    expect(page.locator("#job-state .badge")).to_have_attribute("data-state", "failed")
    expect(page.get_by_role("button", name="Retry")).to_have_count(0)

    csrf = page.locator("meta[name=csrf-token]").get_attribute("content") or ""
    by_session = page.request.post(
        f"/api/v1/jobs/{running['id']}/cancel", headers={"X-CSRF-Token": csrf}
    )
    assert by_session.status == 403
    assert by_session.json()["error"] == "forbidden"
    by_bearer = httpx.post(
        f"{server.url}/api/v1/jobs/{running['id']}/cancel",
        headers={"Authorization": f"Bearer {viewer['token']}"},
    )
    assert by_bearer.status_code == 403
    assert api.get(f"/api/v1/jobs/{running['id']}").json()["state"] == "pending"
    context.close()


def test_forms_and_api_calls_without_the_csrf_token_are_refused(
    admin_page: Page, api: httpx.Client
) -> None:
    """With a valid session, a sign-out form post and an API write without the CSRF token are
    refused (403) and change nothing."""
    job = created(api.post("/api/v1/jobs", json={"name": "csrf-target"}))
    page = admin_page
    signout = page.request.post("/logout", form={"csrf_token": "wrong"})
    assert signout.status == 403
    cancel = page.request.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert cancel.status == 403
    assert json.loads(cancel.text())["error"] == "forbidden"
    assert api.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "pending"
    page.goto("/jobs")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
