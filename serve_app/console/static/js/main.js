// The console's entry: the key (kept in sessionStorage for this tab), the
// sections (#try, #manage, #jobs), and the first loads.
import { api, session } from "./api.js";
import * as jobs from "./jobs.js";
import * as manage from "./manage.js";
import * as tryIt from "./try.js";
import { $, clearMessages, showError } from "./ui.js";

const VIEWS = ["try", "manage", "jobs"];

function keyState() {
  $("#key-state").textContent = session.key ? "Key set for this tab." : "No key set.";
}

async function useKey(e) {
  e.preventDefault();
  const input = $("#key-input");
  const value = input.value.trim();
  if (!value) { input.focus(); return; }
  session.key = value;
  input.value = "";
  clearMessages();
  try {
    await api("/v1/collections");
  } catch (err) {
    if (err.status === 401) session.key = "";  // refused: do not keep it
    keyState();
    showError(err, "Checking the key");
    return;
  }
  keyState();
  await refresh();
}

function forgetKey() {
  session.key = "";
  keyState();
  $("#key-input").focus();
}

async function refresh() {
  if (await manage.loadCollections()) await manage.loadSubjects(true);
}

function route() {
  const view = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "try";
  for (const v of VIEWS) {
    $(`#view-${v}`).hidden = v !== view;
    const link = document.querySelector(`.tabs a[data-view="${v}"]`);
    if (v === view) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  if (view === "jobs") jobs.loadJobs();
  return view;
}

function start() {
  tryIt.init();
  manage.init();
  jobs.init();
  $("#key-form").addEventListener("submit", useKey);
  $("#key-forget").addEventListener("click", forgetKey);
  window.addEventListener("hashchange", () => { const v = route(); $(`#${v}-h`).focus(); });
  keyState();
  route();
  refresh();
}

window.addEventListener("unhandledrejection", (e) => showError(e.reason instanceof Error ? e.reason : new Error(String(e.reason))));
start();
