"""The live trace page in headless Chromium, checked against the gRPC trace of the same requests.

Run by tests/ui/check.sh (which starts the cluster). For each question and strategy it:
1. runs the request over gRPC (`GenerateStream`) and keeps the rounds / characters and the answer;
2. fills the page's form (API key, prompt, strategy, length), submits, waits for the answer;
3. checks every coloured span (kind, member, text) against the gRPC trace, the final text, the
   member panel and the totals, and hovers spans to check their details (winner, drafts, verifiers;
   a character's shares) against the same trace;
4. saves screenshots (desktop, and a phone-width one).
"""

import os
import sys

sys.path.insert(0, os.environ["STUBS"])

import grpc  # noqa: E402
from ensemble.v1 import ensemble_pb2 as pb  # noqa: E402
from ensemble.v1 import ensemble_pb2_grpc as rpc  # noqa: E402
from ensemble.v1 import node_pb2  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

HTTP = os.environ["ENSEMBLE_HTTP"]
KEY = os.environ["ENSEMBLE_KEY"]
SHOTS = os.environ["SHOTS"]
MAX_CHARS = 48

CASES = [
    ("specfuse", "Compute 666 + 84.", "specfuse-arithmetic"),
    ("specfuse", "Name the capital of Draisistan.", "specfuse-atlas"),
    ("chared", "Compute 34 + 904.", "chared-arithmetic"),
    ("chared", "What language is spoken in Kleaqueaistan?", "chared-atlas"),
]


def grpc_trace(stub, strategy, question):
    """(steps, answer, the answer's step count): steps are (kind, node, text, trace message) in order."""
    req = pb.GenerateRequest(
        prompt=node_pb2.Prompt(conversation=node_pb2.Conversation(messages=[node_pb2.ChatMessage(role="user", content=question)])),
        strategy=strategy,
        max_chars=MAX_CHARS,
        sampling=node_pb2.Sampling(temperature=0.0),
    )
    steps, answer, total = [], None, None
    for ev in stub.GenerateStream(req, metadata=[("authorization", f"Bearer {KEY}")], timeout=120):
        which = ev.WhichOneof("event")
        if which == "round":
            steps.append(("round", ev.round.winner_node, ev.round.winner_text, ev.round))
        elif which == "char" and not ev.char.eos:
            top = max(ev.char.shares, key=lambda s: s.share).node if ev.char.shares else ""
            steps.append(("char", top, ev.char.char, ev.char))
        elif which == "done":
            answer, total = ev.done.text, ev.done.steps
    assert answer is not None, "the gRPC stream ended without an answer"
    return steps, answer, total


def page_spans(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#answer .seg')].map(e => "
        "[e.dataset.kind, e.dataset.node, e.textContent, Number(e.dataset.step)]);"
    )


def ask(driver, strategy, question):
    driver.get(f"{HTTP}/ui")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "strategy")).options) > 1)
    key = driver.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(KEY)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(question)
    Select(driver.find_element(By.ID, "strategy")).select_by_value(strategy)
    length = driver.find_element(By.ID, "max-chars")
    length.clear()
    length.send_keys(str(MAX_CHARS))
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 120).until(
        lambda d: d.find_element(By.ID, "answer").get_attribute("data-state") in ("done", "error")
    )
    state = driver.find_element(By.ID, "answer").get_attribute("data-state")
    if state != "done":
        raise AssertionError(f"{strategy} {question!r}: the page shows an error: "
                             f"{driver.find_element(By.ID, 'error').text}")


def check_details(driver, strategy, steps):
    """Hover (and focus) a few spans; their details must be the gRPC trace's."""
    spans = driver.find_elements(By.CSS_SELECTOR, "#answer .seg")
    picks = sorted({0, len(spans) // 2, len(spans) - 1})
    for i in picks:
        ActionChains(driver).move_to_element(spans[i]).perform()
        details = driver.find_element(By.ID, "details")
        WebDriverWait(driver, 5).until(lambda d: details.get_attribute("data-step") == str(i))
        kind, node, text, msg = steps[i]
        assert details.get_attribute("data-kind") == kind, (strategy, i, details.get_attribute("data-kind"))
        if kind == "round":
            winner = details.find_element(By.CSS_SELECTOR, ".candidate.winner .candidate-text")
            assert winner.get_attribute("textContent") == msg.winner_text, (i, winner.text, msg.winner_text)
            shown = [e.get_attribute("textContent") for e in details.find_elements(By.CSS_SELECTOR, ".candidate .candidate-text")]
            assert shown == [c.text for c in msg.candidates], (i, shown, [c.text for c in msg.candidates])
            verifiers = [e.get_attribute("data-node") for e in details.find_elements(By.CSS_SELECTOR, ".verifier")]
            assert verifiers == [v.node for v in msg.verifiers], (i, verifiers)
            exited = details.find_element(By.CSS_SELECTOR, ".exited").get_attribute("textContent")
            for name in msg.exited:
                assert name in exited, (i, name, exited)
        else:
            shares = [e.get_attribute("data-node") for e in details.find_elements(By.CSS_SELECTOR, ".share")]
            assert shares == [s.node for s in msg.shares], (i, shares)
    # Keyboard: focusing the first span shows its details too.
    driver.execute_script("document.querySelector('#answer .seg').focus();")
    WebDriverWait(driver, 5).until(lambda d: d.find_element(By.ID, "details").get_attribute("data-step") == "0")


def main():
    channel = grpc.insecure_channel(os.environ["ENSEMBLE_GRPC"])
    stub = rpc.EnsembleStub(channel)
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1200", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        # The page itself needs no key; its data calls do.
        driver.get(f"{HTTP}/ui")
        assert driver.title, "the page has no title"
        for strategy, question, shot in CASES:
            steps, answer, total = grpc_trace(stub, strategy, question)
            ask(driver, strategy, question)
            spans = page_spans(driver)
            want = [(k, n, t) for (k, n, t, _) in steps]
            got = [(k, n, t) for (k, n, t, _) in spans]
            assert got == want, f"{strategy} {question!r}: spans differ\n page: {got}\n gRPC: {want}"
            assert [s[3] for s in spans] == list(range(len(spans))), "data-step must count the steps"
            final = driver.find_element(By.ID, "final-text").get_attribute("textContent")
            assert final == answer, (final, answer)
            members = [e.get_attribute("data-node") for e in driver.find_elements(By.CSS_SELECTOR, "#members li")]
            assert members == ["arith", "atlas", "general"], members
            steps_total = driver.find_element(By.CSS_SELECTOR, '#totals [data-total="steps"]').get_attribute("textContent")
            assert str(total) in steps_total, (steps_total, total)
            check_details(driver, strategy, steps)
            driver.save_screenshot(os.path.join(SHOTS, f"{shot}.png"))
            winners = sorted({n for (_, n, _) in want})
            print(f"ok  {strategy:9s} {question!r}: {len(spans)} spans by {winners}, answer {answer!r}")
        # Phone width: the side panel moves below the answer and nothing overflows sideways.
        driver.set_window_size(390, 844)
        ask(driver, "chared", CASES[3][1])
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
        assert overflow <= 0, f"the page overflows a phone-width screen by {overflow} px"
        driver.save_screenshot(os.path.join(SHOTS, "chared-phone.png"))
        print("ok  phone width: no horizontal overflow")
        # A wrong key: a clear message, no answer.
        driver.set_window_size(1280, 1200)
        driver.get(f"{HTTP}/ui")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "strategy") is not None)
        key = driver.find_element(By.ID, "api-key")
        key.clear()
        key.send_keys("wrong-key")
        driver.find_element(By.ID, "prompt").send_keys("Compute 1 + 1.")
        driver.find_element(By.ID, "run").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text.strip() != "")
        print(f"ok  a wrong key: {driver.find_element(By.ID, 'error').text.strip()!r}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
