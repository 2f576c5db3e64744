"""The report page in a real headless Chromium: its first screen holds the findings, nothing is wider than
the window, every plot renders, and the evidence opens on demand. Skips, saying why, without chromium."""
import json

import pandas as pd

from browser import images_rendered, severe_logs
from test_report_findings import make_runs, to_store

#: A sweep as a reviewer read one: 5 methods x 3 noise rates, 3 learning rates, 5 seeds.
MEANS = {"ce": {0.0: 62.0, 0.4: 45.0, 0.8: 20.0}, "dspt": {0.0: 62.5, 0.4: 57.0, 0.8: 48.0},
         "gce": {0.0: 60.0, 0.4: 56.0, 0.8: 25.0}, "mae": {0.0: 55.0, 0.4: 52.0, 0.8: 41.0},
         "sce": {0.0: 61.0, 0.4: 50.0, 0.8: 30.0}}


def sweep_store(folder):
    runs = make_runs(MEANS, spread=1.5, lrs=(0.002, 0.02, 0.2), dataset="flowers")
    for run_id in runs["run_id"]:  # logs for the mechanism plot
        log = folder / "runs" / run_id / "log.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text("".join(json.dumps({"event": "epoch", "epoch": e, "grad_norm_clean": 1 / (e + 1),
                                           "grad_norm_noisy": 0.5 / (e + 1), "loss_clean": 1.0,
                                           "loss_noisy": 2.0}) + "\n" for e in range(4)))
    runs["run_id"] = [str(folder / "runs" / r) for r in runs["run_id"]]
    to_store(runs, folder / "results.csv")
    return folder / "results.csv"


def test_the_first_screen_answers_and_the_page_fits_the_window(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from dspt.report import report

    rep, files = report([sweep_store(tmp_path)], tmp_path / "report")
    browser.set_window_size(1280, 900)
    browser.get(files["report.html"].as_uri())
    assert severe_logs(browser) == []
    view = browser.execute_script("return [window.innerWidth, window.innerHeight, "
                                  "document.documentElement.scrollWidth];")
    width, height, scroll_width = view
    assert scroll_width <= width, "the page scrolls sideways: a table is wider than the window"
    box = browser.execute_script("const r = document.getElementById('findings').getBoundingClientRect();"
                                 "return [r.top, r.bottom, r.width];")
    assert box[0] < 150 and box[1] <= height, f"the findings do not fit the first screen: {box}, {height}"
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#findings li")]
    assert items == rep.findings.sentences
    assert any("dspt against ce: clearly ahead in" in t for t in items)
    rows = browser.find_elements(By.CSS_SELECTOR, "#findings-table tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, "td").text for r in rows] == ["sym 0 %", "sym 40 %", "sym 80 %"]
    # the paper table comes next: methods as columns, one row per noise rate
    header = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#paper-0 thead th")]
    assert header == ["dataset", "noise", "zero-shot", "ce", "dspt", "gce", "mae", "sce"]
    # plots are in the page itself and render
    imgs = images_rendered(browser)
    pngs = [n for n in files if n.endswith(".png")]
    assert len(imgs) == len(pngs) == 3 and all(src.startswith("data:image/png") and ok and w > 0
                                               for src, ok, w in imgs)
    # the evidence is folded until asked for
    comparison = browser.find_element(By.CSS_SELECTOR, "#evidence details table")
    assert not comparison.is_displayed()
    browser.find_element(By.CSS_SELECTOR, "#evidence details summary").click()
    assert comparison.is_displayed()
    assert browser.execute_script("return document.documentElement.scrollWidth;") <= width
    cells = pd.read_csv(files["cells.csv"])
    assert len(cells) == 15
