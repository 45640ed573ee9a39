"""`make e2e`: a real frontend in a real browser. Open WebUI (PyPI's open-webui, offline: no
model or embedding downloads) uses kvsnap as its OpenAI connection and is driven in headless
Chromium through Selenium. A user chats three turns; kvsnap is `kill -9`'d and restarted on its
store; the user sends a fourth turn and sees an answer. kvsnap's metrics then say how much of
the history the fourth turn restored from the store and how much it read again. Screenshots of
every turn are left in OUT.

    python tests/e2e/webui.py KVSNAP_BINARY MODEL OUT

Open WebUI sends the whole history with every request and names no conversation, so the
history is found by its tokens (the unnamed entries each turn leaves).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

QUESTIONS = [
    "Tell me about lighthouses in two sentences.",
    "Who kept them?",
    "What did they eat?",
    "Thank you. Summarise what you told me.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"e2e: timed out after {timeout} s waiting for {what}")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def metric(base, name):
    for line in get(base + "/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Kvsnap:
    def __init__(self, binary, model, work, port):
        self.args = [
            binary, "serve", "--config", str(work / "none.toml"), "--data", str(work / "kvsnap.redb"),
            "-m", model, "--port", str(port), "-c", "8192", "-np", "2", "-t", "1",
        ]
        (work / "none.toml").write_text("")
        self.log_path = work / "kvsnap.log"
        self.log = open(self.log_path, "a")
        self.base = f"http://127.0.0.1:{port}"
        self.process = None

    def start(self):
        # entries=debug: where a prompt leaves the state of the sequence it came to (tokens).
        env = dict(os.environ, KVSNAP_LOG="info,kvsnap::engine::entries=debug,llama_cpp_2=warn")
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=self.log, env=env)
        wait_for(lambda: get(self.base + "/health"), "kvsnap to listen", 120)

    def kill_9(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def explain_rereads(kvsnap):
    """Prints each place where a request did not continue the state of the sequence it came to
    (kvsnap's debug log), with the differing tokens as text: what the frontend sent otherwise."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", kvsnap.log_path.read_text())
    for line in text.splitlines():
        if "does not continue this sequence's state" not in line:
            continue
        fields = dict(re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", line))
        shown = {}
        for side in ("held_next", "prompt_next"):
            ids = json.loads(fields.get(side, "[]"))
            request = urllib.request.Request(
                kvsnap.base + "/detokenize", data=json.dumps({"tokens": ids}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                shown[side] = json.loads(response.read())["content"]
        print(
            f"e2e: a request left a sequence's state at token {fields.get('shared')} of "
            f"{fields.get('held')} (prompt {fields.get('prompt')}, reused {fields.get('reused')}): "
            f"the state goes on {shown['held_next']!r}, the prompt {shown['prompt_next']!r}",
            flush=True,
        )


def start_webui(work, port, kvsnap_base, model_id):
    env = dict(os.environ)
    env.update({
        "DATA_DIR": str(work / "webui"),
        "WEBUI_AUTH": "False",
        "WEBUI_SECRET_KEY": "e2e-only",
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "ENABLE_OLLAMA_API": "False",
        "OPENAI_API_BASE_URL": kvsnap_base + "/v1",
        "OPENAI_API_KEY": "none",
        "DEFAULT_MODELS": model_id,
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "True",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
        "ENABLE_TITLE_GENERATION": "False",
        "ENABLE_TAGS_GENERATION": "False",
        "ENABLE_FOLLOW_UP_GENERATION": "False",
        "ENABLE_AUTOCOMPLETE_GENERATION": "False",
        "ENABLE_SEARCH_QUERY_GENERATION": "False",
        "ENABLE_RETRIEVAL_QUERY_GENERATION": "False",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "ENABLE_EVALUATION_ARENA_MODELS": "False",
    })
    (work / "webui").mkdir(exist_ok=True)
    log = open(work / "webui.log", "a")
    binary = Path(sys.executable).parent / "open-webui"
    process = subprocess.Popen(
        [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=log, cwd=work,
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(base + "/health"), "Open WebUI to start", 600)
    return process, base


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def answers(driver):
    return [e.text for e in driver.find_elements(By.ID, "response-content-container")]


def ask(driver, kvsnap, question, turn, out):
    """Types a question as a user does and waits until its answer is shown and complete."""
    generated = metric(kvsnap.base, "kvsnap_tokens_generated_total")
    decoded = metric(kvsnap.base, "kvsnap_tokens_evaluated_total")
    reused = metric(kvsnap.base, "kvsnap_tokens_reused_total")
    restored = metric(kvsnap.base, "kvsnap_prefix_tokens_restored_total")
    wait_for(lambda: driver.find_element(By.ID, "chat-input").is_displayed(), "the chat input", 60)
    field = driver.find_element(By.ID, "chat-input")
    field.click()
    field.send_keys(question)
    field.send_keys(Keys.ENTER)

    def answered():
        shown = answers(driver)
        return (
            len(shown) >= turn
            and shown[turn - 1].strip() != ""
            and metric(kvsnap.base, "kvsnap_tokens_generated_total") > generated
            and metric(kvsnap.base, "kvsnap_active_requests") == 0
        )

    wait_for(answered, f"the answer to turn {turn}", 300)
    time.sleep(1)  # the page renders the last chunk
    driver.save_screenshot(str(out / f"turn-{turn}.png"))
    text = answers(driver)[turn - 1]
    figures = {
        "decoded": metric(kvsnap.base, "kvsnap_tokens_evaluated_total") - decoded,
        "kept in memory": metric(kvsnap.base, "kvsnap_tokens_reused_total") - reused,
        "restored": metric(kvsnap.base, "kvsnap_prefix_tokens_restored_total") - restored,
    }
    shown = ", ".join(f"{name} {value:.0f}" for name, value in figures.items())
    print(f"e2e: turn {turn}: {question!r} -> {text[:80]!r}", flush=True)
    print(f"e2e: turn {turn}: tokens {shown} (decoded: the new message and the reply)", flush=True)
    return text, figures


def main():
    binary, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvsnap-e2e-"))
    kvsnap = Kvsnap(binary, model, work, free_port())
    kvsnap.start()
    webui, webui_base = start_webui(work, free_port(), kvsnap.base, Path(model).name)
    driver = browser()
    try:
        driver.get(webui_base)
        time.sleep(3)
        # A first visit may open a "what's new" dialog over the page.
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        for turn, question in enumerate(QUESTIONS[:3], start=1):
            ask(driver, kvsnap, question, turn, out)
        history = metric(kvsnap.base, "kvsnap_tokens_evaluated_total")

        kvsnap.kill_9()
        print("e2e: kvsnap killed with SIGKILL; restarting it on its store", flush=True)
        kvsnap.start()
        fourth, figures = ask(driver, kvsnap, QUESTIONS[3], 4, out)
        print(
            f"e2e: three turns decoded {history:.0f} tokens; after kill -9 and restart the "
            f"fourth turn restored {figures['restored']:.0f} of them from the store",
            flush=True,
        )
        print(f"e2e: screenshots in {out}", flush=True)
        explain_rereads(kvsnap)
        if not fourth.strip():
            raise SystemExit("e2e: the fourth turn showed no answer")
        if figures["restored"] < 64:
            raise SystemExit("e2e: the fourth turn read its history again instead of restoring it")
    finally:
        driver.quit()
        webui.terminate()
        kvsnap.kill_9()
        try:
            webui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            webui.kill()


if __name__ == "__main__":
    main()
