#!/usr/bin/env python3
"""Fetch llama.cpp's source from PyPI (the `llama-cpp-python` sdist ships the whole llama.cpp tree under
vendor/llama.cpp; the git repository itself is too large to fetch here) and unpack it to DEST/llama.cpp.

Usage: python3 scripts/peers/fetch_llama_cpp.py DEST [VERSION]   (default: 0.3.36, llama.cpp commit 0c1e570)
"""
import hashlib
import io
import re
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

dest = Path(sys.argv[1])
version = sys.argv[2] if len(sys.argv) > 2 else "0.3.36"
index = "https://pypi.org/simple/llama-cpp-python/"
name = f"llama_cpp_python-{version}.tar.gz"
html = urllib.request.urlopen(index, timeout=60).read().decode()
href = re.search(rf'href="([^"]*/{re.escape(name)}#sha256=([0-9a-f]+))"', html)
if href is None:
    sys.exit(f"{name} is not in {index}")
url, sha = urllib.parse.urljoin(index, href.group(1)), href.group(2)
data = urllib.request.urlopen(url, timeout=600).read()
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f"{name}: sha256 differs from the index's {sha}")
prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
out = dest / "llama.cpp"
if out.exists():
    shutil.rmtree(out)
with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
    members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
    for m in members:
        m.name = m.name[len(prefix):]
    tar.extractall(out, members=[m for m in members if m.name], filter="data")
print(f"llama.cpp from {name} ({len(data) / 1e6:.1f} MB, sha256 {sha[:12]}…) in {out}")
