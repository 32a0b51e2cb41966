"""Take docs/img/chat.png: serve a built run, send two messages from the web chat page, screenshot it.

    .venv/bin/python docs/img/screenshot.py runs/demo [--out docs/img/chat.png] [--port 8765]

Drives Debian's chromium (/usr/bin/chromium) through Playwright; never downloads a browser.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MESSAGES = ["hey, how was your weekend?", "nice! do you like going to the movies?"]


def wait_healthy(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} did not become healthy in {seconds:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a built run folder or model directory")
    parser.add_argument("--out", default=str(Path(__file__).parent / "chat.png"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    server = subprocess.Popen([sys.executable, "-m", "murmur", "serve", args.run, "--host", "127.0.0.1",
                               "--port", str(args.port)])
    try:
        base = f"http://127.0.0.1:{args.port}"
        wait_healthy(f"{base}/health")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1100, "height": 720}, device_scale_factor=1)
            page.goto(base)
            for text in MESSAGES:
                before = page.locator("#messages > *").count()
                page.fill("#input", text)
                page.click("#send")
                # the reply is done when the stop button hides again
                page.wait_for_function(
                    "n => document.querySelectorAll('#messages > *').length >= n + 2", arg=before, timeout=60000)
                page.wait_for_selector("#stop", state="hidden", timeout=120000)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
