"""Where a SageMaker container listens, and the settings that allow a plaintext listener."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from modelkeep.api.server import sagemaker_listener
from modelkeep.errors import ConfigError
from modelkeep.settings import Settings


def test_sagemaker_mode_listens_on_every_interface_on_8080(tmp_path: Path) -> None:
    settings = sagemaker_listener(Settings(data_dir=tmp_path, port=8443, sagemaker=True), {})
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.sagemaker_unsafe_plaintext is False  # TLS stays unless asked otherwise


def test_an_inference_pipeline_names_the_port(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, sagemaker=True)
    assert sagemaker_listener(settings, {"SAGEMAKER_BIND_TO_PORT": "9001"}).port == 9001
    for bad in ("http", "0", "70000", ""):
        with pytest.raises(ConfigError, match="SAGEMAKER_BIND_TO_PORT"):
            sagemaker_listener(settings, {"SAGEMAKER_BIND_TO_PORT": bad})


def test_without_sagemaker_mode_nothing_moves(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, port=8443)
    assert sagemaker_listener(settings, {"SAGEMAKER_BIND_TO_PORT": "9001"}) is settings


def test_plaintext_needs_sagemaker_mode(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="only with sagemaker=true"):
        Settings(data_dir=tmp_path, sagemaker_unsafe_plaintext=True)
    assert Settings(data_dir=tmp_path, sagemaker=True, sagemaker_unsafe_plaintext=True)
