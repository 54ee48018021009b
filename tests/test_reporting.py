"""Reports people read: the JSON schema as documented, and the self-contained HTML page, rendered
in headless Chromium when it is installed."""

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import small_cnn
from onnxprune.cli import main
from onnxprune.html_report import html_page, sensitivity_curves

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "report-schema.md"
SENSITIVITY = {"groups": [{"group": "g0", "ratios": [0.0, 0.25, 0.5], "accuracy": [0.99, 0.95, 0.7]},
                          {"group": "g1", "points": [{"ratio": 0.0, "accuracy": 0.99},
                                                     {"ratio": 0.5, "accuracy": 0.9}]}]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One CLI run with every report option, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("report")
    model = tmp / "m.onnx"
    onnx.save(small_cnn(), model)
    (tmp / "sens.json").write_text(json.dumps(SENSITIVITY))
    args = ["prune", model, "-o", tmp / "p.onnx", "--ratio", "0.5", "--verify", "--atol", "1e3", "--bench",
            "--quantize", "dynamic", "--report", tmp / "r.json", "--html", tmp / "r.html",
            "--sensitivity", tmp / "sens.json"]
    assert main([str(a) for a in args]) == 0
    return tmp, json.loads((tmp / "r.json").read_text()), (tmp / "r.html").read_text()


def _documented_keys(section: str) -> set[str]:
    text = SCHEMA_DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return {k for row in re.findall(r"^\| (`[^|]+`) \|", text, re.M) for k in re.findall(r"`(\w+)`", row)}


def test_json_report_matches_documented_schema(full_run):
    _, report, _ = full_run
    assert report["report_version"] == 1
    assert set(report) == _documented_keys("Top-level fields") - {"distill", "rounds"}  # --distill, --steps only
    assert set(report["verify"]) == _documented_keys("`verify`")
    for figures in report["models"].values():
        assert set(figures) == _documented_keys("`models`")
    for layer in report["layers"]:
        assert set(layer) == _documented_keys("`layers[]`")
    assert list(report["models"]) == ["original", "pruned", "quantized"]
    assert sum(layer["removed"] for layer in report["layers"]) == report["channels_removed"]


def test_html_is_self_contained_and_has_the_charts(full_run):
    _, report, page = full_run
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(", page, re.I)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    chart = page.split('id="layer-chart"', 1)[1].split("</svg>", 1)[0]
    assert chart.count('class="kept"') == sum(1 for g in report["layers"] if not g["frozen"])
    assert chart.count('class="removed"') == sum(1 for g in report["layers"] if g["removed"])
    assert page.count('class="curve"') == 2
    assert "PASSED" in page and "pruned+int8" in page
    frozen = page.split('<table id="frozen">', 1)[1].split("</table>", 1)[0]
    assert frozen.count("<tr>") - 1 == sum(1 for g in report["layers"] if g["frozen"]) > 0


def test_sensitivity_shapes_are_read_defensively():
    shapes = [SENSITIVITY, SENSITIVITY["groups"], {"curves": {"g0": {"0.1": 1.0, "0.5": 2.0}}},
              {"g0": [[0.1, 1.0], [0.5, 2.0]]}]
    for data in shapes:
        curves = sensitivity_curves(data)
        assert curves and all(len(c.ratios) == len(c.values) >= 2 for c in curves), data
    assert sensitivity_curves({"groups": [{"group": "x", "ratios": [0.1], "error": [1.0]}]}) == []
    for junk in (None, 3, "text", [1, 2], {"groups": "nope"}, {"g": {"a": "b"}},
                 {"groups": [{"ratios": [0, 1], "error": [float("nan"), 1]}]}):
        assert sensitivity_curves(junk) == []


def test_reads_what_onnxprune_sensitivity_writes():
    sens = pytest.importorskip("onnxprune.sensitivity")
    result = sens.sensitivity(small_cnn(), ratios=(0.25, 0.5), quiet=True)
    data = json.loads(json.dumps(result.to_json()))
    curves = sensitivity_curves(data)
    assert len(curves) == len(result.groups) > 0
    for curve, group in zip(curves, result.ranked()):
        assert curve.name == group.key and curve.metric == "error"
        assert curve.ratios == [0.0, 0.25, 0.5] and curve.values[1:] == pytest.approx(group.error)


def test_unreadable_sensitivity_file_is_exit_2(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), model)
    (tmp_path / "s.json").write_text("{not json")
    code = main(["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--html", str(tmp_path / "r.html"),
                 "--sensitivity", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert code == 2 and "sensitivity" in err and len(err.strip().splitlines()) == 1


def test_failed_verification_still_writes_the_page(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), model)
    page = tmp_path / "r.html"
    code = main(["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--verify", "--atol", "1e-9", "--rtol", "0",
                 "--html", str(page)])
    assert code == 1 and not (tmp_path / "p.onnx").exists()
    text = page.read_text()
    assert 'class="fail">FAILED' in text and 'id="layer-chart"' in text


def test_html_without_optional_sections_still_renders():
    result = onnxprune.prune(small_cnn(), ratio=0.5)
    page = html_page(result.report, sensitivity_curves({"junk": 1}))
    assert 'id="layer-chart"' in page and "no curves" in page and "Not requested" in page


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    return path


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=60)


def test_page_renders_in_headless_chromium(full_run, tmp_path):
    chromium = _chromium()
    run_dir, report, _ = full_run
    url = (run_dir / "r.html").as_uri()
    dom = _headless(chromium, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-500:]
    chart = dom.stdout.split('id="layer-chart"', 1)[1].split("</svg>", 1)[0]
    assert chart.count("<rect") >= len(report["layers"])
    assert dom.stdout.count("<polyline") == 2
    shot = tmp_path / "page.png"
    proc = _headless(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=900,1200", url)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-500:]
    pixels = _png_pixels(shot.read_bytes())
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 20  # text, bars and curves, not a blank page
    kept_blue = np.all(np.abs(pixels[..., :3].astype(int) - (0x1f, 0x77, 0xb4)) <= 2, axis=-1)
    assert kept_blue.sum() > 500  # the kept-channel bars are drawn


def _png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) without extra packages."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0
    channels = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * channels)
    out = np.zeros((height, width * channels), dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros_like(line)
        if kind == 0:
            out[y] = line
        elif kind == 2:
            out[y] = (line + up) % 256
        else:  # Sub, Average and Paeth depend on the left neighbour: walk the row
            row = np.zeros_like(line)
            for x in range(len(line)):
                left = row[x - channels] if x >= channels else 0
                ul = up[x - channels] if x >= channels else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up[x]) // 2
                else:
                    p = left + up[x] - ul
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else ul)
                row[x] = (line[x] + pred) % 256
            out[y] = row
    return out.reshape(height, width, channels).astype(np.uint8)
