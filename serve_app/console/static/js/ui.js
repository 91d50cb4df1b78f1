// DOM helpers: elements from data (never innerHTML), messages, confirmation, charts.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);

/** A number as people read it: FMRs in scientific notation, scores to 4 places. */
export function fmt(v) {
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    if (v !== 0 && Math.abs(v) < 0.001) return v.toExponential(2);
    return String(Math.round(v * 10000) / 10000);
  }
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) return v.length ? v.map(fmt).join(", ") : "none";
  if (v && typeof v === "object") return Object.entries(v).map(([k, x]) => `${k} ${fmt(x)}`).join("; ");
  return v === null || v === undefined ? "–" : String(v);
}

/** Every field of `obj` not in `skip`, as a definition list: optional fields show when present. */
export function kv(obj, skip = []) {
  const dl = h("dl", { class: "kv" });
  for (const [k, v] of Object.entries(obj || {})) {
    if (skip.includes(k) || v === undefined || v === null) continue; // absent, as far as people care
    dl.append(h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, fmt(v)));
  }
  return dl.childElementCount ? dl : null;
}

// --- messages -----------------------------------------------------------------------
export function showError(err, what) {
  const box = document.getElementById("messages");
  const title = what ? `${what} failed` : "Something went wrong";
  const meta = [];
  if (err.status) meta.push(`HTTP ${err.status}`);
  if (err.code) meta.push(`code ${err.code}`);
  if (err.traceId) meta.push(`trace ${err.traceId}`);
  let hint = null;
  if (err.status === 401) hint = "Enter a valid API key above (it is kept for this tab only).";
  if (err.status === 403) hint = "This key lacks the scope this needs (read, enrol or admin).";
  const msg = h("div", { class: "msg error", role: "alert" },
    h("div", {},
      h("p", {}, h("strong", {}, `${title}: `), err.message || String(err)),
      hint && h("p", {}, hint),
      err.details && h("p", { class: "meta" }, `details: ${fmt(err.details)}`),
      meta.length ? h("p", { class: "meta" }, meta.join(" · ")) : null),
    h("button", { type: "button", class: "secondary", onclick: () => msg.remove() }, "Dismiss"));
  box.prepend(msg);
  while (box.childElementCount > 4) box.lastElementChild.remove();
  if (err.status === 401) document.getElementById("key-input").focus();
  return msg;
}

export function showInfo(text, { sticky = false } = {}) {
  const box = document.getElementById("messages");
  const msg = h("div", { class: "msg info", role: "status" }, h("p", {}, text),
    h("button", { type: "button", class: "secondary", onclick: () => msg.remove() }, "Dismiss"));
  box.prepend(msg);
  if (!sticky) setTimeout(() => msg.remove(), 8000);
  while (box.childElementCount > 4) box.lastElementChild.remove();
}

export function clearMessages() { document.getElementById("messages").replaceChildren(); }

/** A modal question; resolves true only on the confirm button. Esc cancels. */
export function confirmDialog(text, okLabel = "Delete") {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  dlg.returnValue = "";
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
    dlg.showModal();
  });
}

/** Runs fn with the button disabled (and the region marked busy) meanwhile. */
export async function busy(button, fn) {
  const region = button.closest("section") || document.body;
  button.disabled = true;
  region.setAttribute("aria-busy", "true");
  try { return await fn(); } finally {
    button.disabled = false;
    region.removeAttribute("aria-busy");
  }
}

// --- timings ------------------------------------------------------------------------
/** Per-stage milliseconds as horizontal bars; "total" is the caption, not a bar. */
export function timingsChart(timings) {
  if (!timings) return null;
  const entries = Object.entries(timings).filter(([k]) => k !== "total");
  const max = Math.max(1e-6, ...entries.map(([, v]) => v));
  const total = timings.total ?? entries.reduce((a, [, v]) => a + v, 0);
  const list = h("ul", { class: "bars" });
  for (const [stage, ms] of entries) {
    const bar = h("span", { class: "bar", "aria-hidden": "true" });
    bar.style.width = `${Math.max(0.5, (ms / max) * 100)}%`; // CSSOM: allowed under the CSP
    list.append(h("li", {}, h("span", {}, stage), h("span", {}, bar), h("span", { class: "v" }, `${ms.toFixed(1)} ms`)));
  }
  return h("section", { class: "timings", "aria-label": "Time per stage" },
    h("h2", {}, `Time per stage (total ${total.toFixed(1)} ms)`), list);
}
