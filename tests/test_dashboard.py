"""/dashboard in a real browser (headless Chromium through Selenium) against a real
`kv3d serve` that served a seeded workload of two tenants, and /v1/kv3d/analytics over HTTP.

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/test.sh installs them when missing).
``KV3D_DASHBOARD_SCREENSHOT=path.png`` also saves the laptop-sized screenshot there (the
README's docs/dashboard.png is made that way).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL_ID, running_server

pytestmark = pytest.mark.slow

KEYS = {"alice": "alice-key-123", "bob": "bob-key-456"}
SYSTEMS = {
    "alice": "You are a support agent for the Acme router company. Answer briefly and politely, citing the "
             "manual section when you can. Never promise refunds.",
    "bob": "You are a travel assistant for Contoso Airlines. Help customers with bookings, baggage and seat "
           "questions. Keep your answers under three sentences.",
}
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def seed(url: str, tenant: str, conversations: int, turns: int = 2) -> None:
    """Chats of one tenant: one system prompt (a family), a few turns each."""
    rng = random.Random(tenant)
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    for i in range(conversations):
        msgs = [{"role": "system", "content": SYSTEMS[tenant]},
                {"role": "user", "content": f"Question {i}: how do I reset item {rng.randint(1, 99)}?"}]
        for _ in range(turns):
            r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                           json={"model": MODEL_ID, "messages": msgs, "max_tokens": 12, "temperature": 0})
            r.raise_for_status()
            msgs += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And then?"}]


def metrics(url: str, key: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    overrides = [f"+server.api_keys={{alice: {KEYS['alice']}, bob: {KEYS['bob']}}}",
                 "analytics.mrc_sample_rate=1.0", "analytics.refresh_s=1", "cache.hot_sessions=1"]
    with running_server(tmp, overrides) as srv:
        seed(srv.url, "alice", 8)
        seed(srv.url, "bob", 4)
        time.sleep(1.0)                       # spills in flight land in the warm tier
        yield srv, tmp


@pytest.fixture()
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/test.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1366,900"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def wait_for(drv, script: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = drv.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def open_with_key(drv, url: str, key: str | None) -> None:
    drv.get(url + "/dashboard")
    if key is not None:
        drv.execute_script("sessionStorage.setItem('kv3d.apiKey', arguments[0])", key)
        drv.get(url + "/dashboard")


def test_dashboard_shows_the_tenants_own_figures(served, browser):
    srv, tmp = served
    open_with_key(browser, srv.url, KEYS["alice"])
    wait_for(browser, "return window.kv3d.last && document.querySelectorAll('#families tbody tr').length > 0")
    browser.execute_script("window.kv3d.last = null")     # the next refresh: compared with /metrics below
    data = wait_for(browser, "return window.kv3d.last")
    m = metrics(srv.url, KEYS["alice"])
    api = httpx.get(srv.url + "/v1/kv3d/analytics", headers={"Authorization": f"Bearer {KEYS['alice']}"},
                    timeout=30).json()

    # families: alice's only, as the JSON endpoint lists them; bob's exists only as a count
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#families tbody tr')].map(r => [r.dataset.id, +r.dataset.requests])")
    assert rows == [[f["id"], f["requests"]] for f in api["families"]["top"]]
    assert len(rows) == 1 and rows[0][1] == 16 and api["families"]["other_tenants"] == 1
    page = browser.page_source
    assert "You are a support agent for" in page            # a preview: the first words only
    assert "Acme" not in page and "Contoso" not in page and "travel assistant" not in page

    # the hit rate and the memory figures are those of /metrics
    hit = float(browser.find_element("id", "hit-rate").get_attribute("data-value"))
    assert hit == pytest.approx(m["kv3d_prefix_hit_rate"]) and 0 < hit < 1
    tiers = browser.execute_script(
        "return [...document.querySelectorAll('#tiers tbody tr')].map(r => [r.dataset.tier, +r.dataset.bytes, +r.dataset.sessions])")
    assert {t for t, _, _ in tiers} >= {"hot", "warm"}
    for tier, nbytes, sessions in tiers:
        assert nbytes == m[f'kv3d_kv_bytes{{tier="{tier}"}}'], tier
        # the host tier holds family prefixes only: no kv3d_sessions series
        assert sessions == (m[f'kv3d_sessions{{tier="{tier}"}}'] if tier != "host" else 0), tier
    assert data["memory"]["sessions_held"] == sum(s for _, _, s in tiers) > 0

    # the what-if curve: drawn, and never falling as the cache grows
    ys = browser.execute_script("return window.kv3d.charts.whatif.data[1]")
    assert len(ys) > 2 and all(a <= b + 1e-12 for a, b in zip(ys, ys[1:])) and ys[-1] > 0

    shot = tmp / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("KV3D_DASHBOARD_SCREENSHOT"):
        browser.save_screenshot(os.environ["KV3D_DASHBOARD_SCREENSHOT"])
    # a phone: the page fits its width (wide tables scroll inside their own box)
    browser.set_window_size(390, 844)
    time.sleep(1.5)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    browser.save_screenshot(str(tmp / "dashboard-phone.png"))


def test_without_the_key_the_page_shows_no_data(served, browser):
    srv, _ = served
    open_with_key(browser, srv.url, None)
    wait_for(browser, "return !document.getElementById('auth').hidden")
    assert browser.execute_script("return window.kv3d.last") is None
    assert browser.execute_script("return document.getElementById('data').hidden")
    assert browser.execute_script("return document.querySelectorAll('tbody tr').length") == 0
    assert "Acme" not in browser.page_source and "Contoso" not in browser.page_source
    open_with_key(browser, srv.url, "wrong-key")
    wait_for(browser, "return document.getElementById('auth').textContent.includes('refused')")
    assert browser.execute_script("return document.querySelectorAll('tbody tr').length") == 0


def test_the_json_endpoint_needs_the_key_and_checks_its_parameters(served):
    srv, _ = served
    url = srv.url + "/v1/kv3d/analytics"
    assert httpx.get(url, timeout=10).status_code == 401
    bob = {"Authorization": f"Bearer {KEYS['bob']}"}
    body = httpx.get(url + "?top=5", headers=bob, timeout=30).json()
    assert [f["preview"].split()[:4] for f in body["families"]["top"]] == [["You", "are", "a", "travel"]]
    assert "Acme" not in str(body)
    for query, param in (("?top=0", "top"), ("?top=x", "top"), ("?limit=3", "limit")):
        r = httpx.get(url + query, headers=bob, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for section in ("memory", "what_if", "roi", "latency"):
        assert "method" in body[section]
    roi = body["roi"]                 # a prompt token priced from the steps by kind
    assert roi["seconds_per_prefill_token_estimate"] in ("marginal", "upper bound")
    assert roi["seconds_per_prefill_token"] > 0 and roi["prefill_tokens_saved"] > 0
    assert roi["device_seconds_saved"] == pytest.approx(roi["prefill_tokens_saved"] * roi["seconds_per_prefill_token"])
    assert httpx.get(srv.url + "/dashboard/../pyproject.toml", timeout=10).status_code == 404
