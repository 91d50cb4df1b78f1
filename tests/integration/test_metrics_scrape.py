"""Live scrape: every metric the alert rules and dashboards use is really exported.

The app runs for real (the session's `live_app`: Ray head, `serve deploy`,
Postgres, Redis). This module sends traffic that meets every `exported_when`
condition in monitoring/metrics_catalog.yml (requests, 4xx answers, batches,
match / no_match / unknown outcomes, a live and a spoof face, and a client
that hangs up in the middle of an upload, which makes an exception leave the
Ingress replica), then scrapes Ray's metrics port the way Prometheus does on a
single node (http://127.0.0.1:<metrics port>/metrics) until the exposition
holds every series the rules and dashboards select, with the labels and label
values their selectors and `by (...)` clauses use.

What is required is read from monitoring/rules/face-recognition-rules.yml and
monitoring/grafana/dashboards/*.json themselves (names as
tests/unit/promtool_util.py finds them), so a rule or panel on a name that is
never exported fails here. The checking functions are also tested against a
synthetic exposition below, without the app, to show that they do fail.

Label values that only exist after a failure nothing honest can provoke from
outside (outcome="error": counted only when a request or check fails with an
unexpected exception; status_code=~"5..") cannot be required; for those the
series must exist with the label, and an outcome value must be in the
catalog's domain. The metrics port is polled while light traffic flows:
Ray 2.60 drops a gauge series ~20 s after its last set(), and some of Ray's
gauges are set only when their value changes.
"""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import httpx
import pytest
import yaml

from tests.conftest import FACES_DIR, people
from tests.integration.conftest import BOOTSTRAP_KEY, LiveApp
from tests.unit.promtool_util import (
    DASHBOARDS_DIR,
    PROMQL_KEYWORDS,
    RULES_PATH,
    catalog_metrics,
    catalog_sample_index,
    iter_panels,
    load_catalog,
    metric_names,
    sample_names,
    substitute_grafana_variables,
    synthetic_openmetrics,
)

# The dashboards' template variables, as the dashboard unit test sets them.
GRAFANA_VARIABLES = {"application": "faceserve", "datasource": "prometheus"}
# Ray exports with some delay (metrics agent, cached replica counters): poll.
SCRAPE_DEADLINE_S = 60.0
# Labels whose catalog list is the complete domain (see the catalog's header).
ENUM_LABELS = ("stage", "outcome")
# Matchers that only select something after a failure the test cannot (and
# must not) provoke; for these the series must exist with the label.
CONDITIONAL_VALUES = {
    ("outcome", "error"): "counted only when a request or check fails with an unexpected exception",
    ("status_code", "5.."): "needs a 5xx answer (the proxy's 503s while the app starts are the usual ones)",
}

LIVENESS_DIR = FACES_DIR / "liveness"


# --------------------------------------------------------------------------
# the Prometheus text exposition
# --------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"')


def parse_exposition(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets of its series (Prometheus or OpenMetrics text)."""
    out: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"cannot parse exposition line {line!r}")
        labels = {
            k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            for k, v in _LABEL.findall(m.group(3) or "")
        }
        out.setdefault(m.group(1), []).append(labels)
    return out


# --------------------------------------------------------------------------
# what the rules and dashboards select
# --------------------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_AGG_CLAUSE = re.compile(r"\b(by|without)\s*\(([^()]*)\)", re.IGNORECASE)
_MATCH_CLAUSE = re.compile(r"\b(on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE)
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)")
_MATCHER = re.compile(
    r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`)'
)


@dataclass(frozen=True)
class Selector:
    """One metric selector of an expression and what it needs from the data."""

    where: str
    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()
    # labels of the `by (...)` clauses whose aggregation contains the selector
    grouping: frozenset[str] = frozenset()

    def __str__(self) -> str:
        body = ", ".join(f'{k}{op}"{v}"' for k, op, v in self.matchers)
        by = f" by ({', '.join(sorted(self.grouping))})" if self.grouping else ""
        return f"{self.name}{{{body}}}{by}"


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _closing(text: str, open_at: int) -> int:
    """Index of the bracket that closes the one at open_at."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    opener, closer = text[open_at], pairs[text[open_at]]
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opener!r} at {open_at} in {text!r}")


def _opening(text: str, close_at: int) -> int:
    depth = 0
    for i in range(close_at, -1, -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced ')' at {close_at} in {text!r}")


def _unquote(literal: str) -> str:
    if literal[0] == "`":
        return literal[1:-1]
    return literal[1:-1].encode("utf-8").decode("unicode_escape")


def selectors_of(expr: str, where: str) -> list[Selector]:
    """Every metric selector in a PromQL expression, with matchers and grouping labels.

    Not a full parser: enough for the rule and dashboard expressions (vector
    selectors, aggregations with by/without before or after the argument,
    binary operators with on/ignoring/group_x). The names found are checked
    against promtool_util.metric_names, so the two scanners cannot drift.
    """
    # Strings keep their length but lose their content; positions stay valid.
    masked = _STRING.sub(lambda m: m.group(0)[0] + " " * (len(m.group(0)) - 2) + m.group(0)[-1], expr)
    scopes: list[tuple[int, int, frozenset[str]]] = []
    names_text = masked
    for m in _AGG_CLAUSE.finditer(masked):
        labels = frozenset(x.strip() for x in m.group(2).split(",") if x.strip())
        after = m.end()
        while after < len(masked) and masked[after].isspace():
            after += 1
        if after < len(masked) and masked[after] == "(":  # sum by (x) (body)
            body = (after, _closing(masked, after))
        else:  # sum (body) by (x)
            before = m.start() - 1
            while before >= 0 and masked[before].isspace():
                before -= 1
            if before < 0 or masked[before] != ")":
                raise ValueError(f"{where}: cannot find the aggregation of {m.group(0)!r} in {expr!r}")
            body = (_opening(masked, before), before)
        if m.group(1).lower() == "by":
            scopes.append((body[0], body[1], labels))
        names_text = _blank(names_text, m.start(), m.end())
    for m in _MATCH_CLAUSE.finditer(masked):
        names_text = _blank(names_text, m.start(), m.end())
    braces: dict[int, int] = {}
    i = 0
    while i < len(masked):
        if masked[i] in "{[":
            end = _closing(masked, i)
            if masked[i] == "{":
                braces[i] = end
            names_text = _blank(names_text, i, end + 1)
            i = end + 1
        else:
            i += 1
    out = []
    for m in _IDENT.finditer(names_text):
        word = m.group(1)
        rest = names_text[m.end():].lstrip()
        if word.lower() in PROMQL_KEYWORDS or rest.startswith("("):
            continue  # keyword, aggregation or function
        nxt = m.end()
        while nxt < len(masked) and masked[nxt].isspace():
            nxt += 1
        matchers: tuple[tuple[str, str, str], ...] = ()
        if nxt in braces:
            body = expr[nxt + 1 : braces[nxt]]
            matchers = tuple((k, op, _unquote(v)) for k, op, v in _MATCHER.findall(body))
        grouping = frozenset().union(*(labels for s, e, labels in scopes if s < m.start() < e))
        out.append(Selector(where, word, matchers, grouping))
    found = {s.name for s in out}
    expected = metric_names(expr)
    if found != expected:
        raise AssertionError(f"{where}: scanner found {sorted(found)}, promtool_util {sorted(expected)}")
    return out


def rule_selectors(rules_path: Path = RULES_PATH) -> list[Selector]:
    doc = yaml.safe_load(rules_path.read_text(encoding="utf-8"))
    out = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            out += selectors_of(rule["expr"], f"rule {name}")
    return out


def dashboard_selectors(dashboards_dir: Path = DASHBOARDS_DIR) -> list[Selector]:
    out = []
    for path in sorted(dashboards_dir.glob("*.json")):
        dash = json.loads(path.read_text(encoding="utf-8"))
        for panel in iter_panels(dash.get("panels", [])):
            for target in panel.get("targets") or []:
                expr = substitute_grafana_variables(target["expr"], GRAFANA_VARIABLES)
                where = f"{path.name} panel {panel['id']} {panel.get('title')!r} {target.get('refId')}"
                out += selectors_of(expr, where)
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", query)
            if m:
                out.append(Selector(f"{path.name} variable ${var['name']}", m.group(1),
                                    grouping=frozenset({m.group(2)})))
    return out


def required_selectors() -> list[Selector]:
    """What the rules and dashboards select, less Prometheus' own series (`up`)."""
    catalog = catalog_sample_index()
    return [
        s for s in rule_selectors() + dashboard_selectors()
        if catalog.get(s.name, {}).get("source") != "prometheus"
    ]


# --------------------------------------------------------------------------
# matching selectors against a scrape
# --------------------------------------------------------------------------


def _matches(labels: dict[str, str], matchers: Iterable[tuple[str, str, str]]) -> bool:
    for key, op, value in matchers:
        got = labels.get(key, "")  # a missing label is the empty string in PromQL
        if op == "=" and got != value:
            return False
        if op == "!=" and got == value:
            return False
        if op == "=~" and not re.fullmatch(value, got):
            return False
        if op == "!~" and re.fullmatch(value, got):
            return False
    return True


def _satisfied(scrape: dict[str, list[dict[str, str]]], name: str,
               matchers: Iterable[tuple[str, str, str]], grouping: Iterable[str]) -> bool:
    matchers = list(matchers)
    return any(
        _matches(labels, matchers) and all(labels.get(g) for g in grouping)
        for labels in scrape.get(name, [])
    )


@dataclass
class Check:
    missing: list[str] = field(default_factory=list)  # failures
    conditional: list[str] = field(default_factory=list)  # values only an exception would create

    @property
    def ok(self) -> bool:
        return not self.missing


def check_selectors(scrape: dict[str, list[dict[str, str]]], selectors: Iterable[Selector]) -> Check:
    result = Check()
    catalog = catalog_sample_index()
    for sel in selectors:
        if sel.name not in scrape:
            result.missing.append(f"{sel.where}: {sel.name} is not exported at all")
            continue
        if _satisfied(scrape, sel.name, sel.matchers, sel.grouping):
            continue
        # A value that only a failure creates: the series must exist with
        # the label, and the value must be one the catalog says the app emits.
        relaxed, waived = [], []
        for key, op, value in sel.matchers:
            if op in ("=", "=~") and (key, value) in CONDITIONAL_VALUES:
                domain = [str(v) for v in (catalog.get(sel.name, {}).get("labels") or {}).get(key, [])]
                if op == "=" and value not in domain:
                    result.missing.append(f"{sel.where}: {key}={value!r} is not in the catalog's domain {domain}")
                relaxed.append((key, "!=", ""))
                waived.append((key, value))
            else:
                relaxed.append((key, op, value))
        if waived and _satisfied(scrape, sel.name, relaxed, sel.grouping):
            what = ", ".join(f"{k}={v!r}" for k, v in waived)
            why = "; ".join(CONDITIONAL_VALUES[kv] for kv in waived)
            result.conditional.append(f"{sel.where}: {sel} - {what} not required ({why})")
            continue
        have = sorted({tuple(sorted(l.items())) for l in scrape[sel.name]})[:5]
        result.missing.append(
            f"{sel.where}: no exported series matches {sel}; some exported label sets: "
            + "; ".join(", ".join(f"{k}={v}" for k, v in h if k in _INTERESTING) for h in have)
        )
    return result


_COMMON = set(load_catalog()["common_labels"])
_INTERESTING = {
    k for e in catalog_metrics().values() for k in (e.get("labels") or {})
} | {"le"}


def check_catalog(scrape: dict[str, list[dict[str, str]]]) -> Check:
    """The catalog's promises for `source: faceserve` and `source: ray_serve`."""
    result = Check()
    for name, entry in catalog_metrics().items():
        if entry["source"] == "prometheus":
            continue
        labels = {k: [str(v) for v in vs] for k, vs in (entry.get("labels") or {}).items()}
        for sample in sample_names(entry):
            series = scrape.get(sample, [])
            if not series:
                result.missing.append(f"catalog: {sample} ({entry['exported_when']}) is not exported")
                continue
            for key in labels:
                if not any(s.get(key) for s in series):
                    result.missing.append(f"catalog: {sample} has no series with label {key!r}")
            # Real names, not placeholders: each example must be a deployment
            # (application) that really records the metric.
            for key in ("application", "deployment"):
                for value in sorted(set(labels.get(key, [])) - {s.get(key, "") for s in series}):
                    result.missing.append(f"catalog: {sample} has no series with {key}={value!r}")
            for key in ENUM_LABELS:
                if key not in labels:
                    continue
                seen = {s[key] for s in series if s.get(key)}
                unknown = seen - set(labels[key])
                if unknown:
                    result.missing.append(
                        f"catalog: {sample} has {key} values {sorted(unknown)} missing from the domain {labels[key]}")
                for value in sorted(set(labels[key]) - seen):
                    if (key, value) in CONDITIONAL_VALUES:
                        result.conditional.append(f"catalog: {sample} {key}={value!r} not seen "
                                                  f"({CONDITIONAL_VALUES[(key, value)]})")
                    else:
                        result.missing.append(
                            f"catalog: {sample} {key}={value!r} is in the catalog's domain but never exported")
    return result


def scrape_text(port: int) -> str:
    """What Prometheus gets from Ray's metrics port on a single node."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode("utf-8")


# --------------------------------------------------------------------------
# the checks themselves must fail on bad input (no app needed)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_scrape() -> dict[str, list[dict[str, str]]]:
    """Every catalog series with the catalog's example labels."""
    now = time.time()
    return parse_exposition(synthetic_openmetrics(now - 60, now))


def test_scanner_attributes_grouping_labels_to_the_right_selector() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (application, le) (rate(a_bucket{route!~"/-/.*", x="sum(b)"}[5m])))'
        " > 2000 and on (application) sum(increase(a_count{application!=\"\"}[5m])) by (application) >= 20"
        " or label_replace(vector(0), \"r\", \"v\", \"\", \"\") or count(d == 2)"
    )
    got = {s.name: s for s in selectors_of(expr, "t")}
    assert set(got) == {"a_bucket", "a_count", "d"}
    assert got["a_bucket"].grouping == {"application", "le"}
    assert got["a_bucket"].matchers == (("route", "!~", "/-/.*"), ("x", "=", "sum(b)"))
    assert got["a_count"].grouping == {"application"}
    assert got["a_count"].matchers == (("application", "!=", ""),)
    assert got["d"].grouping == frozenset() and got["d"].matchers == ()


def test_rules_and_dashboards_are_satisfied_by_the_catalog_examples(synthetic_scrape) -> None:
    """Sanity: the requirement list is not empty and the checker accepts good data."""
    required = required_selectors()
    assert {s.where.split()[0] for s in required} >= {"rule", "faceserve-overview.json"}
    assert len({s.name for s in required}) >= 20
    result = check_selectors(synthetic_scrape, required)
    assert result.ok, "\n".join(result.missing)


def test_a_rule_on_a_name_that_is_not_exported_fails(synthetic_scrape) -> None:
    fake = selectors_of(
        'sum by (application) (rate(ray_faceserve_never_exported_total{application="faceserve"}[5m])) > 0',
        "rule Fake",
    )
    result = check_selectors(synthetic_scrape, required_selectors() + fake)
    assert len(result.missing) == 1 and "ray_faceserve_never_exported_total" in result.missing[0], result.missing


def test_a_real_rule_fails_when_its_metric_disappears(synthetic_scrape) -> None:
    scrape = dict(synthetic_scrape)
    del scrape["ray_faceserve_verifications_total"]
    result = check_selectors(scrape, rule_selectors())
    assert result.missing and all("VerificationFailure" in m for m in result.missing), result.missing


def test_wrong_label_value_or_missing_grouping_label_fails(synthetic_scrape) -> None:
    bad = selectors_of('sum(ray_serve_deployment_replica_healthy{application="faceserve", deployment="Nope"})', "a")
    bad += selectors_of("sum by (stage) (rate(ray_faceserve_verifications_total[5m]))", "b")
    bad += selectors_of('sum(rate(ray_faceserve_liveness_checks_total{outcome="maybe"}[5m]))', "c")
    result = check_selectors(synthetic_scrape, bad)
    assert [m.split(":")[0] for m in result.missing] == ["a", "b", "c"], result.missing


def test_an_error_only_value_is_waived_but_a_typo_is_not(synthetic_scrape) -> None:
    scrape = {
        name: [s for s in series if s.get("outcome") != "error"] for name, series in synthetic_scrape.items()
    }
    ok = selectors_of('sum(rate(ray_faceserve_verifications_total{outcome="error"}[5m]))', "ok")
    typo = selectors_of('sum(rate(ray_faceserve_verifications_total{outcome="eror"}[5m]))', "typo")
    result = check_selectors(scrape, ok + typo)
    assert len(result.conditional) == 1 and result.conditional[0].startswith("ok:"), result
    assert len(result.missing) == 1 and result.missing[0].startswith("typo:"), result


def test_catalog_check_fails_on_a_missing_metric_or_unknown_value(synthetic_scrape) -> None:
    assert check_catalog(synthetic_scrape).ok
    scrape = dict(synthetic_scrape)
    del scrape["ray_serve_batch_queue_length"]
    scrape["ray_faceserve_stage_latency_ms_count"] = scrape["ray_faceserve_stage_latency_ms_count"] + [
        {"application": "faceserve", "deployment": "Ingress", "replica": "r1", "stage": "teleport"}
    ]
    scrape["ray_faceserve_faces_per_image_count"] = [
        dict(s, deployment="Ingress") for s in scrape["ray_faceserve_faces_per_image_count"]
    ]
    missing = check_catalog(scrape).missing
    assert any("ray_serve_batch_queue_length" in m for m in missing), missing
    assert any("teleport" in m for m in missing), missing
    assert any("ray_faceserve_faces_per_image_count has no series with deployment=" in m for m in missing), missing


# --------------------------------------------------------------------------
# traffic for every `exported_when` condition
# --------------------------------------------------------------------------


def _post_image(client: httpx.Client, url: str, path: Path, params: dict[str, Any] | None = None) -> httpx.Response:
    with path.open("rb") as fh:
        return client.post(url, params=params or {}, files={"image": (path.name, fh)})


def _abandon_upload(live_app: LiveApp, path: Path) -> None:
    """A client that hangs up in the middle of its upload (a real-world event).

    The Ingress is already running the handler, waiting for the rest of the
    body; the proxy notices the disconnect, answers 499 and cancels the call,
    so a CancelledError leaves the replica: Ray counts it in
    ray_serve_deployment_error_counter (exception_type="CancelledError").
    No fault is injected into the app.
    """
    data = path.read_bytes()
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + data + tail
    host, port = live_app.ports.http_host, live_app.ports.http
    request = (f"POST /v1/detect HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
               f"X-API-Key: {BOOTSTRAP_KEY}\r\n"  # past authentication: the handler reads the body
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request + body[: len(body) // 2])
        time.sleep(1.0)  # the handler is waiting for the rest of the body
    time.sleep(0.5)


@pytest.fixture(scope="module")
def traffic(live_app: LiveApp) -> dict[str, Any]:
    """Drive every path the catalog's `exported_when` conditions name."""
    ppl = people()
    names = [n for n, photos in ppl.items() if len(photos) >= 2]
    enrolled, stranger = names[:2], names[2]
    with live_app.client() as client:
        # A collection of our own, so the other modules' galleries are untouched.
        collection = f"metrics-scrape-{uuid.uuid4().hex[:8]}"
        r = client.post("/v1/collections", json={"name": collection})
        assert r.status_code == 201, r.text
        seq = 0
        for name in enrolled:
            r = client.post("/v1/subjects", json={"name": f"scrape-{name}-{uuid.uuid4().hex[:6]}",
                                                  "collection": collection},
                            headers={"Idempotency-Key": uuid.uuid4().hex})  # ray_faceserve_idempotency_total
            assert r.status_code == 201, r.text
            r = _post_image(client, f"/v1/subjects/{r.json()['id']}/faces", ppl[name][0],
                            {"collection": collection, "liveness": "flag"})
            assert r.status_code == 201, r.text
            seq = max(seq, r.json()["seq"])
        # identify: match and unknown
        decisions = set()
        for path in (ppl[enrolled[0]][1], ppl[stranger][0]):
            r = _post_image(client, "/v1/identify", path, {"collection": collection, "min_seq": seq})
            assert r.status_code == 200, r.text
            decisions |= {f["decision"] for f in r.json()["faces"]}
        assert decisions == {"match", "unknown"}, decisions
        # verify: match and no_match
        outcomes = set()
        for a, b in ((ppl[enrolled[0]][0], ppl[enrolled[0]][1]), (ppl[enrolled[0]][0], ppl[enrolled[1]][0])):
            with a.open("rb") as fa, b.open("rb") as fb:
                r = client.post("/v1/verify", files={"image1": fa, "image2": fb})
            assert r.status_code == 200, r.text
            outcomes.add(r.json()["match"])
        assert outcomes == {True, False}
        # liveness flag on a live and a spoof face
        lives = set()
        for path in (LIVENESS_DIR / "image_T1.jpg", LIVENESS_DIR / "image_F1.jpg"):
            r = _post_image(client, "/v1/liveness", path)
            assert r.status_code == 200, r.text
            lives |= {f["live"] for f in r.json()["faces"]}
        assert lives == {True, False}
        # detect, several at once so that batches form
        photos = [p for ps in ppl.values() for p in ps][:8]
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda p: _post_image(client, "/v1/detect", p, {"liveness": "flag"}).status_code,
                                  photos))
        assert set(codes) == {200}, codes
        # 4xx answers: not an image (415), no face (422), unknown subject (404)
        r = client.post("/v1/identify", files={"image": ("x.jpg", b"this is not an image")})
        assert r.status_code == 415, r.text
        from io import BytesIO

        from PIL import Image

        buf = BytesIO()
        Image.new("RGB", (160, 120), (90, 120, 150)).save(buf, format="JPEG")
        r = client.post("/v1/detect", files={"image": ("blank.jpg", buf.getvalue())})
        assert r.status_code == 200 and r.json()["faces"] == [], r.text
        r = client.post("/v1/liveness", files={"image": ("blank.jpg", buf.getvalue())})
        assert r.status_code == 422, r.text
        r = client.get("/v1/subjects/00000000-0000-0000-0000-000000000000")
        assert r.status_code == 404, r.text
    # an exception leaving the Ingress replica: a client gone mid-upload
    _abandon_upload(live_app, FACES_DIR / "groups" / "obama_and_biden.jpg")
    return {"collection": collection}


def _keep_busy(client: httpx.Client, collection: str) -> None:
    """One identify through every deployment and batch, with liveness.

    Ray 2.60 drops a gauge series from the exposition about two report
    intervals (2 x 10 s) after its last set(); gauges set only on a change
    (the proxy's ongoing-requests, the batch queue length) are therefore
    there while traffic flows and gone when the app idles. So the scrape is
    polled under light traffic, as Prometheus would see a working service.
    """
    r = _post_image(client, "/v1/identify", LIVENESS_DIR / "image_T1.jpg",
                    {"collection": collection, "liveness": "flag"})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def live_scrape(live_app: LiveApp, traffic: dict[str, Any]) -> dict[str, Any]:
    """Scrape (under light traffic) until everything required is there, or the deadline passes."""
    required = required_selectors()
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    polls: list[set[str]] = []
    with live_app.client() as client:
        while True:
            _keep_busy(client, traffic["collection"])
            text = scrape_text(live_app.ports.metrics)
            scrape = parse_exposition(text)
            polls.append(set(scrape))
            rules = check_selectors(scrape, required)
            catalog = check_catalog(scrape)
            if (rules.ok and catalog.ok) or time.monotonic() > deadline:
                break
            time.sleep(2.0)
    _print_summary(scrape, text, required, rules, catalog, polls)
    return {"scrape": scrape, "text": text, "rules": rules, "catalog": catalog}


def _print_summary(scrape, text: str, required, rules: Check, catalog: Check, polls: list[set[str]]) -> None:
    print(f"\n# live scrape after {len(polls)} poll(s): {len(scrape)} sample names exported")
    names = sorted({s.name for s in required} | {n for e in catalog_metrics().values()
                                                  if e["source"] != "prometheus" for n in sample_names(e)})
    for name in names:
        series = scrape.get(name, [])
        keys = sorted({k for s in series for k in s} - _COMMON - {"le"})
        values = {k: sorted({s.get(k, "") for s in series})[:8] for k in keys
                  if k in {"application", "deployment", "outcome", "stage", "code", "status_code",
                           "error_code", "exception_type", "route", "function_name", "method"}}
        seen = [i for i, p in enumerate(polls) if name in p]
        when = "" if len(seen) in (0, len(polls)) else f" (present in polls {seen})"
        print(f"{'ok ' if series else 'MISSING'} {name}: {len(series)} series {values}{when}")
    for name in ("ray_faceserve_db_pool_size", "ray_faceserve_db_pool_max", "ray_faceserve_db_pool_in_use",
                 "ray_faceserve_redis_used_memory_bytes", "ray_faceserve_redis_maxmemory_bytes"):
        got = re.findall(rf"^{name}{{[^}}]*deployment=\"(\w+)\"[^}}]*}} (\S+)", text, re.M)
        print(f"value {name}: {got}")
    for line in rules.conditional + catalog.conditional:
        print("waived:", line)
    for line in rules.missing + catalog.missing:
        print("PROBLEM:", line)


# --------------------------------------------------------------------------
# against the live app
# --------------------------------------------------------------------------


def test_every_metric_the_rules_and_dashboards_use_is_exported(live_scrape: dict[str, Any]) -> None:
    result: Check = live_scrape["rules"]
    assert result.ok, "selected by the rules/dashboards but not exported:\n" + "\n".join(result.missing)


def test_the_catalog_matches_the_live_scrape(live_scrape: dict[str, Any]) -> None:
    result: Check = live_scrape["catalog"]
    assert result.ok, "monitoring/metrics_catalog.yml vs the live scrape:\n" + "\n".join(result.missing)


def test_the_abandoned_upload_was_counted_as_an_exception(live_scrape: dict[str, Any]) -> None:
    series = live_scrape["scrape"].get("ray_serve_deployment_error_counter_total", [])
    ingress = [s for s in series if s.get("application") == "faceserve" and s.get("deployment") == "Ingress"]
    assert ingress, series
    assert all(s.get("exception_type") for s in ingress), ingress
