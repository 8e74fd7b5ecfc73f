"""Checkpoints: full and adapter round trips, stock checkpoints, refusals; the 7B parameter budget."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import pixels, prompt, tiny_config, tiny_llava
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from dpvr import DPVRConfig, DPVRError, DPVRForConditionalGeneration, convert

CFG = DPVRConfig(mode="lf", split_layer=2, fusion_layers=1)


def trained_like(cfg=CFG, seed=0):
    model = convert(tiny_llava(seed=seed), cfg)
    with torch.no_grad():
        for p in model.side_branch.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model):
    ids, px = torch.tensor([prompt(3, 5)]), pixels(1)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, f"weights differ after reload: {bad[:5]}"


def test_full_round_trip(tmp_path):
    model = trained_like()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "dpvr_llava"
    again = DPVRForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert again.dpvr_config == model.dpvr_config
    assert_same_weights(model, again)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    assert again.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_side_branch_only_round_trip(tmp_path):
    model = trained_like()
    model.save_pretrained(tmp_path, side_branch_only=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["dpvr_adapter.json", "side_branch.safetensors"], files
    n_saved = sum(t.numel() for t in load_file(tmp_path / "side_branch.safetensors").values())
    assert n_saved == model.get_nb_trainable_parameters()[0]
    again = DPVRForConditionalGeneration.from_pretrained(tmp_path, base_model=tiny_llava(seed=0))
    assert_same_weights(model, again)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_side_branch_only_save_takes_gathered_weights(tmp_path):
    # what a sharded run passes (DPVRTrainer.save_model): the side branch's whole weights, gathered from the
    # ranks, while the module holds shards; they are what is written, and other keys are refused
    model, source = trained_like(seed=0), trained_like(seed=1)
    gathered = {k: v.clone() for k, v in source.side_branch.state_dict().items()}
    model.save_pretrained(tmp_path, side_branch_only=True, state_dict=gathered)
    again = DPVRForConditionalGeneration.from_pretrained(tmp_path, base_model=tiny_llava(seed=0))
    for k, v in again.side_branch.state_dict().items():
        assert torch.equal(v, gathered[k]), k
    with pytest.raises(DPVRError, match="side-branch state_dict keys differ") as e:
        model.save_pretrained(tmp_path / "bad", side_branch_only=True, state_dict={"layers.0.x": torch.zeros(1)})
    assert "\n" not in str(e.value)


def test_adapter_finds_its_recorded_base(tmp_path):
    tiny_llava(seed=0).save_pretrained(tmp_path / "base")
    model = trained_like(cfg=CFG)
    model = convert(LlavaForConditionalGeneration.from_pretrained(tmp_path / "base"), CFG)
    model.save_pretrained(tmp_path / "adapter", side_branch_only=True)
    again = DPVRForConditionalGeneration.from_pretrained(tmp_path / "adapter")
    assert_same_weights(model, again)


def test_adapter_onto_mismatched_base_refuses(tmp_path):
    trained_like().save_pretrained(tmp_path, side_branch_only=True)
    other = LlavaForConditionalGeneration(tiny_config(layers=8))
    with pytest.raises(DPVRError, match=r"num_hidden_layers: adapter 6 vs base 8"):
        DPVRForConditionalGeneration.from_pretrained(tmp_path, base_model=other)


def test_adapter_with_corrupt_weights_refuses(tmp_path):
    trained_like().save_pretrained(tmp_path, side_branch_only=True)
    state = load_file(tmp_path / "side_branch.safetensors")
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "side_branch.safetensors")
    with pytest.raises(DPVRError, match="checksum"):
        DPVRForConditionalGeneration.from_pretrained(tmp_path, base_model=tiny_llava())


def test_full_checkpoint_with_missing_side_branch_refuses(tmp_path):
    model = trained_like()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("side_branch.0.mlp")}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(DPVRError, match="missing_keys"):
        DPVRForConditionalGeneration.from_pretrained(tmp_path)


def test_stock_llava_hf_checkpoint_loads_without_random_weights(tmp_path):
    stock = tiny_llava(seed=3)
    stock.save_pretrained(tmp_path)  # transformers 5.x writes the llava-hf hub layout itself
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    model = DPVRForConditionalGeneration.from_pretrained(tmp_path, dpvr_config=CFG)
    got = model.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(got[key], value), f"{key} differs from the checkpoint (randomly initialised?)"
    layer = model.model.language_model.layers[CFG.split_layer].state_dict()
    for key, value in model.side_branch[0].state_dict().items():
        assert torch.equal(value, layer[key]), f"side branch {key} is not a copy of layer {CFG.split_layer}"
    with pytest.raises(DPVRError, match="stock LlavaForConditionalGeneration checkpoint"):
        DPVRForConditionalGeneration.from_pretrained(tmp_path)


def test_llava_1_5_7b_side_branch_budget():
    """One LlamaDecoderLayer of LLaVA-1.5-7B: 202.4M trainable, ~2.9% of the base (built on meta)."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)  # fmt: skip
    with torch.device("meta"):
        base = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text))
    base_total = sum(p.numel() for p in base.parameters())
    model = convert(base, DPVRConfig(mode="lf", split_layer=18, fusion_layers=1, side_depth=1))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 202_383_360, trainable
    assert total == base_total + trainable
    assert round(100 * trainable / base_total, 1) == 2.9, 100 * trainable / base_total


def test_a_pc_side_branch_runs_as_kv_and_no_other_mode(tiny_checkpoint, tmp_path):
    """PC and KV are twins (the same text outputs from the same side branch, test_routing_equivalence.py):
    `--mode kv` runs a trained PC side branch as KV; any other switch is refused by name."""
    from dpvr.loading import load_model

    for mode in ("pc", "lf"):
        model = convert(LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint), DPVRConfig(mode=mode, split_layer=2))
        with torch.no_grad():
            for p in model.side_branch.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(tmp_path / mode, side_branch_only=True)
    pc = load_model(model=str(tiny_checkpoint), adapter=str(tmp_path / "pc"))[0]
    kv = load_model(model=str(tiny_checkpoint), adapter=str(tmp_path / "pc"), mode="kv")[0]
    assert (pc.dpvr_config.mode, kv.dpvr_config.mode) == ("pc", "kv")
    assert kv.dpvr_config.with_routing(mode="pc") == pc.dpvr_config
    assert_same_weights(kv.side_branch, pc.side_branch)
    with pytest.raises(DPVRError, match="--mode kv conflicts with --adapter, a lf side branch"):
        load_model(model=str(tiny_checkpoint), adapter=str(tmp_path / "lf"), mode="kv")
