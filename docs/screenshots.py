"""Retake the README's screenshots of the page (docs/page-1280.png, docs/page-375.png) against a
running stack on the shipped catalogue (`make demo` or `sdgate up` leaves one running), in Debian's
headless Chromium driven by Playwright, as tests/integration/test_web.py drives it:

    .venv/bin/python docs/screenshots.py [--base http://127.0.0.1:8001] [--out docs]

It renders the demo prompts below through the page (so the gallery shows what the demo model
draws), loads the last one back from the gallery into the result panel, and shoots the page at 1280 and 375 px.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = (
    "a small blue triangle on the left on a yellow background",
    "a green square at the top and an orange cross at the bottom on a black background",
    "a large purple cross on the right on a white background",
    "a large red circle in the centre on a white background",
)
CHROMIUM = "/usr/bin/chromium"


def main(argv=None) -> int:
    from playwright.sync_api import expect, sync_playwright

    parser = argparse.ArgumentParser(prog="docs/screenshots.py")
    parser.add_argument("--base", default="http://127.0.0.1:8001", help="the page's address (default: sdgate up's fast port)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(args.base + "/")
            expect(page.locator("#model option")).not_to_have_count(0)
            for prompt in PROMPTS:
                page.get_by_label("Prompt", exact=True).fill(prompt)
                page.get_by_role("button", name="Generate").click()
                expect(page.get_by_role("img", name=f"Generated image: {prompt}")).to_be_visible(timeout=120_000)
            page.reload()
            page.locator("#gallery li", has_text=PROMPTS[-1]).first.locator("button.open").click()
            expect(page.get_by_role("img", name=f"Generated image: {PROMPTS[-1]}")).to_be_visible()
            page.screenshot(path=str(args.out / "page-1280.png"), full_page=True)
            page.set_viewport_size({"width": 375, "height": 800})
            page.screenshot(path=str(args.out / "page-375.png"), full_page=True)
        finally:
            browser.close()
    print(args.out / "page-1280.png", args.out / "page-375.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
