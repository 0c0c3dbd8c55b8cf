"""A real browser (headless Debian chromium through selenium) drives the workbench page and saves
a screenshot of each view into docs/figures/serve/."""

from __future__ import annotations

import json
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


GRAPH_PROMPT = "Once upon a time, there was a little girl named"


def _library_graph(model, transcoders_dir):
    from interplab.graph.attribution import attribute
    from interplab.graph.prune import prune
    from interplab.sae.transcoder import load_transcoders

    ids = model.require_tokenizer()(GRAPH_PROMPT, return_tensors="pt")["input_ids"][0]
    return prune(attribute(model, load_transcoders(transcoders_dir), ids, max_features_per_layer=256)).to_dict()


def _label(node: dict) -> str:
    """A node's title on its card (graph.js: graphNodeLabel)."""
    token = json.dumps(node["token"], ensure_ascii=False)  # as JSON.stringify writes it
    return {"feature": f"L{node['layer']} #{node['feature']}", "error": f"error L{node['layer']}",
            "logit": f"logit {token}", "embedding": f"embedding {token}"}[node["kind"]]


def test_graph_view_draws_the_graph_and_shows_a_feature_card(browser, server, tinystories, ts_transcoders, tmp_path):
    from selenium.webdriver.common.by import By

    from interplab.files import write_json
    from interplab.sae.features import FeatureIndex, transcoder_index_path

    expected = _library_graph(tinystories, ts_transcoders)
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    browser.find_element(By.CSS_SELECTOR, ".tab[data-view=graph]").click()
    by_id(browser, "graph-prompt").clear()
    by_id(browser, "graph-prompt").send_keys(GRAPH_PROMPT)
    by_id(browser, "graph-build").click()
    nodes = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#graph-svg .node"), timeout=120)
    assert len(nodes) == len(expected["nodes"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph-svg line.edge")) == len(expected["edges"])
    assert by_id(browser, "status").text == ""
    feature = max((n for n in nodes if n.get_attribute("data-kind") == "feature"),
                  key=lambda n: expected["nodes"][int(n.get_attribute("data-i"))]["influence"])
    node = expected["nodes"][int(feature.get_attribute("data-i"))]
    feature.click()
    promoted = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#graph-card .graph-promoted tr"))
    assert len(promoted) == 8
    card = by_id(browser, "graph-card").text
    assert card.startswith(_label(node)) and f"influence {node['influence']:.4f}" in card
    inputs = browser.find_elements(By.CSS_SELECTOR, "#graph-card .graph-inputs tr")  # its strongest inputs
    assert inputs
    # the layer's feature index (features-<L>.db in the set's folder) adds the top contexts, maximum marked
    contexts = browser.find_elements(By.CSS_SELECTOR, "#graph-card .graph-contexts .ctx")
    with FeatureIndex(transcoder_index_path(ts_transcoders, node["layer"])) as index:
        top = index.top_contexts(node["feature"], 6)
    assert len(contexts) == len(top) > 0
    marked = [c.find_element(By.CSS_SELECTOR, ".tok.max").text.strip() for c in contexts]
    assert marked == [t.tokens[t.max_pos].strip() for t in top]
    shot(browser, "graph.png")
    source = expected["nodes"][int(inputs[0].get_attribute("data-i"))]
    inputs[0].click()  # a row of the card opens that node's card
    wait(browser, lambda d: by_id(d, "graph-card").text.startswith(_label(source)))
    # a graph.json written by the CLI opens from a file: the same drawing, the graph's own numbers
    write_json(tmp_path / "graph.json", expected)
    by_id(browser, "graph-file").send_keys(str(tmp_path / "graph.json"))
    wait(browser, lambda d: "opened from a file" in by_id(d, "graph-summary").text)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph-svg .node")) == len(expected["nodes"])
    # the standalone page (what `interplab sae graph` writes) inlines the same script and draws the same
    from interplab.graph.html import write_graph_html

    browser.get((write_graph_html(expected, tmp_path / "graph.html")).as_uri())
    standalone = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#g .node"))
    assert len(standalone) == len(expected["nodes"])
    standalone[-1].click()  # the logit
    assert by_id(browser, "card").text.startswith(_label(expected["nodes"][-1]))
