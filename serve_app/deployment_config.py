"""One validated user_config model per deployment; the defaults live here.

serve_config.yaml's user_config blocks are checked against these in each
deployment's reconfigure(): an unknown key or a value out of range fails the
deploy with a readable message instead of surfacing later as a 500.
"""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from models.embedding import SFACE_DEFAULT_THRESHOLD
from models.quality import QualityBars


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngressConfig(_Config):
    verify_threshold: float = Field(SFACE_DEFAULT_THRESHOLD, ge=-1.0, le=1.0)
    identify_threshold: float = Field(SFACE_DEFAULT_THRESHOLD, ge=-1.0, le=1.0)
    top_k: int = Field(5, ge=1, le=100)
    max_image_bytes: int = Field(15_000_000, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=4096)
    liveness_policy_default: Literal["off", "flag", "block"] = "off"
    enrol_liveness_policy_default: Literal["off", "flag", "block"] = "block"
    # per client (API key, else IP), counted in Redis; 0 = unlimited
    requests_per_minute: int = Field(0, ge=0)
    # Embedding cache in Redis (serve_app/embedding_cache.py): how long an
    # image's detection + vectors are kept (0 = no cache), and the largest
    # entry stored (about 0.6 KB a face with SFace).
    embedding_cache_ttl_s: int = Field(3600, ge=0, le=30 * 86400)
    embedding_cache_max_entry_bytes: int = Field(65536, ge=1024, le=16 * 1024**2)
    # Idempotency-Key on enrolment (serve_app/idempotency.py): how long an answer
    # is kept for replay, and how long a repeat waits for the first request.
    idempotency_ttl_s: int = Field(86400, ge=60, le=30 * 86400)
    idempotency_wait_s: float = Field(5.0, ge=0.0, le=60.0)
    # Deadline for one pass through the model graph; past it the answer is 503.
    pipeline_timeout_s: float = Field(10.0, gt=0.0, le=120.0)
    # Deadline for getting a Postgres connection from the pool.
    db_acquire_timeout_s: float = Field(3.0, gt=0.0, le=60.0)
    # Image requests (detect/verify/identify/liveness/enrol) one ingress replica
    # lets into the model graph at once; the excess gets 503 before its body
    # is read. 0 = no limit. Size it to what the detector replicas finish
    # promptly (benchmarks/overload.py).
    max_inflight_images: int = Field(4, ge=0, le=10_000)
    # Enrolment refuses faces whose quality score is below this (422 low_quality
    # with the reasons); 0.5 = "no quality reasons", higher asks for margin.
    enrol_min_quality: float = Field(0.5, ge=0.0, le=1.0)
    # Decisions by false-match rate (configs/calibration_sface.json): when a
    # request gives no target_fmr the thresholds above decide "match"; a score
    # between the threshold for maybe_fmr and the match threshold is "maybe".
    maybe_fmr: float = Field(1e-3, gt=0.0, lt=1.0)
    # Feedback: an identify whose probe is at least this similar to a probe
    # reported as "not subject X" does not decide for X.
    feedback_similarity: float = Field(0.5, ge=-1.0, le=1.0)
    # Retry-After sent with 503s caused by overload.
    retry_after_s: int = Field(1, ge=1, le=300)
    # API keys, tenants and collections are re-read from Postgres every few
    # seconds; while it is out of reach the last good answer is used for at
    # most this long, so identify and verify go on through a database
    # outage (services/last_good.py). 0: never answer from a stale lookup.
    lookup_stale_s: float = Field(300.0, ge=0.0, le=3600.0)


class DetectorConfig(_Config):
    # Re-landmark faces with MTCNN before alignment: never | small_or_flagged |
    # always. docs/ACCURACY.md: TAR at FAR 1e-3 on degraded photos 0.984 ->
    # 0.991 (small_or_flagged) / 0.993 (always), at an MTCNN run per face
    # touched; off by default for that cost.
    relandmark: Literal["never", "small_or_flagged", "always"] = "never"
    # Where each quality reason starts (models/quality.py QualityBars; unknown keys fail).
    quality_bars: dict[str, float | list[float]] = Field(default_factory=dict)
    detector: Literal["yunet", "mtcnn"] = "yunet"
    score_threshold: float = Field(0.7, gt=0.0, lt=1.0)
    min_face_size: int = Field(20, ge=4)
    # Long side of the working image the detector searches.
    max_side: int = Field(1280, ge=64, le=8192)
    max_image_bytes: int = Field(15_000_000, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=4096)
    # Largest decode done whole in memory; larger images are decoded streaming.
    full_decode_bytes: int = Field(48_000_000, ge=1_000_000)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)

    _bars: QualityBars = PrivateAttr()

    def model_post_init(self, _context: object) -> None:
        # Built here, once: a bad bar fails reconfigure() (the deploy), not each request.
        self._bars = QualityBars.from_mapping(self.quality_bars)

    @property
    def bars(self) -> QualityBars:
        return self._bars


# Every embedder the service can run (models/embedding.py EMBEDDERS). A
# collection holds vectors of one of them; the Embedder serves each.
EmbedderName = Literal["sface", "sface_flip", "facenet"]
EMBEDDER_NAMES: tuple[str, ...] = get_args(EmbedderName)


class EmbedderConfig(_Config):
    # The model new collections get, and probes with no collection (verify of
    # two images). A collection of another model is served by loading that
    # model too (serve_app/jobs/reembed.py moves a collection between models).
    embedder: EmbedderName = "sface"
    # Faces per batch (batches are sized by faces, not requests).
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)


class LivenessConfig(_Config):
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)


class MatcherConfig(_Config):
    """The Matcher's user_config (unknown keys fail the deploy)."""

    # Poll period of the change log; NOTIFY wakes the replica sooner.
    sync_interval_s: float = Field(1.0, gt=0.0, le=60.0)
    # Write a collection's snapshot once this many changes are in none; 0 = never.
    snapshot_every: int = Field(1000, ge=0)
    # Rewrite a collection's snapshot once it is this many log entries behind
    # (however few were its own): a restart replays at most about this much; 0 = never.
    snapshot_max_behind: int = Field(100_000, ge=0)
    # Change-log entries below every collection's newest snapshot are deleted
    # once they are this old (seconds); 0 = keep the whole log.
    log_retention_s: float = Field(3600.0, ge=0.0)
    # check_health fails when no sync reached the log's end for this long.
    max_staleness_s: float = Field(30.0, gt=0.0)
    # How long a search waits for min_seq before answering 503.
    min_seq_timeout_s: float = Field(5.0, gt=0.0, le=60.0)
    # Index by size (index/policy.py): exact search up to this many faces per collection...
    exact_max_faces: int = Field(50_000, ge=1)
    # ...IVF-flat above it while it fits this budget per collection, IVF-SQ8 beyond.
    index_memory_budget_mb: float = Field(4096.0, gt=0.0)
    # recall@1 against exact search that IVF's nprobe is calibrated to.
    target_recall: float = Field(0.99, gt=0.0, le=1.0)
