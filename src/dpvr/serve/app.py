"""`transformers serve`'s own server (its FastAPI app, chat handler, SSE streaming and generation thread)
answering with one model that dpvr loaded: a DPVR checkpoint, or a stock one converted at load.

    model, processor = dpvr.loading.load_model(mode="lf", split_layer=6)
    with Running(build_app(model, processor, name="tiny-llava"), listen("127.0.0.1", 0)) as server:
        print(server.url)                # http://127.0.0.1:PORT/v1, for any OpenAI client

Why not `transformers serve MODEL` itself: its ModelManager loads a model by name with from_pretrained
(an Auto class for the model types it lists, else the config's architecture), so it cannot take a model
dpvr converted in memory, an adapter on its base, or the routing flags; the DPVR classes are not in its
Auto mappings either (`KeyError: 'dpvr_llava'`). So this module wires the parts `transformers serve`
wires (cli/serve.py, `Serve.__init__`) around a ModelManager that holds the one model dpvr loaded.
What it adds: the checks of dpvr.serve.checks before transformers' chat handler runs (images read here,
never fetched; a prompt past the model's length refused), and DPVRError answered as HTTP 400.
"""
from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

from dpvr.errors import DPVRError
from dpvr.serve.checks import RequestError, fit_length, load_images

TESTED_WITH = "5.23.0"  # the transformers release whose serve package this module was written against


def serving_parts() -> SimpleNamespace:
    """The parts of transformers' serve package dpvr serve is made of. They live in transformers.cli.serving,
    partly outside its exported names, and are not a stable API: a release that moves one is refused here,
    at start, in one line (and not with a broken server)."""
    import transformers
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise DPVRError("dpvr serve needs transformers' serving extra (fastapi, uvicorn, openai, pydantic): "
                        "pip install 'dpvr[serve]'")  # fmt: skip
    try:
        from transformers.cli.serving import Modality, ModelManager, build_server
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.utils import GenerationState
    except ImportError as exc:
        raise DPVRError(f"transformers {transformers.__version__}'s serve package has changed ({exc}); dpvr serve "
                        f"is built on transformers {TESTED_WITH}'s") from None  # fmt: skip
    # the methods overridden below: a rename upstream must fail here, not leave transformers' own in place
    needed = {ModelManager: ("load_model_and_processor", "get_model_modality", "get_gen_models"),
              ChatCompletionHandler: ("handle_request", "get_processor_inputs_from_messages")}  # fmt: skip
    for cls, names in needed.items():
        for name in names:
            if not callable(getattr(cls, name, None)):
                raise DPVRError(f"transformers {transformers.__version__}'s {cls.__name__} has no {name}; dpvr serve "
                                f"is built on transformers {TESTED_WITH}'s")  # fmt: skip
    return SimpleNamespace(ModelManager=ModelManager, Modality=Modality, build_server=build_server,
                           ChatCompletionHandler=ChatCompletionHandler, GenerationState=GenerationState)  # fmt: skip


def build_app(model, processor, name: str):
    """transformers' FastAPI app serving `model` under `name` (the `model` a request must name) on
    POST /v1/chat/completions; GET /v1/models lists it, GET /health answers. The other endpoints
    transformers has (completions, responses, audio, ...) answer 404: they would skip these checks."""
    tf = serving_parts()
    manager = _one_model_manager(tf, model, processor, name)
    state = tf.GenerationState()  # no continuous batching: transformers' only runs text-only models
    chat = _checked_chat_handler(tf)(model_manager=manager, generation_state=state)
    unserved = _Unserved()
    app = tf.build_server(manager, chat, completion_handler=unserved, response_handler=unserved, generation_state=state,
                          transcription_handler=unserved, systemone_handler=unserved)  # fmt: skip
    _answer_errors_as_json(app)
    return app


def _one_model_manager(tf: SimpleNamespace, model, processor, name: str):
    class OneModel(tf.ModelManager):
        """Every request gets the one model dpvr loaded (transformers' own loads by name, on demand)."""

        def load_model_and_processor(self, model_id_and_revision: str, *args, **kwargs):
            return model, processor

        def get_model_modality(self, model, processor=None):
            # transformers finds a VLM by its class name in its Auto mappings, where DPVR classes are not;
            # every routed family is an image-text model
            return tf.Modality.VLM

        def get_gen_models(self, cache_dir=None) -> list[dict]:  # transformers' lists the hub cache instead
            return [{"id": name, "object": "model", "owned_by": "dpvr", "created": int(time.time())}]

    manager = OneModel(device=str(model.device), model_timeout=-1)
    # set after __init__, which would load a `force_model` itself; transformers' handlers then answer a
    # request naming another model with 400 and give every request this one
    manager.force_model = name
    return manager


def _checked_chat_handler(tf: SimpleNamespace):
    class CheckedChat(tf.ChatCompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            model, processor = self.model_manager.load_model_and_processor(self.model_manager.force_model)
            load_images(body)
            fit_length(body, self._prompt_tokens(body, processor), _max_length(model))
            return await super().handle_request(body, request_id)

        def _prompt_tokens(self, body: dict, processor) -> int:
            """The prompt's length as transformers' handler will tokenize it (image tokens included): the same
            call, made once more here (images are decoded already) so that a prompt too long is refused
            before a stream starts."""
            messages = self.get_processor_inputs_from_messages(body["messages"], tf.Modality.VLM)
            kwargs = {**self.chat_template_kwargs, **(body.get("chat_template_kwargs") or {})}
            try:
                inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tools=body.get("tools"),
                                                       tokenize=True, return_dict=True, **kwargs)  # fmt: skip
            except (ValueError, TypeError, KeyError) as exc:
                raise RequestError(f"cannot render the chat with the model's template: {exc}".splitlines()[0]) from None
            return len(inputs["input_ids"][0])

    return CheckedChat


def _max_length(model) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


class _Unserved:
    """Handler for the endpoints dpvr serve does not answer."""

    async def handle_request(self, *args, **kwargs):
        raise RequestError("dpvr serve answers POST /v1/chat/completions (and GET /v1/models, /health) only", 404)


def _answer_errors_as_json(app) -> None:
    """A refused request (RequestError) and any DPVRError a model raises on its input (say, an input
    routing cannot serve) as an OpenAI-style error body with one line, instead of FastAPI's bare 500."""
    from fastapi.responses import JSONResponse

    async def answer(_request, exc: DPVRError):
        status = exc.status if isinstance(exc, RequestError) else 400
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    app.add_exception_handler(DPVRError, answer)


class Running:
    """uvicorn serving `app` on a listening socket (see `listen`), in this thread (`serve_forever`: Ctrl-C
    stops it) or in a background one (`with Running(...) as server:`, stopped on leaving)."""

    def __init__(self, app, listener: socket.socket, log_level: str = "warning"):
        import uvicorn

        self.socket = listener
        self.host, self.port = listener.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def __enter__(self) -> Running:
        self.thread = threading.Thread(target=self.serve_forever, name="dpvr-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # uvicorn sets it once the app's startup has run
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DPVRError(f"the server on {self.url} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.socket.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), opened before the model loads so that a taken
    port is refused at start, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DPVRError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
