"""`dpvr serve`: transformers' OpenAI-compatible server answering with a routed model (docs/serving.md).

    from dpvr.serve import Running, build_app, listen
    model, processor = dpvr.loading.load_model(mode="lf", split_layer=6)
    with Running(build_app(model, processor, name="tiny-llava"), listen("127.0.0.1", 0)) as server:
        ...                                   # POST server.url + "/chat/completions"

Needs the serving extra (pip install 'dpvr[serve]'): fastapi, uvicorn, openai, pydantic.
`dpvr.serve.vllm` is the other route, DPVR inside vLLM's engine (loaded through vLLM's plugin entry point;
nothing imports it but vLLM).
"""
from dpvr.lazy import lazy_names

_LAZY = {"Running": "dpvr.serve.app", "build_app": "dpvr.serve.app", "listen": "dpvr.serve.app"}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
