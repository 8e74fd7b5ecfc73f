"""Task-conditioned fusion (the DPVR paper's future work (iii)): a policy that picks, per request, where an
LF model fuses the side branch back (its `fusion_at` placement), from what is known about the request:
its task (lmms-eval's task name, the eval family) and its input (image count, prompt length).

    policy = FusionPolicy(default=(11,), rules=(Rule(fusion_at=(9, 13), task="count"),
                                                Rule(fusion_at=(13,), min_images=2)))
    policy.pick(Request(task="count", n_images=1, prompt_tokens=40))   # -> (9, 13): the first rule that matches
    policy.save("policy.json"); FusionPolicy.load("policy.json")
    FusionPolicy.from_analysis("runs/analysis/analysis.json", split_layer=11)

Placements come from one `dpvr analyze` run (each question family's masking curve, read as analyze reads
the pooled one to suggest `fusion_at`). A request runs
exactly as the same model does alone under `model.routing(fusion_at=placement)`: `by_placement` groups a
batch's requests by placement and runs each group under its own routing, so rows never share a forward
with another placement (the batch-equals-rows guarantee is the routing's own, per group).
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from dpvr.errors import DPVRError

POLICY_FILE = "fusion_policy.json"


def _placement(value, where: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise DPVRError(f"{where}={value!r} must be a list of layer indices")
    layers = tuple(value)
    if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
        raise DPVRError(f"{where}={value!r} must be a non-empty list of non-negative layer indices")
    if len(set(layers)) != len(layers):
        raise DPVRError(f"{where}={value!r} names a layer twice")
    return tuple(sorted(layers))


@dataclass(frozen=True)
class Request:
    """What the policy may know about a request before running it."""

    task: str | None = None  # e.g. an lmms-eval task, or a digit-scenes family ("mme/count": MME by category)
    n_images: int = 1
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Rule:
    """Use `fusion_at` for requests that match every condition given (None: any)."""

    fusion_at: tuple[int, ...]
    task: str | None = None
    min_images: int = 0
    max_images: int | None = None
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fusion_at", _placement(self.fusion_at, "Rule.fusion_at"))
        for name in ("min_images", "max_images", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise DPVRError(f"Rule.{name}={value!r} must be a non-negative int")
        if self.task is not None and not isinstance(self.task, str):
            raise DPVRError(f"Rule.task={self.task!r} must be a task name")

    def matches(self, req: Request) -> bool:
        # a task rule covers its sub-tasks too: "mme" matches "mme/count" (the analysis splits MME by category)
        task = self.task is None or (req.task is not None and (req.task == self.task or req.task.startswith(self.task + "/")))
        return (task and req.n_images >= self.min_images
                and (self.max_images is None or req.n_images <= self.max_images)
                and (self.max_prompt_tokens is None or req.prompt_tokens <= self.max_prompt_tokens))  # fmt: skip


@dataclass(frozen=True)
class FusionPolicy:
    default: tuple[int, ...]
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", _placement(self.default, "FusionPolicy.default"))
        rules = tuple(self.rules)
        if any(not isinstance(r, Rule) for r in rules):
            raise DPVRError("FusionPolicy.rules must hold Rule objects")
        object.__setattr__(self, "rules", rules)

    def pick(self, req: Request) -> tuple[int, ...]:
        return next((r.fusion_at for r in self.rules if r.matches(req)), self.default)

    @property
    def placements(self) -> tuple[tuple[int, ...], ...]:
        """Every placement the policy can pick, the default first, each once."""
        return tuple(dict.fromkeys((self.default, *(r.fusion_at for r in self.rules))))

    def validate_for(self, split_layer: int, num_layers: int) -> None:
        """Each placement must name deep layers [split_layer, num_layers) of the model it runs on."""
        for p in self.placements:
            outside = [i for i in p if not split_layer <= i < num_layers]
            if outside:
                raise DPVRError(f"fusion policy placement {list(p)} names layers {outside} outside the deep layers "
                                f"[{split_layer}, {num_layers}) of this model")  # fmt: skip

    def check_model(self, model) -> None:
        """The model must route with LF (a placement is where its side branch fuses back) and hold the
        placements' layers among its deep layers."""
        cfg = getattr(model, "dpvr_config", None)
        if cfg is None or cfg.mode != "lf":
            mode = "stock" if cfg is None else cfg.mode
            raise DPVRError(f"a fusion policy places LF fusion layers; this model is {mode}: use an LF checkpoint "
                            "or --mode lf")  # fmt: skip
        self.validate_for(cfg.split_layer, model.num_text_layers)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"default": list(self.default),
                "rules": [{k: list(v) if k == "fusion_at" else v for k, v in dataclasses.asdict(r).items()
                           if v is not None and (k != "min_images" or v)} for r in self.rules]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> "FusionPolicy":
        if not isinstance(data, dict) or "default" not in data:
            raise DPVRError("a fusion policy is a JSON object with a 'default' placement and optional 'rules'")
        unknown = sorted(set(data) - {"default", "rules"})
        if unknown:
            raise DPVRError(f"unknown fusion policy field(s) {unknown}; known: ['default', 'rules']")
        known = {f.name for f in dataclasses.fields(Rule)}
        rules = []
        for i, rule in enumerate(data.get("rules") or []):
            bad = sorted(set(rule) - known) if isinstance(rule, dict) else ["(not an object)"]
            if bad or "fusion_at" not in rule:
                raise DPVRError(f"fusion policy rule {i}: unknown field(s) {bad} or no fusion_at; known: {sorted(known)}")
            rules.append(Rule(**rule))
        return cls(data["default"], tuple(rules))

    def save(self, path: str | Path) -> Path:
        from dpvr.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FusionPolicy":
        path = Path(path)
        if path.is_dir():
            path = path / POLICY_FILE
        if not path.is_file():
            raise DPVRError(f"no fusion policy at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DPVRError(f"fusion policy {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_dict(data)

    @classmethod
    def from_analysis(cls, path: str | Path, split_layer: int) -> "FusionPolicy":
        """From one `dpvr analyze` run with masking: per question family (its `attention_truth.late_review`
        cost curve: the likelihood lost when one layer's text-to-image attention is blocked), the deep
        layers (>= split_layer) the masking rule of `dpvr analyze` would fuse at; the default is the
        pooled curve's. Families whose curve suggests nothing fall back to the default."""
        from dpvr.analysis.summary import suggest_fusion_at

        reviews = (json.loads(Path(path).read_text()).get("attention_truth") or {}).get("late_review") or {}
        if "all" not in reviews:
            raise DPVRError(f"{path} has no per-family masking curves: run `dpvr analyze` with the masking analysis")

        def placement(review: dict) -> tuple[int, ...]:
            curves = {"dll_only": [-c for c in review["cost"]], "dll_only_sem": review["cost_sem"]}
            return tuple(suggest_fusion_at(curves, split_layer)["fusion_at"])

        default = placement(reviews["all"])
        if not default:
            raise DPVRError(f"{path}: no deep layer (>= {split_layer}) costs likelihood beyond noise when blocked; "
                            "nothing for a fusion policy to place")  # fmt: skip
        rules = [Rule(fusion_at=p, task=family) for family, review in sorted(reviews.items())
                 if family != "all" and (p := placement(review)) and p != default]  # fmt: skip
        return cls(default, tuple(rules))


def add_policy_arguments(parser, task: bool = False) -> None:
    parser.add_argument("--fusion-policy", default=None, metavar="FILE",
                        help="task-conditioned fusion: a fusion policy JSON (docs/fusion_policy.md) picking each "
                        "request's LF fusion layers")  # fmt: skip
    if task:
        parser.add_argument("--task", default=None, help="the request's task, for --fusion-policy's task rules")


def load_policy(path: str | None) -> "FusionPolicy | None":
    """The policy at `path` (None: no policy); commands read it before loading a model, to fail fast."""
    return None if path is None else FusionPolicy.load(path)


def policy_for(model, path: str | None) -> "FusionPolicy | None":
    """The policy at `path` (None: no policy), checked against the model it will run on."""
    policy = load_policy(path)
    if policy is not None:
        policy.check_model(model)
    return policy


def by_placement(model, placements: Sequence[tuple[int, ...]], run: Callable[[list[int]], list]) -> list:
    """run(indices) -> one result per index, called once per distinct placement under
    `model.routing(fusion_at=placement)`; the results come back in the original order."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(placements):
        groups[p].append(i)
    out: list = [None] * len(placements)
    for p, idx in groups.items():
        with model.routing(fusion_at=p):
            for i, result in zip(idx, run(idx), strict=True):
                out[i] = result
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m dpvr.fusion_policy runs/analysis/analysis.json --split-layer 11 --out policy.json"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dpvr.fusion_policy", description="A fusion policy from one `dpvr "
                                "analyze` run: per question family, the fusion layers its masking curve picks.")  # fmt: skip
    p.add_argument("analysis", help="analysis.json of `dpvr analyze` (with its masking analysis)")
    p.add_argument("--split-layer", type=int, required=True, help="the LF model's split: placements are deep layers")
    p.add_argument("--out", default="fusion_policy.json")
    args = p.parse_args(argv)
    try:
        policy = FusionPolicy.from_analysis(args.analysis, args.split_layer)
    except (DPVRError, OSError, KeyError, json.JSONDecodeError) as exc:
        p.exit(1, f"{p.prog}: error: {exc}\n")
    policy.save(args.out)
    print(json.dumps(policy.to_dict()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
