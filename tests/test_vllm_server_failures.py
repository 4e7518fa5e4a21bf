"""The vLLM server engine when its server fails: clear errors or retries, never a hang.

No vLLM needed: a stand-in OpenAI-compatible server (tests/fake_vllm_server.py, FastAPI +
uvicorn, vLLM's response shape) runs in a subprocess on 127.0.0.1, and is SIGKILLed,
restarted, made to hang, or made to answer like an incompatible server. Every engine call
runs in a daemon thread joined with a deadline, so a regression fails the test instead of
hanging the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from rl.engines import SamplingParams
from rl.engines.vllm_server import VLLMServerEngine

FAKE = str(Path(__file__).with_name("fake_vllm_server.py"))
MARGIN = 3.0  # seconds of slack on every time bound (a loaded 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers:
    """Stand-in servers started by one test; all killed at its end."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, port: int, delay: float = 0.0, mode: str = "ok", extra: list[str] = ()) -> subprocess.Popen:
        log = self.tmp_path / f"server{len(self.procs)}.log"
        cmd = [sys.executable, FAKE, "--port", str(port), "--delay", str(delay), "--mode", mode, *extra]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"stand-in server did not start on port {port}:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.close()


def wait_inflight(port: int, n: int, timeout: float = 10.0) -> None:
    """Until the server is answering `n` completions (the engine's requests are in flight)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"http://127.0.0.1:{port}/inflight", timeout=1).json()["inflight"] < n:
        if time.monotonic() > deadline:
            pytest.fail(f"the engine's {n} requests never reached the server")
        time.sleep(0.05)


def in_thread(fn):
    """Run fn() in a daemon thread; returns (thread, box) with box["result"] or box["error"] set when done."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            box["error"] = e
        box["done"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def join(t: threading.Thread, box: dict, deadline: float) -> dict:
    t.join(deadline)
    if t.is_alive():
        pytest.fail(f"engine call still running after {deadline:.1f} s: it hangs")
    return box


def engine(port: int, tok, **kw) -> VLLMServerEngine:
    return VLLMServerEngine(None, tok, 8, base_url=f"http://127.0.0.1:{port}", **kw)


PROMPTS = [[5, 6, 7], [8, 9], [10]]
PARAMS = SamplingParams(max_new_tokens=4, temperature=1.0)


def expected_ids(prompt: list[int], n: int = 4) -> list[int]:
    return [(prompt[-1] + k + 1) % 1000 for k in range(n)]  # what the stand-in server generates


# ----------------------------------------------------------------------------- tests


def test_stand_in_server_round_trip(servers, tiny_tokenizer):
    """The stand-in answers in vLLM's shape (what the failure tests rely on); model_name is checked."""
    port = _free_port()
    servers.start(port)
    eng = engine(port, tiny_tokenizer, timeout=5)
    try:
        assert eng.model_name == "fake-model"
        gens = eng.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1]], PARAMS)
        assert [g.token_ids for g in gens] == [expected_ids(PROMPTS[0])] * 2 + [expected_ids(PROMPTS[1])]
        assert all(g.logprobs == [-0.5] * 4 and g.finish_reason == "length" for g in gens)
        assert eng.stats["requests"] == 2 and eng.stats["retries"] == 0  # identical prompts: one request, n=2
    finally:
        eng.close()
    with pytest.raises(ValueError, match=r"model_name 'other' is not served.*fake-model"):
        engine(port, tiny_tokenizer, timeout=5, model_name="other")


def test_server_killed_mid_generate_raises_naming_the_url_in_bounded_time(servers, tiny_tokenizer):
    """(a) SIGKILL while every request is in flight: RuntimeError after max_retries + 1 attempts, no hang."""
    port = _free_port()
    proc = servers.start(port, delay=30)  # would answer far beyond the engine's timeout
    timeout, retries, backoff = 2.0, 1, 0.5
    eng = engine(port, tiny_tokenizer, timeout=timeout, max_retries=retries, retry_backoff=backoff)
    bound = timeout * (retries + 1) + backoff + MARGIN
    try:
        t0 = time.monotonic()
        t, box = in_thread(lambda: eng.generate(PROMPTS, PARAMS))
        wait_inflight(port, len(PROMPTS))
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        join(t, box, bound)
        err = box.get("error")
        assert isinstance(err, RuntimeError), box
        msg = str(err)
        assert f"http://127.0.0.1:{port}/v1/completions" in msg and "failed after 2 attempts" in msg, msg
        assert "ConnectError" in msg, msg  # the last attempt found nothing listening
        assert box["done"] - t0 < bound
        assert box["done"] - killed < backoff + MARGIN  # the kill is noticed at once, not at the read timeout
        assert eng.stats["retries"] >= 1
    finally:
        eng.close()


def test_server_restarted_during_backoff_the_call_succeeds(servers, tiny_tokenizer):
    """(b) Killed mid-request and restarted on the same port: the retries carry the call through."""
    port = _free_port()
    proc = servers.start(port, delay=30)
    eng = engine(port, tiny_tokenizer, timeout=5, max_retries=5, retry_backoff=0.5)  # 15.5 s of backoff in all
    try:
        t, box = in_thread(lambda: eng.generate(PROMPTS, PARAMS))
        wait_inflight(port, len(PROMPTS))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        servers.start(port, delay=0)  # same port, answers at once
        join(t, box, 6 * 5 + 15.5 + MARGIN)
        assert "error" not in box, box.get("error")
        assert [g.token_ids for g in box["result"]] == [expected_ids(p) for p in PROMPTS]
        assert eng.stats["retries"] >= 1 and eng.stats["samples"] == len(PROMPTS)
    finally:
        eng.close()


def test_server_that_never_answers_times_out_with_a_clear_error(servers, tiny_tokenizer):
    """(c) Connection accepted, completion never answered: bounded by timeout, then a clear error."""
    port = _free_port()
    servers.start(port, mode="hang")
    timeout, retries, backoff = 1.5, 1, 0.5
    eng = engine(port, tiny_tokenizer, timeout=timeout, max_retries=retries, retry_backoff=backoff)
    bound = timeout * (retries + 1) + backoff + MARGIN
    try:
        t0 = time.monotonic()
        t, box = in_thread(lambda: eng.generate(PROMPTS[:1], PARAMS))
        join(t, box, bound)
        err = box.get("error")
        assert isinstance(err, RuntimeError), box
        msg = str(err)
        assert f"http://127.0.0.1:{port}/v1/completions" in msg and "failed after 2 attempts" in msg, msg
        assert "ReadTimeout" in msg and "timeout=1.5 s" in msg, msg
        assert timeout * (retries + 1) <= box["done"] - t0 < bound  # both attempts waited their full timeout
        assert eng.stats["retries"] == retries
    finally:
        eng.close()


def test_silent_listener_fails_construction_in_bounded_time(tiny_tokenizer):
    """(c) A socket that accepts connections (kernel backlog) but never speaks HTTP: construction times out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        port = s.getsockname()[1]
        timeout, retries, backoff = 1.0, 1, 0.2
        t0 = time.monotonic()
        t, box = in_thread(lambda: engine(port, tiny_tokenizer, timeout=timeout, max_retries=retries,
                                          retry_backoff=backoff))
        join(t, box, timeout * (retries + 1) + backoff + MARGIN)
    err = box.get("error")
    assert isinstance(err, RuntimeError), box
    assert f"http://127.0.0.1:{port}" in str(err) and "did not answer" in str(err), str(err)
    assert box["done"] - t0 >= timeout * (retries + 1)


def test_nothing_listening_fails_construction_with_how_to_start_the_server(tiny_tokenizer):
    port = _free_port()  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        VLLMServerEngine(None, tiny_tokenizer, 8, base_url=f"http://127.0.0.1:{port}", timeout=2, max_retries=1,
                         retry_backoff=0.2, weight_sync="disk")
    assert time.monotonic() - t0 < 0.2 + MARGIN
    msg = str(info.value)
    assert f"nothing answers at http://127.0.0.1:{port}" in msg and "Is the vLLM server running?" in msg, msg
    assert "python -m vllm.entrypoints.openai.api_server" in msg and f"--port {port}" in msg, msg
    assert "--logprobs-mode processed_logprobs" in msg and "VLLM_SERVER_DEV_MODE=1" in msg, msg


def test_incompatible_server_without_token_ids_is_a_clear_error(servers, tiny_tokenizer):
    """An OpenAI-compatible server that returns no `token_ids` (old vLLM, other server): no silent empty samples."""
    port = _free_port()
    servers.start(port, mode="no_token_ids")
    eng = engine(port, tiny_tokenizer, timeout=5, max_retries=2)
    try:
        with pytest.raises(RuntimeError) as info:
            eng.generate(PROMPTS, PARAMS)
        msg = str(info.value)
        assert f"http://127.0.0.1:{port}/v1/completions" in msg and "without `token_ids`" in msg, msg
        assert "return_token_ids" in msg, msg
        assert eng.stats["retries"] == 0  # an incompatible answer is not retried
    finally:
        eng.close()
