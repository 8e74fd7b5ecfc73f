"""`transformers serve`'s own server (its FastAPI app, chat handler, SSE streaming and generation thread)
answering with one model that dpvr loaded: a DPVR checkpoint, or a stock one converted at load.

    model, processor = dpvr.loading.load_model(mode="lf", split_layer=6)
    with Running(build_app(model, processor, name="tiny-llava"), listen("127.0.0.1", 0)) as server:
        print(server.url)                # http://127.0.0.1:PORT/v1, for any OpenAI client

Why not `transformers serve MODEL` itself: its ModelManager loads a model by name with from_pretrained
(an Auto class for the model types it lists, else the config's architecture), so it cannot take a model
dpvr converted in memory, an adapter on its base, or the routing flags; the DPVR classes are not in its
Auto mappings either (`KeyError: 'dpvr_llava'`); from 5.25 it runs the model in a process of its own.
So this module wires the parts `transformers serve` wires (cli/serve.py: `Serve.__init__` up to 5.24,
`Serve.run` from 5.25) around a ModelManager that holds the one model dpvr loaded, in this process.
What it adds: the checks of dpvr.serve.checks before transformers' chat handler runs (images read here,
never fetched; a prompt past the model's length refused), and DPVRError answered as HTTP 400.
"""
from __future__ import annotations

import inspect
import queue
import socket
import threading
import time
from types import SimpleNamespace

from dpvr.errors import DPVRError
from dpvr.serve.checks import RequestError, check_generation_config, fit_length, load_images

# the transformers releases whose serve package tests/test_serve.py passes at (pyproject allows 5.19-5.25)
TESTED_WITH = ("5.19.0", "5.23.0", "5.25.0")


def serving_parts() -> SimpleNamespace:
    """The parts of transformers' serve package dpvr serve is made of. They live in transformers.cli.serving,
    partly outside its exported names, and are not a stable API: a release that moves one is refused here,
    at start, in one line (and not with a broken server).

    This is the one place where the releases differ for dpvr serve: how the server reaches its model (the
    checks, the chat handler and the app are the same on all). Kept here, next to the serve code, not in
    dpvr.hf_compat: only dpvr serve imports transformers.cli.serving (and its fastapi), which the model code
    that imports hf_compat must not pull in.
    - 5.19-5.24 (`_in_process_manager`): ModelManager loads a model in the server's process
      (load_model_and_processor) and the chat handler generates with it there; dpvr's subclass hands out
      its model instead.
    - 5.25 (`_engine_manager`): each model runs in a process of its own (EngineClient, ModelLoader), which
      a model in memory cannot cross to; dpvr runs transformers' GenerateRunner in a thread of this process
      behind the queues a ModelManager connects to (its engine_connection, what --api-server-count uses).
    """
    import transformers
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise DPVRError("dpvr serve needs transformers' serving extra (fastapi, uvicorn, openai, pydantic): "
                        "pip install 'dpvr[serve]'")  # fmt: skip
    try:
        from transformers.cli.serving import Modality, ModelManager, build_server
        from transformers.cli.serving import model_manager as manager_module
        from transformers.cli.serving import utils
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
    except ImportError as exc:
        raise DPVRError(f"transformers {transformers.__version__}'s serve package has changed ({exc}); dpvr serve "
                        f"is tested with transformers {', '.join(TESTED_WITH)}") from None  # fmt: skip
    tf = SimpleNamespace(ModelManager=ModelManager, Modality=Modality, build_server=build_server,
                         ChatCompletionHandler=ChatCompletionHandler, GenerationState=utils.GenerationState)  # fmt: skip
    # the methods overridden or called below: a rename upstream must fail here, not leave transformers' own
    needed = [(ChatCompletionHandler, ("handle_request", "get_processor_inputs_from_messages"))]
    if hasattr(manager_module, "EngineClient"):  # 5.25
        tf.one_model = _engine_manager
        tf.EngineClient, tf.ModelLoader = manager_module.EngineClient, manager_module.ModelLoader
        tf.GenerateRunner = getattr(utils, "GenerateRunner", None)
        tf.canonical_model_id = getattr(utils, "canonical_model_id", None)
        needed += [(ModelManager, ("preload_engine", "get_engine")), (utils, ("GenerateRunner", "canonical_model_id")),
                   (tf.ModelLoader, ("load_config", "load_processor"))]  # fmt: skip
    else:  # 5.19-5.24
        tf.one_model = _in_process_manager
        needed.append((ModelManager, ("load_model_and_processor", "get_model_modality")))
    for owner, names in needed:
        for name in names:
            if not callable(getattr(owner, name, None)):
                raise DPVRError(f"transformers {transformers.__version__}'s {owner.__name__} has no {name}; dpvr serve "
                                f"is tested with transformers {', '.join(TESTED_WITH)}")  # fmt: skip
    return tf


def build_app(model, processor, name: str):
    """transformers' FastAPI app serving `model` under `name` (the `model` a request must name) on
    POST /v1/chat/completions; GET /v1/models lists it, GET /health answers. The other endpoints
    transformers has (completions, responses, audio, ...) answer 404: they would skip these checks."""
    tf = serving_parts()
    state = tf.GenerationState()  # no continuous batching: transformers' only runs text-only models
    manager = tf.one_model(tf, model, processor, name, state)
    chat = _checked_chat_handler(tf, model, processor)(model_manager=manager, generation_state=state)
    params = inspect.signature(tf.build_server).parameters
    # every other endpoint's handler answers 404: 5.19 has no systemone_handler, and an endpoint a later
    # release adds gets one too; 5.19-5.24's /health asks the generation_state, 5.25's the manager
    unserved = _Unserved()
    handlers = {key: unserved for key in params if key.endswith("_handler") and key != "chat_handler"}
    if "generation_state" in params:
        handlers["generation_state"] = state
    app = tf.build_server(manager, chat, **handlers)
    _answer_errors_as_json(app)
    return app


def _in_process_manager(tf: SimpleNamespace, model, processor, name: str, _state):
    """5.19-5.24: a ModelManager whose every load is the one model dpvr loaded (transformers' loads by name)."""

    class OneModel(tf.ModelManager):
        def load_model_and_processor(self, model_id_and_revision: str, *args, **kwargs):
            return model, processor

        def get_model_modality(self, model, processor=None):
            # transformers finds a VLM by its class name in its Auto mappings, where DPVR classes are not;
            # every routed family is an image-text model
            return tf.Modality.VLM

        def get_gen_models(self, cache_dir=None) -> list[dict]:
            # 5.19-5.23 list the hub cache here; 5.24 lists a pinned server's one model itself (list_models)
            return [{"id": name, "object": "model", "owned_by": "dpvr", "created": int(time.time())}]

    manager = OneModel(device=str(model.device), model_timeout=-1)
    # set after __init__, which would load a `force_model` itself; transformers' handlers then answer a
    # request naming another model with 400 and give every request this one
    manager.force_model = name
    return manager


def _engine_manager(tf: SimpleNamespace, model, processor, name: str, state):
    """5.25: a ModelManager pinned to `name`, connected to an engine that runs in this process (see
    `_serve_engine_requests`); its EngineClient reads the model's config and processor from dpvr's loader."""

    class OneModelLoader(tf.ModelLoader):
        def load_model_and_processor(self, model_id: str, *args, **kwargs):
            # only an engine transformers starts itself loads (there is none here): never a model by name
            return model, processor

        def load_config(self, model_id: str):
            return model.config, model.generation_config

        def load_processor(self, model_id: str):
            return processor

    class OneEngine(tf.EngineClient):
        # transformers finds the modality by the config's architecture in its Auto mappings, where DPVR classes
        # are not (every routed family is an image-text model); continuous batching runs text-only models only
        modality = tf.Modality.VLM
        use_cb = False

    class OneModel(tf.ModelManager):
        def preload_engine(self, force_model: str, engine_connection: tuple | None) -> None:
            model_id = tf.canonical_model_id(force_model)
            engine = OneEngine(model_id, self.loader, self.generation_state, connection=engine_connection)
            self.engines[model_id] = engine

    requests, results = queue.Queue(), queue.Queue()
    threading.Thread(target=_serve_engine_requests, args=(tf, model, processor, requests, results),
                     name="dpvr-engine", daemon=True).start()  # fmt: skip
    # api server 0 of one: results come back on `results` (with several, each has a queue of its own)
    return OneModel(OneModelLoader(device=str(model.device)), state, model_timeout=-1, force_model=name,
                    engine_connection=(requests, results, 0))  # fmt: skip


def _serve_engine_requests(tf: SimpleNamespace, model, processor, requests: queue.Queue, results: queue.Queue):
    """5.25's model process (EngineClient.run_engine) as a thread of this one: each request on `requests`
    to a GenerateRunner, which generates one at a time in a thread of its own and puts the tokens and
    results on `results`. Not run_engine itself: it loads the model, freezes the garbage collector and sets
    torch's threads for a process it owns. Daemon threads, as transformers' own: they end with the process."""
    runner = tf.GenerateRunner(model, processor, lambda *message: results.put(message))
    while True:
        method, request_id, *args = requests.get()  # ("generate" | "submit" | "cancel", id, *its arguments)
        try:
            getattr(runner, method)(request_id, *args)
        except Exception as exc:  # the request fails, and not the next ones (as run_engine does)
            results.put(([], [], [(request_id, RuntimeError(f"{type(exc).__name__}: {exc}"))]))


def _checked_chat_handler(tf: SimpleNamespace, model, processor):
    class CheckedChat(tf.ChatCompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            load_images(body)
            check_generation_config(body, model)
            fit_length(body, self._prompt_tokens(body), _max_length(model))
            return await super().handle_request(body, request_id)

        def _prompt_tokens(self, body: dict) -> int:
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
