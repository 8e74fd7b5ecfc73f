"""The ground-truth attention analysis (`dpvr.analysis.attention_truth`, `grounding`) against naive
computations: eager attention maps of the stock model, hand-built cell layouts, planted noise, and
constructed masking curves; then `dpvr analyze` end to end on the untrained embedded architecture."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny import IMAGE_TOKEN, PAD, VOCAB, tiny_config
from transformers import LlavaForConditionalGeneration

from dpvr.analysis.attention_truth import TruthAccumulator, find_persistent_noise, late_review, late_reviews
from dpvr.analysis.grounding import (
    answer_query_positions,
    patch_grid_tokens,
    query_mask,
    relevant_cells,
    relevant_tokens,
    token_cells,
)
from dpvr.analysis.saturation import measure_batch
from dpvr.cli import main

IGNORE = -100
N_IMG = 36  # a 24 x 24 image in 4-pixel patches: a 6 x 6 patch grid, each digit-scenes cell 2 x 2 patches
CELLS = [3, -1, 7, 1, 5, -1, 7, -1, 2]  # a scene: raster order, -1 empty


def six_by_six_llava(attn: str) -> LlavaForConditionalGeneration:
    config = tiny_config(attn=attn)
    config.vision_config.image_size, config.image_seq_length = 24, N_IMG
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # as tiny.tiny_llava: random init is small; sharper attention makes the check stricter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def grounded_batch() -> dict:
    """Two right-padded rows `text, 36 image tokens, question, answer (3 labelled tokens)`."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(6, VOCAB, (2,), generator=g).tolist() + [IMAGE_TOKEN] * N_IMG
            + torch.randint(6, VOCAB, (n,), generator=g).tolist() for n in (8, 5)]  # fmt: skip
    T = max(map(len, rows))
    ids = torch.full((2, T), PAD)
    am, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for b, r in enumerate(rows):
        ids[b, : len(r)], am[b, : len(r)] = torch.tensor(r), 1
        labels[b, len(r) - 3 : len(r)] = ids[b, len(r) - 3 : len(r)]
    return {"input_ids": ids, "attention_mask": am, "labels": labels,
            "pixel_values": torch.randn(2, 3, 24, 24, generator=g)}  # fmt: skip


QUESTIONS = [({"family": "spatial", "cells": CELLS}, "<image>\nwhich digit is in the middle middle cell ?"),
             ({"family": "reasoning", "cells": CELLS}, "what is the sum of the top left and bottom right digits ?")]  # fmt: skip


@torch.no_grad()
def test_answer_query_attention_and_shares_match_eager_attention_maps():
    batch = grounded_batch()
    q = answer_query_positions(batch["labels"])
    n = batch["attention_mask"].sum(-1)
    assert q.tolist() == (n - 4).tolist()  # the token before the first labelled one
    at = query_mask(batch["input_ids"], batch["labels"], IMAGE_TOKEN, "answer")
    assert at.sum(-1).tolist() == [1, 1] and at[torch.arange(2), q].all()
    stats, _ = measure_batch(six_by_six_llava("sdpa"), batch, attend_from=at)
    eager = six_by_six_llava("eager")  # same seed: same weights
    assert patch_grid_tokens(eager.config) == N_IMG
    maps = eager(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}, output_attentions=True).attentions
    image = batch["input_ids"] == IMAGE_TOKEN
    acc = TruthAccumulator()
    acc.add(stats.image_attn, *zip(*QUESTIONS))
    got = acc.grounding()
    for b, (meta, question) in enumerate(QUESTIONS):
        want = torch.stack([m[b, :, q[b]].mean(0)[image[b]] for m in maps])  # (L, 36): head mean, image keys
        torch.testing.assert_close(stats.image_attn[b], want, atol=1e-5, rtol=1e-4)
        rel = relevant_tokens(meta, question, N_IMG)
        share = (want[:, torch.from_numpy(rel)].sum(-1) / want.sum(-1)).double()
        g = got[meta["family"]]
        np.testing.assert_allclose(g.share, share.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.add(g.share, g.rest), 1.0, atol=1e-12)
        np.testing.assert_allclose(g.enrichment, share.numpy() / rel.mean(), atol=1e-4)
        assert g.area == pytest.approx((4 if b == 0 else 8) / N_IMG)
    np.testing.assert_allclose(got["all"].share, np.mean([got[m["family"]].share for m, _ in QUESTIONS], axis=0), atol=1e-12)


@torch.no_grad()
def test_question_queries_average_the_eager_maps_over_the_text_after_the_image():
    batch = grounded_batch()
    at = query_mask(batch["input_ids"], batch["labels"], IMAGE_TOKEN, "question")
    n = batch["attention_mask"].sum(-1)
    for b in range(2):  # 2 text tokens, 36 image tokens, then the question up to the last prompt token (n - 4)
        assert torch.nonzero(at[b]).flatten().tolist() == list(range(2 + N_IMG, int(n[b]) - 3))
    stats, _ = measure_batch(six_by_six_llava("sdpa"), batch, attend_from=at)
    maps = six_by_six_llava("eager")(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                                     output_attentions=True).attentions  # fmt: skip
    image = batch["input_ids"] == IMAGE_TOKEN
    for b in range(2):
        want = torch.stack([m[b][:, at[b]].mean((0, 1))[image[b]] for m in maps])  # (L, 36)
        torch.testing.assert_close(stats.image_attn[b], want, atol=1e-5, rtol=1e-4)


def test_a_question_about_cell_r_c_maps_to_its_image_tokens():
    # the embedded default: 12 x 12 patches, 3 x 3 cells of 4 x 4 patches, raster order
    cells = token_cells(144)
    for r, row in enumerate(("top", "middle", "bottom")):
        for c, col in enumerate(("left", "middle", "right")):
            mask = relevant_tokens({"family": "spatial", "cells": CELLS}, f"which digit is in the {row} {col} cell ?", 144)
            want = {y * 12 + x for y in range(4 * r, 4 * r + 4) for x in range(4 * c, 4 * c + 4)}
            assert set(np.flatnonzero(mask)) == want, (row, col)
            assert set(np.flatnonzero(cells == 3 * r + c)) == want
    assert relevant_cells({"cells": CELLS}, "is there a 7 in the image ?") == [2, 6]  # every cell holding a 7
    assert relevant_cells({"cells": CELLS}, "is there a 9 in the image ?") is None  # absent: nothing to look at
    assert relevant_cells({"cells": CELLS}, "how many digits are in the image ?") == [0, 2, 3, 4, 6, 8]
    assert relevant_cells({"cells": CELLS}, "are there 4 digits in the image ?") == [0, 2, 3, 4, 6, 8]
    assert relevant_cells({"cells": CELLS}, "is the top middle digit larger than the middle middle digit ?") == [1, 4]
    assert relevant_cells(None, "which digit is in the top left cell ?") is None  # real data: no meta
    assert relevant_cells({"family": "text"}, "what is 3 plus 4 ?") is None
    assert token_cells(576, grid=3) is not None and token_cells(16) is None and token_cells(150) is None
    from dpvr.embedded.model import build_processor, tiny_config as embedded_config

    assert patch_grid_tokens(embedded_config(len(build_processor().tokenizer))) == 144
    anyres = TruthAccumulator(grid_tokens=144)  # e.g. LLaVA-NeXT: 144 tokens would be a coincidence of tiling
    anyres.add([torch.rand(2, 144)], [{"family": "spatial", "cells": CELLS}], ["which digit is in the top left cell ?"])
    anyres.add([torch.rand(2, 36)], [{"family": "spatial", "cells": CELLS}], ["which digit is in the top left cell ?"])
    assert anyres.masks[0] is not None and anyres.masks[1] is None
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 5, 6], [IGNORE] * 5])
    assert answer_query_positions(labels).tolist() == [2, -1]


def test_noise_finder_finds_a_planted_always_attended_position():
    rng = np.random.default_rng(0)
    S, L, N = 60, 4, 36
    p = rng.dirichlet(np.ones(N), size=(S, L))  # (S, L, N): question-dependent spread
    p[:, :, 7] += 0.3 + 0.1 * rng.random((S, L))  # attended whatever the sample: the planted noise
    p[: S // 5, :, 20] += 1.5  # huge for a fifth of the samples only: high mean, not persistent
    p /= p.sum(-1, keepdims=True)
    found = find_persistent_noise(p, top_k=3, min_rate=0.5, floor=2.0)
    assert found["positions"] == [[7]] * L, found["positions"]
    np.testing.assert_allclose(found["share"], p[:, :, 7].mean(0))
    assert all(r[0] == 1.0 for r in found["rate"])
    assert find_persistent_noise(p, top_k=3, min_rate=0.5, floor=20.0)["positions"] == [[]] * L  # floor: 20/N > its mean


def test_late_review_flag_on_constructed_curves():
    quiet = np.array([1.2, 0.05, 0.02, 0.18, 0.03, 0.01, 0.0, 0.01, 0.0, 0.1, 0.01, 0.0, 0.0, 0.01, 0.0, 0.01])
    zero = np.zeros(16)
    assert not late_review(quiet, zero, tol=0.05)["review"]  # the embedded default's shape: fusion early, quiet tail
    review = quiet.copy()
    review[14] = 0.3
    r = late_review(review, zero, tol=0.05)
    assert r["review"] and r["peak_layer"] == 14 and r["tail_start"] == 12 and r["rise"] == pytest.approx(0.3)
    assert not late_review(review, np.full(16, 0.2), tol=0.05)["review"]  # within two standard errors: noise
    assert not late_review(review, zero, tol=0.05, n=2)["review"]  # too few samples for a verdict
    helped = quiet.copy()
    helped[8], helped[15] = -0.3, 0.04  # a negative trough must not turn a 0.04-nat tail into a "rise"
    assert not late_review(helped, zero, tol=0.05)["review"]
    # per family from masking log-likelihoods (M, 1 + 2L): family "a" reviews, "b" does not
    L, M = 16, 8
    ll = np.zeros((M, 1 + 2 * L))
    ll[:, 1 : 1 + L] = -np.where(np.arange(M)[:, None] < 4, review, quiet) - 0.001 * np.arange(M)[:, None]
    out = late_reviews(ll, ["a"] * 4 + ["b"] * 4, tol=0.05)
    assert list(out) == ["a", "b", "all"] and out["a"].review and not out["b"].review and out["all"].n_samples == M


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint, digit_bench):
    d = tmp_path_factory.mktemp("truth")
    (d / "model").symlink_to(tiny_checkpoint, target_is_directory=True)
    return d, digit_bench(0, train=2, val=1, test=3, existence=2, all=2)


def test_analyze_without_ground_truth_reports_only_the_noise(setup, tmp_path, capsys):
    d, data = setup
    records = [{k: v for k, v in s.items() if k != "meta"} for s in json.loads((data / "test.json").read_text())]
    (tmp_path / "plain.json").write_text(json.dumps(records))  # LLaVA-665k format: no cell annotations
    rc = main(["analyze", "--model", str(d / "model"), "--data", str(tmp_path / "plain.json"), "--images",
               str(data / "images"), "-n", "4", "--no-masking", "--truth-query", "question", "--out", str(tmp_path / "out"), "--quiet", "--threads", "1"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    truth = json.loads((tmp_path / "out" / "analysis.json").read_text())["attention_truth"]
    assert truth["n_grounded"] == 0 and truth["grounding"] == {} and truth["late_review"] == {}
    assert truth["noise"]["n_samples"] == 4
    assert "no ground truth in this data" in printed and truth["query"].startswith("mean over the text tokens")


@pytest.mark.parametrize("extra, message", [(["--noise-top", "0"], "--noise-top"), (["--noise-rate", "1.5"], "--noise-rate"),
                                            (["--noise-floor", "-1"], "--noise-floor"), (["--review-tol", "nan"], "--review-tol")])  # fmt: skip
def test_bad_attention_truth_options_are_one_line_errors(setup, capsys, extra, message):
    d, data = setup
    rc = main(["analyze", "--model", str(d / "model"), "--data", str(data / "test.json"), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0], err
