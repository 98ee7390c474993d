"""Text corpora: the built-in sample, the full Python documentation corpus, deterministic splits.

The corpus is English technical prose: the reStructuredText sources of the Python 3.11 documentation
(Debian's ``python3.11-doc``, about 12 MB). The package ships three parts of it (tutorial, FAQ, howto:
46 files, 1.2 MB, 298 KB as ``.tar.xz``) as a sample, unpacked on first use into the cache directory,
so tests and the default ablation model never need the network. ``fetch_python_docs`` gets the
full corpus with ``apt-get download`` where Debian's archive is reachable.

Splits are by *file* (a document never straddles two splits) and depend only on the files' relative
paths: files are ordered by the SHA-1 of their path, the first ``ceil(5%)`` go to validation, the next
``ceil(5%)`` to test, the rest to train (at least one file each when there are three or more).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

SPLITS = ("train", "validation", "test")
DOC_SUFFIX = ".rst.txt"
SAMPLE_ARCHIVE = Path(__file__).parent / "data" / "python_docs_sample.tar.xz"
SAMPLE_VERSION = "python_docs_sample-v2"
PYDOC_PACKAGE = "python3.11-doc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


class CorpusError(ValueError):
    """A corpus directory or split that cannot be used."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qwen35_jax`` (default ``~/.cache/qwen35_jax``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen35_jax"


def sample_dir() -> Path:
    """The built-in sample corpus (Python tutorial, FAQ and howto sources), unpacked on first use."""
    target = cache_dir() / SAMPLE_VERSION
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=SAMPLE_VERSION + ".", dir=target.parent))
    with tarfile.open(SAMPLE_ARCHIVE, "r:xz") as tar:
        for member in tar.getmembers():  # our own archive, but refuse anything outside the target
            if not (member.isfile() or member.isdir()) or member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                raise CorpusError(f"{SAMPLE_ARCHIVE}: unexpected member {member.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the safe extraction filter
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent first use sees all files or none
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def list_documents(source: str | Path) -> list[Path]:
    """Every ``*.rst.txt`` file under ``source``, sorted by relative path."""
    source = Path(source)
    if not source.is_dir():
        raise CorpusError(f"{source}: corpus directory does not exist")
    files = sorted(p for p in source.rglob(f"*{DOC_SUFFIX}") if p.is_file())
    if not files:
        raise CorpusError(f"{source}: no {DOC_SUFFIX} documents found")
    return files


def split_documents(source: str | Path, fraction: float = 0.05) -> dict[str, list[Path]]:
    """``{split: [files]}``, deterministic by the SHA-1 of each file's path relative to ``source``."""
    source = Path(source)
    files = list_documents(source)
    if len(files) < 3:
        raise CorpusError(f"{source}: {len(files)} document(s); at least 3 are needed for train/validation/test")
    keyed = sorted(files, key=lambda p: hashlib.sha1(p.relative_to(source).as_posix().encode()).hexdigest())
    n = max(1, math.ceil(fraction * len(files)))
    return {"validation": sorted(keyed[:n]), "test": sorted(keyed[n:2 * n]), "train": sorted(keyed[2 * n:])}


def read_split(source: str | Path, split: str, fraction: float = 0.05) -> list[str]:
    """The documents of one split as strings (UTF-8)."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of {SPLITS}")
    return [p.read_text(encoding="utf-8") for p in split_documents(source, fraction)[split]]


def write_splits(source: str | Path, out_dir: str | Path, fraction: float = 0.05) -> dict[str, Path]:
    """Write ``train.txt``, ``validation.txt``, ``test.txt`` (documents joined by blank lines) and a
    ``manifest.txt`` of which file went where. Refuses to overwrite existing split files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = split_documents(source, fraction)
    paths = {s: out_dir / f"{s}.txt" for s in SPLITS}
    for p in [*paths.values(), out_dir / "manifest.txt"]:
        if p.exists():
            raise CorpusError(f"{p} exists; refusing to overwrite (choose another --out)")
    for s in SPLITS:
        paths[s].write_text("\n\n".join(p.read_text(encoding="utf-8") for p in splits[s]), encoding="utf-8")
    (out_dir / "manifest.txt").write_text(
        "".join(f"{s}\t{p.relative_to(source).as_posix()}\n" for s in SPLITS for p in splits[s]), encoding="utf-8")
    return paths


def fetch_python_docs(dest: str | Path) -> Path:
    """Download Debian's ``python3.11-doc`` with ``apt-get download`` and unpack its rst sources into
    ``dest``; returns the directory of the sources."""
    dest = Path(dest)
    target = dest / "python_docs"
    if target.is_dir() and any(target.rglob(f"*{DOC_SUFFIX}")):
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError("fetching the Python docs corpus needs apt-get and dpkg-deb (a Debian/Ubuntu machine); "
                          f"or pass a directory of .rst.txt files, or use the built-in sample {SAMPLE_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(["apt-get", "download", PYDOC_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{PYDOC_PACKAGE}_*.deb"))
        if run.returncode or not debs:
            raise CorpusError(f"apt-get download {PYDOC_PACKAGE} failed: {run.stderr.strip()[-500:]}")
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        shutil.copytree(unpacked / PYDOC_SOURCES, target)
    return target
