"""The web chat page in headless Chromium: a streamed answer appears (the same text the API gives
for the same request), the stop button cancels a generation on the server, tokens/s and memory show;
several tabs streaming at once each end with their own answer and their own token counts.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the Python package ``selenium``;
skipped with the reason when one is missing.
"""

from __future__ import annotations

import shutil
import tempfile

import httpx
import pytest

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="headless Chromium not installed: apt-get install -y chromium chromium-driver")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="flashtier-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, base_url: str, max_tokens: int) -> None:
    driver.get(base_url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "chat-model")
    for field, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)


def ask(driver, text: str) -> None:
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()


def status(driver) -> str:
    return driver.find_element(By.ID, "status").get_attribute("data-state")


def answers(driver) -> list[str]:
    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")]


def test_a_streamed_answer_appears(browser, live_server):
    expected = httpx.post(f"{live_server.base_url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}).json()
    text = expected["choices"][0]["message"]["content"]
    assert text, "the fixture model should answer this question with some text"
    open_page(browser, live_server.base_url, 16)
    ask(browser, QUESTION)
    WebDriverWait(browser, 60, poll_frequency=0.1).until(lambda d: status(d) in ("done", "error", "stopped"))
    assert status(browser) == "done"
    assert answers(browser) == [text]
    WebDriverWait(browser, 10, poll_frequency=0.1).until(lambda d: d.find_element(By.ID, "tok-s").text != "–")
    assert float(browser.find_element(By.ID, "tok-s").text) > 0
    assert "host" in browser.find_element(By.ID, "memory").text  # memory per tier, from /v1/flashtier/stats


def test_stop_button_cancels_the_generation(browser, live_server):
    def cancelled() -> float:
        return httpx.get(f"{live_server.base_url}/v1/flashtier/stats", timeout=30).json()["counters"][
            "requests_cancelled_total"]

    before = cancelled()
    open_page(browser, live_server.base_url, 1500)
    ask(browser, "Tell me a very long story.")
    WebDriverWait(browser, 60, poll_frequency=0.05).until(lambda d: any(answers(d)) or status(d) != "streaming")
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30, poll_frequency=0.1).until(lambda d: status(d) != "streaming")
    assert status(browser) == "stopped", "the answer ended before the stop button was pressed"
    assert "[stopped]" in answers(browser)[-1]
    # The server saw the abort: the generation was cancelled and the next request is served.
    r = httpx.post(f"{live_server.base_url}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert cancelled() == before + 1


TAB_QUESTIONS = ("What is the capital of France?", "How are you today?", "Hello!")
TAB_MAX_TOKENS = 12  # the fixture model answers each of these with 12 tokens: all three end at one step


def test_several_tabs_stream_at_once(browser, chat_model_dir, server_factory, slow_model_loader, hold_stream):
    """Three tabs of the page ask at once, on a server decoding up to 3 requests together: all three
    wait while the batch is full (three long requests run), then stream together and end at the
    same step; each tab ends with its own answer (the API's answer alone) and shows its own token
    counts (not those of the request that happened to finish last on the server)."""
    import threading

    from flashtier.apps.server import ServerConfig, create_app

    app = create_app(slow_model_loader(chat_model_dir, 0.01), ServerConfig("chat-model", max_batch=3))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)
    expected = []
    for question in TAB_QUESTIONS:
        r = httpx.post(f"{live.base_url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": question}], "max_tokens": TAB_MAX_TOKENS,
            "temperature": 0}).json()
        assert r["choices"][0]["message"]["content"] and r["usage"]["completion_tokens"] == TAB_MAX_TOKENS, r
        expected.append((r["choices"][0]["message"]["content"], r["usage"]["prompt_tokens"]))
    assert len({prompt for _, prompt in expected}) == 3  # so a tab showing another's counts is seen

    release = threading.Event()

    blockers = [threading.Thread(target=hold_stream, args=(live.base_url, release)) for _ in range(3)]
    tabs = []
    try:
        for t in blockers:
            t.start()
        for question in TAB_QUESTIONS:
            if tabs:
                browser.switch_to.new_window("tab")
            tabs.append(browser.current_window_handle)
            open_page(browser, live.base_url, TAB_MAX_TOKENS)
            ask(browser, question)
        for tab in tabs:
            browser.switch_to.window(tab)
            assert status(browser) == "streaming"  # all three are waiting for the model at once
        assert app.state.worker.waiting == 3
    finally:
        release.set()
        for t in blockers:
            t.join(30)
    try:
        for tab, (text, prompt_tokens) in zip(tabs, expected):
            browser.switch_to.window(tab)
            WebDriverWait(browser, 60, poll_frequency=0.1).until(lambda d: status(d) in ("done", "error", "stopped"))
            assert status(browser) == "done"
            assert answers(browser) == [text]
            info = browser.find_element(By.ID, "tokens-info").text
            assert info.startswith(f"prompt {prompt_tokens} ") and info.endswith(f"{TAB_MAX_TOKENS} generated"), (
                f"this tab shows {info!r}; its request had {prompt_tokens} prompt tokens")
    finally:
        for tab in tabs[1:]:
            browser.switch_to.window(tab)
            browser.close()
        browser.switch_to.window(tabs[0])
    assert app.state.worker.peak_batch == 3
    live.stop()
