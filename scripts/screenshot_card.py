#!/usr/bin/env python
"""Screenshot a model card (README.md) roughly as the Hugging Face Hub shows it, to review its layout.

Renders the Markdown with markdown-it-py (CommonMark + GFM tables, like the Hub), shows the YAML
front matter as a key/value table above the card as the Hub's metadata box does, applies a small
GitHub-like stylesheet, and takes a full-page screenshot with headless Chromium through Playwright.
Relative image links (the perplexity plot) resolve against the card's folder.

    python scripts/screenshot_card.py release/README.md card.png
    python scripts/screenshot_card.py README.md card.png --html card.html   # also keep the HTML

Needs `pip install playwright markdown-it-py` and a Chromium. Playwright's own browser download
(`playwright install chromium`) needs network access beyond package registries; Debian's
`apt-get install chromium-headless-shell` (or `chromium`) works instead and is found on PATH.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import tempfile
from pathlib import Path

import yaml
from markdown_it import MarkdownIt

CSS = """
body { margin: 0; background: #fff; color: #1f2328; font: 15px/1.6 -apple-system, "Segoe UI", "Noto Sans",
       Helvetica, Arial, sans-serif; }
main { max-width: 920px; margin: 0 auto; padding: 32px 40px; }
h1, h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; }
h1 { font-size: 2em; } h2 { font-size: 1.5em; margin-top: 1.6em; } h3 { font-size: 1.2em; }
code { font: 85% ui-monospace, "DejaVu Sans Mono", monospace; background: #eff1f3; padding: .2em .4em;
       border-radius: 6px; }
pre { background: #f6f8fa; padding: 16px; overflow: auto; border-radius: 6px; }
pre code { background: none; padding: 0; white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; margin: 12px 0; display: block; overflow: auto; font-size: 13px; }
th, td { border: 1px solid #d1d9e0; padding: 5px 10px; vertical-align: top; }
tr:nth-child(2n) { background: #f6f8fa; }
th { background: #f6f8fa; font-weight: 600; }
td:not(:last-child) { white-space: nowrap; }
img { max-width: 100%; }
.metadata { border: 1px solid #d1d9e0; border-radius: 8px; padding: 8px 16px; margin-bottom: 24px;
            background: #fafbfc; }
.metadata table { font-size: 12px; }
"""


def split_front_matter(text: str) -> tuple[dict | None, str]:
    """The card's YAML header (None when it has none) and the Markdown after it."""
    if not text.startswith("---\n"):
        return None, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return None, text
    return yaml.safe_load(text[4:end]) or {}, text[end + len("\n---\n"):]


def metadata_table(meta: dict) -> str:
    """The front matter as a key/value table; non-string values are shown as JSON, all escaped."""
    rows = []
    for key, value in meta.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td><code>{html.escape(str(shown))}</code></td></tr>")
    return f'<section class="metadata"><table>{"".join(rows)}</table></section>'


def card_html(markdown_text: str, *, base_href: str | None = None, title: str = "model card") -> str:
    """A standalone HTML page for the card; `base_href` makes relative image paths resolve there."""
    meta, body = split_front_matter(markdown_text)
    rendered = MarkdownIt("commonmark").enable("table").render(body)
    base = f'<base href="{html.escape(base_href)}">' if base_href else ""
    header = metadata_table(meta) if meta else ""
    return (f'<!doctype html><html><head><meta charset="utf-8">{base}<title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><main>{header}{rendered}</main></body></html>")


def find_chromium(explicit: str | None) -> str | None:
    """An explicit browser path, else a system Chromium on PATH, else None (Playwright's own)."""
    if explicit:
        return explicit
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page_html: str, out: Path, *, width: int, browser_path: str | None) -> None:
    # an optional dependency that only this script needs, so imported here
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            # Chromium lets only a file:// page load file:// images, so open the HTML from a file
            with tempfile.TemporaryDirectory() as tmp:
                html_file = Path(tmp) / "card.html"
                html_file.write_text(page_html, encoding="utf-8")
                page.goto(html_file.as_uri(), wait_until="load")  # "load" waits for the plot image
                page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("card", type=Path, help="the README.md to render")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1000, help="viewport width in CSS pixels")
    parser.add_argument("--browser", help="Chromium executable (default: one found on PATH)")
    parser.add_argument("--html", type=Path, help="also write the rendered HTML here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    text = args.card.read_text(encoding="utf-8")
    base_href = args.card.resolve().parent.as_uri() + "/"
    page_html = card_html(text, base_href=base_href, title=args.card.name)
    if args.html:
        args.html.write_text(page_html, encoding="utf-8")
    screenshot(page_html, args.out, width=args.width, browser_path=find_chromium(args.browser))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
