"""A real browser (headless Debian chromium through selenium) drives the workbench page and saves
a screenshot of each view into docs/figures/serve/."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures" / "serve"


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="interplab-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def shot(driver, name):
    FIGURES.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(FIGURES / name))


def test_playground_generates_baseline_and_steered_side_by_side(browser, server):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    prompt = by_id(browser, "prompt")
    prompt.clear()
    prompt.send_keys("Once upon a time, there was a little cat named")
    Select(by_id(browser, "source")).select_by_value("vector:happy")
    by_id(browser, "layers").send_keys("0")
    slider = by_id(browser, "scale")
    slider.click()
    slider.send_keys(Keys.HOME)  # -20
    slider.send_keys(*[Keys.ARROW_RIGHT] * 56)  # 56 steps of 0.5
    assert by_id(browser, "scale-value").text == "8"
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("30")
    by_id(browser, "generate").click()
    wait(browser, lambda d: by_id(d, "generate").is_enabled() and by_id(d, "steered").text)
    baseline, steered = by_id(browser, "baseline").text, by_id(browser, "steered").text
    assert baseline and steered and baseline != steered
    assert by_id(browser, "status").text == ""
    shot(browser, "playground.png")


def test_feature_browser_search_card_highlight_and_steer(browser, server):
    from selenium.webdriver.common.by import By

    index = server.state.saes.index("ts")
    try:  # a word from a label that the index really has
        label = next(index.summary(f).label for f in range(64) if index.summary(f).label)
    finally:
        index.close()
    word = label.split("'")[1].strip() or label.split("'")[3].strip()
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    browser.find_element(By.CSS_SELECTOR, ".tab[data-view=features]").click()
    by_id(browser, "feature-query").send_keys(word)
    by_id(browser, "feature-search").click()
    hits = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-results li.hit"))
    hits[0].click()
    lit = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-card .tok.lit"))
    assert lit and "234, 88, 12" in lit[0].get_attribute("style")  # shaded by its activation
    assert browser.find_elements(By.CSS_SELECTOR, "#feature-card .effects td.pos")
    assert browser.find_elements(By.CSS_SELECTOR, "#feature-card svg.hist rect")
    shot(browser, "feature_browser.png")
    by_id(browser, "steer-feature").click()
    assert by_id(browser, "playground").is_displayed()
    assert by_id(browser, "source").get_attribute("value").startswith("feature:ts:")


def test_lens_view_shows_heatmap_and_attention(browser, server, tinystories):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    browser.find_element(By.CSS_SELECTOR, ".tab[data-view=lens]").click()
    by_id(browser, "lens-layer").clear()
    by_id(browser, "lens-layer").send_keys("1")
    by_id(browser, "lens-run").click()
    rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#attn-grid tr"))
    lens_rows = browser.find_elements(By.CSS_SELECTOR, "#lens-grid tr")
    assert len(lens_rows) == 1 + 1 + tinystories.n_layers  # header, embed, one per block
    n_tokens = len(rows) - 1
    assert n_tokens > 5 and len(rows[1].find_elements(By.TAG_NAME, "td")) == n_tokens
    shot(browser, "lens.png")
