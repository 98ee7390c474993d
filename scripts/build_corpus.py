"""Build train/validation/test text files from the Python documentation sources.

    python scripts/build_corpus.py --out data/pydoc            # full corpus via apt-get download
    python scripts/build_corpus.py --source DIR --out data/x   # any directory of .rst.txt files
    python scripts/build_corpus.py --sample --out data/sample  # the built-in 288 KB sample
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen35_jax import corpus


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--source", type=Path, help="a directory of .rst.txt documents")
    group.add_argument("--sample", action="store_true", help="use the built-in tutorial sample")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fraction", type=float, default=0.05, help="fraction of files for validation and for test")
    args = ap.parse_args(argv)
    if args.sample:
        source = corpus.sample_dir()
    elif args.source is not None:
        source = args.source
    else:
        source = corpus.fetch_python_docs(args.out)
    paths = corpus.write_splits(source, args.out, args.fraction)
    for split, path in paths.items():
        print(f"{split:10s} {path.stat().st_size / 1e6:7.2f} MB  {path}")


if __name__ == "__main__":
    main()
