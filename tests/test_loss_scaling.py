"""The loss of one optimizer step, and its gradient, do not depend on how the step's tokens are split:
gradient accumulation 1/2/4 in one process, and 1 vs 2 processes (DDP over gloo), for the routed
modes (LF, PC, KV) and the LoRA baseline (the stock forward). The HF Trainer passes
`num_items_in_batch` (supervised tokens of the whole step, over micro-batches and ranks); a forward
that ignores it divides each micro-batch by its own count instead, off by the number of splits.

The same file is the worker that `torch.distributed.run` starts for the two-process runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny.py, also when run by torch.distributed.run
from tiny import pixels, prompt, tiny_llava  # noqa: E402

METHODS = ("lf", "pc", "kv", "lora")
N_SAMPLES = 8  # one optimizer step = the whole data set, in any split
SPLITS_1P = [(8, 1), (4, 2), (2, 4)]  # (per-device batch, accumulation) in one process
SPLITS_2P = [(4, 1), (2, 2)]  # the same, per rank, over two ranks



def two_ranks(script: str, out: Path, port: int) -> dict:
    """Run `script OUT` as 2 gloo ranks (torchrun, one thread each) and return the JSON its rank 0 wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           script, str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())

def samples() -> list[dict]:
    """Equal lengths (no padding to differ between splits), unequal supervised-token counts (1..8),
    so a per-micro-batch mean differs from the per-step mean."""
    out = []
    for i in range(N_SAMPLES):
        ids = torch.tensor(prompt(3, 9, seed=i))
        labels = torch.full_like(ids, -100)
        labels[-(i + 1) :] = ids[-(i + 1) :]
        out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixels(1, seed=i)[0]))
    return out


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def build(method: str):
    from dpvr import DPVRConfig, convert

    base = tiny_llava(layers=6, seed=0)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj"
        torch.manual_seed(1)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    torch.manual_seed(1)
    return convert(base, DPVRConfig(mode=method, split_layer=3, fusion_layers=1, side_init="random"))


class GradRecorder:
    """Trainer callback: the accumulated (and, under DDP, all-reduced) gradient just before the step."""

    def __init__(self):
        from transformers import TrainerCallback

        rec = self

        class _CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                named = sorted((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
                rec.grad = torch.cat([g.detach().flatten().double() for _, g in named])

        self.callback = _CB()
        self.grad = None


def one_step(method: str, batch: int, accum: int, out_dir: str) -> tuple[float, torch.Tensor]:
    """(training loss of one optimizer step, its gradient) with the HF Trainer."""
    from transformers import Trainer, TrainingArguments

    model = build(method)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1,
        learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
    )  # fmt: skip
    rec = GradRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=samples(), data_collator=collate, callbacks=[rec.callback])
    result = trainer.train()
    return result.training_loss, rec.grad


def _assert_same(ref: tuple[float, torch.Tensor], got: tuple[float, torch.Tensor], what: str) -> None:
    (l0, g0), (l1, g1) = ref, got
    assert abs(l1 - l0) <= 1e-5 * abs(l0), f"{what}: loss {l1:.6f} vs {l0:.6f}"
    rel = float((g1 - g0).norm() / g0.norm())
    assert rel <= 1e-5, f"{what}: gradient differs by {rel:.2e} (relative norm); grad norms {g1.norm():.6f} vs {g0.norm():.6f}"


def test_loss_and_gradient_do_not_depend_on_accumulation_or_process_count(tmp_path):
    single = {m: {s: one_step(m, *s, str(tmp_path / f"{m}-{s}")) for s in SPLITS_1P} for m in METHODS}
    for m in METHODS:
        ref = single[m][SPLITS_1P[0]]
        for s in SPLITS_1P[1:]:
            _assert_same(ref, single[m][s], f"{m} batch {s[0]} x accumulation {s[1]} vs batch 8")

    ddp = two_ranks(__file__, tmp_path / "ddp.json", port=29547)
    for m in METHODS:
        ref = single[m][SPLITS_1P[0]]
        for s in SPLITS_2P:
            loss, grad = ddp[m][f"{s[0]}x{s[1]}"]
            _assert_same(ref, (loss, torch.tensor(grad, dtype=torch.float64)),
                         f"{m} 2 processes x batch {s[0]} x accumulation {s[1]} vs 1 process batch 8")  # fmt: skip


if __name__ == "__main__":  # worker under torch.distributed.run: every method and split, rank 0 writes the results
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in METHODS:
            results[m] = {}
            for b, k in SPLITS_2P:
                loss, grad = one_step(m, b, k, os.path.join(tmp, f"{m}-{b}-{k}"))
                results[m][f"{b}x{k}"] = (loss, grad.tolist())
    if int(os.environ.get("RANK", "0")) == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
