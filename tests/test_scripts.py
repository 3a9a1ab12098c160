"""The GPU scripts, checked where CI can: they parse, the GPU check refuses cleanly without a GPU,
and the source hash a prebuilt extension is matched by changes with every source and nothing
else (a GPU run must never test kernels other than the sources beside them)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_gpu_check_without_a_gpu_says_so(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                            text=True, timeout=300,
                            env=dict(os.environ, OUT=str(out), PYTHON=sys.executable))
    assert result.returncode == 2, result.stdout + result.stderr
    assert (out / "summary.md").read_text().strip() == \
        "gpu_check: torch sees no GPU here; nothing to check"


def _stamp(tree):
    result = subprocess.run(["bash", str(tree / "scripts" / "source_stamp.sh")],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_source_stamp_follows_the_sources_and_nothing_else(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "source_stamp.sh", tmp_path / "scripts")
    (tmp_path / "setup.py").write_text("setup()\n")
    for folder in ("csrc/cuda", "benchmarks/cutlass_configs"):
        (tmp_path / folder).mkdir(parents=True)
    sources = ["setup.py", "csrc/ops.cpp", "csrc/epilogue.h", "csrc/cuda/k.cu", "csrc/cuda/k.cuh",
               "benchmarks/cutlass_configs/bindings.cpp"]
    for name in sources[1:]:
        (tmp_path / name).write_text("// source\n")
    (tmp_path / "csrc" / "README.txt").write_text("not a source\n")

    first = _stamp(tmp_path)
    assert len(first) == 64 and int(first, 16) >= 0
    (tmp_path / "csrc" / "README.txt").write_text("changed, still not a source\n")
    assert _stamp(tmp_path) == first
    seen = {first}
    for name in sources:
        (tmp_path / name).write_text((tmp_path / name).read_text() + "// changed\n")
        seen.add(_stamp(tmp_path))
    (tmp_path / "csrc" / "new.cpp").write_text("// a new source\n")
    seen.add(_stamp(tmp_path))
    assert len(seen) == len(sources) + 2
