"""Fetch the MSLR-WEB10K Fold-1 test sample: 43 queries disjoint from the training sample.

    python bench/fetch_mslr_test.py [--out artifacts/data/mslr-web10k-fold1-test-5k.txt]

The training sample in ../shared/data/mslr-web10k-sample is `msn1.fold1.train.5k.txt` from the
rankeval 0.8.2 source distribution on PyPI (MPL-2.0); the same archive ships
`msn1.fold1.test.5k.txt`, the first 5,000 rows of Fold 1's test file. This script downloads that
archive from PyPI (the only network this project's machines reach), checks its sha256 against the
pinned value and extracts the one file. `bench/quality_bench.py --test FILE` then trains every
method on the whole training sample and scores these queries, which nothing was tuned on.
MSLR is research data: cite Qin & Liu 2013 (arXiv:1306.2597) where results are reported.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

URL = (
    "https://files.pythonhosted.org/packages/79/a7/436c3492eb252df3a3747fa675e5781bc7c89c56e508ecbaf3b2c79f1e54/"
    "rankeval-0.8.2.tar.gz"
)
SHA256 = "c7d71602ab7fe0a0281976c1f0e883cb16431f72e4e946e5fd83790449bb21a9"
MEMBER = "rankeval-0.8.2/rankeval/test/data/msn1.fold1.test.5k.txt"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "artifacts" / "data" / "mslr-web10k-fold1-test-5k.txt"


def extract(archive: bytes, out: Path) -> Path:
    digest = hashlib.sha256(archive).hexdigest()
    if digest != SHA256:
        raise ValueError(f"rankeval-0.8.2.tar.gz has sha256 {digest}, expected {SHA256}")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        f = tar.extractfile(MEMBER)
        if f is None:
            raise ValueError(f"{MEMBER} is not a file in the archive")
        data = f.read()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists")
        return args.out
    with urllib.request.urlopen(URL, timeout=120) as r:
        archive = r.read()
    out = extract(archive, args.out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return out


if __name__ == "__main__":
    main()
