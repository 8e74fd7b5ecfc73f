"""Checkpoints, requests and HF references for tests/test_vllm.py (dpvr's vLLM plugin).

Everything starts from the shipped tiny LLaVA (16 layers, 144 image tokens per 48x48 image, a real
tokenizer and processor). Requests mix no image, one image and two images, with questions of different
lengths and different token budgets.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

SPLIT = 9  # dpvr's default split for 16 layers (18/32 of the depth)
WORDS = "which digit is in the top left cell of the grid and what colour is the square next to it".split()


def save_dpvr(out: Path, mode: str, **routing) -> Path:
    """A DPVR checkpoint of the tiny LLaVA saved with dpvr's own API, processor files included. The side
    branch starts as a copy of layer `split`; it is perturbed so that it is not that layer."""
    from dpvr.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "untrained side branch": on purpose here
        net, processor = load_model(mode=mode, split_layer=SPLIT, **routing)
    if net.side_branch is not None:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.side_branch.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.abs().mean())
    net.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_stock(out: Path) -> Path:
    """The stock tiny LLaVA with its weights under the names vLLM's own LLaVA loads (the hub layout:
    the CLIP tower's `vision_model.` level), to compare vLLM's stock model with dpvr's vanilla mode."""
    from dpvr.embedded import default_model_path
    from transformers import AutoProcessor

    src = Path(default_model_path())
    weights = load_file(src / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
               for k, v in weights.items()}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        (out / name).write_text((src / name).read_text())
    AutoProcessor.from_pretrained(src).save_pretrained(out)
    return out


@dataclass(frozen=True)
class Case:
    question: str
    images: tuple[Image.Image, ...]
    max_tokens: int


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def cases(n: int = 18, seed: int = 0) -> list[Case]:
    """n requests: image counts cycle 1, 0, 2, 1, ...; questions of 2-12 words; 3-9 new tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = (1, 0, 2, 1)[i % 4]
        words = rng.choice(WORDS, size=int(rng.integers(2, 13)))
        out.append(Case(" ".join(words), tuple(image(100 * i + j) for j in range(k)), int(rng.integers(3, 10))))
    return out


def prompt_text(processor, case: Case) -> str:
    content = [{"type": "image"}] * len(case.images) + [{"type": "text", "text": case.question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def vllm_prompt(processor, case: Case) -> dict:
    prompt = {"prompt": prompt_text(processor, case)}
    if case.images:
        prompt["multi_modal_data"] = {"image": list(case.images) if len(case.images) > 1 else case.images[0]}
    return prompt


@dataclass
class Reference:
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: torch.Tensor  # (new tokens, vocab): log-softmax of the logits each generated token came from


def load_hf(path):
    """dpvr's HF model of a checkpoint (`load_model`), with EOS not stopping `generate`, as vLLM's
    ignore_eos (an eos_token_id=None keyword would fall back to these)."""
    from dpvr.loading import load_model

    net, processor = load_model(model=str(path))
    net.generation_config.eos_token_id = None
    net.config.text_config.eos_token_id = None
    return net, processor


def hf_reference(net, processor, case: Case) -> Reference:
    """Greedy tokens from dpvr's HF model (`generate`, routed KV cache) and each step's log-probabilities."""
    kw = {"images": list(case.images)} if case.images else {}
    inputs = processor(text=prompt_text(processor, case), return_tensors="pt", **kw)
    with torch.no_grad():
        out = net.generate(**inputs, max_new_tokens=case.max_tokens, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)  # fmt: skip
    n = inputs["input_ids"].shape[1]
    logits = torch.stack([step[0] for step in out.logits]).float()
    return Reference(inputs["input_ids"][0].tolist(), out.sequences[0, n:].tolist(), torch.log_softmax(logits, -1))
