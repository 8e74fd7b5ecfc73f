"""The tiny LLaVA: shape, processor, save/load round trip, the shipped checkpoint and the scorer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dpvr.data.digit_scenes import ensure_benchmark, load_split
from dpvr.data.llava_json import LlavaJsonDataset
from dpvr.data.templates import render_prompt
from dpvr.embedded import build_tiny_model, default_model_path
from dpvr.embedded.model import N_IMAGE_TOKENS, save_checkpoint
from dpvr.embedded import score as score_mod


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return ensure_benchmark(tmp_path_factory.mktemp("b") / "s", seed=0, scenes={"train": 8, "val": 8, "test": 30, "existence": 2, "all": 2}, progress=False)


def test_shape_is_llava_like(tiny):
    model, processor = tiny
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 <= n <= 50 * 2**20 / 4, f"{n / 1e6:.1f}M parameters"  # fp32: at most 50 MB on disk
    assert model.config.text_config.num_hidden_layers >= 16  # LF (split 4-8) leaves a deep text-only stack
    assert model.config.text_config.num_key_value_heads == model.config.text_config.num_attention_heads  # MHA
    assert model.config.image_token_index == processor.image_token_id
    assert type(model.model.language_model).__name__ == "LlamaModel"


def test_processor_expands_image_and_token_ratio_is_llava_like(tiny, bench):
    model, processor = tiny
    from PIL import Image

    ratios = []
    for s in load_split(bench, "test"):
        if "image" not in s:
            continue
        prompt = render_prompt(processor, s["conversations"][0]["value"])
        enc = processor(text=prompt, images=Image.open(bench / "images" / s["image"]), return_tensors="pt")
        n_img = int((enc["input_ids"] == model.config.image_token_index).sum())
        assert n_img == N_IMAGE_TOKENS == model.config.image_seq_length, f"{s['id']}: {n_img} image tokens"
        n_text = enc["input_ids"].shape[1] - n_img
        ratios.append(n_img / n_text)
        with torch.no_grad():  # the model accepts it: features and tokens match
            feats = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
        assert sum(f.shape[0] for f in feats) == n_img
    ratios.sort()
    assert ratios[len(ratios) // 2] >= 8.0, f"median image:text token ratio {ratios[len(ratios) // 2]:.2f} < 8"
    assert ratios[0] >= 3.0, f"image:text token ratio falls to {ratios[0]:.2f} on some test prompt"


def test_save_load_round_trip(tiny, tmp_path, bench):
    model, processor = tiny
    out = save_checkpoint(model, processor, tmp_path / "ck")
    again = save_checkpoint(model, processor, tmp_path / "ck")  # replacing an existing dir also works
    assert out == again and not list(tmp_path.glob(".ck*")), "temp dirs left behind"
    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    assert type(proc.image_processor).__name__ == "CLIPImageProcessorPil"  # works without torchvision
    item = LlavaJsonDataset(load_split(bench, "train")[:1], bench / "images", proc)[0]
    batch = {"input_ids": item["input_ids"][None], "pixel_values": item["pixel_values"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


def test_shipped_checkpoint_loads_and_is_small():
    path = Path(default_model_path())
    weights = path / "model.safetensors"
    assert weights.is_file(), f"no shipped checkpoint at {path}; run `dpvr train-tiny --out {path}`"
    assert weights.stat().st_size <= 50 * 2**20, f"{weights.stat().st_size / 2**20:.1f} MB > 50 MB"
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.image_seq_length == N_IMAGE_TOKENS and processor.image_token_id == model.config.image_token_index
    assert next(model.parameters()).dtype == torch.float32


def test_shipped_checkpoint_sees_the_digits_a_question_names(bench):
    """Trained weights, not just a loadable file: well above chance on the families where a digit word
    in the question must be matched against the image (POPE, MME), and on counting. (Spatial,
    MMBench and reasoning stay weak, 0.30-0.37 on the full test split: docs/embedded.md.)"""
    path = default_model_path()
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = [s for s in load_split(bench, "test") if s["meta"]["family"] in ("pope", "mme", "count")]
    fams = score_mod.score(model, processor, samples, bench / "images")["families"]
    assert fams["pope"]["accuracy"] >= 0.9, fams  # chance 0.5; issue target F1 >= 0.90
    assert fams["count"]["accuracy"] >= 0.9, fams  # chance 1/10; issue target 0.90
    assert fams["mme"]["accuracy"] >= 0.75, fams  # chance 0.5


def test_scorer_metrics(monkeypatch):
    """accuracy+, circular accuracy and exact match, on replies chosen by hand."""
    m = lambda fam, ans, **kw: {"conversations": [{"from": "human", "value": "q"}], "meta": {"family": fam, "answer": ans, **kw}}  # noqa: E731
    samples = [m("mme", "yes", pair_id="p1"), m("mme", "no", pair_id="p1"), m("mme", "yes", pair_id="p2"),
               m("mme", "no", pair_id="p2"), *[m("mmbench", "ABCD"[r], circ_group="g1", rotation=r) for r in range(4)],
               *[m("mmbench", "ABCD"[r], circ_group="g2", rotation=r) for r in range(4)], m("spatial", "7")]  # fmt: skip
    replies = ["yes", "no", "yes", "yes", "A", "B", "C", "D", "A", "B", "C", "A", "7 "[:1]]
    monkeypatch.setattr(score_mod, "predict", lambda *a, **k: replies)
    fams = score_mod.score(None, None, samples, ".")["families"]
    assert fams["mme"]["accuracy"] == 0.75 and fams["mme"]["accuracy_plus"] == 0.5
    assert fams["mmbench"]["accuracy"] == 7 / 8 and fams["mmbench"]["circular_accuracy"] == 0.5
    assert fams["spatial"]["accuracy"] == 1.0


def test_batched_left_padded_predict_equals_one_by_one(tiny, bench):
    model, processor = tiny
    samples = load_split(bench, "test")[:9] + [s for s in load_split(bench, "test") if "image" not in s][:2]
    batched = score_mod.predict(model.eval(), processor, samples, bench / "images", batch_size=4)
    single = score_mod.predict(model, processor, samples, bench / "images", batch_size=1)
    assert batched == single and len(batched) == len(samples)
