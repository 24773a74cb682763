"""One real browser session (headless Chromium through Playwright): log in, approve an item with an edited
answer, and find it in the dataset tab. Set KBLOOP_SCREENSHOTS_DIR to also save a screenshot of every tab
(that is how docs/screenshots/ is made)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from playground import PlaygroundConfig, build_playground, launch
from store import open_db
from store.examples import list_examples
from tests.playground.conftest import seed_feedback
from tests.playground.test_app_client import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium "
                       "(Debian: apt-get install -y chromium)"),
]

def seed_training_history(db, folder: Path) -> None:
    """A running job with a loss curve and two registered adapters: what the Training tab shows mid-run."""
    import math

    from store.adapters import activate_adapter, register_adapter
    from store.jobs import claim_next_job, enqueue_job, log_train_step, set_job_progress

    metrics = {"n_heldout": 4, "heldout_loss": 1.31, "heldout_exact_match": 0.25, "heldout_token_f1": 0.48,
               "stop_rate": 1.0}
    for version in ("v1", "v2"):
        (folder / version).mkdir(parents=True, exist_ok=True)
        register_adapter(db, version=version, path=str(folder / version), base_model="tiny", method="qlora",
                         params={"rank": 8}, dataset_hash=version, dataset_size=40, metrics=metrics)
    activate_adapter(db, "v1")
    job = enqueue_job(db, requester="playground:alice")
    claim_next_job(db, worker_id="docs")
    for step in range(1, 31):
        log_train_step(db, run=f"job-{job.id}", step=step, loss=2.8 * math.exp(-step / 12) + 0.4, job_id=job.id)
    set_job_progress(db, job.id, {"phase": "training", "step": 30, "total": 48, "loss": 0.63, "eta_s": 95})


EDITED = "Report the lost badge at reception; they block it and print a new one the same day."


def test_login_approve_with_edit_and_find_it_in_the_dataset(tmp_path, db_path):
    from playwright.sync_api import expect, sync_playwright

    ids = seed_feedback(open_db(db_path))
    if os.environ.get("KBLOOP_SCREENSHOTS_DIR"):
        seed_training_history(open_db(db_path), tmp_path / "adapters")
    config = PlaygroundConfig(port=free_port(), auth=(("alice", "alice-password"),), admins=("alice",),
                              export_dir=str(tmp_path / "exports"))
    demo = build_playground(config=config, engine=None, db_path=db_path)
    launch(demo, config=config, prevent_thread_lock=True, quiet=True)
    shots = Path(os.environ.get("KBLOOP_SCREENSHOTS_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{config.port}/")
            page.locator("input[type=text]").fill("alice")
            page.locator("input[type=password]").fill("alice-password")
            page.get_by_role("button", name="Login").click()

            # The review tab opens on the first item to review: the uncorrected 👎 answer.
            key = page.locator("#review-key textarea, #review-key input").first
            expect(key).to_have_value(f"i:{ids['badge']}", timeout=30_000)
            expect(page.locator("#whoami")).to_contain_text("alice")
            page.screenshot(path=str(shots / "review.png"), full_page=True)
            answer = page.locator("#review-answer textarea")
            answer.fill(EDITED)
            page.locator("#approve-btn").click()
            expect(page.locator("#review-message")).to_contain_text("Approved", timeout=30_000)
            expect(page.locator("#review-message")).to_contain_text("with your edit")
            expect(key).not_to_have_value(f"i:{ids['badge']}")  # moved on to the next item

            page.get_by_role("tab", name="Dataset").click()
            page.locator("#dataset-search textarea, #dataset-search input").first.fill("reception")
            page.locator("#dataset-search-btn").click()
            expect(page.locator("#dataset-table")).to_contain_text("print a new one", timeout=30_000)
            page.screenshot(path=str(shots / "dataset.png"), full_page=True)

            page.get_by_role("tab", name="Chat").click()
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "chat.png"), full_page=True)
            page.get_by_role("tab", name="Training").click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "training.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    (ex,) = [e for e in list_examples(open_db(db_path), status="approved") if e.interaction_id == ids["badge"]]
    assert ex.answer == EDITED and ex.reviewer == "alice"
    assert (shots / "review.png").stat().st_size > 10_000
