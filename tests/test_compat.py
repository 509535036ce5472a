"""The supported version range: importing optinsight next to an unsupported TensorFlow
or Keras fails with one line naming what is installed and what is supported."""

import importlib
import importlib.metadata

import pytest

import optinsight
from optinsight import compat


def fake_versions(monkeypatch, versions):
    def version(distribution):
        if distribution in versions:
            return versions[distribution]
        raise importlib.metadata.PackageNotFoundError(distribution)
    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.parametrize("versions", [
    {"tensorflow": "2.15.1", "keras": "3.3.3"},
    {"tensorflow": "2.22.0", "keras": "3.15.1"},
    {"tensorflow": "2.21.0", "keras": "2.15.0"},
    {"tensorflow": "2.21.0", "keras": "3.2.1"},
    {"tensorflow": "2.21.0", "keras": "4.0.0"},
    {"keras": "3.15.1"},
])
def test_an_unsupported_version_is_one_clear_line_at_import(monkeypatch, versions):
    fake_versions(monkeypatch, versions)
    with pytest.raises(ImportError) as raised:
        importlib.reload(optinsight)
    monkeypatch.undo()
    importlib.reload(optinsight)  # whole again for the tests after this one
    message = str(raised.value)
    assert "\n" not in message
    assert "optinsight supports tensorflow >= 2.16, < 2.22, keras >= 3.3, < 4.0" in message
    assert f"tensorflow {versions.get('tensorflow', 'not installed')}" in message
    assert f"keras {versions['keras']}" in message


@pytest.mark.parametrize("versions", [
    {"tensorflow": "2.16.2", "keras": "3.3.3"},
    {"tensorflow-cpu": "2.18.0", "keras": "3.8.0rc1"},
    {"tensorflow": "2.21.0", "keras": "3.15.1"},
])
def test_the_supported_range_imports(monkeypatch, versions):
    fake_versions(monkeypatch, versions)
    compat.check_versions()
