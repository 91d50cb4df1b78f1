"""The console end to end, as an operator uses it: key, collection, enrolment by
drop and upload, identify a group photo, a subject's crops, deleting a face,
errors as messages, the jobs panel, the webcam, and an axe-core audit.

The flow tests share one tab, in order (each screen builds on the last); the
error, webcam and audit tests open tabs of their own.
"""
from __future__ import annotations

import base64
import json
import mimetypes
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.browser.conftest import ARTIFACTS, BOOTSTRAP_KEY, Console
from tests.conftest import FACES_DIR

COLLECTION = "console-e2e"
OBAMA = [FACES_DIR / "people" / "obama" / n for n in ("obama_1.jpg", "obama_2.jpg", "obama_3.jpg")]
BIDEN = [FACES_DIR / "people" / "biden" / n for n in ("biden_1.jpg", "biden_2.jpg")]
GROUP = FACES_DIR / "groups" / "obama_and_biden.jpg"
# A real (tiny) PDF: what an operator picks by mistake.
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n")


@pytest.fixture(scope="module")
def flow(browser: Any, console_app: Any) -> Iterator[Console]:
    c = Console(browser, console_app)
    yield c
    c.close()


def api(console: Console) -> Any:
    return console.app.client()


def drop_files(page: Any, selector: str, paths: list[Path]) -> None:
    """What a drag from the file manager delivers: a drop event whose DataTransfer holds Files."""
    files = [{"name": p.name, "type": mimetypes.guess_type(p.name)[0] or "application/octet-stream",
              "b64": base64.b64encode(p.read_bytes()).decode()} for p in paths]
    dt = page.evaluate_handle("""(files) => {
        const dt = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name, { type: f.type }));
        }
        return dt;
    }""", files)
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": dt})


def error_text(page: Any) -> str:
    page.wait_for_selector("#messages .msg.error")
    return page.inner_text("#messages .msg.error")


def wait_enrolled(page: Any, n: int) -> None:
    page.wait_for_function("(n) => { const p = document.querySelector('#enrol-progress');"
                           " return p && p.max === n && p.value === n; }", arg=n)
    page.wait_for_function("(n) => [...document.querySelectorAll('#face-grid img')]"
                           ".filter((i) => i.complete && i.naturalWidth > 0).length === n", arg=n)


def create_subject(page: Any, name: str) -> None:
    page.fill("#subj-name", name)
    page.click("#subj-form button[type=submit]")
    page.wait_for_selector(f"#sd-h:has-text('Subject: {name}')")


def subjects_by_name(console: Console) -> dict[str, dict[str, Any]]:
    with api(console) as client:
        r = client.get("/v1/subjects", params={"collection": COLLECTION, "limit": 100})
        assert r.status_code == 200, r.text
        return {s["name"]: s for s in r.json()["subjects"]}


# --- the flow -----------------------------------------------------------------------------
def test_asks_for_the_key_then_keeps_it_for_the_tab(flow: Console) -> None:
    page = flow.open(key=None).page
    page.wait_for_selector("#messages .msg:has-text('needs an API key')")
    flow.shot("01-key-prompt")
    page.fill("#key-input", BOOTSTRAP_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-state:has-text('Key set for this tab')")
    assert page.evaluate("sessionStorage.getItem('faceserve.console.key')") == BOOTSTRAP_KEY
    assert page.input_value("#key-input") == ""  # not left on screen
    page.reload()  # the tab keeps it: no prompt again
    page.wait_for_selector("#key-state:has-text('Key set for this tab')")
    assert page.locator("#messages .msg").count() == 0


def test_creates_and_selects_a_collection(flow: Console) -> None:
    page = flow.page
    page.click("a[href='#manage']")
    page.fill("#col-name", COLLECTION)
    page.click("#col-form button[type=submit]")
    page.wait_for_selector(f"#col-list button[aria-pressed=true]:has-text('{COLLECTION}')")
    assert page.input_value("#collection-select") == COLLECTION
    with api(flow) as client:
        assert COLLECTION in {c["name"] for c in client.get("/v1/collections").json()["collections"]}
    flow.shot("02-manage-new-collection")


def test_enrols_two_people_by_drop_and_by_upload(flow: Console) -> None:
    page = flow.page
    create_subject(page, "obama")
    drop_files(page, "#enrol-drop", OBAMA)
    wait_enrolled(page, len(OBAMA))
    assert page.inner_text("#enrol-count").startswith(f"{len(OBAMA)} of {len(OBAMA)} done")
    assert page.locator("#enrol-log .good").count() == len(OBAMA)
    flow.shot("03-enrol-obama-by-drop")
    create_subject(page, "biden")
    page.set_input_files("#enrol-files", [str(p) for p in BIDEN])
    wait_enrolled(page, len(BIDEN))
    flow.shot("04-enrol-biden-by-upload")
    found = subjects_by_name(flow)  # what the server holds, not what the page claims
    assert found["obama"]["face_count"] == len(OBAMA) and found["biden"]["face_count"] == len(BIDEN)
    rows = page.locator("#subj-table tbody tr")
    assert rows.count() == 2 and "obama" in page.inner_text("#subj-table") and "biden" in page.inner_text("#subj-table")


def test_identifies_a_group_photo_with_boxes_and_names(flow: Console) -> None:
    page = flow.page
    page.click("a[href='#try']")
    page.set_input_files("#try-file", str(GROUP))
    page.click("#run-identify")
    page.wait_for_selector("#try-result[data-result=identify]")
    page.wait_for_function("() => document.querySelector('#try-result svg').getAttribute('viewBox') !== null")
    boxes = page.locator("#try-result svg rect.face-box")
    assert boxes.count() == 3  # obama, biden and the child
    labels = page.locator("#try-result svg text.face-label").all_text_contents()
    assert any("obama" in t for t in labels) and any("biden" in t for t in labels), labels
    matched = page.locator("#try-result svg g.s-match")
    assert matched.count() == 2
    for i in range(boxes.count()):
        assert float(boxes.nth(i).get_attribute("width") or 0) > 20
    # landmarks, the decision per face, candidates with their enrolled crops, stage timings
    assert page.locator("#try-result svg circle.landmark").count() == 15
    assert page.locator("#try-result .decision.match").count() == 2
    page.wait_for_function("() => [...document.querySelectorAll('#try-result .cands img')]"
                           ".some((i) => i.complete && i.naturalWidth > 0)")
    stages = page.locator("#try-result .timings li").all_inner_texts()
    # a photo sent before (by any test run within the cache's TTL) is answered
    # from the embedding cache: its stages are then cache + search
    assert any(s.startswith(("detect", "cache")) for s in stages) and any(s.startswith("search") for s in stages), stages
    # optional fields of the answer are shown when present (estimated FMR from the calibration)
    text = page.inner_text("#try-result")
    assert "similarity" in text and "threshold" in text
    flow.shot("05-identify-group")


def test_detect_draws_boxes_and_landmarks(flow: Console) -> None:
    page = flow.page
    page.click("#run-detect")
    page.wait_for_selector("#try-result[data-result=detect]")
    assert page.locator("#try-result svg rect.face-box").count() >= 3
    assert page.locator("#try-result svg circle.landmark").count() == 5 * page.locator("#try-result svg rect.face-box").count()
    flow.shot("06-detect")


def test_verify_two_images_and_against_a_subject(flow: Console) -> None:
    page = flow.page
    page.set_input_files("#try-file", str(OBAMA[0]))
    page.set_input_files("#try-file2", str(OBAMA[1]))
    page.click("#run-verify")
    page.wait_for_selector("#try-result[data-result=verify]")
    assert page.inner_text("#try-result .decision").startswith("Match")
    assert page.locator("#try-result figure.stage").count() == 2
    flow.shot("07-verify-two-images")
    page.check("input[name=verify-mode][value=subject]")
    page.wait_for_selector("#verify-subject option:has-text('biden')", state="attached")
    page.select_option("#verify-subject", label=page.locator("#verify-subject option", has_text="biden").inner_text())
    page.click("#run-verify")
    page.wait_for_selector("#try-result .decision:has-text('No match')")
    page.wait_for_function("() => [...document.querySelectorAll('#try-result .thumbs img')]"
                           ".filter((i) => i.complete && i.naturalWidth > 0).length === 2")
    flow.shot("08-verify-against-subject")
    page.check("input[name=verify-mode][value=image]")


def test_liveness_is_drawn(flow: Console) -> None:
    page = flow.page
    page.set_input_files("#try-file", str(FACES_DIR / "liveness" / "image_F1.jpg"))
    page.click("#run-liveness")
    page.wait_for_selector("#try-result[data-result=liveness]")
    label = page.locator("#try-result svg text.face-label").first.text_content() or ""
    assert re.search(r"(live|spoof) \d", label), label
    assert page.locator("#try-result .decision").count() == 1
    flow.shot("09-liveness")


def test_a_subject_shows_its_crops(flow: Console) -> None:
    page = flow.page
    page.click("a[href='#manage']")
    page.fill("#subj-q", "obama")
    page.click("#subj-search button[type=submit]")
    page.wait_for_selector("#subj-total:has-text('1 found')")
    assert page.locator("#subj-table tbody tr").count() == 1
    page.click("#subj-table button:has-text('obama')")
    page.wait_for_function("(n) => [...document.querySelectorAll('#face-grid img')]"
                           ".filter((i) => i.complete && i.naturalWidth >= 64).length === n", arg=len(OBAMA))
    flow.shot("10-subject-crops")


def test_deletes_a_face_after_confirmation(flow: Console) -> None:
    page = flow.page
    first = page.locator("#face-grid li").first
    face_id = first.get_attribute("data-face-id")
    first.locator("button:has-text('Delete')").click()
    page.wait_for_selector("#confirm[open]")
    flow.shot("11-confirm-delete-face")
    page.click("#confirm button[value=cancel]")  # cancelled: nothing happens
    assert page.locator("#face-grid li").count() == len(OBAMA)
    first.locator("button:has-text('Delete')").click()
    page.click("#confirm-ok")
    page.wait_for_function("(n) => document.querySelectorAll('#face-grid li[data-face-id]').length === n",
                           arg=len(OBAMA) - 1)
    assert page.locator(f"#face-grid li[data-face-id='{face_id}']").count() == 0
    assert subjects_by_name(flow)["obama"]["face_count"] == len(OBAMA) - 1
    with api(flow) as client:
        sid = subjects_by_name(flow)["obama"]["id"]
        r = client.get(f"/v1/subjects/{sid}/faces/{face_id}/crop", params={"collection": COLLECTION})
        assert r.status_code == 404  # the crop went with the face
    flow.shot("12-after-delete-face")


def test_rename_a_subject(flow: Console) -> None:
    page = flow.page
    page.fill("#rename-input", "barack obama")
    page.click("#rename-form button[type=submit]")
    page.wait_for_selector("#sd-h:has-text('barack obama')")
    assert "barack obama" in subjects_by_name(flow)


def test_subjects_are_paged(flow: Console) -> None:
    page = flow.page
    with api(flow) as client:
        for i in range(10):
            r = client.post("/v1/subjects", json={"name": f"person {i:02d}", "collection": COLLECTION})
            assert r.status_code == 201, r.text
    page.click("#subj-clear")  # all of them, 10 a page
    page.wait_for_selector("#subj-total:has-text('(12)')")
    assert page.locator("#subj-table tbody tr").count() == 10
    page.click("#subj-next")
    page.wait_for_selector("#subj-page:has-text('page 2')")
    assert page.locator("#subj-table tbody tr").count() == 2 and page.is_disabled("#subj-next")
    flow.shot("13-subjects-page-2")
    page.click("#subj-prev")
    page.wait_for_selector("#subj-page:has-text('page 1')")
    assert page.locator("#subj-table tbody tr").count() == 10


def test_jobs_panel_says_what_there_is(flow: Console) -> None:
    page = flow.page
    page.click("a[href='#jobs']")
    page.wait_for_selector("#jobs-body :is(table, .empty)")
    with api(flow) as client:
        has_jobs_api = client.get("/v1/jobs").status_code != 404
    if not has_jobs_api:
        assert "No bulk jobs API on this server yet" in page.inner_text("#jobs-body")
    flow.shot("14-jobs")


# --- errors are messages, not blank screens ----------------------------------------------------
def test_a_pdf_upload_is_a_message(new_console: Any, tmp_path: Path) -> None:
    c = new_console().open()
    page = c.page
    c.page.wait_for_selector("#key-state:has-text('Key set for this tab')")
    pdf = tmp_path / "passport-scan.pdf"
    pdf.write_bytes(PDF)
    page.set_input_files("#try-file", str(pdf))
    page.click("#run-detect")
    text = error_text(page)
    assert "Detect failed" in text and "unsupported_media_type" in text and "HTTP 415" in text, text
    assert "not an image this page can preview" in page.inner_text("#try-result")  # no broken preview
    c.shot("15-error-pdf")


def test_a_pdf_among_enrolment_photos_is_reported_per_file(flow: Console, tmp_path: Path) -> None:
    page = flow.page
    page.click("a[href='#manage']")
    pdf = tmp_path / "scan.pdf"
    pdf.write_bytes(PDF)
    page.set_input_files("#enrol-files", [str(pdf), str(FACES_DIR / "people" / "obama" / "obama_4.jpg")])
    page.wait_for_function("() => document.querySelector('#enrol-progress').value === 2")
    page.wait_for_selector("#enrol-log .bad:has-text('scan.pdf')")
    assert "unsupported_media_type" in page.inner_text("#enrol-log .bad")
    assert "not enrolled" in error_text(page)
    flow.shot("16-error-enrol-pdf")


def test_a_wrong_key_is_a_message(new_console: Any) -> None:
    c = new_console().open(key="fsk_0000000000000000_not-a-real-secret")
    page = c.page
    text = error_text(page)
    assert "wrong or revoked API key" in text and "HTTP 401" in text, text
    page.wait_for_selector("#key-state:has-text('No key set')")
    assert page.evaluate("sessionStorage.getItem('faceserve.console.key')") is None
    assert page.evaluate("document.activeElement.id") == "key-input"
    c.shot("17-error-wrong-key")


def test_webcam_frame_can_be_analysed(new_console: Any) -> None:
    c = new_console().open()
    page = c.page
    page.click("#cam-start")
    page.wait_for_selector("#cam-video:not([hidden])")
    page.wait_for_function("() => document.querySelector('#cam-video').videoWidth > 0")
    page.click("#cam-shot")
    page.wait_for_selector("#try-current:has-text('webcam frame')")
    page.click("#run-detect")
    # the synthetic camera shows no face: an answer with none, drawn, not an error
    page.wait_for_selector("#try-result[data-result=detect]")
    assert re.search(r"\d+ face\(s\) detected", page.inner_text("#try-result figcaption"))
    c.shot("18-webcam-frame")
    page.click("#cam-stop")


# --- keyboard and axe-core -------------------------------------------------------------------
def test_keyboard_reaches_everything_in_order(new_console: Any) -> None:
    c = new_console().open()
    page = c.page
    page.wait_for_selector("#key-state:has-text('Key set for this tab')")
    page.reload()  # focus starts at the top of a fresh page; the tab kept the key
    page.wait_for_selector("#key-state:has-text('Key set for this tab')")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")  # skip link: focus lands in main
    order = []
    page.focus("#key-input")
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
    assert order[:4] == ["Use key", "key-forget", "collection-select", "Try it"], order
    page.focus("a[href='#manage']")
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-manage:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "manage-h"


def _axe(page: Any, axe_source: str) -> list[dict[str, Any]]:
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(axe_source + "\n;true")  # DevTools evaluation: not subject to the page's CSP
    result = page.evaluate("""async () => {
        const r = await axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'] } });
        return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.target.join(' ')) }));
    }""")
    return result


def test_axe_finds_no_serious_violations(flow: Console, axe_source: str) -> None:
    page = flow.page
    report: dict[str, list[dict[str, Any]]] = {}
    # each screen in the state the flow left it: results drawn, a subject open, the jobs panel
    for view in ("try", "manage", "jobs"):
        page.click(f"a[href='#{view}']")
        page.wait_for_selector(f"#view-{view}:not([hidden])")
        report[view] = _axe(page, axe_source)
    page.click("a[href='#manage']")
    page.locator("#face-grid li button:has-text('Delete')").first.click()
    page.wait_for_selector("#confirm[open]")
    report["confirm-dialog"] = _axe(page, axe_source)
    page.keyboard.press("Escape")  # Esc cancels the dialog
    page.wait_for_selector("#confirm:not([open])", state="attached")
    (ARTIFACTS / "axe.json").write_text(json.dumps(report, indent=2))
    serious = {view: [v for v in found if v["impact"] in ("serious", "critical")] for view, found in report.items()}
    assert not any(serious.values()), json.dumps(serious, indent=2)
