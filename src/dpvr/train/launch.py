"""How many processes the launcher meant to start, read from its environment, so that `dpvr train`
never trains as one process while the user asked for several (or as several independent ones).

Launchers and what they set:
  torchrun / python -m torch.distributed.run / accelerate launch --multi_gpu / deepspeed: WORLD_SIZE, RANK
  mpirun (accelerate's multi-CPU path):                  OMPI_COMM_WORLD_SIZE / PMI_SIZE
  accelerate launch without --multi_gpu (or with --cpu):  ACCELERATE_USE_CPU and no size; it starts ONE
      process whatever --num_processes says (its "simple" launcher), so a single process under accelerate is
      refused: it is either a silent one-of-N run or the same as a plain `dpvr train`

Sharding (FSDP, DeepSpeed) asked for, through the launcher (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED)
or the Trainer's flags (--fsdp, --deepspeed), but not set up by accelerate is refused too: accelerate
enables them for GPU-like devices only, and on CPU processes it runs plain DDP (seen with accelerate 1.15).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from dpvr.errors import DPVRError

# environment variables that carry the number of processes, by launcher
WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world(env: Mapping[str, str] | None = None) -> int:
    """The number of processes the launcher started (1 when no launcher variable is set)."""
    env = os.environ if env is None else env
    sizes = [int(env[v]) for v in WORLD_VARS if env.get(v, "").isdigit()]
    return max(sizes, default=1)


def check_launch(world_size: int, distributed: bool, env: Mapping[str, str] | None = None) -> None:
    """Refuse, in one line, a run whose process count differs from the launcher's.
    world_size / distributed: what the Trainer set up (TrainingArguments.world_size, parallel_mode)."""
    env = os.environ if env is None else env
    launched = launched_world(env)
    if launched == 1 and "ACCELERATE_USE_CPU" in env:
        raise DPVRError(
            "accelerate launched one process (its simple launcher starts one whatever --num_processes says: no "
            "--multi_gpu, or --cpu); for one process run `dpvr train ...`, for N run `accelerate launch --multi_gpu "
            "--num_processes N -m dpvr.cli train ...` or `torchrun --nproc_per_node N -m dpvr.cli train ...`"
        )
    if launched > 1 and (not distributed or world_size != launched):
        raise DPVRError(
            f"launched as {launched} processes but the Trainer runs {world_size} "
            f"({'distributed' if distributed else 'not distributed'}); each process would train its own model"
        )


def sharding_asked(fsdp, deepspeed, env: Mapping[str, str] | None = None) -> str | None:
    """'DeepSpeed' or 'FSDP' when the launcher or the Trainer's flags (--deepspeed, --fsdp) ask for it."""
    env = os.environ if env is None else env
    if deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DeepSpeed"
    if fsdp or env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    return None


def check_sharding(asked: str | None, fsdp_on: bool, deepspeed_on: bool) -> None:
    """Refuse, in one line, a run that asked for FSDP or DeepSpeed and got neither (the Trainer's accelerator
    decides: Trainer.is_fsdp_enabled / is_deepspeed_enabled); it would train unsharded, a silent DDP run."""
    if asked is not None and not {"FSDP": fsdp_on, "DeepSpeed": deepspeed_on}[asked]:
        raise DPVRError(
            f"{asked} was asked for but the Trainer runs without it (accelerate enables FSDP and DeepSpeed on "
            f"GPU-like devices only; on CPU processes it would run plain DDP): run on GPUs, or drop the {asked} flags"
        )
