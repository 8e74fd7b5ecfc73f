"""What reading train.json costs the first time and once it is kept (`dpvr.data.memo`): every sample
read through a LlavaJsonDataset twice, the second time by a new dataset on the same samples (as the
next run of `dpvr reproduce` in the same process reads them).

    python3 benchmarks/encoded_memo.py       # prints JSON: seconds per pass and the MiB kept

Figures are in docs/train.md ("Encoded samples")."""
import argparse
import json
import time

from _common import add_data_options, train_samples

from dpvr.data.llava_json import LlavaJsonDataset
from dpvr.data.memo import MEMO


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_options(p)
    root, processor, samples = train_samples(p.parse_args(argv))
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
