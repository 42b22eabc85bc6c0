"""The source distribution carries what building, packaging and testing lookupd need."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from support import REPO


def test_sdist_carries_snippets_units_tests_and_packaging(tmp_path: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / "tree"
    for name in files:
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "print(build_meta.build_sdist(sys.argv[1]))", str(out)],
                   cwd=tree, check=True, capture_output=True, timeout=120)
    (sdist,) = out.glob("lookupd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {name for name in files if not name.startswith(".")}
    assert wanted - names == set()
    assert not {n for n in names if "__pycache__" in n or n.startswith("bench/out/")}
