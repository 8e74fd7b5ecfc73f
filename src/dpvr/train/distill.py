"""Self-distillation: the routed student learns from the same model with routing off (the paper's future
work (v): a DPVR student from a full-attention teacher).

    loss = (1 - W) * CE + W * T^2 * KL(teacher || student)

over the response tokens (those whose next token carries a label: the mask the CE loss uses), both terms
averaged alike: summed over those tokens and divided by `num_items_in_batch` (the Trainer's count of the
whole optimizer step, over accumulated micro-batches and ranks), or by the micro-batch's own count when
the Trainer passes none, as transformers' causal-LM loss does. The blended loss replaces the model's own
loss before the Trainer scales it for several processes, so both terms are scaled by the same rule.

The teacher is no second copy of the weights: in the same step, under torch.no_grad and in eval mode (a
dropout-free target, and no random numbers drawn, so a resumed run stays exact), the model runs with
`routing(mode="vanilla")`: every layer on every token, the side branch unused. With PEFT on a DPVR model
the teacher also runs with the adapter off (`disable_adapter()`): the stock base, the same fixed teacher
as without PEFT; with the adapter on, the trainable LoRA weights would move the teacher too, and the
student could shrink the KL by moving both instead of learning to route.

    trainer = DPVRTrainer(..., distillation=Distillation(weight=0.5, temperature=2.0))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpvr.data.collate import IGNORE
from dpvr.errors import DPVRError
from dpvr.routing.model import RoutedModel
from dpvr.train.args import check_distillation


def routed_model(model):
    """(the DPVR model inside `model`, the PeftModel around it or None): `model` may be wrapped by
    DDP / FSDP / DeepSpeed (its .module) and by PEFT."""
    inner = getattr(model, "module", model)
    peft = inner if hasattr(inner, "disable_adapter") and hasattr(inner, "get_base_model") else None
    routed = peft.get_base_model() if peft is not None else inner
    return (routed, peft) if isinstance(routed, RoutedModel) else (None, peft)


@dataclass(frozen=True)
class Distillation:
    """W (`weight`, in [0, 1]) and T (`temperature`, > 0) of the blended loss; see the module docstring."""

    weight: float
    temperature: float = 1.0

    def __post_init__(self):
        check_distillation(self.weight, self.temperature)

    def check_model(self, model) -> None:
        """Refuse a model that has no routing to switch off: the teacher would be the student itself."""
        routed, _ = routed_model(model)
        if routed is None:
            raise DPVRError(f"distillation needs a DPVR model (the teacher is its routing switched off); got "
                            f"{type(getattr(model, 'module', model)).__name__}: use --method dpvr")  # fmt: skip
        if not routed.dpvr_config.has_side_branch:
            raise DPVRError(f"distillation trains a side branch; mode {routed.dpvr_config.mode!r} has none (train lf, pc or kv)")

    @contextlib.contextmanager
    def teacher(self, model):
        """`model` as the teacher for this block: routing off (and PEFT's adapter off), eval mode, no grad."""
        routed, peft = routed_model(model)
        was_training = model.training
        with contextlib.ExitStack() as stack:
            if peft is not None:
                stack.enter_context(peft.disable_adapter())
            stack.enter_context(routed.routing(mode="vanilla"))
            stack.enter_context(torch.no_grad())
            model.eval()
            stack.callback(model.train, was_training)
            yield model

    def teacher_logits(self, model, inputs: dict) -> torch.Tensor:
        """The teacher's logits (B, T, V) on a batch (its labels are not needed)."""
        if "shared_states" in inputs:
            raise DPVRError("distillation needs the full model's output, which a shared-stack cache batch cannot give "
                            "(it holds no images): train without --shared-stack-cache")  # fmt: skip
        with self.teacher(model) as teacher:
            return teacher(**{k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}).logits

    def student(self, model, inputs: dict, num_items_in_batch=None):
        """`model` as Trainer.compute_loss calls it, with the teacher run first: a callable whose output's
        loss is the blended loss (the Trainer then scales it as it scales the plain loss)."""
        mask = response_rows(inputs["labels"]) if "labels" in inputs else None
        if mask is None:
            raise DPVRError("distillation blends the cross-entropy over the labelled tokens: the batch has no labels")
        # only the response rows are kept (n, V), not the whole (B, T, V): on a 7B LLaVA most rows are image tokens
        teacher = self.teacher_logits(model, inputs)[:, :-1][mask]

        def forward(**kwargs):
            out = model(**kwargs)
            kl = self.kl(out.logits[:, :-1][mask], teacher, mask, num_items_in_batch)
            out["loss"] = (1.0 - self.weight) * out["loss"] + self.weight * self.temperature**2 * kl
            return out

        return forward

    def kl(self, student_rows, teacher_rows, mask, num_items_in_batch=None) -> torch.Tensor:
        """KL(teacher || student) at temperature T over the response rows (n, V), summed and divided as the
        CE loss is: by num_items_in_batch, or without it by this batch's own count of those rows (`mask`)."""
        s = student_rows.float() / self.temperature
        t = teacher_rows.float().to(s.device) / self.temperature
        total = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        if num_items_in_batch is None:
            return total / mask.sum().clamp(min=1)
        return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


def response_rows(labels: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) mask of the positions whose next token carries a label: position t predicts token t + 1,
    as the causal-LM loss shifts them (and as the Trainer counts num_items_in_batch)."""
    return labels[:, 1:] != IGNORE
