"""Research code (issue 16): digit scenes written in words, for a text-only LM stage.

A scene is a GxG grid of cells, each a digit or empty, written as
    "top left 3 , top right none , ... ."
followed by question/answer turns from every family of the benchmark (POPE, MME, MMBench, count,
spatial) plus a denser one, "where is the 7 ?" -> "top left and bottom right" / "nowhere".
Tokens are words; ids come from a fixed vocabulary built here.
"""
from __future__ import annotations

import numpy as np

from dpvr.data.digit_scenes import digit_popularity

ROWS = {2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}
COLS = {2: ["left", "right"], 3: ["left", "middle", "right"]}
FAMILIES = ["pope", "mme", "mmbench", "count", "spatial", "where", "probe"]
SPECIAL = ["<pad>", "<s>", "</s>", "<img>"]


def positions(grid: int) -> list[str]:
    return [f"{r} {c}" for r in ROWS[grid] for c in COLS[grid]]


def vocab() -> list[str]:
    words = SPECIAL + [str(i) for i in range(10)] + ["none", "yes", "no", "nowhere", "and", ",", ".", "?"]
    words += "top middle bottom left right is there a in the image digit cell which how many are where".split()
    words += "digits A. B. C. D. A B C D".split()
    return list(dict.fromkeys(words))


VOCAB = vocab()
ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, EOS = ID["<pad>"], ID["<s>"], ID["</s>"]


def cell_word(d: int) -> str:
    return "none" if d < 0 else str(d)


class World:
    """Scenes and questions, seeded by the caller's rng."""

    def __init__(self, grid: int, p_empty: float = 0.25, seed: int = 0, weights: dict | None = None, form: str = "named"):
        """form: "named" ("top left 3 , top right none , ... ."), "bare" (one word per cell in reading
        order, then "."), or "patchK" (each cell's word repeated KxK times in patch raster order, the
        layout of image tokens for a cell of KxK patches, then ".")."""
        self.grid, self.p_empty, self.form = grid, p_empty, form
        self.pos = positions(grid)
        self.popularity = digit_popularity(seed)
        self.popular = list(np.argsort(-self.popularity, kind="stable"))
        w = weights or {f: 1.0 for f in FAMILIES}
        self.fam = [f for f in FAMILIES if w.get(f, 0) > 0]
        p = np.array([w[f] for f in self.fam], dtype=float)
        self.fam_p = p / p.sum()

    def scene(self, rng, max_filled: int | None = None) -> list[int]:
        n = self.grid * self.grid
        cells = [-1 if rng.random() < self.p_empty else int(rng.choice(10, p=self.popularity)) for _ in range(n)]
        if max_filled is not None:  # curriculum: keep at most max_filled digits
            filled = [i for i, d in enumerate(cells) if d >= 0]
            for i in rng.permutation(filled)[max_filled:]:
                cells[int(i)] = -1
        return cells

    def scene_words(self, cells) -> list[str]:
        if self.form == "bare":
            return [cell_word(d) for d in cells] + ["."]
        if self.form.startswith("patch"):
            k, g = int(self.form[5:]), self.grid
            return [cell_word(cells[(r // k) * g + c // k]) for r in range(g * k) for c in range(g * k)] + ["."]
        out = []
        for k, d in enumerate(cells):
            out += self.pos[k].split() + [cell_word(d), "," if k < len(cells) - 1 else "."]
        return out

    # ---- questions: (family, question words, answer words, extra) ----
    def ask(self, rng, cells, fam: str):
        present = sorted({d for d in cells if d >= 0})
        absent = [d for d in range(10) if d not in present]
        filled = [i for i, d in enumerate(cells) if d >= 0]
        pos_ = rng.random() < 0.5
        if fam == "pope":
            if pos_ and present:
                d, sub = int(rng.choice(present)), "pos"
            elif rng.random() < 0.5:
                d, sub = next(x for x in self.popular if x in absent), "popular"
            else:
                d, sub = int(rng.choice(absent)), "random"
            return fam, f"is there a {d} in the image ?".split(), ["yes" if d in present else "no"], sub
        if fam == "mme":
            if rng.random() < 0.5 and filled:
                i = int(rng.choice(filled))
                d = cells[i] if pos_ else int(rng.choice([x for x in range(10) if x != cells[i]]))
                return fam, f"is the digit in the {self.pos[i]} cell a {d} ?".split(), ["yes" if d == cells[i] else "no"], "position"
            k = len(filled) if pos_ else int(rng.choice([x for x in range(len(cells) + 1) if x != len(filled)]))
            return fam, f"are there {k} digits in the image ?".split(), ["yes" if k == len(filled) else "no"], "count"
        if fam == "mmbench":
            i = int(rng.integers(len(cells)))
            truth = cell_word(cells[i])
            others = [x for x in [*map(str, range(10)), "none"] if x != truth]
            opts = [truth, *rng.choice(others, size=3, replace=False).tolist()]
            opts = [opts[j] for j in rng.permutation(4)]
            q = f"which digit is in the {self.pos[i]} cell ? A. {opts[0]} B. {opts[1]} C. {opts[2]} D. {opts[3]}"
            return fam, q.split(), ["ABCD"[opts.index(truth)]], ""
        if fam == "count":
            return fam, "how many digits are in the image ?".split(), [str(len(filled))], ""
        if fam == "spatial":
            i = int(rng.choice(filled)) if filled and rng.random() < 0.8 else int(rng.integers(len(cells)))
            return fam, f"which digit is in the {self.pos[i]} cell ?".split(), [cell_word(cells[i])], ""
        if fam == "where":
            d = int(rng.choice(present)) if (pos_ and present) else int(rng.choice(absent))
            where = [self.pos[i] for i, x in enumerate(cells) if x == d]
            return fam, f"where is the {d} ?".split(), (" and ".join(where) or "nowhere").split(), ""
        if fam == "probe":  # compact POPE: the digit alone, answered right after it (one hop)
            d = int(rng.choice(present)) if (pos_ and present) else int(rng.choice(absent))
            return fam, [str(d)], ["yes" if d in present else "no"], ""
        raise ValueError(fam)

    def sequence(self, rng, turns: int, max_filled=None, fams=None, cells=None):
        """(ids, labels-mask, per-answer spans) for one scene and `turns` QA turns."""
        cells = self.scene(rng, max_filled) if cells is None else cells
        words = ["<s>"] + self.scene_words(cells)
        mask = [0] * len(words)
        spans = []
        for t in range(turns):
            fam = fams[t] if fams else str(rng.choice(self.fam, p=self.fam_p))
            f, q, a, extra = self.ask(rng, cells, fam)
            words += q
            mask += [0] * len(q)
            start = len(words)
            words += a + ["</s>"]
            mask += [1] * (len(a) + 1)
            spans.append((f, start, len(a), extra, a))
        return [ID[w] for w in words], mask, spans


def batch(world: World, rng, size: int, turns: int, max_filled=None, fams=None, scenes=None):
    """Right-padded (ids, labels) tensors; labels are -100 except on answers (+ their </s>).
    `scenes`: the cells of each sequence (default: drawn here)."""
    import torch

    scenes = scenes or [None] * size
    seqs = [world.sequence(rng, turns, max_filled, fams, cells) for cells in scenes]
    L = max(len(s[0]) for s in seqs)
    ids = torch.full((size, L), PAD, dtype=torch.long)
    lab = torch.full((size, L), -100, dtype=torch.long)
    for b, (x, m, _) in enumerate(seqs):
        ids[b, : len(x)] = torch.tensor(x)
        lab[b, : len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, m)])
    return ids, lab, [s[2] for s in seqs]


TINTS = [(255, 255, 255), (255, 96, 96), (96, 255, 96), (112, 160, 255), (255, 224, 64)]


def render(grid: int, cells, scans, tints, images) -> np.ndarray:
    """(16G, 16G, 3) float image in [0, 1]: each scan upscaled 2x and tinted, as dpvr's digit scenes
    (which are fixed at 2x2) draw them."""
    canvas = np.zeros((16 * grid, 16 * grid, 3))
    for i, (d, s) in enumerate(zip(cells, scans)):
        if d < 0:
            continue
        ink = np.kron(images[s] / 16.0, np.ones((2, 2)))
        r, c = divmod(i, grid)
        canvas[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = ink[..., None] * np.asarray(TINTS[tints[i]]) / 255.0
    return canvas


def main(argv: list[str] | None = None) -> None:
    """Print one scene and its question-answer turns, as the text stage sees them."""
    import argparse

    p = argparse.ArgumentParser(description="One worded digit scene and its QA turns (the text stage's input).")
    p.add_argument("--grid", type=int, default=2, choices=sorted(ROWS))
    p.add_argument("--form", default="named", help="named | bare | patchK")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ids, _, spans = World(args.grid, form=args.form).sequence(np.random.default_rng(args.seed), args.turns)
    print(" ".join(VOCAB[i] for i in ids))
    for fam, _, _, _, answer in spans:
        print(f"{fam}: {' '.join(answer)}")


if __name__ == "__main__":
    main()
