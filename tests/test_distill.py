"""Self-distillation (dpvr.train.distill) on the tiny LLaVA, through DPVRTrainer: the teacher is the
unrouted stock model (with PEFT on top, the adapter-off stock model), the blended loss is the stated
formula, it does not depend on how a step's tokens are split (as the plain loss, tests/test_loss_scaling.py),
and only the trainable weights get a gradient. The command line's runs are in tests/test_train_recipes.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run by torch.distributed.run
from test_loss_scaling import collate, samples, two_ranks  # noqa: E402
from tiny import tiny_llava  # noqa: E402

from dpvr import DPVRConfig, convert
from dpvr.errors import DPVRError
from dpvr.train.distill import Distillation
from dpvr.train.trainer import DPVRTrainer

KINDS = ("lf", "pc", "kv", "peft")  # peft: LoRA on the base's layers of an LF model, its side branch by modules_to_save
DDP_KINDS = ("lf", "peft")
WEIGHT, TEMPERATURE = 0.5, 2.0


def build(kind: str):
    """(model to train, the stock model it was converted from, never touched again)."""
    stock = tiny_llava(layers=6, seed=0)
    base = tiny_llava(layers=6, seed=0)
    torch.manual_seed(1)
    model = convert(base, DPVRConfig(mode="lf" if kind == "peft" else kind, split_layer=3, side_init="random"))
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj",
                          modules_to_save=["side_branch"], init_lora_weights="gaussian")  # fmt: skip
        model = get_peft_model(model, lora)
    return model, stock


def batch(n: int = 4) -> dict:
    return collate(samples()[:n])


def inputs(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "labels"}


@pytest.mark.parametrize("kind", KINDS)
def test_the_teacher_is_the_unrouted_stock_model(kind):
    model, stock = build(kind)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: LoRA's B starts at zero, a no-op until it moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    b = batch()
    with torch.no_grad():
        want = stock(**inputs(b)).logits
    model.train()
    got = Distillation(WEIGHT, TEMPERATURE).teacher_logits(model, b)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        routed = model(**inputs(b)).logits
    assert (routed - want).abs().max() > 1e-2, "the routed student equals the teacher: the test shows nothing"
    assert model.training and not got.requires_grad, "the teacher left the model in eval mode or kept a graph"
    if kind == "peft":  # with the adapter on, routing off is not the stock model: the teacher turns it off
        with model.get_base_model().routing(mode="vanilla"), torch.no_grad():
            assert (model(**inputs(b)).logits - want).abs().max() > 1e-3


def one_step(kind: str, batch_size: int, accum: int, out_dir, weight: float = WEIGHT):
    """(the step's training loss, its gradient, the frozen parameters that got a .grad) with DPVRTrainer."""
    from transformers import TrainerCallback, TrainingArguments

    model, _ = build(kind)
    seen = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            named = sorted((n, p) for n, p in model.named_parameters())
            seen["grad"] = torch.cat([p.grad.detach().flatten().double() for _, p in named if p.requires_grad])
            seen["frozen_with_grad"] = [n for n, p in named if not p.requires_grad and p.grad is not None]

    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accum, max_steps=1,
        learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
    )  # fmt: skip
    trainer = DPVRTrainer(model=model, args=args, train_dataset=samples(), data_collator=collate, callbacks=[Record()],
                          distillation=Distillation(weight, TEMPERATURE) if weight else None)  # fmt: skip
    return trainer.train().training_loss, seen["grad"], seen["frozen_with_grad"]


@pytest.mark.parametrize("kind", KINDS)
def test_distilled_step_does_not_depend_on_accumulation_and_trains_only_trainable_weights(kind, tmp_path):
    ref_loss, ref_grad, frozen = one_step(kind, 8, 1, tmp_path / "8x1")
    assert not frozen, f"frozen weights got a gradient: {frozen[:5]}"
    assert ref_grad.norm() > 0
    plain_loss, plain_grad, _ = one_step(kind, 8, 1, tmp_path / "plain", weight=0.0)
    assert abs(plain_loss - ref_loss) > 1e-3 * plain_loss, "distillation did not change the loss"
    for b, k in ((4, 2), (2, 4)):
        loss, grad, frozen = one_step(kind, b, k, tmp_path / f"{b}x{k}")
        assert not frozen, f"batch {b} x accumulation {k}: frozen weights got a gradient: {frozen[:5]}"
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"batch {b} x {k}: loss {loss:.6f} vs {ref_loss:.6f}"
        rel = float((grad - ref_grad).norm() / ref_grad.norm())
        assert rel <= 1e-5, f"batch {b} x accumulation {k}: gradient differs by {rel:.2e} (relative norm)"


@pytest.mark.e2e  # a multi-process launch (~45 s on 2 cores): `pytest -m e2e` runs it, as CI does
def test_two_processes_train_the_one_process_step(tmp_path):
    """2 ranks (gloo) x batch 4 and 2 ranks x batch 2 x accumulation 2 vs one process's batch 8: the
    Trainer's cross-rank token count reaches both terms alike."""
    ddp = two_ranks(__file__, tmp_path / "ddp.json", port=29549)
    for kind in DDP_KINDS:
        ref_loss, ref_grad, _ = one_step(kind, 8, 1, tmp_path / kind)
        for split, (loss, grad, frozen) in ddp[kind].items():
            assert not frozen, f"{kind} 2 processes x {split}: frozen weights got a gradient: {frozen[:5]}"
            assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"{kind} 2 processes x {split}: loss {loss:.6f} vs {ref_loss:.6f}"
            rel = float((torch.tensor(grad, dtype=torch.float64) - ref_grad).norm() / ref_grad.norm())
            assert rel <= 1e-5, f"{kind} 2 processes x {split}: gradient differs by {rel:.2e} (relative norm)"


def test_the_loss_is_the_stated_blend_over_the_response_tokens(tmp_path):
    """(1-W) CE + W T^2 KL(teacher || student), each a mean over the labelled tokens of the step, from
    logits computed here: the student's before the step, the stock model's as the teacher."""
    model, stock = build("lf")
    b = batch(8)
    with torch.no_grad():
        student, teacher = model(**inputs(b)).logits[:, :-1], stock(**inputs(b)).logits[:, :-1]
    targets = b["labels"][:, 1:]
    rows = targets != -100
    ce = F.cross_entropy(student[rows], targets[rows])
    p_t = torch.softmax(teacher[rows] / TEMPERATURE, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student[rows] / TEMPERATURE, -1))).sum(-1).mean()
    want = float((1 - WEIGHT) * ce + WEIGHT * TEMPERATURE**2 * kl)
    got, _, _ = one_step("lf", 8, 1, tmp_path)
    assert abs(got - want) <= 1e-5 * want, f"trained on {got:.6f}, the formula gives {want:.6f}"


def test_bad_values_models_without_routing_and_a_given_scheduler_are_refused_in_one_line(tmp_path):
    from transformers import TrainingArguments

    for weight, temperature, what in ((1.5, 1.0, "distill_weight=1.5"), (-0.1, 1.0, "distill_weight=-0.1"),
                                      (0.5, 0.0, "distill_temperature=0.0"), (0.5, -1.0, "distill_temperature=-1.0"),
                                      (float("nan"), 1.0, "distill_weight=nan")):  # fmt: skip
        with pytest.raises(DPVRError, match=what) as err:
            Distillation(weight, temperature)
        assert "\n" not in str(err.value)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    for model, what in ((tiny_llava(layers=6), "needs a DPVR model"),
                        (convert(tiny_llava(layers=6), DPVRConfig(mode="vtw", split_layer=3)), "mode 'vtw' has none")):  # fmt: skip
        with pytest.raises(DPVRError, match=what):
            DPVRTrainer(model=model, args=args, distillation=Distillation(WEIGHT))
    model, _ = build("lf")
    from torch.optim.lr_scheduler import ConstantLR

    from dpvr.train.stages import SideWarmup

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(DPVRError, match="side_warmup builds the learning-rate scheduler"):
        DPVRTrainer(model=model, args=args, optimizers=(optimizer, ConstantLR(optimizer)), side_warmup=SideWarmup(2))
    with pytest.raises(DPVRError, match="side_warmup_lr_scale=0"):
        SideWarmup(2, 0.0)
    with pytest.raises(DPVRError, match="side_warmup_steps=0"):
        SideWarmup(0)
    with pytest.raises(DPVRError, match="shared-stack"):
        Distillation(WEIGHT).teacher_logits(model, {**batch(), "shared_states": torch.zeros(1)})


if __name__ == "__main__":  # worker under torch.distributed.run: rank 0 writes each kind's two splits
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in DDP_KINDS:
            results[kind] = {}
            for b, k in ((4, 1), (2, 2)):
                loss, grad, frozen = one_step(kind, b, k, os.path.join(tmp, f"{kind}-{b}-{k}"))
                results[kind][f"batch {b} x accumulation {k}"] = (loss, grad.tolist(), frozen)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
