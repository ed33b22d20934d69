"""Render a report's index.html in headless Chromium and check that it really shows.

    python jobs/check_report_browser.py REPORT_DIR [--screenshot out.png]

Checks, each failing with a message that says what is wrong:
  * the DOM Chromium builds (--dump-dom) has the cluster table with every row the
    page declares (a class name that broke the HTML would lose rows), no <script>
    (the report has none: one would be an unescaped name), and every <img>
    carries a PNG data URI that decodes;
  * the screenshot is a real PNG of the window size, not blank (many colours,
    a fair share of non-white pixels) and shows saturated colour: the heatmap.
Needs the `chromium` binary (Debian: apt-get install -y chromium). Exit 0 = pass.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from matplotlib.image import imread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WINDOW = (1280, 2400)  # width, height of the screenshot


class Fail(Exception):
    pass


class _PageParser(HTMLParser):
    """Collects <img> sources and, per table id, the declared and actual body rows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.scripts = 0
        self.declared: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "script":
            self.scripts += 1
        elif tag == "table" and a.get("id"):
            self._table = a["id"]
            self.declared[self._table] = int(a.get("data-rows", -1))
            self.rows[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self.rows[self._table] += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None


def _parse(text: str) -> _PageParser:
    p = _PageParser()
    p.feed(text)
    p.close()
    return p


def _decode_png(data: bytes, what: str) -> np.ndarray:
    if not data.startswith(PNG_SIGNATURE):
        raise Fail(f"{what} is not a PNG (starts with {data[:8]!r})")
    try:
        return imread(io.BytesIO(data), format="png")
    except Exception as exc:  # a truncated or corrupt PNG
        raise Fail(f"{what} does not decode as PNG: {exc}") from exc


def _chromium(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",  # we run as root in CI containers
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            *args,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise Fail(f"chromium did not finish within {timeout:.0f} s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise Fail(f"chromium exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc


def render(binary: str, index: Path, shot: Path, timeout: float) -> str:
    """One Chromium run: the screenshot goes to shot, the serialized DOM is returned."""
    shot.unlink(missing_ok=True)
    args = [f"--screenshot={shot.resolve()}", "--dump-dom", index.resolve().as_uri()]
    proc = _chromium(binary, args, timeout)
    return proc.stdout


def check_dom(index: Path, dom_text: str) -> str:
    source = _parse(index.read_text(encoding="utf-8"))
    dom = _parse(dom_text)
    if "clusters" not in source.declared:
        raise Fail(f"{index} has no <table id=\"clusters\">")
    if "clusters" not in dom.rows:
        raise Fail("the rendered DOM has no cluster table (page failed to load?)")
    want, got = source.declared["clusters"], dom.rows["clusters"]
    if want <= 0 or got != want:
        raise Fail(f"cluster table: page declares {want} rows, rendered DOM has {got}")
    if dom.scripts:  # the report has no scripts: this came from an unescaped name
        raise Fail(f"the rendered DOM has {dom.scripts} <script> elements; is user text unescaped?")
    for table, declared in source.declared.items():
        if dom.rows.get(table) != declared:
            raise Fail(f"table #{table}: page declares {declared} rows, DOM has {dom.rows.get(table)}")
    if len(dom.images) < 2 or len(dom.images) != len(source.images):
        raise Fail(f"expected {len(source.images)} (>= 2) images in the DOM, found {len(dom.images)}")
    prefix = "data:image/png;base64,"
    for i, src in enumerate(dom.images):
        if not src.startswith(prefix):
            raise Fail(f"<img> #{i} is not an embedded PNG data URI: {src[:60]!r}")
        img = _decode_png(base64.b64decode(src[len(prefix) :]), f"<img> #{i}")
        if min(img.shape[:2]) < 100:
            raise Fail(f"<img> #{i} is only {img.shape[1]}x{img.shape[0]} px")
    return f"DOM ok: {got} cluster rows, {len(dom.images)} embedded PNG images"


def check_screenshot(shot: Path) -> str:
    if not shot.exists():
        raise Fail(f"chromium wrote no screenshot to {shot}")
    img = _decode_png(shot.read_bytes(), f"screenshot {shot}")
    h, w = img.shape[:2]
    if (w, h) != WINDOW:
        raise Fail(f"screenshot is {w}x{h}, expected the window size {WINDOW[0]}x{WINDOW[1]}")
    rgb = img[..., :3].reshape(-1, 3)
    q = (rgb * 255).round().astype(np.uint32)
    colours = len(np.unique(q[:, 0] << 16 | q[:, 1] << 8 | q[:, 2]))  # distinct RGB values
    ink = float((rgb.min(axis=1) < 0.9).mean())  # anything not near-white
    saturated = float((rgb.max(axis=1) - rgb.min(axis=1) > 0.3).mean())  # heatmap reds/blues
    if colours < 50 or ink < 0.02:
        raise Fail(f"screenshot looks blank: {colours} distinct colours, {ink:.1%} non-white pixels")
    if saturated < 0.005:
        raise Fail(f"no heatmap visible in the screenshot: only {saturated:.2%} saturated pixels")
    return f"screenshot ok: {w}x{h}, {colours} colours, {ink:.0%} non-white, {saturated:.1%} saturated -> {shot}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("--screenshot", type=Path, help="where to keep the screenshot (default: a temp file)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds for the chromium run")
    args = ap.parse_args(argv)

    index = args.report_dir / "index.html"
    try:
        if not index.is_file():
            raise Fail(f"{index} does not exist")
        if shutil.which(args.chromium) is None:
            raise Fail(f"chromium binary {args.chromium!r} not found (apt-get install -y chromium)")
        with tempfile.TemporaryDirectory() as tmp:
            shot = args.screenshot or Path(tmp) / "screenshot.png"
            dom = render(args.chromium, index, shot, args.timeout)
            print(check_dom(index, dom))
            print(check_screenshot(shot))
    except Fail as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
