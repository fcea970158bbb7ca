"""The chat page at `/`, in headless Chromium against the real server: it streams answers equal to
the server's own for the same request, keeps the conversation, sends the API key and shows errors."""
import os
import shutil

import httpx
import pytest
from playwright.sync_api import expect

from test_bench import serve_process

CHROMIUM = "/usr/bin/chromium"
# Offline and quiet: no GPU, no sandbox (tests may run as root), no background network traffic.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
API_KEY = "chat-page-key"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with serve_process(str(tiny_model("llama")), tmp_path_factory.mktemp("chat-server"), api_key=API_KEY) as s:
        yield s


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # executable_path: the system's Chromium; Playwright never downloads a browser here.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def open_chat(page, server):
    """Loads the page, which cannot list models without the key, then enters the key."""
    page.goto(server.base_url + "/")
    page.wait_for_selector("#status.error")
    unauthorized = httpx.get(server.base_url + "/v1/models", timeout=10)
    assert unauthorized.status_code == 401
    assert page.text_content("#status") == unauthorized.json()["error"]["message"]
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    model = httpx.get(server.base_url + "/v1/models", headers=server.headers, timeout=10).json()["data"][0]["id"]
    page.wait_for_function("id => document.getElementById('model-name').textContent === id", arg=model)


def send_and_capture(page, prompt):
    """Sends `prompt` from the page; returns the JSON body the page posted."""
    page.fill("#prompt", prompt)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.press("#prompt", "Enter")
    return request.value.post_data_json


def server_answer(server, body):
    """The server's non-streamed answer to the same request."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def save_screenshot(page, tmp_path):
    page.screenshot(path=str(tmp_path / "chat.png"))
    extra = os.environ.get("RTLLM_CHAT_SCREENSHOT")
    if extra:
        shutil.copyfile(tmp_path / "chat.png", extra)


def test_chat_streams_the_servers_answer(server, page, tmp_path):
    open_chat(page, server)
    page.fill("#system-prompt", "You answer briefly.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")

    questions = ["Hello world! How are you today?", "The quick brown fox"]
    history = [{"role": "system", "content": "You answer briefly."}]
    for turn, question in enumerate(questions):
        body = send_and_capture(page, question)
        history.append({"role": "user", "content": question})
        # The page sends the whole conversation and its settings, and asks for streaming with usage.
        assert body["messages"] == history
        assert (body["temperature"], body["max_tokens"], body["stream"]) == (0, 24, True)
        assert body["stream_options"] == {"include_usage": True}

        answer = page.locator(".message.assistant").nth(turn)
        expect(answer).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
        expected = server_answer(server, body)
        text = expected["choices"][0]["message"]["content"]
        assert text and answer.locator(".content").text_content() == text
        stats = answer.locator(".stats").text_content()
        num_tokens = expected["usage"]["completion_tokens"]
        assert stats.startswith(f"{num_tokens} tokens · ") and "TTFT" in stats
        assert "tok/s" in stats or num_tokens == 1
        history.append({"role": "assistant", "content": text})

    assert page.locator(".message.user").count() == 2
    save_screenshot(page, tmp_path)


def test_chat_shows_the_servers_error(server, page):
    open_chat(page, server)
    page.fill("#temperature", "-1")  # the server rejects it; the page shows the server's message
    body = send_and_capture(page, "Hello")
    page.wait_for_selector(".message.assistant[data-state='error'] .error")
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    assert response.status_code == 400
    assert page.text_content(".message.assistant .error") == response.json()["error"]["message"]
    # The unanswered question returns to the input box and leaves the conversation.
    assert page.input_value("#prompt") == "Hello"
    assert page.locator(".message.user.unsent").count() == 1
    page.fill("#temperature", "0")
    body = send_and_capture(page, "Hello again")
    assert body["messages"] == [{"role": "user", "content": "Hello again"}]
    page.wait_for_selector(".message.assistant[data-state='done']")
