"""The dashboard in headless Chromium (Debian's, driven by Playwright): login with a token that never
enters a URL, the fleet map, the project's clusters, a real job's loss plot growing as the job logs
steps, and a viewer of another project who sees none of it."""

import os
import re

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture
def server(live_service):
    base, tokens, grant = live_service
    grant("acme", "llm", "member")
    grant("globex", "web", "viewer")
    yield base, {"llm": tokens["llm", "member"], "web": tokens["web", "viewer"]}


def _login(page, base, token):
    page.goto(f"{base}/dashboard")
    page.fill("#token", token)
    page.click("#login-button")
    page.wait_for_selector("#app", state="visible", timeout=30_000)
    assert token not in page.url


@pytest.mark.slow
def test_dashboard_shows_the_fleet_clusters_and_a_live_loss_plot(server, library_corpus, tmp_path):
    import httpx
    from playwright.sync_api import sync_playwright

    base, tokens = server
    h = {"Authorization": f"Bearer {tokens['llm']}"}
    httpx.post(f"{base}/v1/projects/llm/clusters", headers=h, json={"name": "here", "gpus": 2}).raise_for_status()
    config = {"data": {"path": str(library_corpus)}, "model": {"preset": "tiny"},
              "train": {"steps": 400, "checkpoint_every": 1000, "eval_every": 1000, "precision": "fp32", "seq_len": 32,
                        "micro_batch": 2, "global_batch": 4}}
    r = httpx.post(f"{base}/v1/projects/llm/jobs", headers=h, json={"cluster": "here", "config": config, "max_restarts": 0})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            _login(page, base, tokens["llm"])
            assert "llm-member" in page.inner_text("#who")
            page.wait_for_selector("#fleet .leaf", timeout=30_000)  # the page fetches the fleet after login
            page.wait_for_function("document.querySelector('#clusters').innerText.includes('here')", timeout=30_000)
            # the project's endpoints (none yet) and the calls they answered
            page.wait_for_function("document.querySelector('#endpoints').innerText.includes('OpenAI base URL')", timeout=30_000)
            page.wait_for_function("document.querySelector('#tokens').innerText.includes('completion tokens')", timeout=30_000)
            loss = f"#job-{job} .plot[data-key=loss]"
            page.wait_for_function(f"(document.querySelector('{loss}')?.dataset.points | 0) >= 2", timeout=240_000)
            first = int(page.get_attribute(loss, "data-points"))
            # the page polls; the plot must grow as the job logs more steps, without a reload
            page.wait_for_function(f"(document.querySelector('{loss}')?.dataset.points | 0) > {first}", timeout=120_000)
            assert page.locator(f"{loss} polyline").count() == 1
            # MFU as a percentage, as the CLI and the plan show it (the API keeps the fraction)
            mfu = page.inner_text(f"#job-{job} .plot[data-key=mfu]")
            logged = [s["mfu"] for s in httpx.get(f"{base}/v1/projects/llm/jobs/{job}/metrics", headers=h).json()["steps"]]
            shown = float(re.search(r"last ([0-9.e+-]+)%", mfu).group(1))  # 3 significant digits of a logged step's
            assert all(0 < m < 1 for m in logged) and any(abs(100 * m - shown) <= 0.005 * shown for m in logged), (mfu, logged)
            page.screenshot(path=str(tmp_path / "dashboard-member.png"), full_page=True)
            assert page.evaluate("sessionStorage.getItem('token')") == tokens["llm"]

            viewer = browser.new_page()
            _login(viewer, base, tokens["web"])
            viewer.wait_for_function("document.querySelector('#jobs').innerText.includes('no jobs')", timeout=30_000)
            assert viewer.locator("#project option").all_inner_texts() == ["web"]
            assert "here" not in viewer.inner_text("#clusters") and "here" not in viewer.inner_text("#fleet")
            viewer.screenshot(path=str(tmp_path / "dashboard-viewer.png"), full_page=True)
            shots = os.environ.get("SUPERCLUSTER_SCREENSHOTS")
            if shots:  # keep them for a report
                import shutil

                for name in ("dashboard-member.png", "dashboard-viewer.png"):
                    shutil.copy(tmp_path / name, os.path.join(shots, name))
            browser.close()
    finally:
        httpx.delete(f"{base}/v1/projects/llm/jobs/{job}", headers=h)
