"""`dpvr train`: train a DPVR side branch (or a baseline) on LLaVA-665k-format data with the HF Trainer.

    dpvr train --mode lf --split-layer 9 --max_steps 300 --output_dir runs/lf          # embedded default (split: dpvr analyze)
    dpvr train --model llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json --images DIR \\
        --template vicuna_v1 --mode lf --split-layer 18 --bf16 --gradient_checkpointing \\
        --per_device_train_batch_size 16 --output_dir runs/lf-7b
    torchrun --nproc_per_node 8 -m dpvr.cli train ...     # DDP; --deepspeed / --fsdp through the Trainer
    dpvr train ... --resume_from_checkpoint true           # after an interruption: the same final weights
    dpvr train --method lora --lora-r 16 ...                # baselines: --method full | lora
    dpvr train ... --distill-weight 0.5 --side-warmup-steps 100   # learn from the unrouted model; a low-rate first stage

Every TrainingArguments flag is accepted (`--help-trainer` lists them; `--help`, dpvr's own). The
seed reaches the model init, the side-branch init and the data order. The final side branch is
written to OUTPUT_DIR/final (adapter files) with run.json (trainable parameters, loss curve).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dpvr.atomic import held_or_refused
from dpvr.cli_types import OneDefaultFormatter, one_line_errors
from dpvr.errors import DPVRError, UsageError
from dpvr.train.args import (
    DEFAULT_LR,
    TRAINING_DEFAULTS,
    DataArguments,
    ModelArguments,
    RecipeArguments,
    normalize_argv,
    own_help,
)
from dpvr.train.launch import check_launch, check_sharding, sharding_asked

if TYPE_CHECKING:
    from transformers import TrainingArguments
# torch and transformers are imported when a run starts: `dpvr train --help` prints at once


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments, RecipeArguments]:
    import torch
    from transformers import HfArgumentParser, TrainingArguments
    from transformers.training_args import ParallelMode

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, RecipeArguments), prog="dpvr train",
                              description=__doc__.splitlines()[0], formatter_class=OneDefaultFormatter)  # fmt: skip
    parser.set_defaults(**TRAINING_DEFAULTS)
    one_line_errors(parser)
    argv = normalize_argv([{"--help-trainer": "--help"}.get(a, a) for a in argv if a != "--debug"])
    if not torch.accelerator.is_available() and not any(a.startswith("--use_cpu") for a in argv):
        # said for the Trainer when there is no GPU: without it, `--bf16` is refused ("doesn't support bf16/gpu")
        # although CPU autocast runs it, and under a launcher every process would train its own model
        argv = [*argv, "--use_cpu", "true"]
    try:
        margs, dargs, targs, rargs = parser.parse_args_into_dataclasses(args=argv)  # every default is a field (tested)
    except ValueError as exc:  # HF's message for unknown flags: make it argparse's one-line usage error
        if "not used by the HfArgumentParser" not in str(exc):
            raise
        parser.error(f"unrecognized arguments: {' '.join(str(exc).split(': ', 1)[1:])}")
    check_launch(targs.world_size, targs.parallel_mode == ParallelMode.DISTRIBUTED)
    if targs.bf16 and targs.use_cpu and margs.attn == "sdpa":  # faster than CPU autocast's bf16 sdpa, and exact
        from dpvr.attention import FP32_SDPA

        margs.attn = FP32_SDPA
    rargs.check_for(margs.method, dargs.shared_stack_cache)
    if dargs.stop_at_plateau and targs.eval_strategy == "no":
        raise UsageError("--stop-at-plateau watches the held-out loss: add --eval_strategy steps --eval_steps N")
    if not any(a == "--learning_rate" or a.startswith("--learning_rate=") for a in argv):
        targs.learning_rate = DEFAULT_LR[margs.mode if margs.method == "dpvr" else margs.method]
    return margs, dargs, targs, rargs


def build_dataset(dargs: DataArguments, processor, held_out: bool = False):
    """The training set, or (held_out) the set whose loss is the held-out curve."""
    from dpvr.data.digit_scenes import open_benchmark
    from dpvr.data.llava_json import LlavaJsonDataset, load_samples

    given, limit = (dargs.eval_data, dargs.eval_limit) if held_out else (dargs.data, dargs.limit)
    if given is None:
        root = open_benchmark(None, dargs.benchmark_seed)
        data, images = root / ("val.json" if held_out else "train.json"), root / "images"
    else:
        data = Path(given)
        images = Path(dargs.images) if dargs.images else data.parent / "images"
    samples = load_samples(data)[:limit]
    if not samples:
        flag = "--eval-limit" if held_out else "--limit"
        cut = f" ({flag} {limit})" if limit is not None else ""
        raise DPVRError(f"no samples to {'score' if held_out else 'train on'} in {data}{cut}: "
                        "pass a LLaVA JSON list with at least one sample")
    return LlavaJsonDataset(samples, images, processor, template=dargs.template, max_length=dargs.max_length,
                            on_error=dargs.on_error, skip_markers=True)  # fmt: skip


def _from_shared_stack(model, margs, targs, folder, dataset, held_out, collate):
    """The training and held-out sets read from the shared-stack cache, and their collator."""
    from dpvr.train.shared_cache import CachedCollator, cached

    if margs.method != "dpvr":
        raise UsageError(f"--shared-stack-cache caches DPVR's frozen shared stack; --method {margs.method} trains it")
    model.to(targs.device)  # the states are computed where the model will train
    batch = targs.per_device_eval_batch_size
    dataset = cached(model, dataset, folder, batch, "train")
    held_out = cached(model, held_out, folder, batch, "held-out") if held_out is not None else None
    return dataset, held_out, CachedCollator(collate)


def train(argv: list[str]) -> dict:
    margs, dargs, targs, rargs = parse(argv)
    # two runs writing one output_dir would interleave checkpoints and both report success; the first
    # process (rank 0) holds the lock, so another run (any of its ranks then) stops before any work
    lock = held_or_refused(targs.output_dir, "dpvr train", "wait for that run or pick another --output_dir") \
        if targs.process_index == 0 else contextlib.nullcontext()  # fmt: skip
    with lock:
        finished = _finished_run(targs)
        if finished is not None:
            return finished
        return _train(margs, dargs, targs, rargs)


def _finished_run(targs) -> dict | None:
    """--resume_from_checkpoint true on a run whose final/ is written under the same step limits: the
    result it reported (nothing is trained again: resuming from its last checkpoint would retrain the
    steps after it and overwrite final/), else None."""
    resume = targs.resume_from_checkpoint
    if not (resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last"))):
        return None
    from dpvr.train.trainer import RUN_RECORD

    path = Path(targs.output_dir, "final", RUN_RECORD)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("max_steps") != targs.max_steps or record.get("num_train_epochs", targs.num_train_epochs) != targs.num_train_epochs:
        return None  # a longer run asked for: it goes on from the last checkpoint
    return {"final": str(path.parent), "train_loss": record["train_loss"], "steps": record["steps"], "already_finished": True}


def _train(margs, dargs, targs, rargs) -> dict:
    from transformers import set_seed

    from dpvr.data.collate import Collator
    from dpvr.fusion_policy import policy_for
    from dpvr.loading import resolve_model_path
    from dpvr.train.distill import Distillation
    from dpvr.train.plateau import PlateauStop
    from dpvr.train.stages import SideWarmup
    from dpvr.train.trainer import DigestCallback, DPVRTrainer, build_model, disk_full_in_one_line, write_run_record

    set_seed(targs.seed)  # before the model: a random side-branch init follows the seed too
    model, processor = build_model(margs)
    if targs.gradient_checkpointing:
        targs.gradient_checkpointing_kwargs = targs.gradient_checkpointing_kwargs or {"use_reentrant": False}
    dataset = build_dataset(dargs, processor)
    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id, padding_side="right", keep_ids=False)
    held_out = build_dataset(dargs, processor, held_out=True) if targs.eval_strategy != "no" else None
    if dargs.shared_stack_cache:
        dataset, held_out, collate = _from_shared_stack(model, margs, targs, dargs.shared_stack_cache, dataset, held_out, collate)
    stop = PlateauStop(dargs.plateau_min_steps) if dargs.stop_at_plateau else None
    distill = Distillation(rargs.distill_weight, rargs.distill_temperature) if rargs.distill_weight > 0 else None
    warmup = SideWarmup(rargs.side_warmup_steps, rargs.side_warmup_lr_scale) if rargs.side_warmup_steps > 0 else None
    policy = policy_for(model, rargs.fusion_policy)
    trainer = DPVRTrainer(model=model, args=targs, train_dataset=dataset, eval_dataset=held_out, data_collator=collate,
                          callbacks=[DigestCallback(), *filter(None, [stop])], distillation=distill, side_warmup=warmup,
                          placements=None if policy is None else policy.placements)  # fmt: skip
    check_sharding(sharding_asked(targs.fsdp, targs.deepspeed), trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled)
    if targs.process_index == 0 and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    resume = targs.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    result = trainer.train(resume_from_checkpoint=resume)
    final = Path(targs.output_dir) / "final"
    if trainer.state.global_step == 0:  # e.g. --on_error skip with every sample bad: final/ would be the untrained init
        skipped = ", ".join(f"{n} {reason}" for reason, n in dict(dataset.skipped).items()) or "none"
        raise DPVRError(f"no training step ran ({len(dataset)} samples, skipped: {skipped}); {final} not written")
    with disk_full_in_one_line(str(final)):
        trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        if margs.method != "dpvr":  # a full or LoRA checkpoint is used on its own: ship the processor
            processor.save_pretrained(final)
        write_run_record(str(final), trainer.model, trainer.state.log_history,
                         {"method": margs.method, "train_loss": result.training_loss, "steps": trainer.state.global_step,
                          "train_samples": len(dataset), "skipped_samples": dict(dataset.skipped), "learning_rate": targs.learning_rate,
                          "max_steps": targs.max_steps, "num_train_epochs": targs.num_train_epochs,
                          "stopped_at_plateau": stop is not None and stop.stopped, **dataclasses.asdict(rargs),
                          "base_model": resolve_model_path(margs.model)})  # fmt: skip
    return {"final": str(final), "train_loss": result.training_loss}


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(own_help("dpvr train", __doc__.split("\n\n")[0]))
        return 0
    out = train(argv)
    if out.get("already_finished"):
        print(f"nothing to resume: {out['final']} holds this run, finished at step {out['steps']} "
              f"(train loss {out['train_loss']:.4f}); pass a larger --max_steps to train further")  # fmt: skip
        return 0
    print(f"final weights: {out['final']} (train loss {out['train_loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
