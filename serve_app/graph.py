"""Builds the Serve application graph; serve_config.yaml points here.

`serve deploy serve_config.yaml` calls build_app(args) with the config's
`args`; the CLI passes the database URL and object store of the embedded
default the same way. Settings are read here, once, and handed to every
deployment as an init argument. `matcher_shards` > 1 binds one matcher
deployment per shard (serve_app/gallery/shards.py).
"""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.deployments.detector import Detector
from serve_app.deployments.embedder import Embedder
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.liveness import Liveness
from serve_app.deployments.matcher import Matcher
from serve_app.gallery.shards import Shard
from serve_app.settings import Settings, load_settings


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = load_settings(**(args or {}))
    if settings.database_url is None:
        raise ValueError(
            "no database configured: set DATABASE_URL or pass database_url in the app args "
            "(`faceserve start` starts an embedded PostgreSQL for you)"
        )
    detector = Detector.bind(settings)
    embedder = Embedder.bind(settings)
    liveness = Liveness.bind(settings)
    return Ingress.bind(settings, detector, embedder, liveness, matcher_shards(settings))


def matcher_shards(settings: Settings) -> Any:
    """The `Matcher` deployment (one shard: every face), or with
    matcher_shards = n > 1 a list of n deployments `Matcher-0` ... each told
    its shard; the ingress's pipeline client asks them all."""
    n = settings.matcher_shards
    if n == 1:
        return Matcher.bind(settings)
    return [Matcher.options(name=Shard(s, n).deployment).bind(settings, s, n) for s in range(n)]
