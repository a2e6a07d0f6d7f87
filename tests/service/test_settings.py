import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from model.engine.options import EngineOptions
from service.__main__ import main
from service.settings import (
    Settings,
    as_environment,
    describe_validation_error,
    flag_of,
    settings_from_command_line,
)

ROOT = Path(__file__).resolve().parents[2]


def settings_from(monkeypatch, **env) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def test_defaults_serve_the_whole_repo_on_port_8000(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("BNN_"):
            monkeypatch.delenv(key)
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port, settings.device) == ("0.0.0.0", 8000, "auto")
    assert settings.model_repo == Path("models")
    assert settings.models == ()
    assert settings.api_key is None


def test_environment_values_are_parsed_and_normalised(monkeypatch):
    settings = settings_from(
        monkeypatch,
        BNN_PORT="9001",
        BNN_MODELS="digits-mlp, digits-cnn",
        BNN_DEVICE="CUDA:1",
        BNN_LOG_LEVEL="DEBUG",
        BNN_API_KEY="s3cret",
        BNN_MAX_QUEUE_DELAY_MS="2.5",
    )
    assert settings.port == 9001
    assert settings.models == ("digits-mlp", "digits-cnn")
    assert settings.device == "cuda:1"
    assert settings.log_level == "debug"
    assert settings.api_key.get_secret_value() == "s3cret"
    assert settings.max_queue_delay_s == pytest.approx(0.0025)


def test_empty_api_key_means_no_key(monkeypatch):
    assert settings_from(monkeypatch, BNN_API_KEY="  ").api_key is None


def test_dotenv_file_is_read(tmp_path):
    env = tmp_path / ".env"
    env.write_text("BNN_PORT=8123\nBNN_MAX_BATCH_SIZE=7\n")
    settings = Settings(_env_file=env)
    assert (settings.port, settings.max_batch_size) == (8123, 7)


def test_settings_build_the_engine_options(monkeypatch, tmp_path):
    """The engine reads no environment: the service hands it these two settings."""
    monkeypatch.delenv("BNN_ENGINE_THREADS", raising=False)
    monkeypatch.delenv("BNN_KERNEL_CACHE_DIR", raising=False)
    assert Settings(_env_file=None).engine_options() == EngineOptions()
    monkeypatch.setenv("BNN_ENGINE_THREADS", "3")
    monkeypatch.setenv("BNN_KERNEL_CACHE_DIR", str(tmp_path))
    options = Settings(_env_file=None).engine_options()
    assert options == EngineOptions(threads=3, kernel_cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("BNN_PORT", "eighty", "BNN_PORT='eighty': Input should be a valid integer"),
        ("BNN_PORT", "70000", "BNN_PORT='70000': Input should be less than or equal to 65535"),
        ("BNN_DEVICE", "tpu", "BNN_DEVICE='tpu': expected auto, cpu, cuda or cuda:N"),
        ("BNN_MAX_BATCH_SIZE", "0", "BNN_MAX_BATCH_SIZE='0': Input should be greater than"),
        ("BNN_MODELS", "ok,../etc", "BNN_MODELS='ok,../etc': invalid model name '../etc'"),
        ("BNN_LOG_LEVEL", "loud", "BNN_LOG_LEVEL='loud': Input should be 'debug'"),
        ("BNN_REQUEST_TIMEOUT_S", "-1", "BNN_REQUEST_TIMEOUT_S='-1': Input should be greater"),
        ("BNN_ENGINE_THREADS", "0", "BNN_ENGINE_THREADS='0': Input should be greater than"),
    ],
)
def test_bad_values_are_named_in_one_line(monkeypatch, key, value, fragment):
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)
    message = describe_validation_error(info.value)
    assert fragment in message
    assert "\n" not in message


def test_main_exits_2_with_one_line_on_a_bad_value(monkeypatch, capsys):
    monkeypatch.setenv("BNN_MAX_QUEUE_SIZE", "lots")
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "BNN_MAX_QUEUE_SIZE='lots'" in err


@pytest.mark.slow  # a fresh interpreter
def test_python_dash_m_service_exits_2_on_a_bad_value():
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        env={"BNN_PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bnn-serve: invalid setting --port/BNN_PORT='not-a-port': Input should be a valid "
        "integer, unable to parse string as an integer"
    ]


# --- command-line flags ----------------------------------------------------------------------------
def clear_bnn_environment(monkeypatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("BNN_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here


def test_every_setting_has_a_flag_documented_with_its_variable(monkeypatch, capsys):
    with pytest.raises(SystemExit) as info:
        settings_from_command_line(["--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for field in Settings.model_fields:
        assert f"{flag_of(field)} " in help_text, field
        assert f"[env: BNN_{field.upper()}]" in help_text, field
    assert "--model-repository" in help_text  # tritonserver's spelling


def test_flags_override_variables_which_override_defaults(monkeypatch, tmp_path):
    clear_bnn_environment(monkeypatch)
    monkeypatch.setenv("BNN_PORT", "9001")
    monkeypatch.setenv("BNN_DEVICE", "cpu")
    settings = settings_from_command_line(
        ["--model-repository", str(tmp_path), "--port", "9100", "--models", "a,b",
         "--no-log-json", "--max-queue-delay-ms", "2"]
    )  # fmt: skip
    assert settings.model_repo == tmp_path
    assert settings.port == 9100  # flag beats BNN_PORT
    assert settings.device == "cpu"  # variable beats the default
    assert settings.models == ("a", "b")
    assert settings.log_json is False
    assert settings.max_queue_delay_s == pytest.approx(0.002)
    assert settings.max_batch_size == 64  # default


def test_api_key_file_sets_the_key(monkeypatch, tmp_path):
    clear_bnn_environment(monkeypatch)
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    settings = settings_from_command_line(["--api-key-file", str(key_file)])
    assert settings.api_key.get_secret_value() == "s3cret"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--port", "eighty"], "invalid setting --port/BNN_PORT='eighty': Input should be a valid"),
        (["--device", "tpu"], "--device/BNN_DEVICE='tpu': expected auto, cpu, cuda or cuda:N"),
        (["--models", "ok,../x"], "--models/BNN_MODELS='ok,../x': invalid model name '../x'"),
        (["--api-key-file", "/nonexistent/key"], "cannot read the API key file"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--port"], "argument --port/--http-port: expected one argument"),
    ],
)
def test_a_bad_flag_exits_2_with_one_line_naming_it(monkeypatch, capsys, argv, expected):
    clear_bnn_environment(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("bnn-serve: ")
    assert expected in err


def test_api_key_and_its_file_together_are_refused(monkeypatch, tmp_path):
    clear_bnn_environment(monkeypatch)
    key_file = tmp_path / "key"
    key_file.write_text("one")
    monkeypatch.setenv("BNN_API_KEY", "two")
    with pytest.raises(ValidationError) as info:
        settings_from_command_line(["--api-key-file", str(key_file)])
    assert "set BNN_API_KEY or BNN_API_KEY_FILE, not both" in describe_validation_error(info.value)


def test_worker_processes_get_the_settings_the_parent_resolved(monkeypatch, tmp_path):
    """Workers rebuild Settings from the environment: as_environment must carry flags, a key
    read from its file and defaults so that the rebuilt settings equal the parent's."""
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    monkeypatch.setenv("BNN_MAX_BATCH_SIZE", "8")
    parent = settings_from_command_line(
        ["--models", "a,b", "--port", "9123", "--no-warmup", "--api-key-file", str(key_file)]
    )
    for name in [n for n in os.environ if n.startswith("BNN_")]:
        monkeypatch.delenv(name)
    for name, value in as_environment(parent).items():
        if value is not None:
            monkeypatch.setenv(name, value)
    child = Settings(_env_file=None)
    assert child.model_dump(exclude={"api_key", "api_key_file"}) == parent.model_dump(
        exclude={"api_key", "api_key_file"}
    )
    assert child.api_key.get_secret_value() == "s3cret"
    assert (child.models, child.port, child.warmup, child.max_batch_size) == (
        ("a", "b"), 9123, False, 8,
    )  # fmt: skip
