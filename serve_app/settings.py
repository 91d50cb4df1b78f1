"""Service settings: one pydantic model, read from the environment when asked.

Nothing here is built at import time; `load_settings()` is called by the CLI
and the app builder, and the resulting object travels to every deployment as
an init argument, so replicas never depend on the environment of whatever
process Ray happened to spawn them from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACESERVE_", extra="ignore", populate_by_name=True)

    # Postgres: the gallery's source of truth. None means "not configured";
    # the CLI then starts an embedded server (serve_app/embedded_pg.py).
    database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "FACESERVE_DATABASE_URL")
    )
    db_pool_min: int = 1
    db_pool_max: int = 10
    # fsspec URL for face crops and index snapshots: file:///..., s3://bucket/prefix
    object_store_url: str = "file://./data/objects"
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "FACESERVE_REDIS_URL")
    )
    # Namespace of this deployment's keys in Redis (embedding cache, idempotency
    # records): two deployments sharing one Redis need different prefixes.
    redis_prefix: str = "faceserve"
    # The bootstrap admin key (X-API-Key or Bearer); see serve_app/services/access.py.
    api_key: SecretStr | None = None
    # When set, index snapshots are HMAC-signed with it and replicas load only
    # snapshots signed with it (whoever can write the bucket cannot inject faces).
    snapshot_key: SecretStr | None = None
    models_dir: str | None = Field(
        default=None, validation_alias=AliasChoices("FACE_MODELS_DIR", "FACESERVE_MODELS_DIR")
    )
    data_dir: Path = Path("./data")
    default_collection: str = "default"
    # Threads each model replica may use for inference (2-core machines: keep small).
    inference_threads: int | None = None  # None: the whole CPUs the replica was given (at least 1)
    # Observability: "otlp" (to otlp_endpoint), "console" or "none".
    trace_exporter: str = "none"
    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "FACESERVE_OTLP_ENDPOINT"),
    )
    trace_schedule_delay_ms: int = 2000
    # Matcher shards: 1 = one `Matcher` deployment holding every face; n > 1
    # binds `Matcher-0` ... `Matcher-{n-1}`, each holding the faces with
    # face_id % n == its index, and identify asks them all (docs/SCALING.md).
    # serve_config.yaml then needs one deployment entry per shard:
    # serve_app.cluster.deploy_config writes them from the `Matcher` entry.
    matcher_shards: int = Field(1, ge=1, le=64)
    # Off only to measure what metrics cost (benchmarks/observability.py).
    metrics_enabled: bool = True

    def database_dsn(self) -> str:
        if self.database_url is None:
            raise RuntimeError("DATABASE_URL is not set")
        return self.database_url.get_secret_value()

    def setup_telemetry(self, deployment: str) -> None:
        """Per replica process: tracing exporter as configured."""
        from serve_app.telemetry import setup_tracing

        setup_tracing(
            f"faceserve.{deployment}",
            self.trace_exporter,
            self.otlp_endpoint,
            self.trace_schedule_delay_ms,
        )

    def apply_models_dir(self) -> None:
        """Point the weights resolver at models_dir (it reads FACE_MODELS_DIR)."""
        import os

        if self.models_dir:
            os.environ["FACE_MODELS_DIR"] = str(Path(self.models_dir).resolve())


def load_settings(**overrides: Any) -> Settings:
    """Environment first, explicit overrides (e.g. app-builder args) win."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    base = Settings()
    return base.model_copy(update=_coerce(base, clean))


def _coerce(base: Settings, updates: dict[str, Any]) -> dict[str, Any]:
    # model_copy(update=) skips validation; run the values through the model
    # so SecretStr/Path fields get their proper types.
    if not updates:
        return {}
    data = base.model_dump()
    for key in ("database_url", "api_key", "snapshot_key"):
        if isinstance(data.get(key), SecretStr):
            data[key] = data[key].get_secret_value()
    data.update(updates)
    validated = Settings.model_validate(data)
    return {k: getattr(validated, k) for k in updates}
