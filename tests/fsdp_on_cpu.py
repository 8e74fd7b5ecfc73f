"""`dpvr train` with accelerate's FSDP on CPU processes, for tests only: accelerate (1.15) enables FSDP for
GPU-like devices only and on CPU processes runs plain DDP (which `dpvr train` refuses), although torch's
FSDP2 (`fully_shard`) runs on CPU with gloo. This lifts that one gate; everything else, the sharding, the
Trainer and dpvr's gather-before-save, is the code a GPU run uses.

    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 tests/fsdp_on_cpu.py train ... --ddp_backend gloo
"""
from __future__ import annotations

import sys

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from dpvr.cli import main

    sys.exit(main(sys.argv[1:]))
