"""A tiny document model, rendered twice (HTML, Markdown) so the two never drift apart.

A Doc is a title and a list of blocks (Heading, Para, Note, Bullets, Image, Table);
a Table's cell is text or Names (a list of class names, truncated on the page).
Every piece of user text is escaped by the renderer, never by the caller.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field

import numpy as np

NAMES_SHOWN = 12  # class names shown per cluster before "… (+N more)"


@dataclass
class Names:
    """A table cell listing class names, truncated after NAMES_SHOWN."""

    names: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str | Names]]
    html_id: str | None = None


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Note(Para):
    """A paragraph that explains a table: on the page, left out of the terminal's text."""


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    filename: str
    png: bytes
    alt: str
    caption: str


@dataclass
class Doc:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


def fmt(value) -> str:
    """A metric value as a table cell: 4 significant digits, '—' for missing/NaN, yes/no."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def numeric_columns(table: Table) -> set[int]:
    """Indices of the columns whose every cell is a number (or empty, or '—'): right-aligned."""

    def is_num(cell) -> bool:
        if isinstance(cell, Names):
            return False
        if cell in ("", "—"):
            return True
        try:
            float(cell.rstrip("%"))
            return True
        except ValueError:
            return False

    return {j for j in range(len(table.headers)) if all(is_num(r[j]) for r in table.rows)}


# --------------------------------------------------------------------------- HTML


def render_html(doc: Doc) -> str:
    """One self-contained page: CSS inline, PNGs as data URIs."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(doc.title)}</title>",
        f"<style>{CSS}</style>",
        "</head><body><main>",
        f"<h1>{e(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lvl = min(block.level, 6)
            out.append(f"<h{lvl}>{e(block.text)}</h{lvl}>")
        elif isinstance(block, Para):
            out.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.alt)}" '
                f'data-file="{e(block.filename)}"><figcaption>{e(block.caption)} '
                f'(<a href="{e(block.filename)}">{e(block.filename)}</a>)</figcaption></figure>'
            )
        elif isinstance(block, Table):
            out.extend(_table_html(block))
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _table_html(table: Table) -> list[str]:
    e = html.escape
    num = numeric_columns(table)
    ident = f' id="{e(table.html_id)}"' if table.html_id else ""
    out = [f'<div class="scroll"><table{ident} data-rows="{len(table.rows)}"><thead><tr>']
    out.extend(f"<th>{e(h)}</th>" for h in table.headers)
    out.append("</tr></thead><tbody>")
    for row in table.rows:
        cells = []
        for j, cell in enumerate(row):
            if isinstance(cell, Names):
                cells.append(f'<td class="names">{_names_html(cell.names)}</td>')
            else:
                cls = ' class="num"' if j in num else ""
                cells.append(f"<td{cls}>{e(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def _names_html(names: list[str]) -> str:
    e = html.escape
    shown = ", ".join(e(n) for n in names[:NAMES_SHOWN])
    if len(names) <= NAMES_SHOWN:
        return shown
    rest = len(names) - NAMES_SHOWN
    return (
        f"{shown} … (+{rest} more)"
        f"<details><summary>all {len(names)}</summary>{', '.join(e(n) for n in names)}</details>"
    )


CSS = """
body{margin:0;background:#fff;color:#1d1d1f;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1100px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:26px;margin:8px 0 12px}
h2{font-size:20px;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid #ddd}
h3{font-size:16px;margin:20px 0 6px}
h4,h5,h6{font-size:15px;margin:14px 0 4px}
p{margin:6px 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:6px 0 16px;font-size:13.5px}
th,td{border:1px solid #d0d0d0;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f2f2f2;font-weight:600}
tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.names{min-width:320px;max-width:640px;overflow-wrap:anywhere}
details{margin-top:4px;color:#444}
summary{cursor:pointer;color:#555}
figure{margin:10px 0 18px}
img{display:block;max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px;margin-top:4px}
a{color:#333}
""".strip()


# --------------------------------------------------------------------------- Markdown

_MD_ALWAYS = re.compile(r"[\\`*\[\]<>|~$]")
_MD_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")  # intraword `_` is literal
_MD_ENTITY = re.compile(r"&(?=#?\w+;)")  # `&amp;` would render as `&`


def md_escape(text: str) -> str:
    """Backslash-escape Markdown syntax so a class name renders literally, also
    inside a table cell (`|`); newlines become spaces. Leaves `snake_case` readable."""
    text = " ".join(str(text).splitlines())
    text = _MD_ALWAYS.sub(lambda m: "\\" + m.group(), text)
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    return _MD_ENTITY.sub(r"\\&", text)


def _names_md(names: list[str]) -> str:
    shown = ", ".join(md_escape(n) for n in names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown += f" … (+{len(names) - NAMES_SHOWN} more)"
    return shown


def render_md(doc: Doc) -> str:
    """The same document in Markdown; images are referenced by file name."""
    out = [f"# {md_escape(doc.title)}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            out += ["#" * min(block.level, 6) + " " + md_escape(block.text), ""]
        elif isinstance(block, Para):
            out += [md_escape(block.text), ""]
        elif isinstance(block, Bullets):
            out += [f"- {md_escape(item)}" for item in block.items] + [""]
        elif isinstance(block, Image):
            out += [f"![{md_escape(block.alt)}]({block.filename})", "", f"*{md_escape(block.caption)}*", ""]
        elif isinstance(block, Table):
            num = numeric_columns(block)
            out.append("| " + " | ".join(md_escape(h) for h in block.headers) + " |")
            out.append("|" + "|".join("---:" if j in num else "---" for j in range(len(block.headers))) + "|")
            for row in block.rows:
                cells = [_names_md(c.names) if isinstance(c, Names) else md_escape(c) for c in row]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)
