"""`corolla monitor`: the swarm page's data from records and probes (pure), and the page itself in a real
headless Chromium (Debian's `chromium` through selenium) over a real 3-peer swarm: every peer and full
coverage, then, after one peer is stopped, the gap within the refresh period. Screenshots are saved under
.pytest_cache/artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarm import LocalSwarm, Process, running

from client.local_swarm import LocalProcess
from client.monitor import Probe, model_report
from protos.records import PeerRecord, PeerState

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / ".pytest_cache" / "artifacts"
REFRESH_PERIOD = 4.0  # seconds: the page must show a change within this
SPANS = ["0:2", "1:3", "2:4"]  # stopping the first leaves block 0 unserved
STARTUP_TIMEOUT = 120.0


def _record(
    start: int, end: int, state: PeerState = PeerState.ONLINE, throughput: float = 10.0
) -> PeerRecord:
    return PeerRecord(
        state=state,
        address="127.0.0.1:1000",
        start=start,
        end=end,
        throughput=throughput,
        free_cache_tokens=64,
        max_length=128,
        dtype="float32",
        version="1.0",
        certificate="-----BEGIN CERTIFICATE-----",
    )


# ---- the page's data ---------------------------------------------------------------------------------


def test_coverage_counts_online_reachable_peers_only() -> None:
    records = {
        "a": _record(0, 2, throughput=4.0),
        "b": _record(1, 4, throughput=6.0),
        "c": _record(2, 4, PeerState.DRAINING),
        "d": _record(3, 4),  # ONLINE in its record, but it does not answer
    }
    probes = {"a": Probe(latency_ms=1.5), "b": Probe(latency_ms=2.0), "d": Probe(error="UNAVAILABLE")}
    report = model_report("m", 4, records, probes)
    assert report["coverage"] == [1, 2, 1, 1]
    assert report["throughput"] == [4.0, 10.0, 6.0, 6.0]
    assert report["served"] and report["num_online"] == 2
    assert report["bottleneck"] == {"throughput": 4.0, "blocks": [[0, 1]]}
    peers = {peer["peer_id"]: peer for peer in report["peers"]}
    assert [peer["peer_id"] for peer in report["peers"]] == ["a", "b", "c", "d"]  # by span
    assert (peers["a"]["latency_ms"], peers["a"]["reachable"], peers["a"]["serving"]) == (1.5, True, True)
    assert (peers["d"]["reachable"], peers["d"]["serving"]) == (False, False)
    assert "probe_error" not in peers["d"]  # whether it answered, never why (a reflector's output)
    assert (peers["c"]["serving"], peers["c"]["reachable"]) == (False, None)  # not probed: draining
    assert "certificate" not in peers["a"] and peers["a"]["tls"] is True


def test_a_gap_is_reported_with_its_blocks() -> None:
    report = model_report("m", 4, {"a": _record(0, 2)}, {})
    assert not report["served"] and report["missing"] == [[2, 4]]
    assert report["coverage"] == [1, 1, 0, 0]


# ---- the page in a browser, over a real swarm ----------------------------------------------------------


def _browser():
    """Headless Chromium from Debian's packages; in CI its absence is a failure, not a skip."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide the browser: {message}")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    return webdriver.Chrome(service=Service(driver), options=options)


def _start_monitor(log_dir: Path, initial_peers: list[str]) -> LocalProcess:
    ready_file = log_dir / "monitor.ready.json"
    log = log_dir / "monitor.log"
    args = ["monitor", "--port", "0", "--refresh-period", str(REFRESH_PERIOD), "--initial-peers"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with log.open("w") as handle:
        popen = subprocess.Popen(
            [sys.executable, "-m", "protos.cli", *args, *initial_peers, "--ready-file", str(ready_file)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    process = LocalProcess(popen, log, ready_file)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while process.ready() is None:
        if popen.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"the monitor did not start:\n{process.text()[-3000:]}")
        time.sleep(0.1)
    return process


@pytest.fixture(scope="module")
def watched(checkpoint, tmp_path_factory) -> Iterator[tuple[LocalSwarm, str]]:
    """A DHT and 3 peers of the tiny Llama, and a monitor of that swarm; (swarm, the page's URL)."""
    log_dir = tmp_path_factory.mktemp("monitored")
    options = ("--model-id", "monitored", "--throughput", "100")
    with running(log_dir, checkpoint("llama"), SPANS, *options) as swarm:
        monitor = _start_monitor(log_dir, swarm.initial_peers)
        try:
            ready = monitor.ready()
            assert ready is not None
            yield swarm, str(ready["url"])
        finally:
            assert monitor.stop() == 0, monitor.text()[-3000:]


def _json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _wait(condition, timeout: float, what: str) -> float:
    """Seconds until `condition()` held, polled every 50 ms; fails after `timeout` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.swarm
def test_the_json_endpoint_lists_every_peer(watched: tuple[LocalSwarm, str]) -> None:
    swarm, url = watched

    def complete() -> bool:
        models = _json(url + "api/swarm")["models"]
        return bool(models) and models[0]["num_online"] == len(SPANS)

    _wait(complete, 60, "all three peers online in /api/swarm")
    [model] = _json(url + "api/swarm")["models"]
    assert (model["model_id"], model["num_blocks"], model["served"]) == ("monitored", 4, True)
    assert model["coverage"] == [1, 2, 2, 1]
    assert {peer["peer_id"] for peer in model["peers"]} == {peer.peer_id for peer in swarm.peers}
    for peer in model["peers"]:
        assert peer["reachable"] and peer["tls"] and peer["latency_ms"] > 0
        assert peer["live"]["max_cache_tokens"] > 0
    assert _json(url + "health") == {"status": "ok"}


# what the page shows, read in one go (the page redraws itself: elements found earlier may be gone)
PAGE_STATE = """
const rows = {};
for (const row of document.querySelectorAll("tr.peer")) rows[row.dataset.peerId] = row.dataset.serving;
const summary = document.querySelector("section.model .summary");
return {
  rows: rows,
  blocks: Array.from(document.querySelectorAll(".coverage .block"), (cell) => cell.dataset.peers),
  served: summary ? summary.dataset.served : null,
  summary: summary ? summary.textContent : null,
  spans: document.querySelectorAll(".lane .span").length,
};
"""


@pytest.mark.swarm
def test_the_page_shows_every_peer_then_the_gap_of_a_stopped_one(watched: tuple[LocalSwarm, str]) -> None:
    swarm, url = watched
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = _browser()
    try:
        browser.get(url)

        def page() -> dict:
            return browser.execute_script(PAGE_STATE)

        expected = {peer.peer_id: "true" for peer in swarm.peers}
        _wait(lambda: page()["rows"] == expected, 60, "every peer serving on the page")
        shown = page()
        assert shown["blocks"] == ["1", "2", "2", "1"] and shown["spans"] == len(SPANS)
        assert (shown["served"], shown["summary"]) == ("true", "all 4 blocks served")
        browser.save_screenshot(str(ARTIFACTS / "monitor-served.png"))

        stopped: Process = swarm.peers[0]
        stopped.popen.send_signal(signal.SIGTERM)  # it drains, announces so, and leaves
        seconds = _wait(lambda: page()["blocks"][:1] == ["0"], 3 * REFRESH_PERIOD, "the gap at block 0")
        assert seconds <= REFRESH_PERIOD, f"the gap showed after {seconds:.1f} s"
        print(f"the gap showed {seconds:.2f} s after SIGTERM (refresh period {REFRESH_PERIOD} s)")
        shown = page()
        assert (shown["served"], shown["summary"]) == ("false", "blocks 0 not served")
        assert shown["rows"][stopped.peer_id] == "false"
        browser.save_screenshot(str(ARTIFACTS / "monitor-gap.png"))
        assert stopped.popen.wait(60) == 0  # drained and left on that one SIGTERM
    finally:
        browser.quit()
