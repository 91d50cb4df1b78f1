"""Helpers for the monitoring tests: find Prometheus' tools, read the metric
catalog, pull metric and label names out of PromQL, and run a throw-away
Prometheus server on loopback.

No Ray, no network beyond 127.0.0.1. The Prometheus binaries come from
Debian's ``prometheus`` package (``apt-get install prometheus``). When they
are missing the tests skip, except under CI (``CI=true``), where a missing
binary is a failure.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
CATALOG_PATH = MONITORING / "metrics_catalog.yml"
RULES_PATH = MONITORING / "rules" / "face-recognition-rules.yml"
RULE_TESTS_DIR = MONITORING / "rules" / "tests"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RUNBOOK_PATH = REPO / "docs" / "RUNBOOK.md"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
PROVISIONING_DIR = MONITORING / "grafana" / "provisioning"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_binary(name: str) -> str:
    """Path of a Prometheus binary; skip without it, fail without it in CI."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"`{name}` not found on PATH (Debian: apt-get install prometheus)"
    if in_ci():
        pytest.fail(msg + " - CI=true, so this is a failure, not a skip")
    pytest.skip(msg)
    raise AssertionError("unreachable")


def run_tool(args: list[str], *, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


# --------------------------------------------------------------------------
# metric catalog
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def load_catalog() -> dict:
    """The parsed catalog (cached: treat it as read-only)."""
    with CATALOG_PATH.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def catalog_metrics() -> dict[str, dict]:
    """Metric family name -> catalog entry."""
    return {m["name"]: m for m in load_catalog()["metrics"]}


def sample_names(entry: dict) -> list[str]:
    """Names under which a catalog entry appears in the exposition."""
    if entry["type"] == "histogram":
        return [entry["name"] + s for s in ("_bucket", "_sum", "_count")]
    return [entry["name"]]


def catalog_sample_index() -> dict[str, dict]:
    """Exposed sample name -> catalog entry (histograms give three names)."""
    index = {}
    for entry in catalog_metrics().values():
        for name in sample_names(entry):
            index[name] = entry
    return index


def allowed_labels(sample: str, index: dict[str, dict] | None = None) -> set[str]:
    """Label names a series of this sample name can carry."""
    index = index if index is not None else catalog_sample_index()
    entry = index[sample]
    labels = set(entry.get("labels") or {}) | set(load_catalog()["common_labels"])
    if sample.endswith("_bucket") and entry["type"] == "histogram":
        labels.add("le")
    return labels


# --------------------------------------------------------------------------
# PromQL scanning (names only; parsing proper is left to Prometheus)
# --------------------------------------------------------------------------

# Keywords and aggregation operators that look like identifiers.
PROMQL_KEYWORDS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "atan2", "bool", "offset", "start", "end",
    "inf", "nan",
}

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_SELECTOR = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)")


def _mask_strings(expr: str) -> str:
    """Replace string literals with "" so that their content can't confuse us."""
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names used as selectors in a PromQL expression."""
    if "__name__" in expr:
        raise ValueError(f"selectors on __name__ are not allowed here: {expr}")
    text = _mask_strings(expr)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(1)
        if word.lower() in PROMQL_KEYWORDS:
            continue
        rest = text[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function call
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring/group_x."""
    text = _mask_strings(expr)
    labels = set()
    for m in _GROUPING.finditer(text):
        labels.update(x.strip() for x in m.group(2).split(",") if x.strip())
    for m in _SELECTOR.finditer(text):
        labels.update(mm.group(1) for mm in _MATCHER.finditer(m.group(2)))
    return labels


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names in its matchers) for each selector with braces."""
    text = _mask_strings(expr)
    out = []
    for m in _SELECTOR.finditer(text):
        if m.group(1):
            out.append((m.group(1), {mm.group(1) for mm in _MATCHER.finditer(m.group(2))}))
    return out


def check_expr_against_catalog(expr: str, where: str) -> list[str]:
    """Problems with an expression's metric and label names, as messages."""
    index = catalog_sample_index()
    problems = []
    names = metric_names(expr)
    if not names:
        problems.append(f"{where}: no metric name found in {expr!r}")
    unknown = sorted(n for n in names if n not in index)
    if unknown:
        problems.append(f"{where}: metrics not in metrics_catalog.yml: {unknown}")
    known = [n for n in names if n in index]
    pool = set()
    for n in known:
        pool |= allowed_labels(n, index)
    for name, used in selectors(expr):
        if name in index:
            bad = sorted(used - allowed_labels(name, index))
            if bad:
                problems.append(f"{where}: {name} has no label(s) {bad} in the catalog")
    if known:
        bad = sorted(label_names(expr) - pool)
        if bad:
            problems.append(f"{where}: label(s) {bad} belong to none of {sorted(known)}")
    return problems


# --------------------------------------------------------------------------
# a real Prometheus on loopback
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """A running ``prometheus`` with its own temporary storage directory."""

    def __init__(self, binary: str, workdir: Path, port: int, proc: subprocess.Popen, log: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.proc = proc
        self.log = log
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, params: dict | None = None, timeout: float = 10) -> tuple[int, dict]:
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400 bad_data, 422 execution error
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, {"status": "error", "error": body.decode(errors="replace")}

    def query(self, expr: str, at: float | None = None) -> tuple[int, dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.get("/api/v1/query", params)

    def log_text(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""


@contextlib.contextmanager
def prometheus_server(
    config: dict, *, storage: Path | None = None, extra_files: dict[str, str] | None = None,
    startup_timeout: float = 60,
) -> Iterator[PrometheusServer]:
    """Start ``prometheus`` on 127.0.0.1 with ``config``; stop it afterwards.

    ``storage`` may hold blocks made beforehand (promtool tsdb
    create-blocks-from); otherwise an empty temporary directory is used.
    ``extra_files`` are written next to the config file (e.g. rule files).
    """
    binary = require_binary("prometheus")
    with tempfile.TemporaryDirectory(prefix="faceserve-prom-") as tmp:
        workdir = Path(tmp)
        for name, text in (extra_files or {}).items():
            (workdir / name).write_text(text)
        cfg = workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        data = storage if storage is not None else workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        log = workdir / "prometheus.log"
        last_error = ""
        for _attempt in range(3):  # a port taken between free_port() and bind
            port = free_port()
            with log.open("w") as log_fh:
                proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={cfg}",
                        f"--storage.tsdb.path={data}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--storage.tsdb.retention.time=30d",
                        "--log.level=info",
                    ],
                    cwd=workdir,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            server = PrometheusServer(binary, workdir, port, proc, log)
            deadline = time.monotonic() + startup_timeout
            ready = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{server.base}/-/ready", timeout=2) as resp:
                        if resp.status == 200:
                            ready = True
                            break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                time.sleep(0.1)
            if ready:
                try:
                    yield server
                finally:
                    _stop(proc)
                return
            last_error = server.log_text()
            _stop(proc)
        raise RuntimeError(f"prometheus did not become ready:\n{last_error}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------
# synthetic data from the catalog (OpenMetrics text for promtool backfill)
# --------------------------------------------------------------------------

HISTOGRAM_BOUNDS = [0.1, 0.5, 1, 5, 10, 50, 100, 500, 1000, 2000, 5000]

GAUGE_VALUES = {
    "ray_serve_proxy_status": 2,  # HEALTHY
    "ray_serve_deployment_replica_healthy": 1,
    "ray_serve_autoscaling_target_replicas": 1,
    "ray_faceserve_db_pool_size": 10,
    "ray_faceserve_db_pool_in_use": 3,
    "ray_faceserve_redis_maxmemory_bytes": 1_000_000_000,
    "ray_faceserve_redis_used_memory_bytes": 400_000_000,
    "up": 1,
}


def _label_sets(entry: dict) -> list[dict[str, str]]:
    sets: list[dict[str, str]] = [{}]
    for label, values in (entry.get("labels") or {}).items():
        sets = [dict(s, **{label: str(v)}) for s in sets for v in values]
    return sets


def _fmt_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def synthetic_openmetrics(start: float, end: float, step: float = 15.0,
                          extra_labels: dict[str, str] | None = None) -> str:
    """OpenMetrics text with every catalog series, one sample per ``step``.

    Counters grow steadily, histograms put observations in every bucket,
    gauges hold a plausible constant (GAUGE_VALUES, else 1). Label values are
    the catalog's examples, so a query that filters on a label the app does
    not emit finds nothing.
    """
    base = {"job": "ray", "instance": "127.0.0.1:8080"}
    base.update(extra_labels or {})
    stamps = []
    t = start
    while t <= end + 1e-9:
        stamps.append(round(t, 3))
        t += step
    lines: list[str] = []
    for entry in load_catalog()["metrics"]:
        name, kind = entry["name"], entry["type"]
        sets = _label_sets(entry)
        if kind == "counter":
            family = name[: -len("_total")] if name.endswith("_total") else name
            lines.append(f"# TYPE {family} counter")
            for i, ls in enumerate(sets):
                labels = _fmt_labels({**base, **ls})
                for n, ts in enumerate(stamps):
                    lines.append(f"{name}{labels} {(n + 1) * (i + 1) * 3} {ts}")
        elif kind == "gauge":
            lines.append(f"# TYPE {name} gauge")
            value = GAUGE_VALUES.get(name, 1)
            for ls in sets:
                labels = _fmt_labels({**base, **ls})
                for ts in stamps:
                    lines.append(f"{name}{labels} {value} {ts}")
        elif kind == "histogram":
            lines.append(f"# TYPE {name} histogram")
            for ls in sets:
                for n, ts in enumerate(stamps):
                    per_bucket = (n + 1) * 2
                    cumulative = 0
                    for bound in HISTOGRAM_BOUNDS:
                        cumulative += per_bucket
                        labels = _fmt_labels({**base, **ls, "le": repr(float(bound))})
                        lines.append(f"{name}_bucket{labels} {cumulative} {ts}")
                    cumulative += per_bucket
                    labels = _fmt_labels({**base, **ls, "le": "+Inf"})
                    lines.append(f"{name}_bucket{labels} {cumulative} {ts}")
                    plain = _fmt_labels({**base, **ls})
                    lines.append(f"{name}_count{plain} {cumulative} {ts}")
                    lines.append(f"{name}_sum{plain} {cumulative * 100} {ts}")
        else:
            raise ValueError(f"unknown metric type {kind!r} for {name}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def backfill(openmetrics: str, storage: Path, workdir: Path) -> None:
    """Write OpenMetrics text into TSDB blocks under ``storage``."""
    promtool = require_binary("promtool")
    src = workdir / "synthetic.om"
    src.write_text(openmetrics)
    proc = run_tool([promtool, "tsdb", "create-blocks-from", "openmetrics", str(src), str(storage)],
                    cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"promtool backfill failed:\n{proc.stdout}\n{proc.stderr}")


# --------------------------------------------------------------------------
# dashboards
# --------------------------------------------------------------------------

# Grafana's built-in interval variables, replaced by a plain duration.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def substitute_grafana_variables(expr: str, variables: dict[str, str]) -> str:
    """Replace $var / ${var} / [[var]] with concrete values; unknown ones raise."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        if name in variables:
            return variables[name]
        raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


def iter_panels(panels: Iterable[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors = set()
    for line in RUNBOOK_PATH.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            anchors.add(github_anchor(m.group(1)))
    return anchors
