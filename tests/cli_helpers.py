"""Running the CLI in-process and checking that bad input is refused cleanly."""

from __future__ import annotations

from pathlib import Path

from onnxprune.cli import main


def run(args, capsys):
    """(exit code, stdout, stderr) of `onnxprune ARGS`."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and not p.is_symlink()}


def assert_refused(args, needle, capsys, directory: Path, output: Path | None = None):
    """Exit 2, one stderr line containing `needle`, no traceback, nothing written or changed."""
    before = snapshot(directory)
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert "Traceback" not in err
    assert "could not process" not in err, f"internal error instead of a clean refusal: {err}"
    if output is not None:
        assert not output.exists()
    assert snapshot(directory) == before
    return err
