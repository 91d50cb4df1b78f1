// The service's API as the console uses it: the key, the collection, and
// errors turned into ApiError (every non-2xx answer is {"error": {...}}).

const KEY = "faceserve.console.key";
const COLLECTION = "faceserve.console.collection";

export const session = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set key(v) { v ? sessionStorage.setItem(KEY, v) : sessionStorage.removeItem(KEY); },
  get collection() { return sessionStorage.getItem(COLLECTION) || ""; },
  set collection(v) { v ? sessionStorage.setItem(COLLECTION, v) : sessionStorage.removeItem(COLLECTION); },
};

export class ApiError extends Error {
  constructor(status, code, message, traceId = null, details = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.traceId = traceId;
    this.details = details;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function toError(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON: say what we know */ }
  const e = body && body.error;
  const trace = res.headers.get("x-trace-id");
  if (e && e.message) return new ApiError(res.status, e.code || "error", e.message, e.trace_id || trace, e.details);
  return new ApiError(res.status, `http_${res.status}`, `The service answered ${res.status} ${res.statusText}.`, trace);
}

/**
 * One call. `json` or `form` is the body; `query` entries that are empty are left out.
 * 503 with Retry-After (overload) is retried a few times, as the service asks.
 */
export async function api(path, { method = "GET", json, form, query = {}, raw = false, retries = 3 } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, String(v));
  }
  const headers = { Accept: "application/json" };
  if (session.key) headers["X-API-Key"] = session.key;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  else if (form) body = form;
  for (let attempt = 0; ; attempt++) {
    let res;
    try {
      res = await fetch(url, { method, headers, body, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, "network", `The service could not be reached (${err.message}).`);
    }
    if (res.status === 503 && attempt < retries && res.headers.has("retry-after")) {
      await sleep(Math.min(Number(res.headers.get("retry-after")) || 1, 10) * 1000);
      continue;
    }
    if (!res.ok) throw await toError(res);
    return raw ? res : res.json();
  }
}

/** Gallery routes take the collection as ?collection=; image routes as a form field. */
export const withCollection = (query = {}) => ({ ...query, collection: session.collection });

export function imageForm(fields) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) {
    if (v instanceof Blob) form.append(k, v, v.name || `${k}.jpg`);
    else if (v !== undefined && v !== null && v !== "") form.append(k, String(v));
  }
  return form;
}

// Crops need the key, so an <img src> cannot fetch them: fetch, then a blob: URL.
const crops = new Map();

export function cropUrl(subjectId, faceId) {
  const id = `${session.collection}/${subjectId}/${faceId}`;
  if (!crops.has(id)) {
    const p = api(`/v1/subjects/${subjectId}/faces/${faceId}/crop`, { query: withCollection(), raw: true })
      .then((res) => res.blob())
      .then((blob) => URL.createObjectURL(blob));
    p.catch(() => crops.delete(id));
    crops.set(id, p);
  }
  return crops.get(id);
}

const facesOf = new Map();

/** A subject's faces, remembered for this view (candidates repeat across faces). */
export function subjectFaces(subjectId, { fresh = false } = {}) {
  const id = `${session.collection}/${subjectId}`;
  if (fresh || !facesOf.has(id)) {
    const p = api(`/v1/subjects/${subjectId}/faces`, { query: withCollection() }).then((r) => r.faces);
    p.catch(() => facesOf.delete(id));
    facesOf.set(id, p);
  }
  return facesOf.get(id);
}

export function forgetSubject(subjectId) { facesOf.delete(`${session.collection}/${subjectId}`); }
