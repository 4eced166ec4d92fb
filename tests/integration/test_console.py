"""The lmforge console (lm.serve.console) in a real browser: headless Chromium driven by Selenium through the
OS package's chromedriver (``make browser``), against a live Serve app on 127.0.0.1 that follows the
registry's production alias, with a user key and an operator key from a key file.

- the playground streams: the answer's text grows chunk by chunk as the tokens arrive (fetch + ReadableStream),
  names the version that answered, shows the retrieved sources;
- a thumbs-down with a correction lands in the feedback log in storage;
- a user key gets no operators' view, and 403 in OpenAI's error shape from every operator endpoint;
- an operator sees the two registry versions, the gate report with its PNGs, the continual-learning
  iteration, the serving numbers and the training curves, and rolls back after confirming: the serving
  version changes; the action is logged with the key's name, never a key.

Screenshots of both views go to ``test-artifacts/console/`` (git-ignored), the docs' images come from there.
"""

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from serving import free_port, model_dir

from lm.config import join_uri, load_config
from lm.storage import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
ARTIFACTS = REPO / "test-artifacts" / "console"
CHROMEDRIVER = "/usr/bin/chromedriver"
USER_KEY, OPS_KEY = "sk-console-user-0123456789", "sk-console-ops-0123456789ab"
KEY_FILE = f"""keys:
  - {{name: player, key: {USER_KEY}, role: user}}
  - {{name: ops, key: {OPS_KEY}, role: operator}}
"""
FACTS = {"orbis.txt": "Orbis is ruled by librarians with lanterns.", "rain.txt": "Rain falls on the northern hills."}
OPERATOR_GETS = ["whoami", "registry", "versions/v000002/report", "versions/v000002/plots/comparison.png",
                 "iterations", "stats", "training"]


def _report(store: ObjectStore, out_uri: str, model_uri: str, baseline_uri: str) -> str:
    """A gate report as lm.eval writes it (report.json, report.md, comparison.png, training.png)."""
    from lm.config.eval import CompareRule
    from lm.eval.compare import compare
    from lm.eval.report import write_report

    verdict = compare({"fixed/bpb": 2.31, "new/bpb": 2.02}, {"fixed/bpb": 2.33, "new/bpb": 2.40},
                      [CompareRule(set="fixed", max_regression=0.05), CompareRule(set="new", min_improvement=0.1)])
    report = {"model": {"uri": model_uri, "parameters": 1000, "vocab_size": 512}, "run_uri": model_uri, "sets": {},
              "created": "2026-12-04T00:00:00Z", "seconds": 1.0, "training": {"note": "metrics.jsonl"},
              "comparison": verdict.to_dict(), "baseline": {"uri": baseline_uri}}
    return write_report(store, out_uri, report, {"loss": [(0, 6.0), (10, 4.0), (20, 3.1)]})


def _metrics(store: ObjectStore, run_uri: str, start: float) -> None:
    lines = [json.dumps({"step": s, "loss": start / (1 + 0.1 * s), "lr": 3e-3}) for s in range(0, 60, 5)]
    store.write_text(join_uri(run_uri, "train", "metrics.jsonl"), "\n".join(lines) + "\n")


def _registry(store: ObjectStore, cfg, root: Path) -> None:
    """Two versions (v000001 then v000002 in production, made by continual iteration 1 with its gate report)."""
    from lm.continual.ledger import Ledger
    from lm.registry import Registry

    first = model_dir(store, cfg, f"{root}/runs/r1/model", seed=1)
    second = model_dir(store, cfg, f"{root}/runs/r2/model", seed=2)
    _metrics(store, f"{root}/runs/r1", 6.0)
    _metrics(store, f"{root}/runs/r2", 5.0)
    reg = Registry(store, cfg.registry_uri)
    v1 = reg.register(first, note="the first production version")
    reg.promote(v1.id, reason="the registry's first version")
    ledger = Ledger(store, join_uri(cfg.registry_uri, "continual"))
    it = ledger.claim({f"{root}/feedback/part-0.jsonl": "etag-1", f"{root}/corpus/new.txt": "etag-2"})
    report = _report(store, f"{root}/registry/continual/runs/i000001/eval", second, first)
    v2 = reg.register(second, parent=v1.id, metrics={"fixed/bpb": 2.31, "new/bpb": 2.02}, gate_report=report,
                      iteration=it["n"])
    reg.promote(v2.id, reason="continual iteration 1: gate passed")
    ledger.finish(it["n"], {"verdict": "promoted", "version": v2.id, "parent": v1.id, "report": report,
                            "reasons": ["PASS fixed/bpb", "PASS new/bpb"]})


@pytest.fixture(scope="module")
def console(ray_session, tmp_path_factory):
    from ray import serve

    from lm.rag import build_index
    from lm.serve.deploy import start

    started, root = time.time(), tmp_path_factory.mktemp("console")
    (root / "keys.yaml").write_text(KEY_FILE)
    (root / "facts").mkdir()
    for name, text in FACTS.items():
        (root / "facts" / name).write_text(text)
    port = free_port()
    overrides = [f"storage.root={root}", f"serve.port={port}", "serve.max_batch_size=4", "serve.replica_cpus=0.5",
                 f"serve.api_keys_file={root}/keys.yaml", "serve.model=registry:production",
                 "serve.registry_poll_s=0.5", "serve.feedback.enabled=true", "serve.feedback.flush_interval_s=0.5",
                 "serve.rag=true", f"rag.sources=[{{name: facts, uri: '{root}/facts'}}]", "rag.passage_words=8",
                 "rag.overlap_words=2", "rag.top_k=1"]
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    store = ObjectStore(cfg.storage)
    _registry(store, cfg, root)
    build_index(cfg, store, log=lambda _: None)
    start(cfg)
    yield {"cfg": cfg, "store": store, "root": root, "url": f"http://127.0.0.1:{port}", "started": started,
           "logs": Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"}
    serve.shutdown()  # the next module's Serve starts its proxy on its own port


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    if chromium is None or not Path(CHROMEDRIVER).exists():
        pytest.fail(f"headless Chromium and {CHROMEDRIVER} are needed: `make browser` (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with the driver's path given too, Selenium downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--window-size=1400,1100", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------------ helpers


def wait_for(driver, check, timeout: float = 30, what: str = "the page"):
    """Poll ``check(driver)`` until it is truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check, f"{what} within {timeout} s")


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def connect(driver, url: str, key: str) -> None:
    """Open the console afresh (a reload forgets any key) and connect with ``key``."""
    driver.get(f"{url}/console/")
    assert by_id(driver, "tabs").is_displayed() is False  # no key: nothing but the key field
    by_id(driver, "key").send_keys(key)
    by_id(driver, "connect").click()
    wait_for(driver, lambda d: by_id(d, "tabs").is_displayed(), what="connecting")
    kept = driver.execute_script("return [localStorage.length, sessionStorage.length, document.cookie, "
                                 "document.getElementById('key').value]")
    assert kept == [0, 0, "", ""]  # the key is in the script's memory only


def set_field(driver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def ask(driver, prompt: str, max_tokens: int, route: str = "completions", rag: bool = False,
        temperature: float = 0, seed: int | None = None) -> dict:
    """Send a prompt from the playground; the page's answer (text, id, version) once it has ended."""
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "route")).select_by_value(route)
    set_field(driver, "temperature", str(temperature))
    set_field(driver, "seed", "" if seed is None else str(seed))
    set_field(driver, "max_tokens", str(max_tokens))
    set_field(driver, "prompt", prompt)
    if by_id(driver, "rag").is_selected() != rag:
        by_id(driver, "rag").click()
    driver.execute_script("document.getElementById('answer-meta').dataset.id = '';")
    by_id(driver, "send").click()
    wait_for(driver, lambda d: by_id(d, "answer-meta").get_attribute("data-id"), what="the answer")
    meta = by_id(driver, "answer-meta")
    return {"text": driver.execute_script("return document.getElementById('output').textContent"),
            "id": meta.get_attribute("data-id"), "version": meta.get_attribute("data-version")}


def api(console: dict, path: str, key: str | None, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body:
        return httpx.post(f"{console['url']}/v1/{path}", json=body, headers=headers, timeout=60)
    return httpx.get(f"{console['url']}/v1/{path}", headers=headers, timeout=60)


def page_problems(driver) -> list[str]:
    """What the browser logged against the page: a CSP refusal, a script error."""
    return [e["message"] for e in driver.get_log("browser")
            if any(s in e["message"] for s in ("Content Security Policy", "Refused to", "Uncaught"))]


def screenshot(driver, name: str) -> None:
    """The whole page (the window made as tall as the page) in test-artifacts/console/."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    driver.set_window_size(width, driver.execute_script("return document.documentElement.scrollHeight") + 120)
    driver.save_screenshot(str(ARTIFACTS / name))
    driver.set_window_size(width, height)


# -------------------------------------------------------------------------------------------------- tests


def test_the_page_is_served_with_a_strict_csp_and_no_inline_script(console):
    page = httpx.get(f"{console['url']}/console/", timeout=30)
    csp = page.headers["content-security-policy"]
    assert page.status_code == 200 and "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert '<script src="console.js"' in page.text and "<script>" not in page.text
    assert httpx.get(f"{console['url']}/console", timeout=30, follow_redirects=True).url.path == "/console/"
    assert httpx.get(f"{console['url']}/console/console.js", timeout=30).headers["content-type"].startswith(
        "text/javascript")
    assert httpx.get(f"{console['url']}/console/secrets.txt", timeout=30).status_code == 404


def test_playground_streams_tokens_as_they_arrive(console, browser):
    connect(browser, console["url"], USER_KEY)
    # every change of the answer's text, as the page makes it
    browser.execute_script("""
        window.lengths = [];
        const out = document.getElementById('output');
        new MutationObserver(() => window.lengths.push(out.textContent.length))
            .observe(out, {childList: true, characterData: true, subtree: true});""")
    answer = ask(browser, "ROMEO:", max_tokens=40, temperature=0.8, seed=7)  # seeded: reproducible
    lengths = [n for n in browser.execute_script("return window.lengths") if n > 0]
    assert len(lengths) >= 3 and lengths == sorted(set(lengths)), lengths  # grew, chunk by chunk
    whole = api(console, "completions", USER_KEY, model="lmforge", prompt="ROMEO:", max_tokens=40, temperature=0.8,
                seed=7, top_p=1)
    assert whole.status_code == 200 and answer["text"] == whole.json()["choices"][0]["text"]
    assert answer["version"] == "v000002" == whole.json()["system_fingerprint"]  # the version that answered
    assert by_id(browser, "feedback").is_displayed()
    screenshot(browser, "playground.png")
    chat = ask(browser, "Speak.", max_tokens=6, route="chat")
    assert chat["id"].startswith("chatcmpl-") and chat["text"] and not by_id(browser, "sources-box").is_displayed()
    # with retrieval: the passages the model read are listed (the tiny model's 64-token context: a short answer)
    ask(browser, "Who rules Orbis?", max_tokens=4, rag=True)
    assert "orbis.txt" in by_id(browser, "sources").text and "librarians" in by_id(browser, "sources").text
    assert not by_id(browser, "tab-operations").is_displayed()  # a user key: no operators' view
    assert not page_problems(browser)


def test_thumbs_down_with_a_correction_lands_in_the_feedback_log(console, browser):
    connect(browser, console["url"], USER_KEY)
    answer = ask(browser, "JULIET:", max_tokens=8)
    by_id(browser, "thumbs-down").click()
    wait_for(browser, lambda d: by_id(d, "feedback-status").get_attribute("data-recorded") == answer["id"])
    correction = "O Romeo, Romeo, wherefore art thou Romeo?"
    set_field(browser, "correction", correction)
    browser.execute_script("document.getElementById('feedback-status').dataset.recorded = '';")
    by_id(browser, "send-correction").click()
    wait_for(browser, lambda d: by_id(d, "feedback-status").get_attribute("data-recorded") == answer["id"])
    assert "correction" in by_id(browser, "feedback-status").text
    store, prefix = console["store"], console["cfg"].feedback_uri
    deadline, records = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        records = [json.loads(line) for uri in store.list(prefix) for line in store.read_text(uri).splitlines()]
        if any(r.get("correction") == correction for r in records):
            break
        time.sleep(0.3)
    mine = [r for r in records if r.get("id") == answer["id"]]
    assert {"type": "feedback", "id": answer["id"], "rating": -1, "correction": correction} in [
        {k: r.get(k) for k in ("type", "id", "rating", "correction")} for r in mine]
    assert any(r["type"] == "completion" and r["prompts"] == ["JULIET:"] for r in mine)  # what it is feedback on


def test_a_user_key_gets_no_operator_view_and_403(console, browser):
    connect(browser, console["url"], USER_KEY)
    assert not by_id(browser, "tab-operations").is_displayed()
    assert api(console, "console/whoami", USER_KEY).json()["role"] == "user"
    for path in OPERATOR_GETS[1:]:
        r = api(console, f"console/{path}", USER_KEY)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (path, r.text)
        assert api(console, f"console/{path}", None).status_code == 401
    refused = api(console, "console/rollback", USER_KEY, production="v000002")
    assert refused.status_code == 403 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert api(console, "console/rollback", None, production="v000002").status_code == 401
    # the operator's own requests are checked like the API's: a bad body or an unknown version is a 4xx
    assert api(console, "console/rollback", OPS_KEY, production="latest").status_code == 400
    assert api(console, "console/versions/v000009/report", OPS_KEY).status_code == 404
    assert api(console, "console/versions/v000002/plots/report.json", OPS_KEY).status_code == 400
    assert api(console, "console/versions/v000002/plots/nothing.png", OPS_KEY).status_code == 404
    from lm.registry import Registry

    aliases = Registry(console["store"], console["cfg"].registry_uri).state()["aliases"]
    assert aliases == {"production": "v000002", "previous": "v000001"}  # nothing was rolled back


def test_operator_sees_two_versions_and_rolls_back_and_the_serving_version_changes(console, browser):
    from lm.registry import Registry

    for _ in range(2):  # a greedy request twice: a cache lookup missed, then one hit
        api(console, "completions", USER_KEY, model="lmforge", prompt="CACHE:", max_tokens=2, temperature=0)
    connect(browser, console["url"], OPS_KEY)
    by_id(browser, "tab-operations").click()
    rows = wait_for(browser, lambda d: (r := d.find_elements("css selector", "#registry tbody tr")) and len(r) == 2
                    and r, what="the registry")
    assert [r.get_attribute("data-version") for r in rows] == ["v000002", "v000001"]
    assert "production" in rows[0].text and "retired" in rows[1].text and "v000001" in rows[0].text  # its parent
    wait_for(browser, lambda d: by_id(d, "serving").get_attribute("data-version") == "v000002", what="the numbers")
    # the gate report of v000002: its verdict, checks and PNGs (fetched with the key, shown as blobs)
    wait_for(browser, lambda d: d.execute_script(
        "const i = [...document.querySelectorAll('#report-plots img')];"
        "return i.length === 2 && i.every(x => x.complete && x.naturalWidth > 0)"), what="the report's plots")
    assert by_id(browser, "report-verdict").text.startswith("PASSED")
    assert len(browser.find_elements("css selector", "#report-checks tbody tr")) == 2
    iterations = browser.find_elements("css selector", "#iterations tbody tr")
    assert len(iterations) == 1 and "promoted" in iterations[0].text and "v000002" in iterations[0].text
    wait_for(browser, lambda d: d.find_elements("css selector", "#training svg polyline"), what="the curves")
    assert "runs/r2" in by_id(browser, "training-note").text
    requests = by_id(browser, "stats-requests").text
    assert "completions" in requests and "console" in requests and "%" in by_id(browser, "stats-summary").text
    screenshot(browser, "operations.png")

    by_id(browser, "rollback").click()
    assert "from v000002 to v000001" in by_id(browser, "rollback-question").text
    set_field(browser, "rollback-reason", "answers got worse")
    by_id(browser, "rollback-yes").click()
    wait_for(browser, lambda d: by_id(d, "aliases").get_attribute("data-production") == "v000001", what="rollback")
    wait_for(browser, lambda d: by_id(d, "serving").get_attribute("data-version") == "v000001", timeout=60,
             what="the replicas to follow the rollback")
    answered = api(console, "completions", USER_KEY, model="lmforge", prompt="KING:", max_tokens=2)
    assert answered.json()["system_fingerprint"] == "v000001"
    event = Registry(console["store"], console["cfg"].registry_uri).events()[-1]
    assert event["action"] == "rollback" and "key ops" in event["reason"] and "answers got worse" in event["reason"]
    again = api(console, "console/rollback", OPS_KEY, production="v000002")  # a stale confirmation
    assert again.status_code == 409 and again.json()["error"]["param"] == "production"
    logged = [p.read_text(errors="replace") for p in console["logs"].rglob("*")  # what Ray logged meanwhile
              if p.is_file() and p.stat().st_mtime >= console["started"]]
    assert any("operator action rollback by key ops" in text for text in logged)
    assert not [t for t in logged if OPS_KEY in t or USER_KEY in t]  # the keys are never logged
    assert not page_problems(browser)
