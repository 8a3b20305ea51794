import pytest

from forgetting_ray.errors import UserError
from forgetting_ray.config import (
    ConfigError,
    PipelineConfig,
    config_reference_markdown,
    dump_config,
    flatten,
    config_to_dict,
    load_config,
)


def test_paper_defaults():
    c = PipelineConfig()
    assert c.selection.rho == 0.7
    assert (c.training.t_max, c.training.t_min, c.training.lambda_schedule) == (0.25, 1e-5, "linear")
    lora = c.training.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (64, 16, 0.1, "all-linear")
    assert (c.training.lr, c.training.warmup_ratio, c.training.epochs) == (1e-4, 0.03, 1)
    assert c.data.max_length == 2048
    assert c.model.trust_remote_code is False


def test_every_field_has_a_description():
    table = config_reference_markdown()
    rows = [r for r in table.splitlines()[2:]]
    assert len(rows) > 60
    for r in rows:
        assert r.rstrip("| ").split("|")[-1].strip(), f"field without description: {r}"


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  lr: 3.0e-4\n  lora:\n    r: 8\ndata:\n  schema: messages\n")
    c = load_config(p, ["training.lr=2e-5", "selection.rho=0.5", "data.train_files=[a.jsonl, b.jsonl]"])
    assert c.training.lr == 2e-5 and c.training.lora.r == 8 and c.selection.rho == 0.5
    assert c.data.train_files == ["a.jsonl", "b.jsonl"] and c.data.schema_ == "messages"
    again = load_config(None, [])
    assert again.training.lr == 1e-4
    # the dump round-trips
    p2 = tmp_path / "d.yaml"
    p2.write_text(dump_config(c))
    assert config_to_dict(load_config(p2)) == config_to_dict(c)


def test_typo_names_file_and_field(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("training:\n  lerning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "training.lerning_rate" in str(e.value) and "unknown field" in str(e.value)


@pytest.mark.parametrize("bad,field", [
    ("selection.rho=0", "selection.rho"),
    ("selection.rho=1.5", "selection.rho"),
    ("training.lr=-1", "training.lr"),
    ("training.lambda_schedule=exponential", "training.lambda_schedule"),
    ("training.t_min=0.5", "training"),
    ("tune.rho={low: 0.9, high: 0.5}", "tune.rho"),
])
def test_invalid_values(bad, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [bad])
    assert field in str(e.value)


@pytest.mark.parametrize("override, field, value", [
    ("training.lr=abc", "training.lr", "'abc'"),
    ("training.max_steps=1.5", "training.max_steps", "1.5"),
    ("resources.num_workers=two", "resources.num_workers", "'two'"),
    ("tracking.enabled=maybe", "tracking.enabled", "'maybe'"),
])
def test_wrong_type_from_the_command_line_names_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg  # the CLI prints it as one `error:` line
    assert f" {field}: " in msg and f"(got {value})" in msg, msg


def test_unknown_key_names_the_field_and_suggests_the_known_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.max_lenght=512"])
    assert "data.max_lenght: unknown field (typo? did you mean 'max_length'?)" in str(e.value)
    p = tmp_path / "typo.yaml"
    p.write_text("model:\n  tokeniser: x\n")
    with pytest.raises(ConfigError, match=rf"{p}.*model\.tokeniser: unknown field \(typo\? did you mean 'tokenizer'\?\)"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
    with pytest.raises(ConfigError, match=rf"^config file not found: {tmp_path}/nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"^override 'training\.lr' must look like section\.field=value"):
        load_config(None, ["training.lr"])


def test_flatten():
    flat = flatten(config_to_dict(PipelineConfig()))
    assert flat["training.lora.r"] == 64 and flat["selection.rho"] == 0.7


def test_a_relative_run_dir_lands_under_the_clusters_storage(monkeypatch, tmp_path):
    from forgetting_ray.config import STORAGE_ENV, PipelineConfig

    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert PipelineConfig(run_dir="runs/x").run_dir == "runs/x"
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/prefix/")
    assert PipelineConfig(run_dir="runs/x").run_dir == "s3://bucket/prefix/runs/x"
    assert PipelineConfig(run_dir=str(tmp_path)).run_dir == str(tmp_path)  # an absolute path stays
    assert PipelineConfig(run_dir="gs://other/run").run_dir == "gs://other/run"
    again = PipelineConfig.model_validate(PipelineConfig(run_dir="runs/x").model_dump())
    assert again.run_dir == "s3://bucket/prefix/runs/x"  # a dumped config (a trial's) is not joined twice
