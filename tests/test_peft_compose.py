"""PEFT on top of a converted model, as docs/train.md's recipe says: LoRA on the base's layers with the
side branch trained through `modules_to_save=["side_branch"]`, or LoRA inside the side branch; a plain
target with the documented exclusion leaves the side branch alone; PeftModel / AutoPeftModel reload
the adapter with identical logits."""
from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModel, LoraConfig, PeftModel, get_peft_model
from tiny import pixels, prompt, tiny_llava

from dpvr import DPVRConfig, DPVRForConditionalGeneration, convert

BASE_LORA = r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj"  # the base's layers only
SIDE_LORA = r"side_branch\.\d+\.self_attn\.(q|v)_proj"  # inside the side branch only
EXCLUDE_SIDE = r".*side_branch.*"  # for plain targets such as ["q_proj", "v_proj"]


def batch():
    ids = torch.tensor([prompt(3, 8, seed=1), prompt(3, 8, seed=2)])
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return dict(input_ids=ids, pixel_values=pixels(2), labels=labels)


@pytest.fixture
def dpvr_dir(tmp_path):
    """A stock base on disk, converted, saved as a side-branch adapter, loaded back: a DPVR model whose
    name_or_path rebuilds it (the base PEFT records)."""
    tiny_llava(layers=6).save_pretrained(tmp_path / "stock")
    from transformers import LlavaForConditionalGeneration

    model = convert(LlavaForConditionalGeneration.from_pretrained(tmp_path / "stock"), DPVRConfig(mode="lf", split_layer=3))
    model.save_pretrained(tmp_path / "dpvr", side_branch_only=True)
    return tmp_path / "dpvr"


def perturb_trainable(model, seed=0):
    """Stand-in for training: move every trainable weight (LoRA B starts at zero, so its effect shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def logits(model):
    model.eval()
    with torch.no_grad():
        b = batch()
        return model(input_ids=b["input_ids"], pixel_values=b["pixel_values"]).logits


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_on_the_base_with_the_side_branch_trained_by_modules_to_save(dpvr_dir, tmp_path):
    model = DPVRForConditionalGeneration.from_pretrained(dpvr_dir)
    plain = logits(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=BASE_LORA, modules_to_save=["side_branch"]))
    names = trainable_names(peft)
    assert any("language_model.layers" in n and "lora_B" in n for n in names)
    side = [n for n in names if "side_branch" in n]
    assert side and all("modules_to_save.default" in n and "lora" not in n for n in side), side[:4]
    torch.testing.assert_close(logits(peft), plain, rtol=0, atol=0)  # LoRA B = 0 and an unchanged copy

    peft.train()
    peft(**batch()).loss.backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "side_branch" in n), "side copy got no gradient"
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n), "LoRA got no gradient"

    perturb_trainable(peft)
    trained = logits(peft)
    assert not torch.allclose(trained, plain)
    with peft.disable_adapter():  # the original side branch and no LoRA: the model before PEFT
        torch.testing.assert_close(logits(peft), plain, rtol=0, atol=0)

    peft.save_pretrained(tmp_path / "lora")
    auto = AutoPeftModel.from_pretrained(tmp_path / "lora", import_allowlist=["dpvr"])
    assert isinstance(auto.get_base_model(), DPVRForConditionalGeneration)
    torch.testing.assert_close(logits(auto), trained, rtol=0, atol=0)
    again = PeftModel.from_pretrained(DPVRForConditionalGeneration.from_pretrained(dpvr_dir), tmp_path / "lora")
    torch.testing.assert_close(logits(again), trained, rtol=0, atol=0)


def test_the_trained_side_copy_is_the_one_routing_runs(dpvr_dir):
    peft = get_peft_model(DPVRForConditionalGeneration.from_pretrained(dpvr_dir),
                          LoraConfig(r=4, target_modules=BASE_LORA, modules_to_save=["side_branch"]))  # fmt: skip
    copy = peft.base_model.model.side_branch.modules_to_save["default"]
    with torch.no_grad():
        for p in copy.parameters():
            p.mul_(1.5)
    reference = DPVRForConditionalGeneration.from_pretrained(dpvr_dir)
    reference.side_branch.load_state_dict(copy.state_dict())  # LoRA B is still zero: only the side branch differs
    torch.testing.assert_close(logits(peft), logits(reference), rtol=0, atol=0)


def test_plain_targets_with_the_exclusion_leave_the_side_branch_alone(dpvr_dir):
    model = DPVRForConditionalGeneration.from_pretrained(dpvr_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=EXCLUDE_SIDE, modules_to_save=["side_branch"])
    names = trainable_names(get_peft_model(model, lora))
    assert not [n for n in names if "side_branch" in n and "lora" in n]
    assert [n for n in names if "side_branch.modules_to_save" in n]
    assert [n for n in names if "language_model.layers" in n and "lora" in n]


def test_lora_inside_the_side_branch_round_trips(dpvr_dir, tmp_path):
    peft = get_peft_model(DPVRForConditionalGeneration.from_pretrained(dpvr_dir), LoraConfig(r=4, target_modules=SIDE_LORA))
    names = trainable_names(peft)
    assert names and all("side_branch" in n and "lora" in n for n in names), names[:4]
    peft.train()
    peft(**batch()).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_B" in n)
    perturb_trainable(peft)
    trained = logits(peft)
    peft.save_pretrained(tmp_path / "side-lora")
    auto = AutoPeftModel.from_pretrained(tmp_path / "side-lora", import_allowlist=["dpvr"])
    torch.testing.assert_close(logits(auto), trained, rtol=0, atol=0)
