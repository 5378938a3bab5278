#!/usr/bin/env python3
"""Pack a CPython standard library's `*.py` files into a deterministic .tar.gz training corpus.

The GPU machine's system Python (Debian/Ubuntu) ships the standard library without its test
suite (~10 MB of source), too little for glm4-moe-tiny, so the corpus is packed here from a full
CPython install and carried there:

    python3 training/pack_corpus.py /root/.pyenv/versions/3.13.0/lib/python3.13 /tmp/cpython-3.13.0-lib.tar.gz

The same files are in CPython's source tree, `Lib/` of tag v3.13.0 (PSF licence). Entries are
`Lib/<relative path>` in sorted order with fixed metadata, so the archive is byte-reproducible.
"""
import gzip
import io
import os
import sys
import tarfile

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def wanted(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
        return False
    # _sysconfigdata_* describes the build machine, not Python
    return parts[-1].endswith(".py") and not parts[-1].startswith("_sysconfigdata")


def main(src: str, out: str) -> None:
    rels = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), src).replace(os.sep, "/")
            if wanted(rel):
                rels.append(rel)
    rels.sort()
    total = 0
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in rels:
                with open(os.path.join(src, rel), "rb") as f:
                    data = f.read()
                info = tarfile.TarInfo("Lib/" + rel)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
                total += len(data)
    print(f"{len(rels)} files, {total/1e6:.1f} MB -> {out} ({os.path.getsize(out)/1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
