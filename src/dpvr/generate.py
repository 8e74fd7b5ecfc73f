"""`dpvr generate`: answer a question about an image, streaming tokens with the routed KV cache.

    dpvr generate --image scene.png --prompt "which digit is in the top-left cell?"
    dpvr generate --model llava-hf/llava-1.5-7b-hf --adapter runs/lf --image cat.jpg --prompt "..." --compare
    dpvr generate --from runs/demo --image scene.png --prompt "..."   # the routing the demo's analysis recommends
    dpvr generate --image scene.png --prompt "..." --contrast-strength 1 --contrast-early 9  # docs/contrastive.md

`--compare` also answers with the vanilla model on the same weights and prints both times to first
token (prefill) and decode rates.
"""
from __future__ import annotations

import argparse
import contextlib
import time

from dpvr.cli_types import at_least
from dpvr.contrast_flags import add_contrast_arguments, contrast_config
from dpvr.fusion_policy import Request, add_policy_arguments, load_policy
from dpvr.errors import DPVRError, UsageError
from dpvr.model_flags import add_model_arguments, model_kwargs

# torch, transformers and PIL are imported where they are used, so `dpvr generate --help` answers at once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="image file (PNG/JPEG)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=32, help="tokens to generate at most")
    parser.add_argument("--compare", action="store_true", help="also answer with vanilla on the same weights")
    parser.add_argument("--no-cache", action="store_true", help="recompute the context every step (paper's decode)")
    add_model_arguments(parser)
    add_contrast_arguments(parser)
    add_policy_arguments(parser, task=True)


def build_inputs(processor, image, question: str, device) -> dict:
    """The checkpoint's own chat template (as eval renders it), one image (a PIL image), generation prompt appended."""
    from dpvr.data.templates import render_prompt

    text = render_prompt(processor, question, template="chat")
    return processor(images=image, text=text, return_tensors="pt").to(device)


class _FirstTokenTimer:
    """A generate() streamer: records when the first generated token arrives and, with echo, streams the
    decoded text to stdout through transformers' TextStreamer."""

    def __init__(self, tokenizer, echo: bool):
        from transformers import TextStreamer

        self.echo = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if echo else None
        self.first_at, self.count, self._prompt_seen = None, 0, False

    def put(self, value):
        if self._prompt_seen and self.first_at is None:
            self.first_at = time.perf_counter()
        if self._prompt_seen:
            self.count += value.numel()
        self._prompt_seen = True
        if self.echo is not None:
            self.echo.put(value)

    def end(self):
        if self.echo is not None:
            self.echo.end()


def answer(model, processor, inputs: dict, max_new_tokens: int, use_cache: bool = True, echo: bool = True) -> dict:
    """Generate greedily; returns text, time to first token, decode ms/token."""
    import torch

    streamer = _FirstTokenTimer(processor.tokenizer, echo)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache, streamer=streamer,
            pad_token_id=processor.tokenizer.pad_token_id,
        )  # fmt: skip
    end = time.perf_counter()
    new = out[0, inputs["input_ids"].shape[1] :]
    ttft = (streamer.first_at or end) - start
    decode = (end - (streamer.first_at or end)) / max(len(new) - 1, 1)
    return {"text": processor.decode(new, skip_special_tokens=True).strip(), "ttft_s": ttft,
            "decode_ms_per_token": 1000 * decode, "new_tokens": len(new)}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from dpvr.contrast import contrast
    from dpvr.loading import describe, load_model
    from dpvr.routing import DPVRForConditionalGeneration

    try:  # before loading the model: fail fast on a bad path
        image = Image.open(args.image).convert("RGB")
    except OSError as exc:
        raise DPVRError(f"cannot read image {args.image}: {exc}") from None
    policy, placed = load_policy(args.fusion_policy), contextlib.nullcontext()
    if policy is None and args.task is not None:
        raise UsageError("--task is read by --fusion-policy's rules; give --fusion-policy too")
    model, processor = load_model(**model_kwargs(args))
    cfg = contrast_config(args, model.config.text_config.num_hidden_layers)
    if args.compare and not isinstance(model, DPVRForConditionalGeneration):  # before answering anything
        raise UsageError("--compare needs a routed model (--mode, --adapter or a DPVR checkpoint); this one is stock")
    inputs = build_inputs(processor, image, args.prompt, model.device)
    suffix = "" if cfg is None else f" +contrast {cfg.strength:g}"
    if policy is not None:
        policy.check_model(model)
        req = Request(args.task, n_images=1, prompt_tokens=len(processor.tokenizer(args.prompt).input_ids))
        placed = model.routing(fusion_at=policy.pick(req))
    with contrast(model, cfg), placed:  # both rows of --compare answer under them
        return _answer_rows(model, processor, inputs, describe(model) + suffix, "vanilla" + suffix, args)


def _answer_rows(model, processor, inputs: dict, label: str, vanilla: str, args: argparse.Namespace) -> int:
    if args.compare:  # untimed warm-up of both paths: the first call pays one-off costs (kernels, allocator)
        for mode in (None, "vanilla"):
            with model.routing(mode=mode) if mode else contextlib.nullcontext():
                answer(model, processor, inputs, 1, use_cache=not args.no_cache, echo=False)
    print(f"[{label}] ", end="", flush=True)
    routed = answer(model, processor, inputs, args.max_new_tokens, use_cache=not args.no_cache)
    rows = [(label, routed)]
    if args.compare:
        print(f"[{vanilla}] ", end="", flush=True)
        with model.routing(mode="vanilla"):
            rows.append((vanilla, answer(model, processor, inputs, args.max_new_tokens)))
        print(f"\n{'model':<28} {'TTFT ms':>9} {'decode ms/tok':>14}  answer")
        for name, r in rows:
            print(f"{name:<28} {1000 * r['ttft_s']:>9.1f} {r['decode_ms_per_token']:>14.2f}  {r['text']!r}")
    return 0
