"""What `dpvr serve` checks in a chat request before transformers' handler sees it, so that a request the
model cannot answer gets an HTTP 400 with one line naming the problem (and not a 500, a stream cut off
mid-way, or a URL fetched on the client's behalf), and the server goes on serving the next one.

    n_images = load_images(body)      # every image part decoded here; refuses URLs, missing files, bad data
    fit_length(body, prompt_tokens=700, max_length=4096)   # refuses a prompt the model cannot hold
    check_generation_config(body, model)   # refuses generate() settings routing refuses

Plain functions over the request's JSON body (no fastapi): a RequestError carries the HTTP status.
"""
from __future__ import annotations

import base64
import binascii
import json
from io import BytesIO
from pathlib import Path

from dpvr.errors import DPVRError

IMAGE_PARTS = ("image_url", "input_image")  # chat completions' name, and the Responses API's
TEXT_PARTS = ("text", "input_text", "output_text")


class RequestError(DPVRError):
    """A request the server refuses: answered with `status` and this one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_messages(body: dict) -> list[dict]:
    """The request's messages, refusing shapes transformers' handler would fail on with a 500."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("`messages` must be a non-empty list of {role, content} objects")
    for k, message in enumerate(messages):
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        typed = isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)
        if not typed:
            raise RequestError(f"message {k}: `content` must be a string or a list of {{type, ...}} parts")
        other = sorted({p["type"] for p in content} - {*IMAGE_PARTS, *TEXT_PARTS})
        if other:  # transformers would fetch a video's or audio's URL, and routing refuses video
            raise RequestError(f"message {k}: dpvr serve takes text and image parts, not {', '.join(map(str, other))}")
    return messages


def load_images(body: dict) -> int:
    """Decode every image part of the request in place (its URL becomes the decoded image, which
    transformers' processor takes as it is); returns how many. Only base64 data URLs and paths on the
    server are read: a web URL is refused, not fetched."""
    count = 0
    for message in check_messages(body):
        for part in message.get("content") if isinstance(message.get("content"), list) else []:
            if part["type"] not in IMAGE_PARTS:
                continue
            count += 1
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RequestError(f"image {count}: no url; send {{'image_url': {{'url': 'data:image/png;base64,...'}}}}")
            part["image_url"] = {"url": decode_image(url, count)}
    return count


def decode_image(url: str, index: int):
    """A base64 data URL or a local path (plain or file://) as an RGB PIL image, decoded the way
    transformers' own `load_image` does (so the served answer is the one `transformers serve` would give)."""
    from PIL import Image
    from transformers.image_utils import load_image

    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"image {index}: a data URL must be base64 (data:image/png;base64,...)")
        try:
            source = BytesIO(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(f"image {index}: its data URL is not valid base64") from None
    elif "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise RequestError(f"image {index}: {scheme}:// URLs are not fetched; send a base64 data URL or a path on "
                           "the server")  # fmt: skip
    else:
        source = Path(url.removeprefix("file://")).expanduser()
        if not source.is_file():
            raise RequestError(f"image {index}: no such file on the server: {source}")
    try:
        return load_image(Image.open(source))  # load_image: EXIF orientation, then RGB
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        what = "its data URL" if url.startswith("data:") else url
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise RequestError(f"image {index}: {what} is not a readable image ({why})") from None


def requested_new_tokens(body: dict) -> int | None:
    """max_completion_tokens (the current OpenAI name) or max_tokens (the older one), as transformers reads them."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"`{key}` must be an integer >= 1, got {value!r}")
            return value
    return None


def fit_length(body: dict, prompt_tokens: int, max_length: int | None) -> None:
    """Refuse a prompt (image tokens included) the model cannot hold, or a completion that would run past
    its max length; without a requested length, generate at most up to it (transformers' own default,
    1024 new tokens, could run past a short model's positions)."""
    wanted = requested_new_tokens(body)
    if body.get("max_completion_tokens") is not None:
        # transformers 5.19 ignores max_completion_tokens (5.23 on read it first); every release reads max_tokens
        body["max_tokens"] = body.pop("max_completion_tokens")
    if max_length is None:
        return
    room = max_length - prompt_tokens
    if room < 1:
        raise RequestError(f"the prompt is {prompt_tokens} tokens (image tokens included); this model holds at most "
                           f"{max_length} (its max_position_embeddings), leaving no room for an answer")  # fmt: skip
    if wanted is not None and wanted > room:
        raise RequestError(f"the prompt is {prompt_tokens} tokens and {wanted} new tokens were asked for: more than "
                           f"this model's max length {max_length}; ask for at most {room}")  # fmt: skip
    if wanted is None:
        body["max_tokens"] = room


def check_generation_config(body: dict, model) -> None:
    """Refuse a `generation_config` (a JSON object of generate() settings transformers passes on) with a setting
    the routed model's generate() refuses, with generate()'s own line: here, before a stream starts, and on
    every release (5.25 generates behind a queue, whose errors come back as plain ValueError text)."""
    from dpvr.routing.inputs import check_generate

    raw = body.get("generation_config")
    if raw is None:
        return
    try:
        settings = json.loads(raw) if isinstance(raw, str) else None  # transformers json.loads it, as a string
    except json.JSONDecodeError as exc:
        raise RequestError(f"`generation_config` is not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise RequestError("`generation_config` must be a JSON object of generate() settings, as a string")
    routing = getattr(model, "dpvr_config", None)
    if routing is not None and routing.mode != "vanilla":  # as the routed generate() checks
        check_generate(model.generation_config, settings)
