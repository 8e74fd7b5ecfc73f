"""Side-branch training on the HF Trainer: model building per method, atomic side-branch-only
checkpoints, exact resume, and a DDP consistency record.

    model, processor = build_model(ModelArguments(mode="lf", split_layer=9))
    trainer = DPVRTrainer(model=model, args=training_args, train_dataset=ds, data_collator=collate)

Checkpoints: `checkpoint-N` is written under `.partial/` and renamed into place only when complete,
so a crash (kill -9 included) never leaves a half-written checkpoint that resume would pick. For the
DPVR method a checkpoint holds the side branch (adapter files) plus the optimizer, scheduler, RNG
and trainer state; resuming checks that the routing config is the one the checkpoint was made with.
Under FSDP / DeepSpeed ZeRO-3 the side branch is gathered whole on every rank and rank 0 writes it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from dpvr.atomic import atomic_write_text
from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.loading import load_stock, resolve_model_path
from dpvr.routing import DPVRForConditionalGeneration, convert
from dpvr.routing.adapter import ADAPTER_CONFIG, WEIGHTS, read_adapter_config
from dpvr.routing.backbones import freeze_vision_encoder
from dpvr.train.args import ModelArguments
from dpvr.train.sampling import GROUP_BY_LENGTH, LengthGroupedSampler

logger = logging.get_logger(__name__)
STAGING = ".partial"
RUN_RECORD = "run.json"  # in final/, beside the weights: what write_run_record writes
LOSS_SUM = "dpvr_loss_sum.json"  # in a checkpoint: the summed step losses so far, so a resumed train_loss is the whole run's


def build_model(margs: ModelArguments):
    """(trainable model, processor) for --method dpvr / full / lora. Full fine-tuning is LLaVA's: the
    language model and the projector (the image encoder too with --train-vision-tower)."""
    # convert() needs the base whole; full and LoRA keep transformers' partitioned load under ZeRO-3
    with whole_at_construction() if margs.method == "dpvr" else contextlib.nullcontext():
        return _build_model(margs)


@contextlib.contextmanager
def whole_at_construction():
    """Once TrainingArguments name a ZeRO-3 config, transformers builds every model under DeepSpeed's
    zero.Init, partitioned as it is constructed; convert() builds on the meta device and copies layers of
    the loaded base, which fails there ("Cannot copy out of meta tensor") and needs them whole. In this
    block models are built whole (every rank holds one until the Trainer prepares it; DeepSpeed partitions
    it then), as accelerate's zero3_init_flag: false asks."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter: set/unset are the public API
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _build_model(margs: ModelArguments):
    from transformers import AutoProcessor

    path = resolve_model_path(margs.model)
    base = load_stock(path, attn_implementation=margs.attn)
    processor = AutoProcessor.from_pretrained(path)
    if margs.method == "full":
        base.requires_grad_(True)
        if not margs.train_vision_tower:
            freeze_vision_encoder(base)
        return base, processor
    if margs.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
        lora = LoraConfig(r=margs.lora_r, lora_alpha=2 * margs.lora_r, lora_dropout=0.0, target_modules=targets)
        return get_peft_model(base, lora), processor
    cfg = DPVRConfig.from_namespace(margs)  # --split-layer unset: None, which convert resolves for the base
    if not cfg.has_side_branch:
        raise DPVRError(f"--mode {cfg.mode!r} has nothing to train; train lf, pc or kv (fastv/vtw are inference-only)")
    if cfg.is_lf_ideal:
        raise DPVRError(
            "DPVR-LF-ideal (mode lf, fusion_layers 0) cannot be trained: under LLaVA label masking its side "
            "branch gets exactly zero gradient (paper, Appendix A); use fusion_layers >= 1"
        )
    return convert(base, cfg), processor


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of every trainable parameter, in name order: equal digests = bit-identical weights. Under
    FSDP2 / ZeRO-3 the parameters are gathered whole first, so every rank must call this."""
    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        with gathered([p]):  # one at a time: under full fine-tuning the trainable weights are the whole model
            h.update(name.encode())
            h.update(whole(p.detach()).float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- sharded runs (FSDP2, DeepSpeed ZeRO-3)
def whole(t: torch.Tensor) -> torch.Tensor:
    """t as a plain, full tensor. FSDP2 holds each parameter as a DTensor whose local part is this rank's
    shard; it is all-gathered, so every rank must call this for the same tensors in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """ZeRO-3 partitions each parameter (outside this block its .data is an empty placeholder): gather them
    whole for the block, on every rank (a collective); with modifier_rank, what that rank writes into them
    is partitioned again at the end. Without ZeRO-3 there is nothing to gather."""
    params = [p for p in params if hasattr(p, "ds_id")]  # the attribute ZeRO-3 gives the parameters it partitions
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def side_branch_state(model) -> dict[str, torch.Tensor]:
    """The side branch's full weights as CPU copies (keys as side_branch.state_dict()'s), on every rank:
    a collective under FSDP2 / ZeRO-3; the copies outlive ZeRO-3's gather, which frees the whole tensors."""
    with gathered(model.side_branch.parameters()):
        return {k: whole(v).detach().cpu().clone() for k, v in model.side_branch.state_dict().items()}


class DigestCallback(TrainerCallback):
    """At the end of training every rank writes the digest of its trainable weights: under DDP they
    must all agree (one consistent model)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = args.process_index
        Path(args.output_dir, f"trainable_digest_rank{rank}.txt").write_text(param_digest(model) + "\n")


def load_side_branch(model, state: dict[str, torch.Tensor]) -> None:
    """Load the side branch's full weights into a live side branch that may be sharded: under FSDP2 each
    tensor is cut to this rank's shard as the parameter is laid out (every rank calls this), under ZeRO-3
    the parameters are gathered, written and partitioned again."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    live = model.side_branch.state_dict()
    state = {k: distribute_tensor(v.to(live[k].device), live[k].device_mesh, live[k].placements)
             if isinstance(live.get(k), DTensor) else v for k, v in state.items()}  # fmt: skip
    with gathered(model.side_branch.parameters(), modifier_rank=0):
        model.side_branch.load_state_dict(state, strict=True)


def saved_loss_sum(checkpoint: str) -> float | None:
    """The summed step losses a checkpoint recorded (LOSS_SUM), or None."""
    loss_file = Path(checkpoint) / LOSS_SUM
    return json.loads(loss_file.read_text())["loss_sum"] if loss_file.exists() else None


def check_resume_routing(checkpoint: str, model) -> None:
    """Refuse to resume from a checkpoint made with another routing config, naming the changed fields."""
    # compared as normalised configs: JSON gives lists where the live config has tuples
    saved, now = DPVRConfig.from_dict(read_adapter_config(checkpoint)["dpvr"]), model.dpvr_config
    if saved != now:
        changed = {k: (v, getattr(now, k)) for k, v in saved.to_dict().items() if v != getattr(now, k)}
        raise DPVRError(f"cannot resume from {checkpoint}: routing config changed {changed} (saved, now)")


class DPVRTrainer(Trainer):
    """The HF Trainer with DPVR's checkpoints and resume, plus two options of the side branch's training:
    `distillation` (dpvr.train.distill.Distillation: the routed model learns from itself with routing off)
    and `side_warmup` (dpvr.train.stages.SideWarmup: a low learning rate first, then the run's schedule);
    `placements` (a fusion policy's LF fusion_at placements) trains one side branch across them, optimizer
    step k under placements[k % len] (a function of the step: resume repeats it exactly)."""

    def __init__(self, *args, distillation=None, side_warmup=None, placements=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation, self.side_warmup, self.placements = distillation, side_warmup, placements
        if side_warmup is not None and self.lr_scheduler is not None:
            raise DPVRError("side_warmup builds the learning-rate scheduler: pass no scheduler in optimizers=")
        if distillation is not None:
            distillation.check_model(self.model)
            if self.label_smoother is not None or self.compute_loss_func is not None:
                raise DPVRError("distillation blends the model's own loss: drop --label_smoothing_factor / compute_loss_func")

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    # ---------------------------------------------------------------- length-grouped batches
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != GROUP_BY_LENGTH or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(dataset.lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps, seed)

    def _get_eval_sampler(self, eval_dataset):
        # HF groups the held-out batches too under this strategy; they keep HF's plain order instead
        # (file order, or sharded by accelerate under DDP), so the held-out loss means the same
        # whatever order the training batches come in
        if self.args.train_sampling_strategy != GROUP_BY_LENGTH:
            return super()._get_eval_sampler(eval_dataset)
        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    # ---------------------------------------------------------------- stage-wise learning rates
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.side_warmup is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        # the run's own schedule (type, warmup, kwargs as HF builds it) for the steps after the warm-up
        # stage, then one scheduler that runs the stage first (HF saves and resumes it as its own)
        second = super().create_scheduler(self.side_warmup.remaining(num_training_steps), optimizer)
        self.lr_scheduler = self.side_warmup.staged(second)
        return self.lr_scheduler

    # ---------------------------------------------------------------- distillation, batches with no image
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # distillation and the placements train only: the held-out loss stays the model's own routing's
        # plain CE, comparable between runs
        forward = self.distillation.student(model, inputs, num_items_in_batch) if (
            self.distillation is not None and model.training) else model  # fmt: skip
        placed = contextlib.nullcontext()
        if self.placements and model.training:
            placed = self._unwrapped().routing(fusion_at=self.placements[self.state.global_step % len(self.placements)])
        with placed:
            out = super().compute_loss(forward, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        if loss.requires_grad or not (model.training and torch.is_grad_enabled()):
            return out
        # text-only samples never reach DPVR's side branch, so a batch of them (grouped batches make
        # them; batch 1 on LLaVA-665k meets one at once) has no path to a trainable weight: a zero-
        # weighted term gives every trainable weight a zero gradient, and the step (DDP's all-reduce
        # included) runs like any other
        loss = loss + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
        return (loss, *out[1:]) if return_outputs else loss

    # ---------------------------------------------------------------- skipped samples (on_error="skip")
    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """Record the samples a batch skipped (with DataLoader workers the dataset's counters live in the
        workers; the collator brings them here), and replace a batch whose samples were all skipped by
        the next one: a step trains on real samples, and the epoch ends that much earlier."""
        batches = []
        while len(batches) < num_batches:
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            for reason, sid, index in batch.pop("skipped", ()):
                self.train_dataset.record_skip(reason, sid, index)
            if "input_ids" in batch:
                batches.append(batch)
        return batches, self._get_num_items_in_batch(batches, device)

    # ---------------------------------------------------------------- train_loss across a resume
    def _loss_sum_so_far(self) -> float:
        return getattr(self, "_loss_before_resume", 0.0) + self._total_loss_scalar + float(self._tr_loss)

    def _finalize_training(self, trial, num_train_samples, start_time):
        # HF divides this call's loss sum by this call's step count (it records the step it resumed at); after a
        # resume neither gives the run's train_loss. Scale the sum so that HF's division gives the whole run's mean.
        if getattr(self, "_loss_before_resume", None) is not None and self.state.global_step > 0:
            steps_now = self.state.global_step - self._initial_global_step
            whole = self._loss_sum_so_far() / self.state.global_step
            self._total_loss_scalar = whole * steps_now - float(self._tr_loss)
        return super()._finalize_training(trial, num_train_samples, start_time)

    def _saves_side_branch(self) -> bool:
        model = self._unwrapped()
        return isinstance(model, DPVRForConditionalGeneration) and model.side_branch is not None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._saves_side_branch():
            return super().save_model(output_dir, _internal_call)
        # HF's save_model gathers the whole model under FSDP (and saves nothing with a sharded state dict)
        # and under ZeRO-3 only with stage3_gather_16bit_weights_on_model_save; a DPVR checkpoint is the
        # side branch alone, so every rank gathers just it (a collective) and rank 0 writes it
        state = self._side_branch_state()
        if self.args.should_save:
            self._save(output_dir, state)

    def _side_branch_state(self) -> dict[str, torch.Tensor]:
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
            # FSDP1 flattens parameters into shards that only its state_dict hooks reassemble: the whole
            # model's full state dict (rank 0 gets it, as in HF's save_model), side branch kept
            full = self.accelerator.get_state_dict(self.model)
            return {k.removeprefix("side_branch."): v for k, v in full.items() if k.startswith("side_branch.")}
        return side_branch_state(self._unwrapped())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._saves_side_branch():
            return super()._save(output_dir, state_dict)
        # state_dict: the side branch's gathered weights (save_model's); None: the module's own, whole
        output_dir = output_dir or self.args.output_dir
        self._unwrapped().save_pretrained(output_dir, side_branch_only=True, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if (loss_sum := saved_loss_sum(resume_from_checkpoint)) is not None:
            self._loss_before_resume = loss_sum
        model = model or self._unwrapped()
        adapter = Path(resume_from_checkpoint) / ADAPTER_CONFIG
        if not isinstance(model, DPVRForConditionalGeneration) or not adapter.exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        check_resume_routing(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        state = {k.removeprefix("side_branch."): v for k, v in load_file(Path(resume_from_checkpoint) / WEIGHTS).items()}
        load_side_branch(model, state)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # under DeepSpeed HF resumes the weights from DeepSpeed's own checkpoint and never calls
        # _load_from_checkpoint; this runs on every resume, so its checks happen here
        if checkpoint is not None and self.is_deepspeed_enabled:
            if (loss_sum := saved_loss_sum(checkpoint)) is not None:
                self._loss_before_resume = loss_sum
            model = self._unwrapped()
            if isinstance(model, DPVRForConditionalGeneration) and (Path(checkpoint) / ADAPTER_CONFIG).exists():
                check_resume_routing(checkpoint, model)
        return super()._load_optimizer_and_scheduler(checkpoint)

    # ---------------------------------------------------------------- atomic checkpoints
    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_dir = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(os.path.join(self._staging_dir, name), ignore_errors=True)
        try:
            with disk_full_in_one_line(os.path.join(run_dir, name), cleanup=os.path.join(self._staging_dir, name)):
                super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staging copy
        if self.args.should_save:
            Path(run_dir, STAGING, name, LOSS_SUM).write_text(json.dumps({"loss_sum": self._loss_sum_so_far()}) + "\n")
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(run_dir, STAGING, name), final)  # the checkpoint appears complete or not at all
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)  # fmt: skip
        self.accelerator.wait_for_everyone()


# how a full disk shows: an errno, or torch's zip writer's own words for the short write it met (no errno kept)
_DISK_FULL_TEXT = ("No space left on device", "unexpected pos", "file write failed", "os error 28")


@contextlib.contextmanager
def disk_full_in_one_line(what: str, cleanup: str | None = None):
    """Report a full disk while writing `what` as one line saying so (torch's message names its C++ source
    line instead), after removing the half-written `cleanup` folder, which only holds space."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise DPVRError(f"no space left on device while writing {what}: free space there, "
                        "or keep fewer checkpoints (--save_total_limit)") from exc  # fmt: skip


def _disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc) for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_run_record(output_dir: str, model, log_history: list[dict], extra: dict) -> None:
    """run.json next to the final weights: method, routing, trainable params, loss curve."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    record = {"trainable_params": trainable, "total_params": total, "log_history": log_history, **extra}
    if isinstance(model, DPVRForConditionalGeneration):
        record["dpvr"] = model.dpvr_config.to_dict()
    atomic_write_text(Path(output_dir, RUN_RECORD), json.dumps(record, indent=1) + "\n")
