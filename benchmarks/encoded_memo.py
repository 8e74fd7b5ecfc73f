"""What reading train.json costs the first time and once it is kept (`dpvr.data.memo`): every sample
read through a LlavaJsonDataset twice, the second time by a new dataset on the same samples (as the
next run of `dpvr reproduce` in the same process reads them).

    python3 benchmarks/encoded_memo.py       # prints JSON: seconds per pass and the MiB kept

Figures are in docs/train.md ("Encoded samples")."""
import argparse
import json
import time

from transformers import AutoProcessor

from dpvr.data.digit_scenes import open_benchmark
from dpvr.data.llava_json import LlavaJsonDataset, load_samples
from dpvr.data.memo import MEMO
from dpvr.loading import resolve_model_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=None, help="the first N train.json samples only (default: all)")
    p.add_argument("--data", default=None, help="digit-scenes benchmark dir (default: the seed-0 one, built if missing)")
    p.add_argument("--model", default=None, help="checkpoint dir whose processor encodes (default: the embedded model)")
    args = p.parse_args(argv)
    root = open_benchmark(args.data, 0)
    processor = AutoProcessor.from_pretrained(resolve_model_path(args.model))
    samples = load_samples(root / "train.json")[: args.samples]
    seconds = []
    for _ in ("first", "again"):
        data = LlavaJsonDataset(samples, root / "images", processor, skip_markers=True)
        start = time.perf_counter()
        for i in range(len(data)):
            data[i]
        seconds.append(round(time.perf_counter() - start, 2))
    print(json.dumps({"samples": len(samples), "first_pass_s": seconds[0], "second_pass_s": seconds[1],
                      "kept_mib": round(MEMO.used / 2**20, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
