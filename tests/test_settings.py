"""Settings: embedded defaults, strata.toml, STRATA_* variables, clear errors."""

import pytest

from strata.tasks.workspace.settings import SettingsError, load_settings


def test_embedded_defaults_live_under_dot_strata(tmp_path):
    settings = load_settings(tmp_path)
    assert settings.ledger_url == f"sqlite:///{tmp_path.resolve()}/.strata/strata.db"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path.resolve()}/.strata/mlflow.db"
    assert settings.dvc_remote == str(tmp_path.resolve() / ".strata" / "dvc-remote")


def test_toml_then_environment_precedence(tmp_path, monkeypatch):
    (tmp_path / "strata.toml").write_text('ledger_url = "postgresql://x/db"\ndvc_remote = "s3://bucket/p"\n')
    monkeypatch.setenv("STRATA_DVC_REMOTE", "/mnt/remote")
    settings = load_settings(tmp_path)
    assert settings.ledger_url == "postgresql://x/db"
    assert settings.dvc_remote == "/mnt/remote"


def test_malformed_toml_names_the_file(tmp_path):
    (tmp_path / "strata.toml").write_text("ledger_url = [unclosed\n")
    with pytest.raises(SettingsError, match="strata.toml is not valid TOML"):
        load_settings(tmp_path)


def test_unknown_key_is_rejected(tmp_path):
    (tmp_path / "strata.toml").write_text('ledger_ur = "typo"\n')
    with pytest.raises(SettingsError, match="ledger_ur"):
        load_settings(tmp_path)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://strata:s3cret@db:5432/ledger", "postgresql+psycopg://strata:***@db:5432/ledger"),
        ("http://ml:p%40ss@mlflow:5000", "http://ml:***@mlflow:5000"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("sqlite:////work/ws/.strata/mlflow.db", "sqlite:////work/ws/.strata/mlflow.db"),
    ],
)
def test_store_urls_are_shown_without_their_password(url, shown):
    from strata.tasks.workspace.settings import redact_url

    assert redact_url(url) == shown
