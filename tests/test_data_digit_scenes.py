"""Digit scenes: determinism, disjoint scan pools, answers consistent with the rendered scenes."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from dpvr.data import digit_scenes as ds
from dpvr.data.scene_questions import LETTERS, POSITIONS, vocabulary
from dpvr.errors import DPVRError

SMALL = {"train": 40, "val": 12, "test": 12, "existence": 8, "all": 8}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return ds.ensure_benchmark(tmp_path_factory.mktemp("b") / "scenes", seed=3, scenes=SMALL, progress=False)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(bench, tmp_path):
    again = _files(ds.ensure_benchmark(tmp_path / "again", seed=3, scenes=SMALL, progress=False))
    first = _files(bench)
    assert sorted(first) == sorted(again)
    differ = [name for name in first if first[name] != again[name]]
    assert not differ, f"{len(differ)} files differ between two builds with seed 3, e.g. {differ[:3]}"
    other = _files(ds.ensure_benchmark(tmp_path / "other", seed=4, scenes=SMALL, progress=False))
    assert other["test.json"] != first["test.json"], "seed 4 produced the same test split as seed 3"


def test_scan_pools_are_disjoint_and_used_per_split(bench):
    pools = ds.scan_pools(3)
    sets = {k: set(v.tolist()) for k, v in pools.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sum(len(s) for s in sets.values()) == len(load_digits().target)
    for split in ("train", "val", "test"):
        used = {scan for s in ds.load_split(bench, split) if "image" in s for scan in s["meta"]["scans"] if scan >= 0}
        assert used and used <= sets[split], f"{split} uses scans outside its pool: {sorted(used - sets[split])[:5]}"


def test_images_show_the_scans_in_meta(bench):
    digits = load_digits()
    for s in ds.load_split(bench, "test")[:20]:
        if "image" not in s:
            continue
        img = np.asarray(Image.open(bench / "images" / s["image"]), dtype=np.float64)  # (48, 48, 3)
        for i, (d, scan, tint) in enumerate(zip(s["meta"]["cells"], s["meta"]["scans"], s["meta"]["tints"])):
            r, c = divmod(i, ds.GRID)
            cell = img[r * ds.CELL : (r + 1) * ds.CELL, c * ds.CELL : (c + 1) * ds.CELL]
            if d == ds.EMPTY:
                assert cell.max() == 0, f"{s['id']}: empty cell {i} is not blank"
                continue
            assert digits.target[scan] == d, f"{s['id']}: scan {scan} is a {digits.target[scan]}, meta says {d}"
            want = np.kron(digits.images[scan] / 16.0, np.ones((2, 2)))[..., None] * np.array(ds.TINTS[tint])
            diff = np.abs(cell - np.round(want)).max()
            assert diff == 0, f"{s['id']} cell {i}: max pixel difference {diff}"


def test_answers_follow_from_cells(bench):
    for s in ds.load_split(bench, "test"):
        m, q = s["meta"], s["conversations"][0]["value"].replace("<image>", "").strip()
        assert s["conversations"][1]["value"] == m["answer"]
        if m["family"] == "spatial":
            i = next(k for k, p in enumerate(POSITIONS) if f"the {p} cell" in q)
            assert m["answer"] == ("none" if m["cells"][i] < 0 else str(m["cells"][i])), s["id"]
        if m["family"] == "count":
            assert m["answer"] == str(sum(d >= 0 for d in m["cells"])), s["id"]
        if m["family"] == "pope":
            d = int(q.split()[3])
            assert m["answer"] == ("yes" if d in m["cells"] else "no"), s["id"]
        if m["family"] == "mmbench":
            assert m["options"][LETTERS.index(m["answer"])] == m["truth"], s["id"]


def test_eval_structure_pope_mme_mmbench(bench):
    test = ds.load_split(bench, "test")
    fams = {s["meta"]["family"] for s in test}
    assert fams == set(ds.FAMILIES), f"families in test: {sorted(fams)}"
    assert {s["meta"]["subset"] for s in test if s["meta"]["family"] == "pope"} == {"random", "popular", "adversarial"}
    pairs, groups = defaultdict(list), defaultdict(list)
    for s in test:
        if s["meta"]["family"] == "mme":
            pairs[s["meta"]["pair_id"]].append(s["meta"]["answer"])
        if s["meta"]["family"] == "mmbench":
            groups[s["meta"]["circ_group"]].append(s["meta"])
    assert pairs and all(sorted(v) == ["no", "yes"] for v in pairs.values()), dict(pairs)
    for g, metas in groups.items():
        assert sorted(m["rotation"] for m in metas) == [0, 1, 2, 3], g
        assert len({m["answer"] for m in metas}) == 4, f"{g}: the right letter must move with each rotation"
    assert all("image" not in s for s in test if s["meta"]["family"] == "text")


def test_every_word_is_in_the_vocabulary(bench):
    vocab = set(vocabulary())
    for split in ("train", "pretrain", "text", "test"):
        for s in ds.load_split(bench, split):
            for turn in s["conversations"]:
                missing = set(turn["value"].replace("<image>", " ").split()) - vocab
                assert not missing, f"{s['id']}: words not in the tokenizer vocabulary: {missing}"


def test_text_corpus_writes_the_scene_and_its_answers(bench):
    bench_text = ds.load_split(bench, "text")
    parts = defaultdict(set)
    side = ds.GRID * ds.WORDS_PER_CELL_SIDE
    for s in bench_text:
        m, turns = s["meta"], s["conversations"]
        assert "image" not in s and len(turns) == 2 * ds.TRAIN_TURNS
        words = turns[0]["value"].split()
        grid = [words[y * side : (y + 1) * side] for y in range(side)]
        for i, d in enumerate(m["cells"]):  # cell i's block: its name, then its digit in every other word
            r, c = divmod(i, ds.GRID)
            k = ds.WORDS_PER_CELL_SIDE
            block = [w for row in grid[r * k : (r + 1) * k] for w in row[c * k : (c + 1) * k]]
            assert " ".join(block[:2]) == POSITIONS[i], (s["id"], i, block)
            assert set(block[2:]) == {"none" if d < 0 else str(d)}, (s["id"], i, block)
        assert " ".join(words[side * side :]) == m["turns"][0]["question"]
        for k, qa in enumerate(m["turns"]):
            assert turns[2 * k + 1]["value"] == qa["answer"]
            if qa["family"] == "pope":
                assert qa["answer"] == ("yes" if int(qa["question"].split()[3]) in m["cells"] else "no")
            parts[m["part"]].add(qa["family"])
    assert parts["existence"] == {"pope"}
    assert parts["all"] >= {"pope", "mme", "mmbench", "count", "spatial", "caption", "text"}


def test_reuse_and_refuse_incomplete(bench, tmp_path):
    stamp = (bench / "test.json").stat().st_mtime_ns
    assert ds.ensure_benchmark(bench, seed=3, scenes=SMALL, progress=False) == bench
    assert (bench / "test.json").stat().st_mtime_ns == stamp, "a complete benchmark was rewritten"
    half = tmp_path / "half"
    half.mkdir()
    (half / "train.json").write_text("[]")
    with pytest.raises(DPVRError, match="not a complete"):
        ds.ensure_benchmark(half, seed=3, scenes=SMALL, progress=False)
    manifest = json.loads((bench / "MANIFEST.json").read_text())
    assert manifest["samples"]["pretrain"] == SMALL["train"]
