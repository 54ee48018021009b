"""Config files: the keys are the prune keyword arguments; explicit flags override the file."""

import json

import onnx
import pytest

import onnxprune
from builders import small_cnn
from onnxprune.cli import main
from onnxprune.config import load_config, option_names


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_cnn(), path)
    return path


def _removed(tmp_path, model_path, *extra) -> int:
    report = tmp_path / "r.json"
    code = main(["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--report", str(report), *map(str, extra)])
    assert code == 0
    return json.loads(report.read_text())["channels_removed"]


def test_keys_are_exactly_the_prune_keywords_and_cli_dests():
    import inspect

    from onnxprune.config import _prune_actions

    keywords = [n for n, p in inspect.signature(onnxprune.prune).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert option_names() == keywords
    assert set(keywords) <= set(_prune_actions())


def test_json_config_equals_the_same_flags(tmp_path, model_path):
    cfg = tmp_path / "prune.json"
    cfg.write_text(json.dumps({"ratio": 0.25, "scope": "global", "criterion": "l2"}))
    from_file = _removed(tmp_path, model_path, "--config", cfg)
    from_flags = _removed(tmp_path, model_path, "--ratio", "0.25", "--scope", "global", "--criterion", "l2")
    assert from_file == from_flags != _removed(tmp_path, model_path)


def test_explicit_flag_overrides_file_even_at_its_default_value(tmp_path, model_path):
    cfg = tmp_path / "prune.json"
    cfg.write_text(json.dumps({"ratio": 0.75}))
    assert _removed(tmp_path, model_path, "--config", cfg, "--ratio", "0.5") == _removed(tmp_path, model_path)
    assert _removed(tmp_path, model_path, "--config", cfg) > _removed(tmp_path, model_path)


def test_yaml_config_and_python_use(tmp_path, model_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "prune.yaml"
    cfg.write_text("ratio: 0.25\nexclude: Conv*\nverify: true\natol: 1000\n")
    options = load_config(cfg)
    assert options == {"ratio": 0.25, "exclude": ["Conv*"], "verify": True, "atol": 1000.0}
    result = onnxprune.prune(model_path, **options)
    assert result.report.verify is not None
    assert any("excluded by user" in reason for g in result.report.layers for reason in g["frozen"])
    assert _removed(tmp_path, model_path, "--config", cfg) == result.report.channels_removed


@pytest.mark.parametrize("text,suffix,needle", [
    ('{"ratoi": 0.5}', ".json", "unknown option 'ratoi'"),
    ('{"output": "x.onnx"}', ".json", "unknown option 'output'"),
    ('{"ratio": "half"}', ".json", "expects float"),
    ('{"scope": "everywhere"}', ".json", "expects one of local, global"),
    ('{"verify": "yes"}', ".json", "expects true or false"),
    ('[1, 2]', ".json", "mapping"),
    ('{bad json', ".json", "invalid JSON"),
    ("ratio = 0.5", ".toml", "must end in"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, model_path, capsys, text, suffix, needle):
    cfg = tmp_path / f"prune{suffix}"
    cfg.write_text(text)
    code = main(["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.onnx").exists()


def test_missing_config_file(tmp_path, model_path, capsys):
    code = main(["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--config", str(tmp_path / "no.yaml")])
    assert code == 2 and "cannot read config" in capsys.readouterr().err
