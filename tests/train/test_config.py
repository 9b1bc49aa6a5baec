"""A bad config fails before any work: one line per problem, each naming its key, and no run directory."""

import json
from pathlib import Path

import pytest

from mlc.commands.train.config import TrainConfig, apply_overrides, from_dict, load_config
from mlc.errors import ValidationError

TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
CORPUS = Path(__file__).resolve().parents[2] / "mlc" / "data" / "corpus" / "train.txt"


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY))
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\nconfig = "model"\n[data]\ntrain = "{CORPUS}"\n' + body)
    return path


@pytest.mark.parametrize(
    "body, key, words",
    [
        ("[train]\nstpes = 10\n", "train.stpes", "did you mean train.steps"),
        ("[train]\nsteps = \"ten\"\n", "train.steps", "expected an integer"),
        ("[optim]\nname = \"sgd\"\n", "optim.name", "one of 'adamw', 'muon'"),
        ("[data]\neval = \"missing.txt\"\n", "data.eval", "does not exist"),
        ("[lora]\nbase = \"nf4\"\n", "lora.base", "set lora.enabled = true"),
        ("[optim]\nname = \"galore\"\n[train]\nparallel = \"fsdp\"\n", "optim.name", "use train.parallel = \"ddp\""),
    ],
)
def test_bad_config_fails_before_any_work_naming_the_key(tmp_path, run_mlc, body, key, words):
    if body.startswith("[data]"):  # a second [data] table is invalid TOML: use an override instead
        path, extra = write(tmp_path, ""), ["--set", "data.eval=\"missing.txt\""]
    else:
        path, extra = write(tmp_path, body), []
    code, out, err = run_mlc("train", path, *extra)
    assert code == 1
    assert key in err and words in err
    assert not run_mlc.runs_dir.exists() or not any(run_mlc.runs_dir.iterdir())


def test_missing_training_file_names_data_train(tmp_path, run_mlc):
    path = write(tmp_path, "")
    code, _, err = run_mlc("train", path, "--set", "data.train=\"nowhere/train.txt\"")
    assert code == 1 and "data.train: nowhere/train.txt does not exist" in err


def test_a_model_config_that_is_not_one_names_model_config(tmp_path):
    path = write(tmp_path, "")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "gpt-nonsense"}')
    with pytest.raises(ValidationError) as e:
        load_config(path)
    assert e.value.problems[0].startswith("model.config:")


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValidationError) as e:
        from_dict({"train": {"steps": "x", "batch": 3}, "optim": {"lr": "fast"}, "nonsense": {}})
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4
    for key in ("train.steps", "train.batch", "optim.lr", "unknown key nonsense"):
        assert key in text


def test_values_out_of_range_are_listed_with_the_wrong_types():
    with pytest.raises(ValidationError) as e:
        from_dict({"train": {"steps": 0, "seed": "x"}, "optim": {"lr": -1.0, "betas": [0.9, "a"]}, "data": {"val_fraction": 1.0}})
    assert e.value.problems == [
        "data.val_fraction: must be less than 1, got 1.0",
        "train.steps: must be at least 1, got 0",
        "train.seed: expected an integer, got 'x'",
        "optim.lr: must be greater than 0, got -1.0",
        "optim.betas: expected a list of numbers, got [0.9, 'a']",
    ]


def test_overrides_are_read_as_toml_values():
    raw = apply_overrides({}, ["train.steps=7", "optim.betas=[0.8, 0.9]", "optim.name=muon", "train.compile=true"])
    config = from_dict(raw)
    assert config.train.steps == 7 and config.optim.betas == [0.8, 0.9]
    assert config.optim.name == "muon" and config.train.compile is True


def test_a_good_config_resolves_paths_relative_to_the_file(tmp_path):
    config, text = load_config(write(tmp_path, "[train]\nsteps = 3\n"))
    assert isinstance(config, TrainConfig) and config.train.steps == 3
    assert Path(config.model.config) == tmp_path / "model"
    assert "steps = 3" in text


@pytest.mark.parametrize("key", ["data.train", "data.eval"])
def test_a_data_file_that_is_not_utf8_names_the_file_the_key_and_the_place(tmp_path, run_mlc, key):
    bad = tmp_path / "latin1.txt"
    # 5 MiB of good text first, so the bad byte sits in the second block of the streamed check.
    bad.write_bytes(b"plain text line\n" * (5 * 2**16) + b"caf\xe9 au lait\n")
    path = write(tmp_path, "")
    code, _, err = run_mlc("train", path, "--set", f'{key}="{bad}"')
    assert code == 1
    line = err.strip().splitlines()[-1] if "\n" in err.strip() else err.strip()
    assert f"{key}: {bad} is not UTF-8 text (byte {16 * 5 * 2**16 + 3}, line {5 * 2**16 + 1}" in " ".join(err.split())
    assert "UnicodeDecodeError" not in err and "unexpected" not in line
    assert not run_mlc.runs_dir.exists() or not any(run_mlc.runs_dir.iterdir())


def test_a_config_that_is_not_utf8_names_the_file(tmp_path, run_mlc):
    path = write(tmp_path, "")
    path.write_bytes(path.read_bytes() + b"# \xff\xfe comment\n")
    code, _, err = run_mlc("train", path)
    assert code == 1 and f"{path} is not UTF-8 text" in " ".join(err.split()) and "UnicodeDecodeError" not in err
    assert not run_mlc.runs_dir.exists() or not any(run_mlc.runs_dir.iterdir())


def test_an_init_folder_without_config_json_names_model_init(tmp_path, run_mlc):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    path = write(tmp_path, "")
    code, _, err = run_mlc("train", path, "--set", 'model.config=""', "--set", f'model.init="{folder}"')
    assert code == 1 and f"model.init: {folder} has no config.json" in " ".join(err.split())
    assert "FileNotFoundError" not in err
    assert not run_mlc.runs_dir.exists() or not any(run_mlc.runs_dir.iterdir())
