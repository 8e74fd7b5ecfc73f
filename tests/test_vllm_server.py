"""vLLM's OpenAI server with dpvr's plugin (a DPVR-LF checkpoint of the tiny LLaVA), on 127.0.0.1 only:
bad requests get a one-line HTTP 400 and the server answers the next request with HF DPVR's tokens; a
mode the plugin cannot run stops the server at start with dpvr's one-line refusal. Runs where vLLM is
installed (.ci/vllm.sh); skipped elsewhere.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm.sh runs these tests)")

import vllm_cases as vc  # noqa: E402

START_S = 300  # a server start takes ~25 s on an idle 2-core machine, several times that under load
ARGS = ["--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--host", "127.0.0.1", "--dtype", "float32",
        "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager",
        "--limit-mm-per-prompt", json.dumps({"image": 2})]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port), *ARGS]


class Server:
    def __init__(self, model, log):
        self.model, self.port = str(model), free_port()
        self.proc = subprocess.Popen(command(model, self.port), stdout=log, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        self.proc.kill()
        raise RuntimeError(f"vLLM's server did not come up in {START_S} s (see {log.name})")

    def chat(self, content: list[dict], max_tokens: int = 6) -> tuple[int, dict]:
        # add_special_tokens: vLLM's chat endpoint leaves out the tokenizer's BOS (it expects the chat
        # template to write it, and LLaVA's does not), where HF's processor puts it in
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "add_special_tokens": True,
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def lf(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-server")
    model = vc.save_dpvr(root / "lf", "lf", fusion_layers=1)
    with open(root / "server.log", "wb") as log:
        server = Server(model, log)
        yield server
        server.stop()


def data_url(raw: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}


def png(seed: int) -> dict:
    buf = io.BytesIO()
    vc.image(seed).save(buf, "PNG")
    return data_url(buf.getvalue())


QUESTION = "which digit is in the top left cell"
TEXT = {"type": "text", "text": QUESTION}


def check_refused(answer: tuple[int, dict], words: str) -> None:
    status, body = answer
    assert status == 400, (status, body)
    message = body["error"]["message"]
    assert words in message and "\n" not in message, message


def check_answers_as_hf(server: Server, images: tuple[int, ...]) -> None:
    status, body = server.chat([png(s) for s in images] + [TEXT])
    assert status == 200, body
    net, processor = vc.load_hf(server.model)
    ref = vc.hf_reference(net, processor, vc.Case(QUESTION, tuple(vc.image(s) for s in images), 6))
    assert body["prompt_token_ids"] == ref.prompt_ids
    assert body["choices"][0]["token_ids"] == ref.tokens


def test_bad_requests_get_one_line_400s_and_the_server_keeps_serving(lf):
    check_answers_as_hf(lf, (1,))
    check_refused(lf.chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA!!"}}, TEXT]), "base64")
    check_refused(lf.chat([data_url(b"not an image at all"), TEXT]), "Failed to load image")
    check_refused(lf.chat([png(1), png(2), png(3), TEXT]), "At most 2 image(s)")
    check_refused(lf.chat([png(1), {"type": "text", "text": " ".join(["grid"] * 600)}]), "maximum context length")
    check_answers_as_hf(lf, (4, 5))  # two images, after the refusals
    check_answers_as_hf(lf, ())  # text only


@pytest.mark.parametrize("mode", ["pc"])
def test_unservable_mode_stops_the_server_at_start_in_one_line(tmp_path, mode):
    model = vc.save_dpvr(tmp_path / mode, mode)
    run = subprocess.run(command(model, free_port()), capture_output=True, text=True, env=ENV, timeout=START_S)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("dpvr.errors.DPVRError: ") and f"not '{mode}'" in last, last
