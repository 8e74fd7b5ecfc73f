"""`dpvr serve` over loopback: the shipped tiny LLaVA converted to LF (as `dpvr serve --mode lf --split-layer 6`
builds it), served by transformers' server in a background thread on a free port, always stopped.

Every answer must be the one `dpvr generate` gives (dpvr.generate.build_inputs + answer: the same chat
template, greedy, the same max_new_tokens), with the same prompt length, and the routed cache must hold the
schedule's per-layer lengths; bad requests get a 400 with one line, and the next request is answered.
Needs the serve extra (in dpvr[test]); skipped without it.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from transformers.utils.import_utils import is_serve_available

from dpvr.cli import command_parser, main

if not is_serve_available():
    pytest.skip("the serve extra (fastapi, uvicorn, openai) is not installed: pip install 'dpvr[serve]'",
                allow_module_level=True)  # fmt: skip

NEW_TOKENS = 8
SPLIT = 6
QUESTION = "which digit is in the top left cell ?"


def png(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


@pytest.fixture(scope="module")
def served():
    """(server, model, processor, prefills): prefills collects (prompt length, RoutedCache lengths) per prefill."""
    from dpvr.routing.cache import RoutedCache
    from dpvr.serve.cli import start

    args = command_parser("serve").parse_args(["--mode", "lf", "--split-layer", str(SPLIT), "--port", "0",
                                               "--log-level", "warning"])  # fmt: skip
    server, model, processor = start(args)
    prefills: list[tuple[int, list[int]]] = []

    def record(_module, _args, kwargs, out):
        cache, ids = out.past_key_values, kwargs.get("input_ids")
        if isinstance(cache, RoutedCache) and ids is not None and ids.shape[1] > 1:  # a prefill, not a decode step
            prefills.append((ids.shape[1], cache.lengths()))

    hook = model.register_forward_hook(record, with_kwargs=True)
    try:
        with server:
            yield server, model, processor, prefills
    finally:
        hook.remove()


def post(server, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    """(status, JSON body, or the raw text of a stream)."""
    request = urllib.request.Request(server.url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            return response.status, text if body.get("stream") else json.loads(text)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def ask(server, messages: list[dict], **extra) -> dict:
    status, reply = post(server, {"model": "tiny-llava", "messages": messages, "max_tokens": NEW_TOKENS, **extra})
    assert status == 200, reply
    return reply


def expected(model, processor, image: Image.Image | None, question: str = QUESTION) -> tuple[str, int, int]:
    """(`dpvr generate`'s greedy answer, its prompt length and its answer length in tokens)."""
    from dpvr.data.templates import render_prompt
    from dpvr.generate import answer, build_inputs

    if image is None:
        inputs = processor(text=render_prompt(processor, question, has_image=False), return_tensors="pt")
    else:
        inputs = build_inputs(processor, image, question, model.device)
    got = answer(model, processor, inputs, NEW_TOKENS, echo=False)
    return got["text"], inputs["input_ids"].shape[1], got["new_tokens"]


def schedule_lengths(model, prompt_tokens: int, has_image: bool) -> list[int]:
    """Per layer, the keys the schedule says a prefill leaves: every token, or the text tokens only."""
    from dpvr.routing.schedule import compile_schedule, layer_contents

    L = model.config.text_config.num_hidden_layers
    steps = compile_schedule(model.dpvr_config, L, has_images=has_image)
    text = prompt_tokens - (model.config.image_seq_length if has_image else 0)
    return [text if keys == "text" else prompt_tokens for keys, _pruned in layer_contents(steps, L)]


def check_cache(served_, prompt_tokens: int, has_image: bool) -> None:
    _server, model, _processor, prefills = served_
    held = [lengths for n, lengths in prefills if n == prompt_tokens]
    assert held, f"no prefill of {prompt_tokens} tokens recorded: {[n for n, _ in prefills]}"
    want = schedule_lengths(model, prompt_tokens, has_image)
    assert all(lengths == want for lengths in held), f"cache lengths {held[-1]}, schedule says {want}"
    if has_image:  # LF's text-only layers keep no image keys: the KV memory dpvr serve saves
        assert min(want) < prompt_tokens == max(want)


def test_image_request_gets_generates_answer(served, tmp_path):
    server, model, processor, _ = served
    image = png(0)
    want, prompt_tokens, new_tokens = expected(model, processor, image)
    for url in (data_url(image), str(tmp_path / "img.png"), f"file://{tmp_path / 'img.png'}"):
        image.save(tmp_path / "img.png")
        reply = ask(server, image_message(url))
        assert reply["choices"][0]["message"]["content"].strip() == want, url[:40]
        assert (reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]) == (prompt_tokens, new_tokens)
    check_cache(served, prompt_tokens, has_image=True)


def test_streaming_with_the_openai_client(served):
    import openai

    server, model, processor, _ = served
    image = png(1)
    want, prompt_tokens, _ = expected(model, processor, image, "how many digits are there ?")
    client = openai.OpenAI(base_url=server.url, api_key="unused", timeout=120, max_retries=0)
    stream = client.chat.completions.create(model="tiny-llava", messages=image_message(data_url(image), "how many "
                                            "digits are there ?"), max_tokens=NEW_TOKENS, stream=True)  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == want and len(chunks) >= 3  # the role, >= 1 piece of text, the finish
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    check_cache(served, prompt_tokens, has_image=True)


def test_text_only_request(served):
    server, model, processor, _ = served
    want, prompt_tokens, new_tokens = expected(model, processor, None, "how many cells are there ?")
    reply = ask(server, [{"role": "user", "content": "how many cells are there ?"}])
    assert reply["choices"][0]["message"]["content"].strip() == want
    assert (reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]) == (prompt_tokens, new_tokens)
    check_cache(served, prompt_tokens, has_image=False)  # every layer, every token: no image to route


def test_four_concurrent_clients(served):
    server, model, processor, _ = served
    questions = [QUESTION, "how many digits are there ?", "is there a 3 ?", "which digit is in the center cell ?"]
    wants = [expected(model, processor, png(10 + k), q)[0] for k, q in enumerate(questions)]
    replies: list = [None] * 4

    def client(k: int) -> None:
        replies[k] = post(server, {"model": "tiny-llava", "max_tokens": NEW_TOKENS,
                                   "messages": image_message(data_url(png(10 + k)), questions[k])})  # fmt: skip

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a client got no answer in 180 s"
    for k, (status, reply) in enumerate(replies):
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"].strip() == wants[k], questions[k]


def test_a_saved_dpvr_checkpoint_serves_the_same_answers(served, tmp_path):
    """MODEL a DPVR checkpoint (what `save_pretrained` writes): loaded with its own routing, no flags."""
    from dpvr.serve.cli import start

    _server, model, processor, _ = served
    model.save_pretrained(tmp_path / "lf")
    image = png(5)
    want, prompt_tokens, _ = expected(model, processor, image)
    args = command_parser("serve").parse_args([str(tmp_path / "lf"), "--port", "0", "--log-level", "warning"])
    server, loaded, _processor = start(args)
    assert loaded.dpvr_config == model.dpvr_config
    with server:
        status, reply = post(server, {"model": str(tmp_path / "lf"), "max_tokens": NEW_TOKENS,
                                      "messages": image_message(data_url(image))})  # fmt: skip
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"].strip() == want
    assert reply["usage"]["prompt_tokens"] == prompt_tokens


def _refused(server, body: dict, words: list[str], status: int = 400) -> None:
    got, reply = post(server, {"model": "tiny-llava", "max_tokens": NEW_TOKENS, **body})
    assert got == status, reply
    message = reply["error"]["message"]
    assert "\n" not in message and all(w in message for w in words), message


def _still_serving(server) -> None:
    reply = ask(server, image_message(data_url(png(2))))
    assert reply["choices"][0]["message"]["content"] is not None


def test_bad_images_are_refused_and_serving_goes_on(served, tmp_path):
    server = served[0]
    (tmp_path / "not_an_image.png").write_text("hello")
    cases = [
        (image_message(str(tmp_path / "missing.png")), ["image 1", "no such file", "missing.png"]),
        (image_message(str(tmp_path / "not_an_image.png")), ["image 1", "not a readable image"]),
        (image_message("data:image/png;base64,not*base64"), ["image 1", "not valid base64"]),
        (image_message("data:image/png;base64," + base64.b64encode(b"hello").decode()), ["not a readable image"]),
        (image_message("https://example.com/cat.png"), ["https:// URLs are not fetched"]),
    ]
    for messages, words in cases:
        _refused(server, {"messages": messages}, words)
        _refused(server, {"messages": messages, "stream": True}, words)  # an error status, not a broken stream
        _still_serving(server)


def test_prompt_past_the_max_length_is_refused_and_serving_goes_on(served):
    server, model = served[:2]
    limit = model.config.text_config.max_position_embeddings
    long = [{"role": "user", "content": "cell " * limit}]
    for stream in (False, True):
        _refused(server, {"messages": long, "stream": stream}, [f"holds at most {limit}", "no room"])
        _still_serving(server)
    _refused(server, {"messages": image_message(data_url(png(3))), "max_tokens": limit}, [f"max length {limit}"])
    _still_serving(server)


def test_other_endpoints_and_models_are_refused(served):
    server = served[0]
    listed = json.loads(urllib.request.urlopen(server.url + "/models", timeout=30).read())
    assert [m["id"] for m in listed["data"]] == ["tiny-llava"]
    status, reply = post(server, {"model": "another", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "pinned to 'tiny-llava'" in reply["detail"]
    request = urllib.request.Request(server.url + "/completions", data=b'{"prompt": "hi"}',
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 404
    _still_serving(server)


def test_a_setting_routing_refuses_is_a_400(served):
    server = served[0]
    config = json.dumps({"cache_implementation": "static", "max_new_tokens": NEW_TOKENS})
    _refused(server, {"messages": image_message(data_url(png(4))), "generation_config": config},
             ["cache_implementation='static' is not supported in routed modes"])  # fmt: skip
    _still_serving(server)


def test_a_bad_generation_config_is_a_400(served):
    server = served[0]
    _refused(server, {"messages": image_message(data_url(png(4))), "generation_config": "{not json"},
             ["`generation_config` is not valid JSON"])  # fmt: skip
    _refused(server, {"messages": image_message(data_url(png(4))), "generation_config": "[1]", "stream": True},
             ["`generation_config` must be a JSON object"])  # fmt: skip
    _still_serving(server)


def test_max_completion_tokens_caps_the_answer(served):
    """Read on every release (transformers 5.19 ignores it: dpvr passes it on as max_tokens)."""
    server, model, processor, _ = served
    _want, _prompt_tokens, new_tokens = expected(model, processor, png(0))
    assert new_tokens > 1, "the answer needs 2 tokens or more to be cut short"
    status, reply = post(server, {"model": "tiny-llava", "messages": image_message(data_url(png(0))),
                                  "max_completion_tokens": new_tokens - 1})  # fmt: skip
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == new_tokens - 1


def test_unknown_model_folder_is_refused_at_start(tmp_path, capsys):
    rc = main(["serve", str(tmp_path / "no-such-model"), "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "no such file" in err[0] and "no-such-model" in err[0], err


def test_a_missing_serve_extra_is_refused_at_start(monkeypatch, capsys):
    import transformers.utils.import_utils as import_utils

    monkeypatch.setattr(import_utils, "is_serve_available", lambda: False)
    rc = main(["serve", "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "pip install 'dpvr[serve]'" in err[0], err


@pytest.mark.e2e
def test_the_command_serves_until_interrupted(tmp_path):
    """`dpvr serve` as a shell runs it: prints its URL, answers, and on Ctrl-C (SIGINT) shuts down and exits
    130 with its one line, as every dpvr command does."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dpvr.cli", "serve", "--mode", "lf", "--split-layer", str(SPLIT), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the start line, once the model is loaded and the port is open
        assert " on http://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        server = type("Server", (), {"url": url})
        reply = ask(server, [{"role": "user", "content": "how many cells are there ?"}])
        assert reply["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and err.strip().endswith("dpvr serve: interrupted"), err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
