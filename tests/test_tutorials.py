"""Executable docs: every tutorial in docs/tutorials/ runs as written, so the docs cannot rot.

Each ```bash and ```python block of a tutorial runs in order, in one fresh temporary directory per
tutorial, with ONNXPRUNE_REPO set to the repository root and this interpreter's `onnxprune` and
`python` first on PATH. Every block is its own process: files carry over from block to block,
Python variables do not. Blocks tagged anything else (```text, ```console) are not run. A tutorial
whose text holds `<!-- requires: mod1, mod2 -->` is skipped when a module is missing, and is marked
`zoo` (torch, torchvision, transformers), `keras` (tensorflow, keras, tf2onnx) or `ray` like the export tests.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
BLOCK = re.compile(r"^```(bash|python)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
REQUIRES = re.compile(r"<!--\s*requires:\s*(.*?)\s*-->")
MARKERS = {"zoo": {"torch", "torchvision", "transformers", "onnxscript"},
           "keras": {"tensorflow", "keras", "tf2onnx"}, "ray": {"ray"}}
BLOCK_TIMEOUT_S = 300


def requirements(text: str) -> list[str]:
    found = REQUIRES.search(text)
    return [m.strip() for m in found.group(1).split(",") if m.strip()] if found else []


def _param(path: Path):
    needs = set(requirements(path.read_text()))
    marks = [getattr(pytest.mark, name) for name, modules in MARKERS.items() if needs & modules]
    return pytest.param(path, marks=marks, id=path.stem)


def test_block_parser_finds_tagged_blocks_only():
    text = "x\n```bash\necho 1\n```\n```text\nnot run\n```\n```python\nprint(2)\n```\n<!-- requires: a, b -->"
    assert [lang for lang, _ in BLOCK.findall(text)] == ["bash", "python"]
    assert requirements(text) == ["a", "b"]


@pytest.mark.parametrize("tutorial", [_param(p) for p in TUTORIALS])
def test_tutorial_runs(tutorial: Path, tmp_path):
    text = tutorial.read_text()
    for module in requirements(text):
        pytest.importorskip(module, reason=f"{tutorial.name} needs {module}")
    blocks = BLOCK.findall(text)
    assert blocks, f"{tutorial.name} has no ```bash or ```python block"
    run_blocks(tutorial.name, blocks, tmp_path)


def test_readme_pipeline_section_runs(tmp_path):
    """The README's newcomer path, minus `pip install` (the suite runs on an installed package)."""
    section = (ROOT / "README.md").read_text().split("## Pipeline", 1)[1].split("\n## ", 1)[0]
    blocks = [(lang, "\n".join(line for line in code.splitlines() if not line.startswith("pip install")))
              for lang, code in BLOCK.findall(section)]
    assert blocks, "README has no runnable Pipeline block"
    run_blocks("README.md", blocks, tmp_path)
    for name in ("pruned.onnx", "pruned.int8.onnx", "report.json", "report.html"):
        assert (tmp_path / name).stat().st_size > 0, name


def run_blocks(source: str, blocks: list[tuple[str, str]], workdir: Path) -> None:
    """Run each block in its own process, in order, in `workdir`; fail with the block's output."""
    env = dict(os.environ, ONNXPRUNE_REPO=str(ROOT), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for number, (lang, code) in enumerate(blocks, 1):
        if lang == "bash":
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            script = workdir / f".block{number}.py"
            script.write_text(code)
            command = [sys.executable, str(script)]
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        assert proc.returncode == 0, (f"{source}: {lang} block {number} exited {proc.returncode}\n"
                                      f"{code}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
