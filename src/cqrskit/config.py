"""Settings, from environment variables (CQRSKIT_*) with CLI flags layered on top."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CQRSKIT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path("./data")
    command_db: str | None = Field(
        default=None, description="event store URL; default sqlite:///<data_dir>/command.db"
    )
    query_db: str | None = Field(
        default=None, description="view store URL; default sqlite:///<data_dir>/query.db"
    )
    stream: str = "embedded"
    domains: str = Field(
        default="cqrskit.domains.records",
        description="comma-separated modules, each defining `domain` (or module:attribute)",
    )
    sqlite_synchronous: str = Field(default="FULL", pattern="^(OFF|NORMAL|FULL|EXTRA)$")
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    consistency_timeout: float = Field(default=5.0, ge=0, le=60)
    retry_attempts: int = Field(default=3, ge=1, le=100)
    retry_backoff: float = Field(default=0.1, ge=0)
    aggregate_cache_size: int = Field(default=10_000, ge=0)
    log_level: str = "INFO"

    @property
    def command_db_url(self) -> str:
        return self.command_db or f"sqlite:///{self.data_dir / 'command.db'}"

    @property
    def query_db_url(self) -> str:
        return self.query_db or f"sqlite:///{self.data_dir / 'query.db'}"
