"""Open a local HTML page in headless Chromium and report what a person would see go wrong: console
errors, pictures that did not load, and the number of elements a selector finds; optionally a
full-page screenshot.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
ending in NUL on file descriptors 3 and 4), so no port, no websocket library and no driver binary
are needed. Without a browser `find_browser` returns None and the tests skip, naming what to install.

    python tests/browser.py PAGE.html [--screenshot OUT.png] [--count 'CSS SELECTOR']
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# the flags a closed network needs: no first-run, sync, update or QUIC connections to refuse
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")
NO_BROWSER = ("no Chromium found (looked for $FSAD_BROWSER, then " + ", ".join(CANDIDATES) + " on PATH): "
              "install it (Debian: apt-get install chromium) or set FSAD_BROWSER to its executable")

# Runs in the page once it has loaded: shows every hidden view and lazy picture, waits until each
# has loaded or failed, and returns what the test checks.
_CHECK = """
(async (selector) => {
  for (const d of document.querySelectorAll('details')) d.open = true;
  const imgs = [...document.images];
  for (const img of imgs) img.loading = 'eager';
  await Promise.all(imgs.map(img => img.complete ? null :
      new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
  return JSON.stringify({
    images: imgs.map(img => ({src: img.getAttribute('src'), width: img.naturalWidth, complete: img.complete})),
    count: selector ? document.querySelectorAll(selector).length : null,
    title: document.title,
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  });
})
"""


def find_browser() -> str | None:
    """$FSAD_BROWSER when it names an executable, else the first of CANDIDATES on PATH, else None."""
    given = os.environ.get("FSAD_BROWSER", "").strip()
    if given and (found := shutil.which(given)):
        return found
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


@dataclass
class PageReport:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict] = field(default_factory=list)  # {src, width (naturalWidth), complete}
    count: int | None = None  # elements matching the selector asked for
    title: str = ""
    links: list[str] = field(default_factory=list)
    value: object = None  # the JSON value of the `expression` asked for

    @property
    def broken_images(self) -> list[str]:
        return [i["src"] for i in self.images if not i["width"]]


class Browser:
    """One headless Chromium for several pages: `with Browser() as b: report = b.check(path)`."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0):
        self.executable = executable or find_browser()
        if self.executable is None:
            raise FileNotFoundError(NO_BROWSER)
        self.timeout = timeout
        self._id = 0
        self._buffer = b""

    def __enter__(self) -> "Browser":
        self._profile = tempfile.TemporaryDirectory(prefix="fsad-chromium-")
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def child_fds():  # the pipe ends become the child's fds 3 (commands in) and 4 (answers out)
            a, b = os.dup(to_child), os.dup(from_child)  # dup2 onto itself would keep close-on-exec
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._process = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe",
             "about:blank"], preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._send("Browser.close")
        except OSError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._write)
        os.close(self._read)
        self._profile.cleanup()

    # -- protocol ---------------------------------------------------------------------
    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        return self._id

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise ConnectionError(f"Chromium ({self.executable}) closed the connection (exit code "
                                      f"{self._process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _call(self, method: str, params: dict | None = None, session: str | None = None,
              events: list | None = None) -> dict:
        """Send a command and wait for its answer; events arriving meanwhile go to `events`."""
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._next(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if events is not None and "method" in message:
                events.append(message)

    def _wait_event(self, name: str, session: str, events: list) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e["method"] == name and e.get("sessionId") == session for e in events):
            message = self._next(deadline)
            if "method" in message:
                events.append(message)

    # -- a page -----------------------------------------------------------------------
    def check(self, path: str | os.PathLike, selector: str | None = None, screenshot: str | os.PathLike | None = None,
              fragment: str = "", expression: str | None = None, width: int = 1280, height: int = 900) -> PageReport:
        """Load the page at `path` (+ '#fragment'), show every lazy picture, and report errors, pictures
        and the number of elements `selector` matches; `expression`: JavaScript evaluated after that,
        its JSON value in report.value; with `screenshot`, a PNG of the whole page (taken last)."""
        url = Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")
        events: list[dict] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Page", "Runtime", "Log"):
                self._call(f"{domain}.enable", session=session, events=events)
            self._call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                              "deviceScaleFactor": 1, "mobile": False},
                       session=session, events=events)
            self._call("Page.navigate", {"url": url}, session=session, events=events)
            self._wait_event("Page.loadEventFired", session, events)
            result = self._call("Runtime.evaluate", {"expression": f"({_CHECK})({json.dumps(selector)})",
                                                     "awaitPromise": True, "returnByValue": True},
                                session=session, events=events)
            if "exceptionDetails" in result:
                raise RuntimeError(f"page check failed: {result['exceptionDetails']}")
            data = json.loads(result["result"]["value"])
            if expression is not None:
                value = self._call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                        "returnByValue": True}, session=session, events=events)
                if "exceptionDetails" in value:
                    raise RuntimeError(f"expression failed: {value['exceptionDetails']}")
                data["value"] = value["result"].get("value")
            if screenshot is not None:
                shot = self._call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                  session=session, events=events)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            self._call("Runtime.evaluate", {"expression": "0"}, session=session, events=events)  # flush events
        finally:
            self._call("Target.closeTarget", {"targetId": target}, events=events)
        return PageReport(errors=_errors(events, session), images=data["images"], count=data["count"],
                          title=data["title"], links=data["links"], value=data.get("value"))


def _errors(events: list[dict], session: str) -> list[str]:
    out = []
    for e in events:
        if e.get("sessionId") != session:
            continue
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="+")
    ap.add_argument("--screenshot", default=None, help="PNG path (with several pages: a folder)")
    ap.add_argument("--count", default=None, help="CSS selector whose matches are counted")
    ap.add_argument("--fragment", default="", help="open PAGE#FRAGMENT (e.g. a photo's full-size view: v1)")
    args = ap.parse_args(argv)
    with Browser() as b:
        for n, page in enumerate(args.pages, 1):
            shot = args.screenshot
            if shot and len(args.pages) > 1:
                Path(shot).mkdir(parents=True, exist_ok=True)
                shot = str(Path(shot) / f"{n:02d}_{Path(page).stem}.png")
            r = b.check(page, args.count, shot, fragment=args.fragment)
            print(f"{page}: {len(r.images)} images, {len(r.broken_images)} broken, {len(r.errors)} errors"
                  + (f", {r.count} x {args.count}" if args.count else ""))
            for line in r.errors + [f"broken image: {s}" for s in r.broken_images]:
                print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
