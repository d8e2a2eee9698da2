"""One settings object for paths and store URIs.

Sources, highest first: keyword arguments, ``STRATA_*`` environment variables, ``strata.toml`` in
the workspace root, then embedded defaults under ``<workspace>/.strata``. Store URIs left empty
resolve to those embedded defaults (SQLite ledger and MLflow store, local DVC remote); a relative local
path (``sqlite:///.strata/other.db``, ``mlflow_artifacts = "artifacts"``) is relative to the workspace
root, not to the current directory, so the settings follow the workspace when it moves.

What Strata stores (ledger rows) holds paths inside the workspace relative to its root
(``StrataSettings.relative``) and resolves them at use (``StrataSettings.resolve``): a moved or copied
workspace reads its own files, never the original's.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from strata.models.errors import UserError

SETTINGS_FILE = "strata.toml"
STATE_DIR = ".strata"


class SettingsError(UserError, ValueError):
    """Settings cannot be read; the message names the file or variable to fix."""


class StrataSettings(BaseSettings):
    """Where a workspace keeps its stores."""

    model_config = SettingsConfigDict(env_prefix="STRATA_", extra="forbid")

    workspace: Path = Field(default_factory=Path.cwd, description="workspace root (holds strata.toml)")
    ledger_url: str = Field("", description="SQLAlchemy URL of the ledger; default SQLite in .strata/")
    mlflow_tracking_uri: str = Field("", description="MLflow tracking URI; default SQLite in .strata/")
    mlflow_artifacts: str = Field("", description="MLflow artifact root; default .strata/mlartifacts")
    dvc_remote: str = Field("", description="DVC remote URL; default the local directory .strata/dvc-remote")
    device: str = Field("", description="torch device; default cuda when available, else cpu")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        workspace = Path(init_settings.init_kwargs.get("workspace") or os.environ.get("STRATA_WORKSPACE") or Path.cwd())
        toml_file = workspace / SETTINGS_FILE
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _embedded_defaults(self) -> StrataSettings:
        self.workspace = self.workspace.resolve()
        state = self.workspace / STATE_DIR
        self.ledger_url = self._anchored_sqlite(self.ledger_url) or f"sqlite:///{state / 'strata.db'}"
        self.mlflow_tracking_uri = self._anchored_sqlite(self.mlflow_tracking_uri) or f"sqlite:///{state / 'mlflow.db'}"
        self.mlflow_artifacts = self._anchored_path(self.mlflow_artifacts) or str(state / "mlartifacts")
        self.dvc_remote = self._anchored_path(self.dvc_remote) or str(state / "dvc-remote")
        return self

    def _anchored_path(self, value: str) -> str:
        """A local relative path as an absolute one under the workspace; URLs and absolute paths as given."""
        if not value or "://" in value or Path(value).is_absolute():
            return value
        return str(self.workspace / value)

    def _anchored_sqlite(self, url: str) -> str:
        """``sqlite:///relative.db`` under the workspace (SQLAlchemy would open it relative to the cwd)."""
        prefix = "sqlite:///"
        if not url.startswith(prefix) or url[len(prefix) :].startswith(("/", ":memory:")) or url == prefix:
            return url
        return prefix + str(self.workspace / url[len(prefix) :])

    @property
    def state_dir(self) -> Path:
        return self.workspace / STATE_DIR

    def relative(self, path: str | Path) -> str:
        """``path`` as Strata stores it: relative to the workspace root when inside it (``.strata/…``),
        else as given (another disk, a URL): nothing stored then names the folder the workspace lives in."""
        text = str(path)
        if "://" in text or not Path(text).is_absolute():
            return text
        absolute = Path(os.path.normpath(text))
        return absolute.relative_to(self.workspace).as_posix() if absolute.is_relative_to(self.workspace) else text

    def resolve(self, stored: str) -> Path:
        """A stored path at use: a relative one under this workspace's root (where it is now); absolute as is."""
        return self.workspace / stored


def load_settings(workspace: str | Path | None = None, **overrides) -> StrataSettings:
    """Settings for ``workspace`` (default: the current directory), with clear errors."""
    kwargs = dict(overrides)
    if workspace is not None:
        kwargs["workspace"] = Path(workspace)
    try:
        return StrataSettings(**kwargs)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{SETTINGS_FILE} is not valid TOML ({exc}); fix or remove it") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(
            f"invalid Strata settings ({problems}); check {SETTINGS_FILE} and STRATA_* variables"
        ) from exc


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: store URLs appear in messages, logs and Prefect
    artifacts, and a password there would outlive the run (``postgresql+psycopg://u:pw@host/db``,
    ``http://u:pw@mlflow:5000``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))
