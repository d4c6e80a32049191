"""Data Docs that work without internet: their scripts, stylesheets and fonts copied into the site.

Great Expectations 1.24.1's page templates load Bootstrap, jQuery, Popper, bootstrap-table,
bootstrap-datepicker, bootstrap-dark, Vega / Vega-Lite / Vega-Embed and Font Awesome from CDNs,
and its logo from S3: on a factory network without internet the pages come out unstyled and the
index's table of validation runs (drawn by bootstrap-table) stays empty. The same files, at the
versions the templates name, are the npm packages pinned by `data-docs-assets/package-lock.json`,
which `make install` installs with `npm ci` into `data-docs-assets/node_modules/`.

`make_offline(site)`, called after every Data Docs build, copies them (with their licences) into
the site's `static/vendor/` and rewrites every page to load those copies by relative paths, so the
site also works when it is copied elsewhere (a run's folder). Nothing is downloaded at run time:
when the packages are not installed the pages keep their CDN links and a warning says how to
install them. `external_assets(html)` lists what a page would still load from elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from defectflow.config import REPO_ROOT

log = logging.getLogger(__name__)

#: Where `make install` (`npm ci` in data-docs-assets/) puts the pinned packages.
NODE_MODULES = REPO_ROOT / "data-docs-assets" / "node_modules"
#: The site folder the copies go to (GE's own images, styles and fonts are in static/ too).
VENDOR_DIR = Path("static") / "vendor"

#: Every CDN URL of GE 1.24.1's templates (render/view/templates/page.j2, page_minimal.j2,
#: index_page.j2, js_script_imports.j2) -> (npm package, file in it). The versions are those the
#: URLs name; the unversioned Vega ones (jsDelivr's latest 5 / 5 / 6) are pinned to the newest of
#: those majors. Two exceptions, same content: the index asks bootstrap-table 1.19.0 for the
#: filter-control stylesheet (1.19.1's is served), and bootstrap-dark's unminified stylesheet
#: (860 KB) is served minified.
CDN_ASSETS: dict[str, tuple[str, str]] = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": (
        "bootstrap",
        "dist/css/bootstrap.min.css",
    ),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": (
        "bootstrap",
        "dist/js/bootstrap.min.js",
    ),
    "https://code.jquery.com/jquery-3.7.1.min.js": ("jquery", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": (
        "popper.js",
        "dist/umd/popper.min.js",
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": (
        "bootstrap-table",
        "dist/bootstrap-table.min.css",
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": (
        "bootstrap-table",
        "dist/bootstrap-table.min.js",
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js": (
        "bootstrap-table",
        "dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css": (
        "bootstrap-table",
        "dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css": (
        "bootstrap-table",
        "dist/extensions/filter-control/bootstrap-table-filter-control.css",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker",
        "dist/css/bootstrap-datepicker.min.css",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker",
        "dist/js/bootstrap-datepicker.min.js",
    ),
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": (
        "@forevolve/bootstrap-dark",
        "dist/css/bootstrap-prefers-dark.min.css",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": (
        "@fortawesome/fontawesome-free",
        "css/all.min.css",
    ),
    "https://cdn.jsdelivr.net/npm/vega@5": ("vega", "build/vega.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-lite@5": ("vega-lite", "build/vega-lite.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-embed@6": ("vega-embed", "build/vega-embed.min.js"),
}

#: Files a copied stylesheet loads by relative URL, copied beside it: Font Awesome's fonts
#: (WOFF2 only; every browser of the last years takes it before the TrueType fallback).
EXTRA_FILES: dict[str, tuple[str, ...]] = {
    "@fortawesome/fontawesome-free": tuple(
        f"webfonts/{name}.woff2"
        for name in ("fa-brands-400", "fa-regular-400", "fa-solid-900", "fa-v4compatibility")
    ),
}

#: GE's logo comes from S3 (top_navbar.j2, with a "?d=<time>" query; the dark-mode background of
#: data_docs_default_styles.css): GE copies logo-long.png into every site's static/images/, and it
#: stands in for the dark-mode logo too.
_GE_IMAGES = re.compile(
    r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/"
    r"(?:logo-long|full_logo_dark)\.png(?:\?[^\"'\s)]*)?"
)
_LOCAL_LOGO = Path("static") / "images" / "logo-long.png"

_LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE")

#: Where a page names something the browser loads by itself: src / href of script, link, img,
#: iframe and media tags, CSS url() and @import.
_TAG_URL = re.compile(
    r"<(?:script|link|img|iframe|source|video|audio|embed|track|input)\b[^>]*?"
    r"\b(?:src|href|srcset|poster)\s*=\s*[\"']?([^\"'\s>]+)",
    re.IGNORECASE,
)
_CSS_URL = re.compile(r"url\(\s*[\"']?([^\"')\s]+)|@import\s+[\"']([^\"']+)", re.IGNORECASE)
_SCRIPT_OR_LINK = re.compile(r"<(?:script|link)\b[^>]*>", re.IGNORECASE)
_CORS_ATTRIBUTES = re.compile(
    r"\s+(?:crossorigin|integrity)(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s>]+))?", re.IGNORECASE
)
_EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)


def external_assets(text: str) -> list[str]:
    """The URLs of scripts, stylesheets, fonts, images and frames that a page (or stylesheet)
    loads from another host: absolute http(s) and protocol-relative ones. Links (`<a href>`)
    are not loads and are not listed."""
    found = [m.group(1) for m in _TAG_URL.finditer(text)]
    found += [m.group(1) or m.group(2) for m in _CSS_URL.finditer(text)]
    return [url for url in found if _EXTERNAL.match(url)]


def _folder(package: str, version: str) -> str:
    return f"{package.rsplit('/', 1)[-1]}-{version}"


def _installed(modules: Path) -> dict[str, tuple[str, str]]:
    """package -> (version, licence) of the installed packages; raises FileNotFoundError naming
    the first file that is missing."""
    packages: dict[str, tuple[str, str]] = {}
    for package, path in CDN_ASSETS.values():
        if package not in packages:
            meta = json.loads((modules / package / "package.json").read_text(encoding="utf-8"))
            packages[package] = (meta["version"], str(meta.get("license", "see the package")))
        if not (modules / package / path).is_file():
            raise FileNotFoundError(modules / package / path)
    return packages


def copy_assets(site: Path, modules: Path | None = None) -> dict[str, Path]:
    """Copy the pinned files from `modules` (default NODE_MODULES) into
    `site`/static/vendor/<package>-<version>/ with their licence files and a NOTICE.txt;
    returns CDN URL -> copied file. FileNotFoundError when a package or file is missing."""
    modules = NODE_MODULES if modules is None else Path(modules)
    packages = _installed(modules)
    vendor = site / VENDOR_DIR
    copied: dict[str, Path] = {}
    files = [(package, path) for package, path in CDN_ASSETS.values()]
    files += [(package, path) for package, paths in EXTRA_FILES.items() for path in paths]
    files += [
        (package, name)
        for package in packages
        for name in _LICENCE_FILES
        if (modules / package / name).is_file()
    ]
    for package, path in dict.fromkeys(files):
        target = vendor / _folder(package, packages[package][0]) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules / package / path, target)
    for url, (package, path) in CDN_ASSETS.items():
        copied[url] = vendor / _folder(package, packages[package][0]) / path
    notice = [
        "Copied by defectflow (src/defectflow/data/data_docs_assets.py) from the npm packages",
        "pinned in data-docs-assets/package-lock.json, so that these Data Docs work offline.",
        "",
        *(
            f"{_folder(package, version)}/: npm {package} {version}, licence {licence}"
            for package, (version, licence) in sorted(packages.items())
        ),
    ]
    (vendor / "NOTICE.txt").write_text("\n".join(notice) + "\n", encoding="utf-8")
    return copied


def _relative(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target, page.parent)).as_posix()


def _without_cors(tag: re.Match) -> str:
    text = tag.group(0)
    return _CORS_ATTRIBUTES.sub("", text) if f"{VENDOR_DIR.as_posix()}/" in text else text


def rewrite_page(page: Path, site: Path, copies: dict[str, Path]) -> bool:
    """Point one page's CDN and S3 URLs at the site's copies; True when the page changed.

    The copies' tags lose `crossorigin` and `integrity`: a browser checks integrity only on a
    CORS response, which a file: URL never is, so the script would not run. (The copies are the
    files those hashes name, byte for byte: tests/data/test_data_docs_offline.py checks it.)"""
    html = page.read_text(encoding="utf-8")
    new = html
    for url, target in copies.items():
        new = new.replace(url, _relative(target, page))
    new = _GE_IMAGES.sub(_relative(site / _LOCAL_LOGO, page), new)
    new = _SCRIPT_OR_LINK.sub(_without_cors, new)
    if new != html:
        page.write_text(new, encoding="utf-8")
    return new != html


def make_offline(site: str | Path, modules: Path | None = None) -> list[Path]:
    """Make a built Data Docs site load nothing from the internet (see the module docstring);
    returns the pages rewritten. Idempotent: call it after every build of the site. `modules`
    defaults to NODE_MODULES."""
    site = Path(site)
    modules = NODE_MODULES if modules is None else Path(modules)
    try:
        copies = copy_assets(site, modules)
    except FileNotFoundError as exc:
        log.warning(
            "Data Docs in %s keep their CDN links (they need internet): %s is missing; "
            "`make install` (or `npm ci` in %s) installs the pinned packages",
            site,
            exc.filename or exc,
            modules.parent,
        )
        return []
    changed = [page for page in sorted(site.rglob("*.html")) if rewrite_page(page, site, copies)]
    for page in sorted(site.rglob("*.html")):
        left = external_assets(page.read_text(encoding="utf-8"))
        if left:
            log.warning("%s still loads from the internet: %s", page, ", ".join(sorted(set(left))))
    return changed
