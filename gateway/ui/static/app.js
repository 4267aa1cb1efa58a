// gateway dashboard: live updates from the event stream, countdowns, and actions through the API.
// Plain JavaScript, no build step. The server renders every page; on each event this script
// fetches the page's live region again (header `X-Gateway-Fragment: 1`) and swaps it in.
(function () {
  "use strict";

  const body = document.body;
  const serverSkewMs = body.dataset.serverNow ? Number(body.dataset.serverNow) - Date.now() : 0;
  const now = () => Date.now() + serverSkewMs;

  // -- durations and countdowns ------------------------------------------------------------

  function duration(seconds) {
    const total = Math.max(0, Math.floor(seconds));
    const d = Math.floor(total / 86400), h = Math.floor((total % 86400) / 3600);
    const m = Math.floor((total % 3600) / 60), s = total % 60;
    const pad = (n) => String(n).padStart(2, "0");
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${pad(m)}m`;
    if (m) return `${m}m ${pad(s)}s`;
    return `${s}s`;
  }

  function timeLeft(seconds) {
    const total = Math.max(0, Math.floor(seconds));
    const d = Math.floor(total / 86400), h = Math.floor((total % 86400) / 3600);
    const m = Math.floor((total % 3600) / 60), s = total % 60;
    const pad = (n) => String(n).padStart(2, "0");
    if (d) return `${d}d ${pad(h)}h ${pad(m)}m`;
    if (h) return `${h}h ${pad(m)}m ${pad(s)}s`;
    if (m) return `${m}m ${pad(s)}s`;
    return `${s}s`;
  }

  function tick() {
    const at = now();
    for (const el of document.querySelectorAll("[data-deadline]")) {
      const left = (Number(el.dataset.deadline) - at) / 1000;
      el.textContent = left > 0 ? timeLeft(left) : "overdue";
      el.classList.toggle("urgent", left < 60);
      el.classList.toggle("overdue", left <= 0);
    }
    for (const el of document.querySelectorAll("[data-since]")) {
      el.textContent = duration((at - Number(el.dataset.since)) / 1000);
    }
  }

  // -- the live region -----------------------------------------------------------------------

  let refreshTimer = null;
  let refreshing = false;
  let refreshAgain = false;

  let lastRefresh = 0;

  function scheduleRefresh(delayMs) {
    if (refreshTimer !== null) return;
    // A burst of events costs one fetch, and a busy server at most about two a second.
    const wait = Math.max(delayMs === undefined ? 150 : delayMs, 500 - (Date.now() - lastRefresh));
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      lastRefresh = Date.now();
      refresh();
    }, wait);
  }

  async function refresh() {
    const live = document.getElementById("live");
    if (!live) return;
    if (refreshing) {
      refreshAgain = true;
      return;
    }
    refreshing = true;
    try {
      const response = await fetch(location.pathname + location.search, {
        headers: { "X-Gateway-Fragment": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.status === 401) {
        location.reload();
        return;
      }
      if (response.ok) swap(live, await response.text());
    } catch (err) {
      // The server is away (a restart); the stream's reconnect brings the next refresh.
    } finally {
      refreshing = false;
      if (refreshAgain) {
        refreshAgain = false;
        scheduleRefresh(0);
      }
    }
  }

  function swap(live, html) {
    const kept = new Map();
    for (const el of live.querySelectorAll("[data-keep][id]")) kept.set(el.id, el);
    live.innerHTML = html;
    for (const [id, el] of kept) {
      const placeholder = document.getElementById(id);
      if (placeholder && placeholder !== el) placeholder.replaceWith(el);
    }
    afterSwap();
  }

  let pollTimer = null;

  function afterSwap() {
    tick();
    applyNameFilter();
    pollTraceSoon();
    // Something on the page is still in flight (a webhook delivery): look again shortly.
    if (pollTimer === null && document.querySelector("#live [data-poll]")) {
      pollTimer = setTimeout(() => {
        pollTimer = null;
        scheduleRefresh(0);
      }, 2000);
    }
  }

  // -- the event stream ----------------------------------------------------------------------

  function setLive(state, word) {
    const indicator = document.getElementById("live-indicator");
    if (!indicator) return;
    indicator.dataset.live = state;
    indicator.querySelector(".word").textContent = word;
  }

  function connect() {
    const base = body.dataset.stream;
    if (!base) return;
    let url = base;
    const last = body.dataset.lastEventId;
    if (last) url += (url.includes("?") ? "&" : "?") + "last_event_id=" + encodeURIComponent(last);
    const source = new EventSource(url);
    const onEvent = (event) => {
      if (event.lastEventId) body.dataset.lastEventId = event.lastEventId;
      scheduleRefresh();
    };
    for (const type of JSON.parse(body.dataset.eventTypes || "[]")) {
      source.addEventListener(type, onEvent);
    }
    source.onopen = () => setLive("open", "live");
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (signed out, or the server answered an error): check, then start again.
        source.close();
        setLive("retrying", "reconnecting");
        setTimeout(async () => {
          await refresh();
          connect();
        }, 3000);
      } else {
        setLive("retrying", "reconnecting");
      }
    };
  }

  // -- the trace of a job --------------------------------------------------------------------

  let traceOffset = 0;
  let traceLoaded = false;
  let traceBusy = false;
  let traceTimer = null;
  const TRACE_KEEP = 200000;

  function jobTerminal() {
    return document.querySelector("[data-job-terminal]") !== null;
  }

  function pollTraceSoon() {
    if (!document.getElementById("trace") || traceTimer !== null) return;
    traceTimer = setTimeout(() => {
      traceTimer = null;
      pollTrace();
    }, 100);
  }

  async function pollTrace() {
    const pre = document.getElementById("trace");
    if (!pre || traceBusy) return;
    traceBusy = true;
    const terminal = jobTerminal();
    try {
      const response = await fetch(`${pre.dataset.traceUrl}?offset=${traceOffset}`, {
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.ok) {
        const text = await response.text();
        const size = Number(response.headers.get("X-Trace-Size") || traceOffset);
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
        if (traceOffset === 0) pre.textContent = "";
        if (text) pre.append(document.createTextNode(text));
        if (pre.textContent.length > TRACE_KEEP) {
          pre.textContent = "…" + pre.textContent.slice(-TRACE_KEEP);
        }
        traceOffset = size;
        traceLoaded = true;
        if (!pre.textContent) {
          const empty = document.createElement("span");
          empty.className = "muted";
          empty.textContent = terminal ? "(no output)" : "(no output yet)";
          pre.replaceChildren(empty);
        }
        if (atBottom) pre.scrollTop = pre.scrollHeight;
        const status = document.getElementById("trace-status");
        if (status) status.textContent = terminal ? "" : "· live";
      }
    } catch (err) {
      // try again on the next tick
    } finally {
      traceBusy = false;
    }
  }

  // -- filters ------------------------------------------------------------------------------

  function applyNameFilter() {
    const input = document.getElementById("name-filter");
    if (!input) return;
    const wanted = input.value.trim().toLowerCase();
    for (const row of document.querySelectorAll("tr[data-name]")) {
      row.hidden = wanted !== "" && !row.dataset.name.includes(wanted);
    }
  }

  // -- actions through the API ---------------------------------------------------------------

  function notice(kind, build) {
    const area = document.getElementById("notices");
    if (!area) return;
    const box = document.createElement("div");
    box.className = `notice ${kind}`;
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    const content = document.createElement("div");
    build(content);
    const close = document.createElement("button");
    close.type = "button";
    close.className = "close";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", () => box.remove());
    box.append(content, close);
    area.prepend(box);
  }

  function paragraph(parent, ...parts) {
    const p = document.createElement("p");
    for (const part of parts) p.append(part);
    parent.append(p);
    return p;
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  function done(kind, answer) {
    if (kind === "retry") {
      notice("ok", (box) => {
        paragraph(box, "Retried as ", link(`/jobs/${answer.id}`, `attempt ${answer.attempt}`), ".");
        if (answer.continue_url) {
          const line = paragraph(box, "New continue URL (shown only now; copy it): ");
          line.className = "secret";
          const code = document.createElement("code");
          code.className = "continue-url";
          code.textContent = answer.continue_url;
          const copy = document.createElement("button");
          copy.type = "button";
          copy.className = "button small";
          copy.textContent = "Copy";
          copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(answer.continue_url));
          line.append(code, copy);
        }
      });
    } else if (kind === "redeliver") {
      notice("ok", (box) => paragraph(box, `Redelivery of ${answer.event_type} queued.`));
    } else if (kind === "cancel" || kind === "cancel-pipeline") {
      notice("ok", (box) => paragraph(box, "Canceled."));
    }
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target.closest("form[data-api]");
    if (!form) return;
    event.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    const button = form.querySelector("button");
    if (button) button.disabled = true;
    try {
      const response = await fetch(form.dataset.api, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": form.elements.csrf_token.value },
      });
      const answer = await response.json().catch(() => ({}));
      if (response.ok) {
        done(form.dataset.kind, answer);
      } else {
        notice("error", (box) => paragraph(box, answer.detail || `The gateway answered ${response.status}.`));
      }
    } catch (err) {
      notice("error", (box) => paragraph(box, "The gateway could not be reached."));
    } finally {
      if (button) button.disabled = false;
      scheduleRefresh(0);
    }
  });

  // -- start ---------------------------------------------------------------------------------

  const nameFilter = document.getElementById("name-filter");
  if (nameFilter) nameFilter.addEventListener("input", applyNameFilter);
  afterSwap();
  setInterval(tick, 1000);
  connect();
  if (document.getElementById("trace")) {
    setInterval(() => {
      if (!jobTerminal() || !traceLoaded) pollTrace();
    }, 2000);
  }
  const every = Number(body.dataset.refreshMs || 0);
  if (every > 0) setInterval(() => scheduleRefresh(0), every);
})();
