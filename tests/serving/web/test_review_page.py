"""The review page (/review/ of service.py) in a real headless Chromium.

The service of tests/serving/web/test_review_service.py (a tiny model that answers "uncertain" to
everything, the review inbox on, a bearer token) is filled through /predict; the browser
fixtures of tests/serving/web/test_ui_page.py (headless Chromium over the DevTools client of
scripts/browser.py, a tab recording exceptions, console messages, requests and CSP
violations) then drive the page the way a person would: type the token and a reviewer name,
open an item, look at the image and the overlay, pick a class and a mask choice, press the
button. A refused review must show the service's reason and leave the item pending; an
accepted one must show success, leave the pending list and land in the incoming dataset with
the reviewer's name in provenance.jsonl. Without a Chromium binary the test is skipped, saying why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import test_review_service as review_tests
import test_review_trust as trust_tests
from helpers_browser import click, no_page_problems
from helpers_models import CLASSES

from defectflow.data.mvtec import scan_dataset
from defectflow.serving.inbox import read_provenance

pytestmark = pytest.mark.integration

# The fixtures are the other modules' (module-scoped ones start again for this module):
# the review service, and Chromium with a recording tab.
service = review_tests.service
# The service with serve.inbox.min_reviews=2, trusted_reviewers=[dana] and reviewer tokens.
trust_service = trust_tests.service

AUTH = review_tests.AUTH
REVIEWER = "Zoë Ortiz"  # non-ASCII on purpose: it goes through a multipart form into JSON
H, W = 96, 128


def _fill_inbox(url: str, count: int) -> list[dict]:
    """`count` uncertain answers from /predict, then their inbox items (written in the background)."""
    before = {
        i["id"] for i in httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
    }
    for seed in range(count):
        answer = httpx.post(
            f"{url}/predict",
            headers=AUTH,
            timeout=60,
            files={"image": (f"{seed}.png", review_tests._png(_upload(seed)))},
        )
        assert answer.status_code == 200 and answer.json()["status"] == "uncertain", answer.text
    deadline = time.monotonic() + 20
    while True:
        items = httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
        new = [i for i in items if i["id"] not in before]
        if len(new) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(new) == count, new
    details = [
        httpx.get(f"{url}/review/items/{i['id']}", headers=AUTH, timeout=10).json() for i in new
    ]
    for item in details:  # which upload it is
        shown = review_tests._decode(item["image_png_base64"], cv2.IMREAD_COLOR)
        item["seed"] = next(s for s in range(count) if np.array_equal(shown, _upload(s)))
    return details


def _upload(seed: int) -> np.ndarray:
    return review_tests._image(100 + seed, H, W)


def _mask_pixels(item: dict) -> int:
    return int(
        np.count_nonzero(
            review_tests._decode(item["prediction"]["mask_png_base64"], cv2.IMREAD_GRAYSCALE)
        )
    )


def _type(page, selector: str, text: str) -> None:
    click(page, selector)
    assert page.evaluate(
        f"document.activeElement === document.querySelector({json.dumps(selector)})"
    )
    page.call("Input.insertText", text=text)


def _choose_class(page, label: str) -> None:
    page.evaluate(f"""(() => {{
      const s = document.getElementById('label');
      s.value = {json.dumps(label)};
      s.dispatchEvent(new Event('input', {{bubbles: true}}));
      s.dispatchEvent(new Event('change', {{bubbles: true}}));
    }})()""")
    assert page.evaluate("document.getElementById('label').value") == label


def _status(page) -> dict:
    return page.evaluate(
        "(() => { const s = document.getElementById('status');"
        " return {text: s.textContent, kind: s.className}; })()"
    )


def _listed(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('#items li')].map((li) => li.dataset.id)")


def _pending(url: str) -> set[str]:
    return {
        i["id"] for i in httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
    }


def _shot(page, path: Path) -> float:
    """A full-page screenshot; its grey-level standard deviation (0: a blank page)."""
    page.screenshot(path, beyond_viewport=True)
    print(f"screenshot: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image is not None and image.shape[1] == 1280
    return float(image.std())


_IMAGES = """(() => Object.fromEntries(['image', 'overlay'].map((id) => {
  const img = document.getElementById(id);
  const r = img.getBoundingClientRect();
  let pixels = null;
  if (img.complete && img.naturalWidth) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    pixels = Array.from(g.getImageData(0, 0, c.width, c.height).data);
  }
  return [id, {complete: img.complete, size: [img.naturalWidth, img.naturalHeight],
               shown: [Math.round(r.width), Math.round(r.height)], pixels}];
})))()"""


def test_review_page_reviews_an_item_into_the_incoming_dataset(
    browser_binary, service, page, tmp_path
):
    url = service["url"]
    items = _fill_inbox(url, 3)
    ids = {i["id"] for i in items}

    # The item to review, and a review of it that will succeed: a class other than the
    # predicted one, with the predicted mask when there is one (a defect class needs a mask),
    # else `good` without one.
    with_mask = [i for i in items if _mask_pixels(i) > 0]
    if with_mask:
        target = with_mask[0]
        label = next(c for c in CLASSES[1:] if c != target["prediction"]["class"])
        mask_choice = "keep"
    else:
        target = next((i for i in items if i["prediction"]["class"] != "good"), None)
        assert target is not None, (
            "every answer is `good` with an empty mask: no review without an upload"
        )
        label, mask_choice = "good", "clear"
    item_id = target["id"]
    print(
        f"\nreviewing {item_id}: predicted {target['prediction']['class']} "
        f"({_mask_pixels(target)} mask pixels) -> {label}, mask {mask_choice}"
    )

    navigated = page.call("Page.navigate", url=f"{url}/review/")
    assert not navigated.get("errorText"), navigated
    page.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('token')",
        "the page to load",
    )
    # Without a token the list is refused, and the page says what to do.
    page.wait_for(
        "document.getElementById('status').textContent.includes('enter the API token')",
        "the page to ask for the token",
        timeout=15,
    )
    assert _listed(page) == []

    start = time.monotonic()
    _type(page, "#token", review_tests.TOKEN)
    _type(page, "#reviewer", REVIEWER)  # leaving the token field commits it: the list loads
    page.wait_for(
        f"document.querySelectorAll('#items li').length >= {len(ids)}",
        "the pending items",
        timeout=15,
    )
    assert set(_listed(page)) == ids
    assert page.evaluate("document.getElementById('count').textContent") == f"({len(ids)})"
    assert page.evaluate("sessionStorage.getItem('defectflow.apiToken')") == review_tests.TOKEN
    assert page.evaluate("localStorage.getItem('defectflow.reviewer')") == REVIEWER
    assert _status(page) == {"text": "", "kind": ""}, "the 401 from before the token is still shown"

    # Open the item: its title, the classes to choose from, the image and the overlay.
    click(page, f"#items li[data-id='{item_id}']")
    page.wait_for(
        f"!document.getElementById('item').hidden && document.getElementById('title')"
        f".textContent.endsWith({json.dumps(item_id)}) && ['image', 'overlay'].every((id) => "
        "document.getElementById(id).complete && document.getElementById(id).naturalWidth > 0)",
        "the item with its image and overlay",
        timeout=15,
    )
    assert page.evaluate("document.querySelector('#items li.active').dataset.id") == item_id
    assert page.evaluate("document.getElementById('title').textContent").startswith(
        f"Predicted {target['prediction']['class']} ("
    )
    assert (
        page.evaluate("[...document.getElementById('label').options].map((o) => o.value)")
        == CLASSES
    )
    assert page.evaluate("document.getElementById('label').value") == target["prediction"]["class"]
    assert page.evaluate("document.querySelector('input[name=mask]:checked').value") == "keep"
    shown = page.evaluate(_IMAGES)
    for name in ("image", "overlay"):
        assert shown[name]["size"] == [W, H], (name, shown[name]["size"])
        assert shown[name]["shown"][0] > 100 and shown[name]["shown"][1] > 50, (
            name,
            shown[name]["shown"],
        )
    image = np.array(shown["image"]["pixels"], np.uint8).reshape(H, W, 4)
    overlay = np.array(shown["overlay"]["pixels"], np.uint8).reshape(H, W, 4)
    # The image is the upload; the overlay is the image, but red where the predicted mask is.
    assert image[:, :, 3].min() == 255
    assert np.array_equal(image[:, :, :3], cv2.cvtColor(_upload(target["seed"]), cv2.COLOR_BGR2RGB))
    differs = int(np.count_nonzero((image[:, :, :3] != overlay[:, :, :3]).any(axis=2)))
    assert differs <= _mask_pixels(target) and (differs > 0) == (_mask_pixels(target) > 0), differs

    # A refused review: a defect class without a mask. The service's reason is shown; the item stays.
    defect = next(c for c in CLASSES[1:] if c != target["prediction"]["class"])
    _choose_class(page, defect)
    click(page, "input[name=mask][value=clear]")
    assert page.evaluate("document.querySelector('input[name=mask]:checked').value") == "clear"
    click(page, "#accept")
    page.wait_for(
        "document.getElementById('status').className === 'error'", "the refusal", timeout=15
    )
    refused = _status(page)["text"]
    assert "needs a defect mask" in refused and "instead of clearing it" in refused, refused
    assert not page.evaluate("document.getElementById('item').hidden")
    assert item_id in _listed(page) and item_id in _pending(url)
    std = _shot(page, tmp_path / "review-refused.png")
    assert std > 10, f"the screenshot is blank (std {std:.1f})"

    # The review that succeeds.
    _choose_class(page, label)
    click(page, f"input[name=mask][value={mask_choice}]")
    click(page, "#accept")
    page.wait_for(
        "document.getElementById('status').className === 'ok'",
        "the review to be written",
        timeout=15,
    )
    written = _status(page)["text"]
    image_rel = (
        f"train/good/inbox-{item_id}.png"
        if label == "good"
        else f"test/{label}/inbox-{item_id}.png"
    )
    assert written.startswith(f"Written: {image_rel}") and str(service["incoming"]) in written, (
        written
    )
    page.wait_for(
        f"!document.querySelector(\"#items li[data-id='{item_id}']\") && "
        f"document.querySelectorAll('#items li').length === {len(ids) - 1}",
        "the item to leave the pending list",
        timeout=15,
    )
    assert page.evaluate("document.getElementById('item').hidden")
    assert page.evaluate("document.getElementById('count').textContent") == f"({len(ids) - 1})"
    assert _pending(url) == ids - {item_id}
    print(f"typed the token -> review written in {time.monotonic() - start:.1f} s")
    std = _shot(page, tmp_path / "review-done.png")
    assert std > 10, f"the screenshot is blank (std {std:.1f})"

    # The other button: discard a second item.
    other = sorted(ids - {item_id})[0]
    click(page, f"#items li[data-id='{other}']")
    page.wait_for(
        f"document.getElementById('title').textContent.endsWith({json.dumps(other)})",
        "the second item",
        timeout=15,
    )
    click(page, "#discard")
    page.wait_for(
        f"document.getElementById('status').textContent === 'Discarded {other}' && "
        f"document.querySelectorAll('#items li').length === {len(ids) - 2}",
        "the discard",
        timeout=15,
    )
    assert _status(page)["kind"] == "ok" and _pending(url) == ids - {item_id, other}

    # On disk: the image in the incoming dataset, as `label`, and who said so.
    samples = {s.path.stem: s for s in scan_dataset(service["incoming"])}
    sample = samples[f"inbox-{item_id}"]
    assert sample.label == label
    assert f"inbox-{other}" not in samples  # discarded: not in the dataset
    assert sample.path.read_bytes() == review_tests._png(_upload(target["seed"]))  # as uploaded
    assert (sample.mask_path is None) == (label == "good")
    provenance = [p for p in read_provenance(service["incoming"]) if p["inbox_id"] == item_id]
    assert len(provenance) == 1
    assert provenance[0]["reviewer"] == REVIEWER and provenance[0]["label"] == label
    assert provenance[0]["predicted_class"] == target["prediction"]["class"]
    assert provenance[0]["mask_source"] == ("none" if label == "good" else "prediction")

    # Nothing went wrong in the page: no exception, no CSP violation, nothing requested
    # elsewhere, no console error; the only failed requests are the two the test caused.
    no_page_problems(page, url)
    console = [
        e["params"]
        for e in page.events
        if e["method"] == "Runtime.consoleAPICalled"
        and e["params"]["type"] in ("error", "assert", "warning")
    ]
    assert not console, console
    logged = [
        e["params"]["entry"]
        for e in page.events
        if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning")
    ]
    unexpected = [
        e
        for e in logged
        if not (
            e.get("source") == "network"
            and (
                (e.get("url") == f"{url}/review/items" and "401" in e["text"])
                or (e.get("url") == f"{url}/review/items/{item_id}" and "400" in e["text"])
            )
        )
    ]
    assert not unexpected, unexpected
    assert len(logged) == 2, logged  # the list before the token, the refused review


def test_review_page_shows_votes_and_the_policy_and_who_you_are(
    browser_binary, trust_service, page, tmp_path
):
    """With min_reviews=2: a reviewer signed in with their own token is named by it (the name
    field filled and locked); the page shows the policy, each item's votes so far and a
    dispute; a vote short of the policy says the item stays pending, the agreeing second one
    writes it."""
    url, shared = trust_service["url"], trust_tests._auth(trust_tests.SHARED)
    agree, dispute = (
        trust_tests._seed(trust_service, "crack", 60),
        trust_tests._seed(trust_service, "crack", 61),
    )
    drawn = np.zeros((36, 48), np.uint8)
    drawn[2:8, 2:8] = 255
    for item, label, files in ((agree, "crack", None), (dispute, "poke", drawn)):
        voted = httpx.post(
            f"{url}/review/items/{item}",
            headers=shared,
            data={"label": label, "reviewer": "ann"},
            files={"mask": ("m.png", review_tests._png(files), "image/png")}
            if files is not None
            else None,
            timeout=10,
        )
        assert voted.json()["status"] == "pending", voted.text

    navigated = page.call("Page.navigate", url=f"{url}/review/")
    assert not navigated.get("errorText"), navigated
    page.wait_for("document.readyState === 'complete'", "the page to load")
    page.wait_for(
        "document.getElementById('status').textContent.includes('enter the API token')",
        "the page to ask for the token",
        timeout=15,
    )
    _type(page, "#token", trust_tests.TOKENS["erin"])
    click(page, "#refresh")
    page.wait_for(
        f"!!document.querySelector(\"#items li[data-id='{agree}']\") && "
        "document.getElementById('reviewer').disabled",
        "the list, as erin",
        timeout=15,
    )
    assert page.evaluate("document.getElementById('reviewer').value") == "erin"
    policy = page.evaluate("document.getElementById('policy').textContent")
    assert "2 distinct reviewers must agree" in policy and "dana" in policy, policy
    rows = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#items li')]"
        ".map((li) => [li.dataset.id, li.textContent]))"
    )
    assert "1 vote · 2 needed" in rows[agree] and "disputed" not in rows[agree], rows[agree]

    # Erin's vote against ann's: recorded, the item stays, disputed.
    click(page, f"#items li[data-id='{dispute}']")
    page.wait_for(
        f"document.getElementById('title').textContent.endsWith({json.dumps(dispute)})",
        "the disputed item",
        timeout=15,
    )
    votes = page.evaluate("document.getElementById('votes').textContent")
    assert "ann (token-holder): poke, uploaded mask" in votes, votes
    _choose_class(page, "crack")
    click(page, "#accept")
    page.wait_for(
        "document.getElementById('status').textContent.startsWith('Vote recorded')",
        "the vote",
        timeout=15,
    )
    said = _status(page)["text"]
    assert "(erin: crack)" in said and "stays pending" in said and "disagree" in said, said
    assert page.evaluate("document.getElementById('votes').className") == "disputed"
    assert "DISPUTED" in page.evaluate("document.getElementById('votes').textContent")
    page.wait_for(
        f"document.querySelector(\"#items li[data-id='{dispute}']\").textContent"
        ".includes('disputed')",
        "the list to mark the dispute",
        timeout=15,
    )

    # Erin agrees with ann on the other item: two distinct reviewers, written.
    click(page, f"#items li[data-id='{agree}']")
    page.wait_for(
        f"document.getElementById('title').textContent.endsWith({json.dumps(agree)})",
        "the item to agree on",
        timeout=15,
    )
    _choose_class(page, "crack")
    click(page, "#accept")
    page.wait_for(
        "document.getElementById('status').textContent.startsWith('Written: ')",
        "the item to be written",
        timeout=15,
    )
    assert f"test/crack/inbox-{agree}.png" in _status(page)["text"]
    entry = {e["inbox_id"]: e for e in read_provenance(trust_service["incoming"])}[agree]
    assert {(v["reviewer"], v["identity"]) for v in entry["votes"]} == {
        ("ann", "token-holder"),
        ("erin", "token"),
    }
    assert dispute not in {e["inbox_id"] for e in read_provenance(trust_service["incoming"])}
    _shot(page, tmp_path / "review-votes.png")
    no_page_problems(page, url)
