// Bulk jobs, where the service has an API for them (GET /v1/jobs). Bulk
// enrolment runs as a Ray job today; until an HTTP listing exists the panel says so.
import { api, withCollection } from "./api.js";
import { $, fmt, h, kv, showError } from "./ui.js";

function jobRows(res) {
  return Array.isArray(res) ? res : res.jobs || res.items || [];
}

async function showReport(job, row) {
  try {
    const full = await api(`/v1/jobs/${encodeURIComponent(job.id ?? job.job_id)}`, { query: withCollection() });
    row.after(h("tr", {}, h("td", { colspan: "4" }, kv(full) || h("p", {}, "empty report"))));
  } catch (err) { showError(err, "Fetching the job report"); }
}

export async function loadJobs() {
  const out = $("#jobs-body");
  try {
    const res = await api("/v1/jobs", { query: withCollection() });
    const jobs = jobRows(res);
    if (!jobs.length) { out.replaceChildren(h("p", { class: "empty" }, "No bulk jobs yet.")); return; }
    const tbody = h("tbody");
    for (const j of jobs) {
      const id = j.id ?? j.job_id;
      const pct = j.progress ?? (j.total ? (j.done ?? j.processed ?? 0) / j.total : null);
      const prog = pct === null || pct === undefined ? h("span", {}, "–")
        : h("progress", { max: "1", value: String(pct), "aria-label": `job ${id} progress` });
      const row = h("tr", {}, h("td", {}, String(id)), h("td", {}, fmt(j.state ?? j.status)), h("td", {}, prog),
        h("td", {}, h("button", { type: "button", class: "secondary", onclick: () => showReport(j, row) }, "Report")));
      tbody.append(row);
    }
    out.replaceChildren(h("table", {}, h("caption", { class: "sr-only" }, "Bulk jobs"),
      h("thead", {}, h("tr", {}, ["Job", "State", "Progress", ""].map((t) => h("th", { scope: "col" }, t)))), tbody));
  } catch (err) {
    if (err.status === 404 && err.code === "not_found") {
      out.replaceChildren(h("div", { class: "empty" },
        h("p", {}, h("strong", {}, "No bulk jobs API on this server yet.")),
        h("p", {}, "Bulk enrolment runs as a Ray job (python -m serve_app.jobs.enroll, submitted with ray job submit; " +
          "see docs/BULK.md). Each job writes its report to the object store under reports/enroll/<tenant>/<collection>/."),
        h("p", {}, "This panel lists jobs, their state and progress, and a finished job's report once the service " +
          "exposes GET /v1/jobs.")));
      return;
    }
    showError(err, "Listing jobs");
  }
}

export function init() {
  $("#jobs-refresh").addEventListener("click", loadJobs);
}
