"""The web pages: GET / (the chat page), /ui/* (its script and style), GET /report (a run's evaluation
report, when the served folder has one) and /report/NAME (the report's Markdown and PNG charts).

ServerMiddleware adds the Content-Security-Policy every HTML response carries.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from murmur.serve.errors import APIError
from murmur.serve.state import server_state

UI_DIR = Path(__file__).parent / "ui"
PAGE_HEADERS = {"Cache-Control": "no-cache"}
REPORT_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.(png|md)$")
MAX_REPORT_FILE_BYTES = 50_000_000

router = APIRouter(include_in_schema=False)


def read_report_file(report_dir: Path, name: str) -> bytes | None:
    """The bytes of report file `name`: a regular file directly in `report_dir`, not a link, folder or pipe."""
    if not REPORT_FILE.match(name):
        return None
    try:
        fd = os.open(report_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_REPORT_FILE_BYTES:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as file:
        return file.read(MAX_REPORT_FILE_BYTES)


@router.get("/")
async def chat_page():
    return FileResponse(UI_DIR / "index.html", headers=PAGE_HEADERS)


@router.api_route("/report", methods=["GET", "HEAD"])
async def report_page(request: Request):
    report_dir = server_state(request).report_dir
    report = report_dir / "report.md" if report_dir is not None else None
    if report is None or not report.exists() or not stat.S_ISREG(report.lstat().st_mode):
        raise APIError(404, "no report here: serve a run folder after `murmur eval` wrote report/report.md",
                       type="not_found")
    return FileResponse(UI_DIR / "report.html", headers=PAGE_HEADERS)


@router.get("/report/{name}")
async def report_file(name: str, request: Request):
    report_dir = server_state(request).report_dir
    content = read_report_file(report_dir, name) if report_dir is not None else None
    if content is None:
        raise APIError(404, f"report file {name[:100]!r} not found", type="not_found")
    media = "image/png" if name.endswith(".png") else "text/plain; charset=utf-8"
    return Response(content, media_type=media, headers={"X-Content-Type-Options": "nosniff"})


router.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
