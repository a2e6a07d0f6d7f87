import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from service.logs import JsonFormatter, RequestIdFilter, request_id_from, request_id_var

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kernels  # loads and runs the compiled engine in a fresh interpreter
def test_serving_path_never_imports_torch_or_training(tmp_path):
    """Build the app, and load and run a model on the CPU as the service does: no torch."""
    from tests.service.numpy_model import publish_tiny

    version = publish_tiny(tmp_path / "repo")
    code = (
        "import sys, numpy as np\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "import service.__main__\n"
        "create_app(Settings(_env_file=None))\n"
        "from model import load_model\n"
        f"m = load_model({str(version.artifact_path)!r}, device='cpu')\n"
        "m.predict(np.zeros((2, 1, 6, 6), np.float32))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_service_sources_do_not_import_training():
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        assert "import training" not in text and "from training" not in text, path


def test_json_log_line_carries_request_id_and_extra_fields():
    record = logging.makeLogRecord(
        {"name": "service.x", "levelname": "INFO", "msg": "hello %s", "args": ("world",)}
    )
    record.model = "digits"
    token = request_id_var.set("req-7")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello world"
    assert entry["request_id"] == "req-7"
    assert entry["model"] == "digits"
    assert entry["level"] == "info"


def test_request_id_from_header():
    assert request_id_from("abc-1") == "abc-1"
    assert request_id_from("has space") != "has space"
    assert len(request_id_from(None)) == 32
    assert len(request_id_from("x" * 500)) == 32
    fresh = {request_id_from(None) for _ in range(1000)}
    assert len(fresh) == 1000 and all(len(rid) == 32 for rid in fresh)
