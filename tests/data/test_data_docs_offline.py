"""Data Docs without internet (defectflow.data.data_docs_assets).

The site is built by the real `validate_dataset` on the tiny synthetic dataset. Without a
browser: every CDN URL of Great Expectations' templates has a pinned local copy, and no built
page (nor a copied stylesheet) names a script, stylesheet, font or image on another host. In
headless Chromium inside a network namespace that holds only loopback (tests/helpers_offline.py):
the index's bootstrap-table lists the validation run, a person's click on its row opens the
validation page, and both pages are styled by Bootstrap, show Font Awesome's icons, have every
library GE loads and asked for nothing outside the site.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import great_expectations
import pytest
from helpers_browser import click
from helpers_offline import external_requests, failed_requests, offline_network, recorded_requests

from defectflow.config import ValidationConfig
from defectflow.data.data_docs_assets import (
    CDN_ASSETS,
    EXTRA_FILES,
    NODE_MODULES,
    VENDOR_DIR,
    external_assets,
    make_offline,
)
from defectflow.data.mvtec import scan_dataset
from defectflow.data.validation import image_facts, validate_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from browser import headless_chromium, new_tab  # noqa: E402

GE_VIEW = Path(great_expectations.__file__).parent / "render" / "view"
#: The S3 folder GE's navbar and dark-mode stylesheet take its logo from.
GE_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
WAIT = 60.0


@pytest.fixture(scope="module")
def site(tiny_dataset, tmp_path_factory) -> Path:
    """Data Docs of one validation run of the tiny synthetic dataset, as the pipeline builds them."""
    docs = tmp_path_factory.mktemp("data-docs") / "data_docs"
    result = validate_dataset(
        image_facts(scan_dataset(tiny_dataset)), ValidationConfig(), data_docs_dir=docs
    )
    index = Path(result.statistics["data_docs"])
    assert index == docs.resolve() / "index.html" and index.is_file()
    return index.parent


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def _local_loads(page: Path) -> list[str]:
    """The relative URLs a page's script, link and img tags load."""
    html = page.read_text(encoding="utf-8")
    urls = re.findall(r"<(?:script|link|img)\b[^>]*?\b(?:src|href)=\"([^\"#]+)\"", html)
    return [u for u in urls if not re.match(r"[a-z]+:", u, re.I)]


# --- without a browser ------------------------------------------------------------------------


def test_every_cdn_url_of_the_ge_templates_is_mapped():
    """A new Great Expectations that loads something else from a CDN fails here first."""
    texts = [
        p.read_text(encoding="utf-8")
        for p in sorted(GE_VIEW.rglob("*"))
        if p.suffix in {".j2", ".css"}
    ]
    urls = {u for text in texts for u in re.findall(r"""https?://[^\s"'()<>]+""", text)}
    links = {
        u for text in texts for u in re.findall(r"""<a\s[^>]*href="(https?://[^"]+)\"""", text)
    }
    links |= {u for text in texts for u in re.findall(r"\]\((https?://[^)\s]+)\)", text)}
    unmapped = sorted(u for u in urls - links - set(CDN_ASSETS) if not u.startswith(GE_IMAGES))
    assert unmapped == []
    assert set(CDN_ASSETS) <= urls, sorted(set(CDN_ASSETS) - urls)  # nothing stale in the map
    # The check the built pages get below does see every one of them.
    scripts = (GE_VIEW / "templates" / "js_script_imports.j2").read_text(encoding="utf-8")
    assert len(external_assets(scripts)) == 10


def test_the_installed_packages_are_the_versions_the_pages_name():
    lock = json.loads((NODE_MODULES.parent / "package-lock.json").read_text())["packages"]
    for url, (package, path) in CDN_ASSETS.items():
        installed = json.loads((NODE_MODULES / package / "package.json").read_text())["version"]
        assert lock[f"node_modules/{package}"]["version"] == installed, package
        assert (NODE_MODULES / package / path).is_file(), (package, path)
        named = re.search(r"[@/-](\d+(?:\.\d+)*)(?=/|\.min\.js$|$)", url.split("//", 1)[1]).group(1)
        if package == "bootstrap-table" and named == "1.19.0":
            named = "1.19.1"  # the filter-control stylesheet: 1.19.1's stands in (module docstring)
        assert installed == named or installed.startswith(f"{named}."), (url, installed)
    for package, paths in EXTRA_FILES.items():
        assert all((NODE_MODULES / package / p).is_file() for p in paths), package


def test_the_copies_are_the_files_ge_pins_by_hash():
    """GE's templates pin two CDN scripts by Subresource Integrity; the copies (whose tags lose
    the attribute: file: URLs cannot be checked) are those very bytes."""
    scripts = (GE_VIEW / "templates" / "js_script_imports.j2").read_text(encoding="utf-8")
    pinned = re.findall(r'src="([^"]+)" integrity="sha384-([^"]+)"', scripts)
    assert len(pinned) == 2
    for url, digest in pinned:
        package, path = CDN_ASSETS[url]
        data = (NODE_MODULES / package / path).read_bytes()
        assert base64.b64encode(hashlib.sha384(data).digest()).decode() == digest, url


def test_built_pages_load_no_script_stylesheet_font_or_image_from_the_internet(site: Path):
    pages = _pages(site)
    assert {p.parent.name for p in pages} >= {site.name, "expectations"}
    assert any("validations" in p.relative_to(site).parts for p in pages)
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert external_assets(html) == [], page
        assert not any(url in html for url in CDN_ASSETS), page
        assert GE_IMAGES not in html, page
        loads = _local_loads(page)
        vendored = [u for u in loads if "/vendor/" in u or u.startswith("static/vendor/")]
        assert len(vendored) == len(CDN_ASSETS) - 1, (page, vendored)  # one filter-control sheet
        for url in vendored + [u for u in loads if u.endswith("logo-long.png")]:
            assert (page.parent / url).resolve().is_file(), (page, url)
    stylesheets = list((site / VENDOR_DIR).rglob("*.css"))
    assert len(stylesheets) == 7
    for sheet in stylesheets:
        css = sheet.read_text(encoding="utf-8")
        assert external_assets(css) == [], sheet
        for url in re.findall(r"url\(\s*[\"']?(?!data:)([^\"')?#]+)", css):
            if not url.endswith(".ttf"):  # Font Awesome's fonts are copied as WOFF2 only
                assert (sheet.parent / url).resolve().is_file(), (sheet, url)
    notice = (site / VENDOR_DIR / "NOTICE.txt").read_text()
    assert "bootstrap-4.3.1/: npm bootstrap 4.3.1, licence MIT" in notice


def test_make_offline_again_changes_nothing(site: Path, tmp_path: Path):
    copy = shutil.copytree(site, tmp_path / "site")
    before = {p: p.read_bytes() for p in _pages(copy)}
    assert make_offline(copy) == []
    assert {p: p.read_bytes() for p in _pages(copy)} == before


def test_without_the_packages_the_pages_keep_their_links_and_a_warning_says_why(
    tiny_dataset, tmp_path, caplog, monkeypatch
):
    import defectflow.data.data_docs_assets as assets

    monkeypatch.setattr(assets, "NODE_MODULES", tmp_path / "no_node_modules")
    docs = tmp_path / "docs"
    with caplog.at_level("WARNING", logger=assets.__name__):
        validate_dataset(
            image_facts(scan_dataset(tiny_dataset)), ValidationConfig(), data_docs_dir=docs
        )
    assert "keep their CDN links" in caplog.text and "make install" in caplog.text
    assert not (docs / VENDOR_DIR).exists()
    assert external_assets((docs / "index.html").read_text())  # GE's pages, untouched


# --- in Chromium, offline ---------------------------------------------------------------------


#: What a page shows of its styles, fonts and libraries (after its fonts are ready).
FACTS = """(async () => {
  await document.fonts.ready;
  const row = document.querySelector('.row');
  return {
    url: location.href,
    sheets: [...document.styleSheets].map((s) => s.href),
    rowDisplay: row && getComputedStyle(row).display,
    navbarDisplay: getComputedStyle(document.querySelector('nav.navbar')).display,
    iconFont: (() => { const i = document.querySelector('i.fas, i.fa'); return i && getComputedStyle(i).fontFamily; })(),
    loadedFonts: [...document.fonts].filter((f) => f.status === 'loaded').map((f) => f.family),
    libraries: {
      jQuery: typeof window.jQuery, Popper: typeof window.Popper,
      bootstrap: typeof (window.jQuery && jQuery.fn.tooltip),
      bootstrapTable: typeof (window.jQuery && jQuery.fn.bootstrapTable),
      filterControl: typeof (window.jQuery && jQuery.fn.bootstrapTable && jQuery.fn.bootstrapTable.defaults.filterControl),
      datepicker: typeof (window.jQuery && jQuery.fn.datepicker),
      vega: typeof (window.vega && vega.View), vegaLite: typeof (window.vegaLite && vegaLite.compile),
      vegaEmbed: typeof window.vegaEmbed,
    },
  };
})()"""
LIBRARIES = {
    "jQuery": "function",
    "Popper": "function",
    "bootstrap": "function",
    "bootstrapTable": "function",
    "filterControl": "boolean",
    "datepicker": "function",
    "vega": "function",
    "vegaLite": "function",
    "vegaEmbed": "function",
}
ROWS = "#Validation-Results table tbody tr[data-href]"


@pytest.fixture(scope="module")
def offline_browser(browser_binary, tmp_path_factory) -> Iterator:
    """Headless Chromium started inside a network namespace with nothing but loopback."""
    profile = tmp_path_factory.mktemp("chromium-offline")
    with (
        offline_network(),
        headless_chromium(browser_binary, profile, profile.parent / "chromium.log") as browser,
    ):
        yield browser


def _exceptions(tab) -> list[str]:
    return [
        e["params"]["exceptionDetails"].get("exception", {}).get("description", "?")
        for e in tab.events
        if e.get("method") == "Runtime.exceptionThrown"
    ]


def _check_styled(facts: dict, page: str) -> None:
    """Bootstrap's local copy styles the page (its rows and navbar are flex boxes; unstyled,
    blocks), Font Awesome's local font draws the icons, and every library GE loads is there."""
    local = "/static/vendor/bootstrap-4.3.1/dist/css/bootstrap.min.css"
    assert any(href.endswith(local) for href in facts["sheets"]), (page, facts["sheets"])
    assert (facts["rowDisplay"], facts["navbarDisplay"]) == ("flex", "flex"), (page, facts)
    assert "Font Awesome 6 Free" in (facts["iconFont"] or ""), (page, facts["iconFont"])
    assert "Font Awesome 6 Free" in facts["loadedFonts"], (page, facts["loadedFonts"])
    assert facts["libraries"] == LIBRARIES, (page, facts["libraries"])


@pytest.mark.integration
def test_index_and_validation_page_work_offline_in_chromium(
    site: Path, offline_browser, tmp_path: Path
):
    index = site / "index.html"
    with new_tab(offline_browser, domains=("Page", "Runtime", "Network")) as tab:
        navigated = tab.call("Page.navigate", url=index.as_uri())
        assert not navigated.get("errorText"), navigated
        tab.wait_for("document.readyState === 'complete'", "the index to load", WAIT)
        # bootstrap-table draws the rows from the page's inline script, before the load ends.
        links = tab.evaluate(f"[...document.querySelectorAll('{ROWS}')].map((r) => r.dataset.href)")
        facts = tab.evaluate(FACTS)
        print(f"index: rows {links}; {facts}; screenshot {tab.screenshot(tmp_path / 'index.png')}")
        assert len(links) == 1, "the index lists no validation run"
        assert links[0].startswith("validations/") and (site / links[0]).is_file(), links
        _check_styled(facts, "index")

        click(tab, ROWS)  # bootstrap-table's click-row handler opens the run
        tab.wait_for(
            "location.pathname.includes('/validations/') && document.readyState === 'complete'",
            "the validation page to open",
            WAIT,
        )
        tab.wait_for(
            "document.querySelectorAll('.ge-section').length > 3",
            "the validation page's sections",
            15,
        )
        facts = tab.evaluate(FACTS)
        print(
            f"validation page: {facts['url']}; screenshot {tab.screenshot(tmp_path / 'validation.png')}"
        )
        assert facts["url"] == (site / links[0]).as_uri()
        _check_styled(facts, "validation page")
        assert tab.evaluate("document.body.innerText.includes('Expectation Validation Result')")
        time.sleep(0.2)
        tab.evaluate("1")  # collects the events that came in since the last call
        requests = recorded_requests(tab)
        assert any(u.endswith("/vega.min.js") for u in requests) and any(
            u.endswith(".woff2") for u in requests
        )
        assert external_requests(tab) == [], external_requests(tab)
        # GE's own favicon link on validation pages is one folder short (its bug): the one miss.
        missing = [f for f in failed_requests(tab) if "favicon.ico" not in f]
        assert missing == [], missing
        assert _exceptions(tab) == [], _exceptions(tab)
