"""A real headless Chromium (Debian's `chromium`, installed by `make install`), driven over the
DevTools protocol on a websocket: no browser download, no driver binary, nothing but the system
browser and the `websockets` package.

Only what the console's browser test needs: open a page, wait for it to load, read and fill the
DOM, click, take a screenshot. Clicks and typing are done in the page's DOM by the protocol's
Runtime.evaluate, which the page's own Content-Security-Policy (no script at all) does not block:
it is the browser's debugger, not a script of the page.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class BrowserError(AssertionError):
    pass


class Browser:
    def __init__(self, width: int = 1280, height: int = 900):
        if not Path(CHROMIUM).exists():
            raise BrowserError("chromium is not installed (`make install` installs Debian's chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="vtl-chromium-"))
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise BrowserError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        self.base = f"127.0.0.1:{port}"
        self.ws = connect(self._page_socket(), max_size=64 * 1024 * 1024, open_timeout=10)
        self._id = 0
        self.events: list[dict] = []
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _page_socket(self) -> str:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 10
        while True:
            with opener.open(f"http://{self.base}/json/list", timeout=5) as response:
                pages = [t for t in json.loads(response.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            if time.monotonic() > deadline:
                raise BrowserError("chromium has no page target")
            time.sleep(0.1)

    # ---------------- protocol ----------------
    def call(self, method: str, timeout: float = 30, **params: Any) -> dict:
        self._id += 1
        wanted = self._id
        self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def _wait_event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event.get("method") == name:
                    return self.events.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no {name} within {timeout}s")
            self.events.append(json.loads(self.ws.recv(timeout=remaining)))

    # ---------------- pages ----------------
    def open(self, url: str) -> "Browser":
        self.events.clear()
        self.call("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired")
        return self

    def js(self, expression: str) -> Any:
        """The value of a DOM expression in the page (the debugger's evaluation, not a page script)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def fill(self, selector: str, value: str) -> None:
        found = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false; "
                        f"e.value = {json.dumps(value)}; return true; }})()")
        if not found:
            raise BrowserError(f"no {selector} on {self.url}")

    def click_and_wait(self, selector: str) -> "Browser":
        """Click what submits a form or follows a link, and wait for the next page to load."""
        self.events.clear()
        found = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false; "
                        "e.click(); return true; })()")
        if not found:
            raise BrowserError(f"no {selector} on {self.url}")
        self._wait_event("Page.loadEventFired")
        return self

    @property
    def url(self) -> str:
        return self.js("location.href")

    def text(self, selector: str = "body") -> str:
        return self.js(f"(document.querySelector({json.dumps(selector)}) || {{innerText: ''}}).innerText")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)
