"""`dpvr serve`: an OpenAI-compatible chat server for a routed model, built on `transformers serve`.

    dpvr serve                                                  # the embedded tiny LLaVA, stock
    dpvr serve runs/train/lf/final-full                         # a DPVR checkpoint, with its own routing
    dpvr serve llava-hf/llava-1.5-7b-hf --mode lf --split-layer 18 --adapter runs/lf/final --port 8001
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny-llava", "messages": [{"role": "user", "content": "hello"}]}'

The model loads as `dpvr generate` loads it (dpvr.loading.load_model: the same flags, a stock checkpoint
converted with --mode), then transformers' server answers POST /v1/chat/completions with it (see
docs/serving.md): images as base64 data URLs or paths on the server, streaming, requests queued.
"""
from __future__ import annotations

import argparse

from dpvr.cli_types import at_least
from dpvr.errors import UsageError
from dpvr.model_flags import add_model_arguments, model_kwargs

DEFAULT_NAME = "tiny-llava"  # what requests name the embedded model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint dir or hub id, as --model (default: the embedded tiny LLaVA)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (0: a free one)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the `model` requests name (default: MODEL as given, or tiny-llava)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="uvicorn's log level (info: one line per request)")  # fmt: skip
    add_model_arguments(parser)


def _port(text: str) -> int:
    value = at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {value}")
    return value


_port.__name__ = "port"


def start(args: argparse.Namespace):
    """(the server for these options, listening but not yet serving: a `Running`; the model; its processor).
    What can be refused cheaply is refused before the model loads: a missing MODEL folder, a missing
    serving extra, a taken port."""
    from dpvr.loading import describe, load_model, resolve_model_path
    from dpvr.serve.app import Running, build_app, listen, serving_parts

    if args.checkpoint is not None and args.model is not None and args.checkpoint != args.model:
        raise UsageError(f"MODEL {args.checkpoint} and --model {args.model} disagree; give one of them")
    args.model = args.model or args.checkpoint
    resolve_model_path(args.model)
    serving_parts()
    listener = listen(args.host, args.port)
    try:
        model, processor = load_model(**model_kwargs(args))
        name = args.served_model_name or args.model or DEFAULT_NAME
        server = Running(build_app(model, processor, name), listener, log_level=args.log_level)
    except BaseException:
        listener.close()
        raise
    print(f"dpvr serve: {describe(model, plan=True)} as {name!r} on {server.url} (POST /chat/completions)", flush=True)
    return server, model, processor


def run(args: argparse.Namespace) -> int:
    server, _model, _processor = start(args)
    server.serve_forever()  # until Ctrl-C: uvicorn shuts down (5 s for requests in flight), then dpvr exits 130
    return 0
