"""dpvr's vLLM plugin (src/dpvr/serve/vllm): DPVR checkpoints served by vLLM's CPU engine give the tokens
and log-probabilities of dpvr's own HF model, with prefills and decodes of requests with no, one or two
images batched together. Runs where vLLM is installed (.ci/vllm.sh); skipped elsewhere.

Engines start in this process (no engine-core subprocess: quicker, and LLM.apply_model reaches the model
for its step counters), one at a time (`Engines`): each start takes ~10-60 s on 2 cores.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm.sh runs these tests)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from transformers import AutoProcessor  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import vllm_cases as vc  # noqa: E402
from dpvr.errors import DPVRError  # noqa: E402

ENGINE = dict(enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False, dtype="float32",
              max_model_len=512, kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"image": 2}, seed=0)  # fmt: skip
CHECKPOINTS = {
    "stock": lambda d: vc.save_stock(d),
    "vanilla": lambda d: vc.save_dpvr(d, "vanilla"),
    "lf": lambda d: vc.save_dpvr(d, "lf", fusion_layers=1),
    "fusion_at": lambda d: vc.save_dpvr(d, "lf", fusion_at=(10, 13, 14)),  # sparse, and a two-layer run
    "vtw": lambda d: vc.save_dpvr(d, "vtw"),
}
TOL = 1e-4  # fp32 log-probabilities, vLLM against HF


# a KV cache of 24 blocks of 32 tokens (all 16 layers, fp32): too small for the preemption test's requests
# at once, so vLLM preempts some and later prefills them again, prompt and generated tokens together
TIGHT = dict(block_size=32, kv_cache_memory_bytes=24 * 16 * 2 * 6 * 32 * 4 * 32, disable_log_stats=False)


class Engines:
    """Checkpoints written on first use, and one live engine at a time (vLLM's in-process state is global)."""

    def __init__(self, root):
        self.root, self.name, self.llm = root, None, None

    def path(self, name: str):
        d = self.root / name
        if not (d / "config.json").exists():
            CHECKPOINTS[name](d)
        return d

    def get(self, name: str, **engine) -> LLM:
        key = (name, tuple(sorted(engine)))
        if key != self.name:
            self.close()
            self.llm, self.name = LLM(model=str(self.path(name)), **{**ENGINE, **engine}), key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            from vllm.distributed import cleanup_dist_env_and_memory

            self.llm.llm_engine.engine_core.shutdown()
            self.llm = self.name = None
            gc.collect()
            cleanup_dist_env_and_memory()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    pool = Engines(tmp_path_factory.mktemp("vllm-checkpoints"))
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def cases():
    return vc.cases(18)


def params(case: vc.Case) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=case.max_tokens, ignore_eos=True, logprobs=5)


def stats(llm: LLM) -> dict:
    return dict(llm.apply_model(lambda model: model.stats)[0])


def check_against(refs: list[vc.Reference], outputs, label: str) -> None:
    """vLLM's outputs (in the order of refs) have the references' prompts and tokens, and every step's
    top log-probabilities within TOL."""
    for i, (ref, out) in enumerate(zip(refs, outputs, strict=True)):
        assert list(out.prompt_token_ids) == ref.prompt_ids, f"{label} request {i}: prompt tokens differ"
        got = out.outputs[0]
        assert list(got.token_ids) == ref.tokens, f"{label} request {i}: tokens {list(got.token_ids)} != HF {ref.tokens}"
        for t, step in enumerate(got.logprobs):
            err = max(abs(lp.logprob - float(ref.logprobs[t, tok])) for tok, lp in step.items())
            assert err < TOL, f"{label} request {i} step {t}: log-probabilities off by {err:.2e}"


def hf_refs(engines: Engines, name: str, cases) -> list[vc.Reference]:
    net, processor = vc.load_hf(engines.path(name))
    return [vc.hf_reference(net, processor, c) for c in cases]


def generate_together(engines: Engines, name: str, cases):
    llm = engines.get(name)
    processor = AutoProcessor.from_pretrained(engines.path(name))
    return llm.generate([vc.vllm_prompt(processor, c) for c in cases], [params(c) for c in cases], use_tqdm=False)


def generate_staggered(llm: LLM, processor, cases, wave: int = 4) -> list:
    """Requests added in waves between engine steps, so that steps hold new prefills beside decodes."""
    engine, done, pending, i = llm.llm_engine, {}, list(enumerate(cases)), 0
    while pending or engine.has_unfinished_requests():
        for k, case in pending[:wave]:
            engine.add_request(str(k), vc.vllm_prompt(processor, case), params(case))
        pending = pending[wave:]
        for _ in range(2):  # two steps per wave: the wave's prefill, then a decode step of every request
            done.update({o.request_id: o for o in engine.step() if o.finished})
        i += 1
    return [done[str(k)] for k in range(len(cases))]


# ----------------------------------------------------------------------------- LF (K = 1)
def test_lf_together_matches_hf(engines, cases):
    outputs = generate_together(engines, "lf", cases)
    check_against(hf_refs(engines, "lf", cases), outputs, "lf")
    seen = stats(engines.get("lf"))
    assert seen["routed"] > 0 and seen["side"] > 0, seen
    assert {len(c.images) for c in cases} == {0, 1, 2} and len(cases) >= 16


def test_lf_staggered_matches_hf(engines, cases):
    llm = engines.get("lf")
    before = stats(llm)
    outputs = generate_staggered(llm, AutoProcessor.from_pretrained(engines.path("lf")), cases)
    check_against(hf_refs(engines, "lf", cases), outputs, "lf staggered")
    after = stats(llm)
    assert after["mixed"] > before.get("mixed", 0), "no step held a prefill beside a decode"


def test_lf_preempted_matches_hf(engines):
    """Requests preempted for KV blocks and prefilled again (vLLM's recompute) keep HF's tokens: the
    prompt's image count is recounted, and a reused first block carries the new request's count."""
    long = [vc.Case(c.question, c.images[:1], 40) for c in vc.cases(16, seed=1) if c.images][:6]
    llm = engines.get("lf", **TIGHT)
    processor = AutoProcessor.from_pretrained(engines.path("lf"))
    outputs = llm.generate([vc.vllm_prompt(processor, c) for c in long], [params(c) for c in long], use_tqdm=False)
    check_against(hf_refs(engines, "lf", long), outputs, "lf preempted")
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0, "no request was preempted: the test's KV cache is not tight enough"


def test_lf_is_not_vanilla(engines, cases):
    """The routing changes the numbers (else the tests above would pass on a stock forward too)."""
    image_cases = [c for c in cases if c.images][:4]
    lf = hf_refs(engines, "lf", image_cases)
    stock = hf_refs(engines, "vanilla", image_cases)
    gaps = [float((a.logprobs[0] - b.logprobs[0]).abs().max()) for a, b in zip(lf, stock)]
    assert min(gaps) > 1e-2, gaps


# ----------------------------------------------------------------------------- sparse fusion, VTW
@pytest.mark.parametrize("name", ["fusion_at", "vtw"])
def test_routed_modes_match_hf(engines, cases, name):
    outputs = generate_together(engines, name, cases)
    check_against(hf_refs(engines, name, cases), outputs, name)
    assert stats(engines.get(name))["routed"] > 0


# ----------------------------------------------------------------------------- vanilla
def test_vanilla_equals_stock_vllm(engines, cases):
    stock = generate_together(engines, "stock", cases)
    vanilla = generate_together(engines, "vanilla", cases)
    for i, (a, b) in enumerate(zip(stock, vanilla)):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids), f"request {i}"
        for sa, sb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert sa.keys() == sb.keys() and all(abs(sa[t].logprob - sb[t].logprob) < 1e-5 for t in sa), f"request {i}"
    check_against(hf_refs(engines, "vanilla", cases), vanilla, "vanilla")
    assert stats(engines.get("vanilla")).get("routed", 0) == 0  # the stock layers, every step


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("mode", ["pc", "kv", "fastv"])
def test_unservable_mode_is_refused(engines, mode):
    d = engines.root / mode
    if not (d / "config.json").exists():
        vc.save_dpvr(d, mode)
    with pytest.raises(DPVRError, match=f"not '{mode}'") as err:
        LLM(model=str(d), **ENGINE)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flag", ["enable_prefix_caching", "enable_chunked_prefill"])
def test_prefix_caching_and_chunked_prefill_are_refused(engines, flag):
    with pytest.raises(DPVRError, match=f"{flag}=False") as err:
        LLM(model=str(engines.path("lf")), **{**ENGINE, flag: True})
    assert "\n" not in str(err.value)
