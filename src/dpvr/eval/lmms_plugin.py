"""DPVR models inside lmms-eval 0.7 without forking it (`pip install dpvr[lmms]`):

    python -m lmms_eval --model dpvr_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,adapter=runs/lf/final \\
        --tasks pope,mme,mmbench_en_dev,mmbench_cn_dev,scienceqa_img,seedbench,blink --batch_size 8
    # or a stock checkpoint with an inference-only routing: ...,mode=fastv,fastv_layer=2,fastv_ratio=0.5
    # sparse fusion layers are colon-separated (model_args split on commas): ...,mode=lf,fusion_at=24:28

Registered through the `lmms_eval.models` entry point (pyproject.toml) as `MANIFEST`, a callable, so
importing this module needs no lmms-eval. Unlike lmms-eval's own llava_hf model, exceptions are never
turned into empty answers (a routing bug must not show up as a quietly low score) and batches larger
than 1 work (left padding). `loglikelihood` returns (negative summed log-probability, greedy): lmms-eval
0.7.3 picks a multiple-choice answer by argmin over that first value (its models return a loss), so a
log-probability there would pick the least likely choice. Under `accelerate launch` or torchrun with N
processes it runs data-parallel as lmms-eval's own models do: each process loads the model on its own
device (cuda:LOCAL_RANK, or the CPU) and answers the share of documents lmms-eval gives its rank, and
lmms-eval gathers the results (on CPUs: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes
N`, gloo). The
request-handling logic lives in plain functions (`generate_texts`,
`continuation_logprobs`, `lmms_loglikelihoods`) that the tests exercise without lmms-eval installed.
"""
from __future__ import annotations

import logging
from itertools import groupby

import torch

from dpvr.config import ROUTING_FIELDS, routing_default
from dpvr.fusion_policy import Request, by_placement, policy_for

MODEL_ID = "dpvr_llava"
IMAGE = "<image>"
# task generation kwargs that describe other models' image preprocessing: the checkpoint's own processor
# decides that here, so they are dropped (with one warning naming them) instead of failing the run
IGNORED_GEN_KWARGS = ("image_aspect_ratio", "image_grid_pinpoints", "interleaved_format")
logger = logging.getLogger(__name__)
_warned: set[str] = set()


def MANIFEST():  # noqa: N802 - the entry point's name in pyproject.toml
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as exc:
        raise ImportError(f"the dpvr lmms-eval plugin needs lmms-eval 0.7 (pip install 'dpvr[lmms]'): {exc}") from exc
    return ModelManifest(model_id=MODEL_ID, simple_class_path="dpvr.eval.lmms_plugin.DPVRLlava")


def render(processor, context: str, n_images: int) -> str:
    """The checkpoint's chat template with n_images image placeholders before the text."""
    text = context.replace(IMAGE, "").strip()
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _encode(processor, prompts: list[str], images: list[list], device):
    flat = [im for ims in images for im in ims]
    kw = dict(padding=True, padding_side="left", return_tensors="pt")
    enc = processor(text=prompts, images=flat, **kw) if flat else processor.tokenizer(prompts, **kw)
    return {k: v.to(device) for k, v in enc.items()}


def _flag(value) -> bool:
    """A boolean model_arg: lmms-eval passes `key=False` through as the string 'False'."""
    return str(value).lower() not in ("false", "0")


def _layers(value) -> tuple[int, ...]:
    """A layer-list model_arg (`fusion_at`): lmms-eval splits model_args on commas, so the layers are
    written with colons, `fusion_at=10:13`; a tuple or list passes through."""
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    text = str(value).strip()
    try:
        return tuple(int(v) for v in text.replace(" ", ":").split(":") if v)
    except ValueError:
        raise ValueError(f"dpvr_llava: fusion_at={text!r} is not a colon-separated list of layers, e.g. fusion_at=10:13") from None


def routing_model_args(model_args: dict) -> dict:
    """The routing fields among lmms-eval's model_args (taken out of it), each as its DPVRConfig field's
    type: lmms-eval hands over strings or what it parsed them into."""
    routing = {}
    for name in ROUTING_FIELDS:
        if name not in model_args:
            continue
        value, default = model_args.pop(name), routing_default(name)
        if value is None or str(value) == "None":  # mode / split_layer: derived (the model's own)
            routing[name] = None
        elif isinstance(default, bool):
            routing[name] = _flag(value)
        elif isinstance(default, tuple):
            routing[name] = _layers(value)
        else:
            routing[name] = type(default)(value)
    return routing


def _gen_settings(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    gk = dict(gen_kwargs or {})
    until = gk.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gk.pop("temperature", 0) or 0)
    settings = dict(max_new_tokens=int(gk.pop("max_new_tokens", default_max_new_tokens)),
                    num_beams=int(gk.pop("num_beams", 1) or 1))  # fmt: skip
    if temperature > 0:
        settings.update(do_sample=True, temperature=temperature, top_p=float(gk.pop("top_p", 1.0) or 1.0))
    else:
        settings["do_sample"] = False
        gk.pop("top_p", None)
    gk.pop("do_sample", None)
    ignored = sorted(k for k in IGNORED_GEN_KWARGS if k in gk)
    for k in ignored:
        gk.pop(k)
    if set(ignored) - _warned:
        logger.warning("dpvr_llava ignores generation kwargs %s (the checkpoint's processor prepares images)", ignored)
        _warned.update(ignored)
    if gk:
        raise ValueError(f"unsupported generation kwargs {sorted(gk)}")
    return settings, until


@torch.inference_mode()
def generate_texts(model, processor, items: list[tuple[str, dict, list]], batch_size: int = 8,
                   max_new_tokens: int = 128, use_cache: bool = True) -> list[str]:  # fmt: skip
    """items: (context, gen_kwargs, images). Greedy unless gen_kwargs ask otherwise; `until` cuts the text."""
    out: list[str | None] = [None] * len(items)
    # batches share generation settings and image-ness; original order is restored at the end
    key = lambda i: (repr(sorted((items[i][1] or {}).items())), bool(items[i][2]))  # noqa: E731
    order = sorted(range(len(items)), key=key)
    for _, group in groupby(order, key=key):
        group = list(group)
        for k in range(0, len(group), batch_size):
            idx = group[k : k + batch_size]
            settings, until = _gen_settings(items[idx[0]][1], max_new_tokens)
            prompts = [render(processor, items[i][0], len(items[i][2])) for i in idx]
            enc = _encode(processor, prompts, [items[i][2] for i in idx], model.device)
            gen = model.generate(**enc, **settings, use_cache=use_cache, pad_token_id=processor.tokenizer.pad_token_id)
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :]):
                text = processor.tokenizer.decode(row, skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out[i] = text.strip()
    return out  # type: ignore[return-value]


@torch.inference_mode()
def continuation_logprobs(model, processor, items: list[tuple[str, str, list]]) -> list[tuple[float, bool]]:
    """items: (context, continuation, images) -> (sum of log p(continuation | context), greedy match)."""
    results = []
    for context, continuation, images in items:
        prompt = render(processor, context, len(images))
        enc = _encode(processor, [prompt + continuation], [images], model.device)
        n_prompt = _encode(processor, [prompt], [images], model.device)["input_ids"].shape[1]
        ids = enc["input_ids"]
        if ids.shape[1] <= n_prompt:
            raise ValueError(f"continuation {continuation!r} adds no tokens to the context")
        logits = model(**enc).logits[:, n_prompt - 1 : -1].float()  # predictions of the continuation tokens
        target = ids[:, n_prompt:]
        logp = logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
        results.append((float(logp.sum()), bool((logits.argmax(-1) == target).all())))
    return results


def lmms_loglikelihoods(logprobs: list[tuple[float, bool]]) -> list[tuple[float, bool]]:
    """(summed log p, greedy) -> what lmms-eval 0.7.3 scores correctly: (-summed log p, greedy). Its
    multiple_choice tasks take argmin (and argmin of the value per character for acc_norm)."""
    return [(-lp, greedy) for lp, greedy in logprobs]


def process_setup(device: str):
    """(accelerator or None, this process's device, rank, world size) for the processes the launcher
    started. Several: an Accelerator (lmms-eval gathers through it), and a bare "cuda" becomes this
    process's own GPU; one: no Accelerator, the device as given."""
    from dpvr.errors import DPVRError
    from dpvr.train.launch import launched_world

    launched = launched_world()
    if launched == 1:
        return None, device, 0, 1
    from accelerate import Accelerator

    acc = Accelerator()  # lmms-eval's main made it already (one state per process): this reads it
    if acc.num_processes != launched:  # each process would evaluate every document as a world of one
        raise DPVRError(f"dpvr_llava: the launcher started {launched} processes but accelerate sees {acc.num_processes} "
                        "(without GPUs accelerate needs ACCELERATE_USE_CPU=1 to join CPU processes): run "
                        "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m lmms_eval ...`")  # fmt: skip
    if device == "cuda":
        device = f"cuda:{acc.local_process_index}"
    return acc, device, acc.process_index, acc.num_processes


try:  # the lmms-eval model class exists only where lmms-eval is installed
    from lmms_eval.api.model import lmms
except ImportError:  # pragma: no cover - exercised where lmms-eval is absent (CI)
    lmms = None

if lmms is not None:

    class DPVRLlava(lmms):
        """lmms-eval model: a stock llava checkpoint, a DPVR checkpoint, or a base plus an adapter."""

        is_simple = True

        def __init__(self, pretrained: str, adapter: str | None = None, device: str = "cuda", dtype: str = "bfloat16",
                     attn_implementation: str = "sdpa", batch_size: int = 1, max_new_tokens: int = 128,
                     use_cache: bool = True, fusion_policy: str | None = None, **kwargs) -> None:  # fmt: skip
            """kwargs: the DPVRConfig fields as model_args (mode=lf,split_layer=6,...; mode=None keeps the
            model's own routing, split_layer=None the checkpoint's or 18/32 of the depth); fusion_policy:
            a dpvr.fusion_policy JSON picking each request's LF fusion layers from its task and input."""
            super().__init__()
            routing = routing_model_args(kwargs)
            if kwargs:
                raise ValueError(f"dpvr_llava: unexpected model_args {sorted(kwargs)}")
            from dpvr.loading import load_model

            accelerator, device, self._rank, self._world_size = process_setup(device)
            if accelerator is not None:  # lmms-eval gathers the ranks' results through it
                self.accelerator = accelerator
            self._model, self.processor = load_model(model=pretrained, adapter=adapter, attn=attn_implementation,
                                                     dtype=dtype, device=device, **routing)  # fmt: skip
            self.batch_size_per_gpu, self.max_new_tokens = int(batch_size), int(max_new_tokens)
            self.use_cache = _flag(use_cache)
            self.policy = policy_for(self._model, fusion_policy)  # task-conditioned fusion (dpvr.fusion_policy)

        def _placed(self, items: list, tasks: list[str], run):
            """run(items) -> results, per fusion placement when a policy is set (each request under the
            placement its task and input pick), in the items' order."""
            if self.policy is None:
                return run(items)
            tok = self.processor.tokenizer
            placements = [self.policy.pick(Request(task, len(item[-1]), len(tok(item[0]).input_ids)))
                          for item, task in zip(items, tasks)]  # fmt: skip
            return by_placement(self._model, placements, lambda idx: run([items[i] for i in idx]))

        @property
        def model(self):
            return self._model

        @property
        def device(self):
            return self._model.device

        def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            return [v for v in (visuals or []) if v is not None]

        def generate_until(self, requests) -> list[str]:
            items = [(ctx, gk, self._visuals(dtv, doc_id, task, split))
                     for ctx, gk, dtv, doc_id, task, split in (r.args for r in requests)]  # fmt: skip
            tasks = [r.args[4] for r in requests]
            return self._placed(items, tasks, lambda part: generate_texts(
                self._model, self.processor, part, self.batch_size_per_gpu, self.max_new_tokens, self.use_cache))

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            items = []
            for ctx, target, dtv, doc_id, task, split in (r.args for r in requests):
                doc = self.task_dict[task][split][doc_id]
                items.append((ctx, target if isinstance(target, str) else target(doc), self._visuals(dtv, doc_id, task, split)))
            from lmms_eval.api.instance import GenerationResult

            # lmms-eval 0.7.3 turns any result but a str or a GenerationResult into its str() (instance.py,
            # unwrap_generation_output), and multiple_choice then unzips characters: pass the pair through
            tasks = [r.args[4] for r in requests]
            logprobs = self._placed(items, tasks, lambda part: continuation_logprobs(self._model, self.processor, part))
            results = lmms_loglikelihoods(logprobs)
            return [GenerationResult(text=r) for r in results]

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("dpvr_llava does not implement multi-round generation")
