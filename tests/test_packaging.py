"""Packaging: what a source archive of the project holds. (Not marked `build`: the GPU check
runs those, and this needs no GPU.)"""

import os
import subprocess
import sys


def test_source_archive_carries_every_source_file(tmp_path):
    """setup.py lists only translation units; MANIFEST.in must bring the headers, or a source
    archive cannot compile."""
    import shutil
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # From a copy without the build's leftovers: an old *.egg-info/SOURCES.txt would list the
    # files MANIFEST.in should.
    source = tmp_path / "source"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", "results"))
    env = dict(os.environ, FUSEDSKIP_FORCE_CPU="1")
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
                          cwd=source, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (archive,) = tmp_path.glob("fusedskip-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = set()
    for folder in ("csrc", os.path.join("benchmarks", "cutlass_configs")):
        for parent, _, files in os.walk(os.path.join(root, folder)):
            wanted |= {os.path.relpath(os.path.join(parent, f), root) for f in files
                       if f.endswith((".h", ".cuh", ".cu", ".cpp"))}
    assert wanted and not wanted - packed, sorted(wanted - packed)
    assert {"setup.py", "pyproject.toml", "tests/conftest.py", "README.md"} <= packed
