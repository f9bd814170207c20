"""The web page at `/` in headless Chromium, driven by selenium, over fake stages behind a real gateway.

A person's use of it: type a prompt, generate, watch the progress bar and get an image with its seed; with the
keyboard alone (Tab, Ctrl+Enter, Escape); with API keys (the key field, the 401 message, then the image).

Needs Debian's `chromium` and `chromium-driver` (`make install` installs them; nothing is downloaded here).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from importlib import resources

import httpx
import numpy as np
import pytest
from PIL import Image
from test_gateway import FakeDenoiser, Stack, expected_pixel

from sdmesh.services.http.app import serve
from sdmesh.services.http.common import Front
from sdmesh.services.serving.tenants import Tenants

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
except ImportError:  # reported by the `browser` fixture, so the reason reads plainly
    webdriver = None

STEP_SECONDS = 0.05  # the fake denoiser's time per step: long enough to see the bar move
KEY = "sk-page-test"


class Site:
    """A fake stack, the HTTP front in front of its gateway, and the page's URL."""

    def __init__(self, **gateway_options):
        self.denoiser = FakeDenoiser(step_seconds=STEP_SECONDS)
        self.stack = Stack([self.denoiser], **gateway_options)
        self.http = serve(Front(self.stack.service), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.http.port}/"

    def close(self):
        self.http.stop(2)
        self.stack.close()


@pytest.fixture(scope="module")
def site():
    s = Site()
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed_site(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"{KEY} alice\n")
    s = Site(tenants=Tenants.from_file(keys, max_inflight=16))
    yield s
    s.close()


def find_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make install` (it installs Debian's chromium and "
                    f"chromium-driver), then run this test again", pytrace=False)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, its viewport 1280×800. Never downloads a browser or a driver."""
    if webdriver is None:
        pytest.fail("selenium is not installed: `make install` (it is in the dev extra)", pytrace=False)
    chromium, chromedriver = find_binary("chromium"), find_binary("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,800"):  # fmt: skip
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "1")  # selenium-manager: no downloads
        try:
            driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
        except WebDriverException as e:
            pytest.fail(f"Chromium did not start ({e.msg}); `make install` installs chromium and chromium-driver",
                        pytrace=False)  # fmt: skip
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
        driver.quit()


# --- helpers ----------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 10.0, what: str = "the page"):
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def open_page(browser, site: Site) -> None:
    browser.get(site.url)
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_for(lambda: "fake" in text(browser, "model") or "key" in text(browser, "model"), what="/v1/info")


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def progress(browser) -> float:
    return float(browser.execute_script("return document.getElementById('progress').value"))


def gallery(browser) -> list[dict]:
    """Each shown image: its src, whether it decoded, its caption's seed label and its download link."""
    return browser.execute_script("""
        return [...document.querySelectorAll('#gallery li')].map((li) => {
            const img = li.querySelector('img'), a = li.querySelector('a[download]');
            return {src: img.src, decoded: img.complete && img.naturalWidth > 0, seed: img.dataset.seed,
                    label: li.querySelector('.seed').textContent, href: a.href, download: a.download};
        });""")


def image_bytes(browser, src: str) -> bytes:
    """The bytes behind a blob: or data: URL, read in the page."""
    b64 = browser.execute_async_script(
        """const [src, done] = arguments;
        fetch(src).then((r) => r.blob()).then((blob) => {
            const reader = new FileReader();
            reader.onload = () => done(reader.result.split(',')[1]);
            reader.readAsDataURL(blob);
        });""",
        src,
    )
    return base64.b64decode(b64)


def active_id(browser) -> str:
    return browser.execute_script("return document.activeElement.id || document.activeElement.textContent")


def keys(browser, *sequence) -> None:
    ActionChains(browser).send_keys(*sequence).perform()


def ctrl_enter(browser) -> None:
    ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()


def tab_to(browser, target: str, *, back: bool = False, limit: int = 30) -> None:
    """Press Tab (Shift+Tab: `back`) until the focused element's id (or text) is `target`."""
    for _ in range(limit):
        if active_id(browser) == target:
            return
        if back:
            ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
        else:
            keys(browser, Keys.TAB)
    raise AssertionError(f"Tab never reached {target!r}; focus is on {active_id(browser)!r}")


def replace_value(browser, value: str) -> None:
    """Type `value` over the focused field's contents."""
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(value).perform()


# --- the tests --------------------------------------------------------------------------


def test_a_prompt_and_a_click_give_an_image_with_its_seed_while_the_bar_moves(browser, site, tmp_path):
    open_page(browser, site)
    assert browser.find_element(By.ID, "width").get_attribute("value") == "32"  # the model's size, from /v1/info
    assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#sampler option")] == ["ddim", "euler"]
    assert not browser.find_element(By.ID, "key-row").is_displayed()  # no keys on this front
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
            .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
            .map((e) => e.id);""")
    assert unlabelled == []  # every control has a name a screen reader can say

    browser.find_element(By.ID, "prompt").send_keys("a cat")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("20")
    browser.find_element(By.ID, "generate").click()

    # the bar moves from the encoder on; the denoiser's steps are said beside it
    seen = wait_for(lambda: "step" in text(browser, "status") and not gallery(browser) and progress(browser),
                    what="the denoiser's steps on the page")  # fmt: skip
    assert 0 < seen < 1
    shown = wait_for(lambda: [g for g in gallery(browser) if g["decoded"]], what="an image in the gallery")

    (image,) = shown
    assert image["src"].startswith(("blob:", "data:"))
    seed = int(image["seed"])
    assert image["label"] == f"seed {seed}" and f"seed {seed}" in text(browser, "status")
    assert image["href"] == image["src"] and image["download"] == f"sdmesh-{seed}.png"
    png = Image.open(io.BytesIO(image_bytes(browser, image["src"])))
    assert png.format == "PNG" and png.size == (32, 32)
    assert np.all(np.asarray(png.convert("L")) == expected_pixel(seed, "a cat"))  # the image of the seed shown
    assert progress(browser) == 1 and text(browser, "error") == ""

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size == (1280, 800)


def test_the_keyboard_alone_generates_reuses_a_seed_and_cancels(browser, site):
    open_page(browser, site)
    before = len(gallery(browser))

    tab_to(browser, "prompt")
    keys(browser, "a dog")
    tab_to(browser, "steps")
    replace_value(browser, "5")
    ctrl_enter(browser)
    first = wait_for(lambda: len(gallery(browser)) > before and gallery(browser)[0]["decoded"] and gallery(browser),
                     what="the image")  # fmt: skip
    seed = first[0]["seed"]
    assert active_id(browser) in ("generate", "steps")  # the keyboard's place is kept, not lost to <body>

    tab_to(browser, "Use seed")  # the newest image's button
    keys(browser, Keys.ENTER)
    assert active_id(browser) == "seed"
    assert browser.find_element(By.ID, "seed").get_attribute("value") == seed
    ctrl_enter(browser)  # from the seed field: the same seed again, the same image
    again = wait_for(lambda: len(gallery(browser)) > before + 1 and gallery(browser)[0]["decoded"] and gallery(browser),
                     what="the second image")  # fmt: skip
    assert again[0]["seed"] == seed
    assert image_bytes(browser, again[0]["src"]) == image_bytes(browser, again[1]["src"])

    # a long job, then Escape
    tab_to(browser, "steps", back=True)
    replace_value(browser, "400")  # 20 s at the fake's pace: it is cancelled long before
    ctrl_enter(browser)
    # its denoising, not only its encoding: the cancellation must reach a denoiser that is working
    wait_for(lambda: progress(browser) > 0 and "Denoising" in text(browser, "status"), what="the long job to denoise")
    keys(browser, Keys.ESCAPE)
    wait_for(lambda: text(browser, "status") == "Cancelled.", what="the cancellation")
    job = browser.find_element(By.ID, "status").get_attribute("data-job")
    assert httpx.get(f"{site.url}v1/jobs/{job}").json()["state"] == "cancelled"
    assert len(gallery(browser)) == before + 2 and progress(browser) == 0
    assert site.denoiser.cancelled.wait(5)  # the denoiser stopped its work too


def test_with_keys_the_page_asks_for_one_shows_the_401_then_works_with_it(browser, keyed_site):
    open_page(browser, keyed_site)
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed()  # /v1/info answered 401: the page asks for a key
    assert "API key" in text(browser, "error")

    browser.find_element(By.ID, "prompt").send_keys("a cat")
    browser.find_element(By.ID, "generate").click()
    wait_for(lambda: text(browser, "status") == "Not started.", what="the refusal")
    assert "needs an API key" in text(browser, "error")
    assert active_id(browser) == "api-key" and not gallery(browser)

    key.send_keys(KEY)
    browser.find_element(By.ID, "generate").click()
    shown = wait_for(lambda: [g for g in gallery(browser) if g["decoded"]], what="the image with the key")
    assert len(shown) == 1 and text(browser, "error") == ""

    browser.refresh()  # the key is kept in this browser
    wait_for(lambda: "fake" in text(browser, "model"), what="/v1/info with the kept key")
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY


def test_the_page_is_served_from_the_package_and_fetches_nothing_elsewhere(site):
    static = resources.files("sdmesh.services.http") / "static"
    for name in ("index.html", "app.js", "style.css"):
        answer = httpx.get(site.url + ("" if name == "index.html" else name))
        assert answer.status_code == 200 and answer.text == (static / name).read_text()
        assert "http://" not in answer.text and "https://" not in answer.text  # no CDN, no fonts from elsewhere


def test_with_several_models_the_page_picks_one_and_takes_its_sizes_and_samplers(browser):
    from test_models_gateway import MARK_B, TwoModels

    models = TwoModels()
    try:
        browser.get(models.url + "/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait_for(lambda: "full-sd2" in text(browser, "model"), what="/v1/info")
        picker = browser.find_element(By.ID, "served-model")
        assert picker.is_displayed() and picker.get_attribute("value") == "full-sd2"
        assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#served-model option")] == ["full-sd2", "sd15"]

        def run() -> int:
            before = len(gallery(browser))
            browser.find_element(By.ID, "generate").click()
            new = lambda: len(gallery(browser)) > before and gallery(browser)[0]["decoded"] and gallery(browser)
            shown = wait_for(new, what="the image")
            return int(np.asarray(Image.open(io.BytesIO(image_bytes(browser, shown[0]["src"]))))[0, 0, 0])

        browser.find_element(By.ID, "prompt").send_keys("x")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("1")
        browser.find_element(By.ID, "seed").send_keys("3")
        a = run()
        Select(picker).select_by_value("sd15")
        wait_for(lambda: browser.find_element(By.ID, "width").get_attribute("value") == "48", what="sd15's facts")
        assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#sampler option")] == ["euler"]
        assert "sd15" in text(browser, "model")
        assert (run() - a) % 256 == MARK_B  # sd15's denoiser made it
    finally:
        models.close()
