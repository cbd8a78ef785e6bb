"""Time `store.verify` of a record holding one unchanged 2 GB file: the check every model load and
table build makes. The record is committed through the store (its file is hashed then, as a stage's
checkpoint is), then verified several times; each verification after the first trusts the stat
cache (filehash.py) and reads nothing. Prints the times; the last line is the median.

    python benchmarks/verify_scale.py [--gb 2] [--real] [--dir /tmp]

--real writes random bytes (real disk traffic, real hashing time at commit); the default is a
sparse file, which costs no disk space and hashes at memory speed. A private QUANTPIPE_HOME is
used, so the user's cache is not touched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--real", action="store_true", help="random bytes instead of a sparse file")
    ap.add_argument("--dir", default=None, help="where the record is written (default: the system temp folder)")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        os.environ["QUANTPIPE_HOME"] = str(Path(tmp) / "home")
        from pipeline import filehash
        from pipeline.store import cached, verify

        size = int(a.gb * 1e9)

        def compute(folder: Path) -> dict:
            f = folder / "model.safetensors"
            if a.real:
                with open(f, "wb") as out:
                    left = size
                    while left:
                        out.write(os.urandom(min(left, 64 << 20)))
                        left -= min(left, 64 << 20)
            else:
                with open(f, "wb") as out:
                    out.truncate(size)
            return {}

        t = time.perf_counter()
        rec, _ = cached(Path(tmp) / "rec", "key", compute, "benchmark")
        commit = time.perf_counter() - t
        margin = filehash.RACY_NS / 1e9
        print(f"commit (write + one hash of {size / 1e9:.1f} GB, waiting out {margin:.0f} s of timestamp margin): {commit:.2f} s")
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            found, why = verify(rec.path, "key")
            times.append(time.perf_counter() - t)
            assert found is not None, why
        print("verify, unchanged:", ", ".join(f"{x * 1e3:.2f} ms" for x in times))
        cold = time.perf_counter()
        filehash.sha256_file(rec.path / "model.safetensors")
        print(f"for comparison, re-hashing the file as verify did before: {time.perf_counter() - cold:.2f} s")
        print(f"median verify of an unchanged {size / 1e9:.1f} GB record: {statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
