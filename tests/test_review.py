"""The review page of `dspt audit` (dspt.review): a self-contained HTML file to fix wrong labels in a browser.

Unit tests read the HTML; the browser tests load it in a real headless Chromium (selenium), take two suggestions,
download the corrected labels and train on them. They skip, saying why, where chromium, chromedriver or
selenium is missing (CI installs them: .ci/run).
"""
from __future__ import annotations

import csv
import json
import os
import re
import time
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

from dspt.data.table import load_table, read_table
from dspt.review import relative_src, write_review_page

from browser import images_rendered, severe_logs
from imagefolders import make_image_folder

#: Class names a page must survive: a comma (CSV quoting), HTML tags, an ampersand and double quotes.
CLASSES = ["class_0", "red, dark", '<b>x</b> & "q"']
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# test data: class folders of small images, and an audit table over them


def make_images(root: Path) -> list[Path]:
    """3 classes x 8 images of 24 px in folders class_0..2 (the table names them CLASSES); one file name holds
    a comma and quotes."""
    make_image_folder(root, classes=3, per_class=8, size=24, seed=3)
    (root / "class_1" / "002.png").rename(root / "class_1" / 'img, "2".png')
    return sorted(p.resolve() for p in root.rglob("*.png"))


def make_table(paths: list[Path], flag: list[int], extra: bool = True) -> pd.DataFrame:
    """An audit table as `dspt audit` writes it: given = the folder, the rows `flag` (indices into `paths`)
    flagged with the next class as suggestion and low scores; most suspicious first."""
    rng = np.random.default_rng(0)
    given = [CLASSES[int(p.parent.name.removeprefix("class_"))] for p in paths]
    suggested = list(given)
    quality = rng.uniform(0.5, 1.0, len(paths))
    for k, i in enumerate(flag):
        suggested[i] = CLASSES[(CLASSES.index(given[i]) + 1) % len(CLASSES)]
        quality[i] = 0.05 + 0.02 * k
    table = pd.DataFrame({"path": [str(p) for p in paths], "given": given, "suggested": suggested,
                          "label_quality": quality, "given_prob": quality * 0.8,
                          "suggested_prob": 1 - quality * 0.8, "flagged": [i in flag for i in range(len(paths))]})
    if extra:
        table["fold"] = rng.integers(0, 5, len(paths))
        table["margin"] = rng.normal(size=len(paths))
    table = table.sort_values("label_quality", kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    paths = make_images(root / "images")
    comma = next(i for i, p in enumerate(paths) if "," in p.name)
    flag = [0, 9, comma, 17, 20]  # a suspect per class at least, and the file with a comma in its name
    return root, paths, make_table(paths, flag)


class _Tags(HTMLParser):
    """Start tags with their attributes, and each <script>'s attributes and text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append((dict(attrs), ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def parse(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def page_data(tags: _Tags) -> dict:
    """The rows and class names the page builds its CSV from."""
    (text,) = [text for attrs, text in tags.scripts if attrs.get("id") == "review-data"]
    return json.loads(text)


# ---------------------------------------------------------------------------------------------------------------
# unit tests: the HTML


def test_page_is_self_contained_and_shows_every_suspect(dataset, tmp_path):
    table = dataset[2]
    out = write_review_page(table, CLASSES, tmp_path / "review.html")
    assert out == tmp_path / "review.html"
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text, re.IGNORECASE)  # nothing to fetch: no http(s) URL at all, src or href
    tags = parse(out)
    assert not [a for t, a in tags.tags if t in ("script", "img", "link", "iframe") and a.get("src", "") and
                not a["src"].startswith("data:")]
    assert all(a.get("href", "").startswith(("#", "data:")) for t, a in tags.tags if t in ("a", "link"))
    imgs = tags.find("img")
    suspects = table[table["flagged"]]
    assert len(imgs) == len(suspects) == 5
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in imgs)
    cards = [int(a["data-row"]) for a in tags.find("article")]
    assert sorted(cards) == sorted(suspects.index.tolist())
    # keep / suggest / another class (with its list) / drop for each suspect
    for row in cards:
        assert {a["value"] for a in tags.find("input", name=f"c{row}")} == {"keep", "suggest", "other", "drop"}
        assert len(tags.find("select", **{"data-row": str(row)})) == 1
    assert len(tags.find("button", id="download")) == 1
    # the summary: counts and a line per score, the extra numeric columns included
    assert "<b>24</b> training images in 3 classes" in text and "<b>5</b> flagged" in text
    for score in ("label_quality", "given_prob", "suggested_prob", "fold", "margin"):
        assert f"<dt>{score}</dt>" in text
    # every table row travels with the page (the CSV holds them all), with the exact class names
    data = page_data(tags)
    assert data["classes"] == CLASSES
    assert [r[0] for r in data["rows"]] == table["path"].tolist()
    assert [data["classes"][r[1]] for r in data["rows"]] == table["given"].tolist()
    assert [data["classes"][r[2]] for r in data["rows"]] == table["suggested"].tolist()


def test_class_names_with_html_characters_are_escaped(dataset, tmp_path):
    table = dataset[2]
    evil = '</script><script>alert("x")</script>'
    classes = CLASSES + [evil]
    t = table.copy()
    t.loc[t["flagged"].idxmax(), "suggested"] = evil
    out = write_review_page(t, classes, tmp_path / "review.html")
    text = out.read_text(encoding="utf-8")
    tags = parse(out)
    assert "<b>x</b>" not in text and "<script>alert" not in text  # never raw, in the HTML or in the JSON
    assert len(tags.find("script")) == 3  # the page's own: error handler, data, code
    assert "&lt;b&gt;x&lt;/b&gt; &amp; &#34;q&#34;" in text  # shown escaped in the cards and headings
    assert "&lt;/script&gt;&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
    assert page_data(tags)["classes"] == classes  # the JSON the CSV is built from holds the names unchanged


def test_relative_image_paths_when_not_embedded(dataset, tmp_path):
    _, paths, table = dataset
    out = write_review_page(table, CLASSES, tmp_path / "pages" / "sub" / "review.html", embed=False)
    imgs = parse(out).find("img")
    suspects = table[table["flagged"]]
    assert len(imgs) == len(suspects)
    for a in imgs:
        src = a["src"]
        assert not src.startswith(("data:", "/", "file:")) and src.startswith("../../")
        assert (out.parent / unquote(src)).resolve() in set(paths)
    expected = {relative_src(p, out.parent) for p in suspects["path"]}
    assert {a["src"] for a in imgs} == expected
    assert any("%2C" in s and "%22" in s for s in expected)  # the comma and quotes percent-encoded


@pytest.mark.parametrize("embed", [True, False])
def test_broken_and_missing_images_become_placeholders(dataset, tmp_path, embed):
    table = dataset[2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    t = table.copy()
    first, second = t.index[t["flagged"]][:2]
    t.loc[first, "path"] = str(broken)
    t.loc[second, "path"] = str(tmp_path / "gone.png")
    out = write_review_page(t, CLASSES, tmp_path / "review.html", embed=embed)
    text = out.read_text(encoding="utf-8")
    tags = parse(out)
    holders = [a for a in tags.find("div") if a.get("class") == "placeholder"]
    assert len(holders) == 2 and "file not found" in text and "unreadable image" in text
    assert len(tags.find("img")) == int(t["flagged"].sum()) - 2
    assert len(tags.find("article")) == int(t["flagged"].sum())  # still a choice for each: drop it
    assert "2 could not be read" in text


def test_max_items_and_top(dataset, tmp_path):
    _, _, table = dataset
    tags = parse(write_review_page(table, CLASSES, tmp_path / "a.html", max_items=3))
    rows = [int(a["data-row"]) for a in tags.find("article")]
    assert sorted(table.loc[rows, "rank"]) == [1, 2, 3]
    assert "the 3 most suspicious of 5" in (tmp_path / "a.html").read_text()
    tags = parse(write_review_page(table, CLASSES, tmp_path / "b.html", top=8))
    rows = {int(a["data-row"]) for a in tags.find("article")}
    assert rows == set(table.index[table["flagged"] | (table["rank"] <= 8)])
    assert len(page_data(tags)["rows"]) == len(table)  # the CSV still covers every row


def test_no_suspects_and_bad_input(dataset, tmp_path):
    _, _, table = dataset
    quiet = table.assign(flagged=False)
    text = write_review_page(quiet, CLASSES, tmp_path).read_text()  # a folder: review.html inside
    assert "No suspects" in text and "<img" not in text and (tmp_path / "review.html").is_file()
    with pytest.raises(ValueError, match="suggested"):
        write_review_page(table.drop(columns=["suggested"]), CLASSES, tmp_path / "x.html")
    with pytest.raises(ValueError, match="not among"):
        write_review_page(table, CLASSES[:2], tmp_path / "x.html")


def test_the_template_is_installed_as_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["dspt"]
    template = REPO / "src" / "dspt" / "templates" / "review.html"
    assert template.is_file()
    assert any(fnmatch("templates/review.html", p) for p in patterns)
    assert any(d.split(">")[0].split("<")[0].strip().lower() == "jinja2" for d in cfg["project"]["dependencies"])


# ---------------------------------------------------------------------------------------------------------------
# browser tests: headless Chromium through selenium


def download_to(driver, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    from selenium.common.exceptions import WebDriverException

    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    except WebDriverException:  # an older Chromium
        driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})


def wait_for_file(folder: Path, name: str, timeout: float = 30) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        path = folder / name
        if path.is_file() and not list(folder.glob("*.crdownload")) and path.stat().st_size > 0:
            return path
        time.sleep(0.1)
    raise AssertionError(f"no {name} in {folder} after {timeout} s: {sorted(os.listdir(folder))}")


def click(driver, css: str):
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()
    return el


def reload_until(driver, restored, timeout: float = 20) -> bool:
    """Reload until `restored()` holds; False if it never does within `timeout` seconds.

    Chromium hands a page's localStorage writes to the browser process asynchronously, so a reload a few
    milliseconds after the last write may still read the state before it (seen once on a loaded CI machine).
    A page whose storage never persists still fails here, just after the timeout.
    """
    end = time.monotonic() + timeout
    while True:
        time.sleep(0.5)
        driver.refresh()
        if restored():
            return True
        if time.monotonic() > end:
            return False


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text



def download_csv(browser, tmp_path: Path) -> tuple[Path, list[list[str]]]:
    """Press the download button; the file it saved and its rows (no console error on the way)."""
    downloads = tmp_path / "downloads"
    download_to(browser, downloads)
    click(browser, "#download")
    got = wait_for_file(downloads, "corrected_labels.csv")
    assert severe_logs(browser) == []
    with got.open(newline="", encoding="utf-8") as fh:
        return got, list(csv.reader(fh))


def test_browser_take_two_suggestions_download_and_train(browser, dataset, tmp_path):
    table = dataset[2]
    page = write_review_page(table, CLASSES, tmp_path / "page" / "review.html")
    browser.get(page.as_uri())
    assert severe_logs(browser) == []
    shown = images_rendered(browser)
    assert len(shown) == int(table["flagged"].sum()) == 5
    assert all(done and width > 0 for _, done, width in shown), shown
    assert text_of(browser, "counter") == "No changes"

    flagged = table.index[table["flagged"]].tolist()
    comma = next(i for i in flagged if "," in table.loc[i, "path"])
    chosen = [comma, next(i for i in flagged if i != comma and '"' in table.loc[i, "suggested"])]
    for row in chosen:
        el = click(browser, f'.card[data-row="{row}"] input[value="suggest"]')
        assert el.is_selected()
    assert text_of(browser, "counter") == "2 changes: 2 relabelled, 0 dropped"

    got, rows = download_csv(browser, tmp_path)
    assert rows[0] == ["path", "label"]
    expected = [[p, s if i in chosen else g] for i, (p, g, s) in
                enumerate(zip(table["path"], table["given"], table["suggested"]))]
    assert rows[1:] == expected  # every row, exactly the two labels changed
    assert sum(r[1] != g for r, g in zip(rows[1:], table["given"])) == 2
    assert '"' in got.read_text() and "," in table.loc[comma, "path"]  # quoted where needed

    # dspt reads it as it is: the table loader, then a tiny training run on it
    parsed, _ = read_table(got)
    assert [(r["path"], r["label"]) for r in parsed] == [tuple(r) for r in expected]
    splits = load_table(got)
    assert len(splits.train) + len(splits.test) == len(table)

    from dspt.config import RunConfig
    from dspt.train import train

    metrics = train(RunConfig(data=str(got), model="dspt-tiny", pretrained=None, shots=4, epochs=1, views=1,
                              seed=0, output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                              progress=False))
    assert (tmp_path / "run" / "metrics.json").is_file() and 0 <= metrics["test_acc"] <= 100  # percent
    info = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert metrics["classes"] == 3 and info["n_pool"] + metrics["n_test"] == len(table)  # every row trained on


def test_browser_relative_images_placeholders_drop_and_reload(browser, dataset, tmp_path):
    table = dataset[2]
    t = table.copy()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    first, second, third = t.index[t["flagged"]][:3]
    t.loc[first, "path"] = str(broken)
    t.loc[second, "path"] = str(tmp_path / "gone.png")
    page = write_review_page(t, CLASSES, tmp_path / "pages" / "sub" / "review.html", embed=False)
    browser.get(page.as_uri())
    assert severe_logs(browser) == []
    shown = images_rendered(browser)
    assert len(shown) == int(t["flagged"].sum()) - 2
    assert all(src.startswith("file:") and done and width > 0 for src, done, width in shown), shown
    assert len(browser.find_elements("css selector", ".placeholder")) == 2

    click(browser, f'.card[data-row="{first}"] input[value="drop"]')  # drop the unreadable image
    click(browser, f'.card[data-row="{third}"] input[value="suggest"]')
    click(browser, f'.card[data-row="{third}"] input[value="keep"]')  # changed its mind: no change
    assert text_of(browser, "counter") == "1 change: 0 relabelled, 1 dropped"
    assert text_of(browser, "rows-info") == f"CSV: {len(t) - 1} of {len(t)} images"

    # the choices survive a reload (localStorage)
    assert reload_until(browser, lambda: browser.find_element(
        "css selector", f'.card[data-row="{first}"] input[value="drop"]').is_selected())
    assert text_of(browser, "counter") == "1 change: 0 relabelled, 1 dropped"

    got, rows = download_csv(browser, tmp_path)
    assert rows[1:] == [[p, g] for i, (p, g) in enumerate(zip(t["path"], t["given"])) if i != first]


def test_browser_another_class_from_the_list(browser, dataset, tmp_path):
    """Neither the given label nor the suggestion: the reviewer picks a third class from the card's list."""
    from selenium.webdriver.support.ui import Select

    table = dataset[2]
    page = write_review_page(table, CLASSES, tmp_path / "page" / "review.html")
    browser.get(page.as_uri())
    row = next(i for i in table.index[table["flagged"]] if table.loc[i, "given"] == "class_0")
    other = next(c for c in CLASSES if c not in (table.loc[row, "given"], table.loc[row, "suggested"]))
    card = f'.card[data-row="{row}"]'

    click(browser, f'{card} input[value="other"]')  # no class chosen yet: nothing changes
    assert text_of(browser, "counter") == "No changes"
    select = click(browser, f"{card} select.other-class")  # the list fills on first use, without the given class
    names = [o.text for o in Select(select).options]
    assert names == ["choose…"] + [c for c in CLASSES if c != table.loc[row, "given"]]
    Select(select).select_by_visible_text(other)
    assert browser.find_element("css selector", f'{card} input[value="other"]').is_selected()
    assert "is-other" in browser.find_element("css selector", card).get_attribute("class")
    assert text_of(browser, "counter") == "1 change: 1 relabelled, 0 dropped"

    assert reload_until(browser, lambda: Select(browser.find_element(
        "css selector", f"{card} select.other-class")).first_selected_option.text == other)
    assert browser.find_element("css selector", f'{card} input[value="other"]').is_selected()

    _, rows = download_csv(browser, tmp_path)
    expected = [[p, other if i == row else g] for i, (p, g) in enumerate(zip(table["path"], table["given"]))]
    assert rows[1:] == expected  # exactly that one label changed, to the chosen class

    click(browser, f'{card} input[value="keep"]')  # back to the given label: the list forgets the choice
    assert text_of(browser, "counter") == "No changes"
    assert Select(browser.find_element("css selector", f"{card} select.other-class")).first_selected_option.text \
        == "choose…"


def test_groups_come_in_the_order_of_their_most_suspicious_image(dataset, tmp_path):
    table = dataset[2]
    page = write_review_page(table, CLASSES, tmp_path / "review.html")
    ranks = [int(c["data-rank"]) for c in parse(page).find("article", **{"class": "card"})]
    firsts = _group_first_ranks(page.read_text())
    assert len(firsts) > 1 and firsts == sorted(firsts) and min(ranks) == firsts[0]


def _group_first_ranks(text: str) -> list[int]:
    """The rank of the first card of each group section, in page order."""
    out = []
    for chunk in text.split('<section class="group"')[1:]:
        m = re.search(r'data-rank="(\d+)"', chunk)
        out.append(int(m.group(1)))
    return out


def test_browser_type_a_class_name_and_view_the_most_suspicious_first(browser, dataset, tmp_path):
    """The type-ahead box picks a class by name (for 1000-class data, where a list is too long to scroll), and the
    flat view shows every suspect most suspicious first across class pairs; both survive a reload."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    table = dataset[2]
    page = write_review_page(table, CLASSES, tmp_path / "page" / "review.html")
    browser.get(page.as_uri())
    assert severe_logs(browser) == []
    options = browser.execute_script("return Array.from(document.querySelectorAll('#class-list option'))"
                                     ".map(o => o.value);")
    assert options == CLASSES  # one shared list, every class
    row = next(i for i in table.index[table["flagged"]] if table.loc[i, "given"] == "class_0")
    other = next(c for c in CLASSES if c not in (table.loc[row, "given"], table.loc[row, "suggested"]))
    card = f'.card[data-row="{row}"]'

    box = click(browser, f"{card} input.class-search")
    box.send_keys("no such class", Keys.TAB)  # not a class: marked, nothing changes
    assert "unknown" in box.get_attribute("class") and text_of(browser, "counter") == "No changes"
    box.clear()
    box.send_keys(other.upper(), Keys.TAB)  # a class name, in any case
    assert text_of(browser, "counter") == "1 change: 1 relabelled, 0 dropped"
    assert browser.find_element("css selector", f'{card} input[value="other"]').is_selected()
    assert Select(browser.find_element("css selector", f"{card} select.other-class")).first_selected_option.text \
        == other
    assert box.get_attribute("value") == other

    click(browser, "#view-flat")
    ranks = browser.execute_script("return Array.from(document.querySelectorAll('#flat .card'))"
                                   ".map(c => Number(c.dataset.rank));")
    assert ranks == sorted(int(r) for r in table.loc[table["flagged"], "rank"])  # every suspect, by rank
    assert not browser.find_element("css selector", "section.group").is_displayed()
    assert reload_until(browser, lambda: browser.find_element("css selector", "#view-flat").is_selected())
    assert browser.execute_script("return document.querySelectorAll('#flat .card').length;") == len(ranks)
    assert browser.find_element("css selector", f"{card} input.class-search").get_attribute("value") == other
    click(browser, "#view-groups")
    assert browser.execute_script("return document.querySelectorAll('#flat .card').length;") == 0
    assert browser.find_element("css selector", "section.group").is_displayed()
    _, rows = download_csv(browser, tmp_path)
    expected = [[p, other if i == row else g] for i, (p, g) in enumerate(zip(table["path"], table["given"]))]
    assert rows[1:] == expected
