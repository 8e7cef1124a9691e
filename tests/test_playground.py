"""The playground page at / in a real browser (Debian's chromium + chromedriver, driven by Selenium): a line is
spoken and streamed into Web Audio, then a second turn of the same conversation, which the server remembers.

.ci/run installs the browser; where none can be installed the test skips and says why."""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace

import pytest
import torch

from csm.config import get_config
from csm.generate import Generator
from csm.mimi import Mimi, preset
from csm.model import CSM
from csm.serve.server import make_server

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium + chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(tokenizer):
    torch.manual_seed(0)
    codec = Mimi(replace(preset("tiny"), num_codebooks=32, codebook_size=2048)).eval()
    srv = make_server(Generator(CSM(get_config("tiny")), tokenizer, codec), port=0, slots=2, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.service.batcher.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_playground_speaks_two_turns_of_a_conversation(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    host, port = server.server_address[:2]
    browser.get(f"http://{host}:{port}/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: int(d.find_element(By.ID, "voice").get_attribute("data-count") or 0) > 0)
    status = browser.find_element(By.ID, "status")

    def say(text: str, voice: str) -> int:
        Select(browser.find_element(By.ID, "voice")).select_by_value(voice)
        box = browser.find_element(By.ID, "text")
        box.clear()
        box.send_keys(text)
        turns = len(browser.find_elements(By.CSS_SELECTOR, "#turns li"))
        browser.execute_script("document.getElementById('seed').value = '3'")  # the settings stay folded
        browser.find_element(By.ID, "speak").click()
        wait.until(lambda d: status.get_attribute("data-state") in ("done", "error")
                   and len(d.find_elements(By.CSS_SELECTOR, "#turns li")) == turns + 1)
        assert status.get_attribute("data-state") == "done", status.text
        return int(status.get_attribute("data-samples"))

    first = say("hello there, how are you?", "0")
    assert first > 0  # 16-bit PCM came through the stream and was decoded by the page
    # The page scheduled them on Web Audio, whose clock runs on (no device needed in headless mode).
    assert browser.execute_script("return audioCtx !== null && audioCtx.state") in ("running", "suspended")
    second = say("fine thanks, and you?", "1")
    assert second > 0
    conversation = browser.find_element(By.TAG_NAME, "body").get_attribute("data-conversation")
    turns = server.service.conversations[conversation]
    assert [(t.speaker, t.text) for t in turns] == [(0, "hello there, how are you?"), (1, "fine thanks, and you?")]
    assert turns[0].audio.shape[1] > 0
