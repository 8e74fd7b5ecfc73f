"""Command-line arguments of `dpvr train`: model/method and data dataclasses, plus every HF
TrainingArguments flag (`--bf16`, `--deepspeed`, `--gradient_checkpointing`, `--report_to`, ...).

Defaults follow the paper: only the side branch trains, AdamW, cosine schedule, zero weight decay, and a higher
learning rate for LF (sparser gradient: one attention path into the side branch) than for PC/KV. One exception: no learning-rate warmup (the paper's is 3% of the steps,
`--warmup_steps 0.03`). transformers 5.x has no `warmup_ratio`, and the default written as one was dropped
unnoticed, so every run measured in docs/ trained without warmup; the default says so now, and a test checks
that each default names a TrainingArguments field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dpvr.config import MODES, SIDE_BRANCH_MODES, TRAIN_FLAGS, routing_default, routing_help
from dpvr.errors import UsageError

METHODS = ("dpvr", "full", "lora")
# learning rates for the embedded tiny model; the paper's 7B values were lost in its text copy
DEFAULT_LR = {"lf": 1e-3, "pc": 5e-4, "kv": 5e-4, "full": 1e-4, "lora": 5e-4}
TRAINING_DEFAULTS = dict(
    output_dir="runs/train", lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
    per_device_train_batch_size=8, num_train_epochs=1, logging_steps=10, save_strategy="steps", save_steps=200,
    save_total_limit=2, report_to="none", remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    prediction_loss_only=True,  # the held-out curve needs the loss only, not every logit of the val set
)  # fmt: skip


# The routing flags `dpvr train` takes: DPVRConfig's fields named in TRAIN_FLAGS, typed and defaulted as there
# (a field added to DPVRConfig and TRAIN_FLAGS is a train flag with no edit here). The help says what a field
# means for training where that differs from its DPVRConfig help.
TRAIN_HELP = {
    "mode": "dpvr routing: lf, pc or kv",
    "split_layer": "s (default: 18/32 of the depth)",
    "fusion_layers": "K for lf (0 = LF-ideal, which cannot train)",
    "fusion_at": "lf: sparse fusion at these deep layers instead of the last K",
    "side_depth": "D: decoder layers in the side branch",
    "side_init": "copy (layers s..s+D-1) or random",
}


def _routing_field(name: str) -> tuple[str, str, dataclasses.Field]:
    default, meta = routing_default(name), {"help": TRAIN_HELP.get(name) or routing_help(name)}
    if name == "split_layer":  # unset: None, which convert resolves for the base (DPVRConfig.resolve_for)
        return name, "int | None", field(default=None, metadata=meta)
    if isinstance(default, tuple):  # HfArgumentParser parses a list (`--fusion_at 3 5`; normalize_argv: 3,5)
        return name, "list[int]", field(default_factory=lambda: list(default), metadata=meta)
    return name, type(default).__name__, field(default=default, metadata=meta)


@dataclass
class _MethodArguments:
    model: str | None = field(default=None, metadata={"help": "base llava checkpoint (default: the embedded tiny LLaVA)"})
    method: str = field(default="dpvr", metadata={"help": f"one of {METHODS}: DPVR side branch, full fine-tune, LoRA"})


_RoutingArguments = dataclasses.make_dataclass("_RoutingArguments", [_routing_field(n) for n in TRAIN_FLAGS],
                                               bases=(_MethodArguments,), namespace={"__module__": __name__})  # fmt: skip


@dataclass
class ModelArguments(_RoutingArguments):
    """--model and --method, the routing flags (TRAIN_FLAGS), then the baselines' and the attention's."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank (method lora)"})
    train_vision_tower: bool = field(default=False, metadata={
        "help": "method full: train the image encoder too (LLaVA's fine-tuning trains the language model and projector)"})
    attn: str = field(default="sdpa", metadata={"help": "attention implementation: sdpa or eager"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r} is not one of {METHODS}")
        if self.train_vision_tower and self.method != "full":
            raise UsageError(f"--train-vision-tower is for --method full (got --method {self.method})")
        if self.method == "dpvr" and self.mode not in SIDE_BRANCH_MODES:
            what = "is inference-only" if self.mode in MODES else f"is not a routing mode ({', '.join(MODES)})"
            raise UsageError(f"--mode {self.mode!r} {what}: it has nothing to train; train {', '.join(SIDE_BRANCH_MODES)} "
                             "(fastv/vtw need no training: use them directly with dpvr eval/generate --mode)")  # fmt: skip


@dataclass
class DataArguments:
    data: str | None = field(default=None, metadata={"help": "LLaVA-665k JSON (default: digit scenes train.json)"})
    images: str | None = field(default=None, metadata={"help": "image folder (default: the JSON's benchmark images/)"})
    template: str = field(default="chat", metadata={"help": "chat (the checkpoint's own) or vicuna_v1 (LLaVA-1.5)"})
    max_length: int | None = field(default=None, metadata={"help": "truncate longer samples (never inside images)"})
    on_error: str = field(default="raise", metadata={"help": "raise, or skip (and count) bad samples"})
    limit: int | None = field(default=None, metadata={"help": "train on the first N samples only"})
    benchmark_seed: int = field(default=0, metadata={"help": "digit-scenes seed when --data is not given"})
    eval_data: str | None = field(
        default=None, metadata={"help": "LLaVA JSON whose loss is the held-out curve, scored when --eval_strategy is "
                                "not 'no' (default: the digit scenes' val.json; images from --images or beside it)"})
    eval_limit: int | None = field(default=None, metadata={"help": "held-out loss on the first N samples only"})
    stop_at_plateau: bool = field(
        default=False, metadata={"help": "end training once the held-out loss has plateaued (dpvr.train.plateau: at most "
                                 "2%% lower over the last third of the steps, from the 4th evaluation on); needs "
                                 "--eval_strategy steps"})
    plateau_min_steps: int = field(default=0, metadata={"help": "with --stop-at-plateau: never stop before this many steps "
                                                        "(e.g. one epoch)"})  # fmt: skip
    shared_stack_cache: str | None = field(
        default=None, metadata={"help": "dpvr method: compute the frozen shared stack's output once per sample into this "
                                "folder (and LF's text path up to its first fusion layer) and train (and score the held-out loss) "
                                "from there (dpvr.train.shared_cache)"})


@dataclass
class RecipeArguments:
    """What the side branch learns from and at which rates: self-distillation (dpvr.train.distill) and a
    low-rate warm-up stage (dpvr.train.stages), the paper's future-work items (v) and (iv)."""

    distill_weight: float = field(
        default=0.0, metadata={"help": "W: train on (1-W) CE + W T^2 KL(teacher || student) over the response tokens; the "
                               "teacher is the same model with routing off (dpvr.train.distill); 0 = plain CE"})
    distill_temperature: float = field(default=1.0, metadata={"help": "T: softmax temperature of both sides of the KL"})
    side_warmup_steps: int = field(
        default=0, metadata={"help": "warm the side branch up: this many first steps at --side-warmup-lr-scale x the rate, "
                             "then the run's schedule over the remaining steps (dpvr.train.stages); 0 = off"})
    side_warmup_lr_scale: float = field(default=0.1, metadata={"help": "the warm-up stage's fraction of --learning_rate"})
    fusion_policy: str | None = field(
        default=None, metadata={"help": "lf: train one side branch across this fusion policy's placements "
                                "(dpvr.fusion_policy), one placement per optimizer step in turn"})

    def __post_init__(self):
        check_distillation(self.distill_weight, self.distill_temperature)
        check_side_warmup(self.side_warmup_steps, self.side_warmup_lr_scale, off=0)

    def check_for(self, method: str, shared_stack_cache: str | None) -> None:
        """The combinations that cannot work: both options shape a DPVR side branch's training."""
        for flag, on in (("--distill-weight", self.distill_weight > 0), ("--side-warmup-steps", self.side_warmup_steps > 0)):
            if on and method != "dpvr":
                raise UsageError(f"{flag} trains a DPVR side branch (--method dpvr); --method {method} trains the stock model")
        if self.fusion_policy is not None and method != "dpvr":
            raise UsageError(f"--fusion-policy places a DPVR-LF side branch's fusion (--method dpvr), not --method {method}")
        if self.fusion_policy is not None and shared_stack_cache:
            raise UsageError("--fusion-policy trains at several placements, and --shared-stack-cache would freeze "
                             "LF's text path at one: use one or the other")  # fmt: skip
        if self.distill_weight > 0 and shared_stack_cache:
            raise UsageError("--distill-weight needs the full model's output every step (the teacher), which "
                             "--shared-stack-cache skips: use one or the other")  # fmt: skip


def check_distillation(weight: float, temperature: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise UsageError(f"distill_weight={weight}: must lie in [0, 1] (0 = cross-entropy only, 1 = the KL only)")
    if not temperature > 0.0 or temperature == float("inf"):
        raise UsageError(f"distill_temperature={temperature}: must be a finite number > 0")


def check_side_warmup(steps: int, lr_scale: float, off: int | None = None) -> None:
    """off: the step count that means "no warm-up stage" where one is allowed (the flag's 0)."""
    if steps < 1 and steps != off:
        raise UsageError(f"side_warmup_steps={steps}: must be >= 1" + (f" ({off} = no warm-up stage)" if off is not None else ""))
    if not 0.0 < lr_scale <= 1.0:
        raise UsageError(f"side_warmup_lr_scale={lr_scale}: must lie in (0, 1] (a fraction of --learning_rate)")


# ----------------------------------------------------------------------------- one spelling, light help
# dpvr's own flags are documented in kebab case with comma lists (`--split-layer 11 --fusion-at 11,13`), as
# in every other command; HfArgumentParser also takes `--split_layer` and a space-separated `--fusion_at`.
LIST_FLAGS = tuple(f"--{spelling}" for name in TRAIN_FLAGS if isinstance(routing_default(name), tuple)
                   for spelling in (name, name.replace("_", "-")))  # fmt: skip


def normalize_argv(argv: list[str]) -> list[str]:
    """`--fusion-at 11,13` and `--fusion-at=11,13` as HfArgumentParser's `--fusion_at 11 13` (each list flag)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag not in LIST_FLAGS:
            out.append(arg)
            continue
        value = value if eq else next(it, "")
        out += [flag, *(v for v in value.replace(",", " ").split() if v)]
    return out


def own_help(prog: str, description: str) -> str:
    """`dpvr train --help`: dpvr's own flags (model/method and data) with their defaults, then where the
    Trainer's are. Built without importing transformers, so it prints at once."""
    import argparse
    import textwrap

    from dpvr.cli_types import OneDefaultFormatter

    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=OneDefaultFormatter,
                                     add_help=False, usage=f"{prog} [dpvr flags] [TrainingArguments flags]")  # fmt: skip
    groups = (("model and method", ModelArguments), ("data", DataArguments),
              ("distillation and learning-rate stages", RecipeArguments))  # fmt: skip
    for title, cls in groups:
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            metavar = "N,N,..." if f.type == "list[int]" else None if f.type == "bool" else f.name.upper()
            kwargs = dict(action="store_true") if f.type == "bool" else dict(metavar=metavar)
            group.add_argument("--" + f.name.replace("_", "-"), default=default, help=f.metadata.get("help"), **kwargs)
    trainer = ", ".join(f"--{k} {v}" for k, v in TRAINING_DEFAULTS.items() if k != "prediction_loss_only")
    rates = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    tail = ("Trainer flags: every Hugging Face TrainingArguments flag is accepted as well (--max_steps, --learning_rate, "
            "--bf16, --gradient_checkpointing, --resume_from_checkpoint, --deepspeed, ...); `dpvr train --help-trainer` "
            f"lists all of them. dpvr's defaults for them: {trainer}; --learning_rate by method or mode: {rates}. "
            "Underscored spellings (--split_layer) and space-separated lists (--fusion_at 11 13) are accepted too.")  # fmt: skip
    return parser.format_help() + "\n" + textwrap.fill(tail, width=100) + "\n"
