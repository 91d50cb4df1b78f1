// "Manage": collections, subjects (paged, found by name) and their faces:
// create, rename, enrol by drop or file choice with progress, delete with confirmation.
import { api, cropUrl, forgetSubject, imageForm, session, subjectFaces, withCollection } from "./api.js";
import { dropZone, loadVerifySubjects } from "./try.js";
import { $, busy, confirmDialog, fmt, h, showError, showInfo } from "./ui.js";

const PAGE = 10;
const ENROL_PARALLEL = 2; // below the edge's admission limit, so uploads are not shed
let cursors = [null]; // the cursor of each page seen, for Previous
let nameFilter = "";
let nextCursor = null;
let current = null; // the open subject

// --- collections ------------------------------------------------------------------------
export async function loadCollections() {
  const sel = $("#collection-select");
  const list = $("#col-list");
  const sentKey = session.key;
  try {
    const res = await api("/v1/collections");
    const names = res.collections.map((c) => c.name);
    if (session.collection && !names.includes(session.collection)) names.push(session.collection);
    sel.replaceChildren(h("option", { value: "" }, "default"),
      ...names.filter((n) => n).map((n) => h("option", { value: n }, n)));
    sel.value = session.collection;
    list.replaceChildren(...res.collections.map((c) => h("li", {},
      h("button", { type: "button", class: "link", "aria-pressed": String(c.name === (session.collection || "default")),
        onclick: () => selectCollection(c.name) }, c.name),
      h("span", { class: "muted small" }, ` ${c.embedder}, ${c.dim}-d`))));
    if (!res.collections.length) list.append(h("li", { class: "muted" }, "none yet (the default is made on first use)"));
    return true;
  } catch (err) {
    if (sentKey !== session.key) return false; // the key changed meanwhile: that call's answer is moot
    if (err.status === 401 && !sentKey) showInfo("This service needs an API key: enter it above to start.", { sticky: true });
    else showError(err, "Listing collections");
    return false;
  }
}

export async function selectCollection(name) {
  session.collection = name === "default" ? "" : name;
  $("#collection-select").value = session.collection;
  closeSubject();
  await Promise.all([loadCollections(), loadSubjects(true)]);
  if (!$("#verify-subject-row").hidden) loadVerifySubjects();
}

async function createCollection(e) {
  e.preventDefault();
  const input = $("#col-name");
  await busy(e.submitter || $("#col-form button"), async () => {
    try {
      const col = await api("/v1/collections", { method: "POST", json: { name: input.value.trim() } });
      input.value = "";
      showInfo(`Collection ${col.name} created.`);
      await selectCollection(col.name);
    } catch (err) { showError(err, "Creating the collection"); }
  });
}

// --- subjects -----------------------------------------------------------------------------
export async function loadSubjects(reset = false) {
  if (reset) cursors = [null];
  const cursor = cursors[cursors.length - 1];
  const body = $("#subj-table tbody");
  try {
    const res = await api("/v1/subjects", { query: withCollection({ limit: PAGE, cursor, name: nameFilter }) });
    nextCursor = res.next_cursor;
    body.replaceChildren(...res.subjects.map((s) => h("tr", {},
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => openSubject(s) }, s.name)),
      h("td", {}, String(s.face_count)),
      h("td", {}, new Date(s.created_at).toLocaleString()))));
    if (!res.subjects.length) {
      body.append(h("tr", {}, h("td", { colspan: "3", class: "muted" },
        nameFilter ? `No subject named “${nameFilter}”.` : "No subjects yet: create one below.")));
    }
    $("#subj-total").textContent = nameFilter ? `(${res.total} found)` : `(${res.total})`;
    $("#subj-page").textContent = `page ${cursors.length}`;
    $("#subj-prev").disabled = cursors.length < 2;
    $("#subj-next").disabled = !nextCursor;
  } catch (err) {
    showError(err, "Listing subjects");
  }
}

async function createSubject(e) {
  e.preventDefault();
  const input = $("#subj-name");
  await busy(e.submitter || $("#subj-form button"), async () => {
    try {
      const s = await api("/v1/subjects", { method: "POST", json: { name: input.value.trim() }, query: withCollection() });
      input.value = "";
      await loadSubjects(true);
      await openSubject(s);
    } catch (err) { showError(err, "Creating the subject"); }
  });
}

function closeSubject() {
  current = null;
  $("#sd-body").hidden = true;
  $("#sd-empty").hidden = false;
  $("#sd-h").textContent = "Subject";
}

export async function openSubject(s) {
  current = s;
  $("#sd-h").textContent = `Subject: ${s.name}`;
  $("#sd-id").textContent = s.id;
  $("#rename-input").value = s.name;
  $("#enrol-log").replaceChildren();
  $("#enrol-progress-wrap").hidden = true;
  $("#sd-empty").hidden = true;
  $("#sd-body").hidden = false;
  $("#sd-h").focus();
  await loadFaces();
}

async function loadFaces() {
  const grid = $("#face-grid");
  const s = current;
  try {
    const faces = await subjectFaces(s.id, { fresh: true });
    if (current !== s) return;
    grid.replaceChildren(...faces.map((f) => {
      const img = h("img", { alt: `face ${f.id} of ${s.name}` });
      cropUrl(s.id, f.id).then((u) => { img.src = u; }).catch(() => { img.alt = `face ${f.id}: crop unavailable`; });
      return h("li", { "data-face-id": String(f.id) }, img,
        h("div", {}, `#${f.id} · det ${fmt(f.det_score)}`),
        h("div", { class: "muted" }, new Date(f.created_at).toLocaleDateString()),
        h("button", { type: "button", class: "danger", "aria-label": `Delete face ${f.id} of ${s.name}`,
          onclick: (e) => deleteFace(f, e.currentTarget) }, "Delete"));
    }));
    if (!faces.length) grid.append(h("li", { class: "muted" }, "No faces yet: drop photos above."));
  } catch (err) {
    showError(err, "Listing faces");
  }
}

async function renameSubject(e) {
  e.preventDefault();
  const name = $("#rename-input").value.trim();
  await busy(e.submitter || $("#rename-form button"), async () => {
    try {
      current = await api(`/v1/subjects/${current.id}`, { method: "PATCH", json: { name }, query: withCollection() });
      $("#sd-h").textContent = `Subject: ${current.name}`;
      showInfo(`Renamed to ${current.name}.`);
      await loadSubjects();
    } catch (err) { showError(err, "Renaming"); }
  });
}

async function deleteFace(f, button) {
  if (!(await confirmDialog(`Delete face #${f.id} of ${current.name}? Its crop and embedding are removed.`, "Delete face"))) return;
  await busy(button, async () => {
    try {
      await api(`/v1/subjects/${current.id}/faces/${f.id}`, { method: "DELETE", query: withCollection() });
      showInfo(`Face #${f.id} deleted.`);
      forgetSubject(current.id);
      await Promise.all([loadFaces(), loadSubjects()]);
    } catch (err) { showError(err, "Deleting the face"); }
  });
}

async function deleteSubject(button) {
  const s = current;
  if (!(await confirmDialog(`Delete ${s.name} and all of its faces?`, "Delete subject"))) return;
  await busy(button, async () => {
    try {
      const res = await api(`/v1/subjects/${s.id}`, { method: "DELETE", query: withCollection() });
      showInfo(`${s.name} deleted with ${res.faces_removed} face(s).`);
      closeSubject();
      await loadSubjects(true);
    } catch (err) { showError(err, "Deleting the subject"); }
  });
}

// --- enrolment ------------------------------------------------------------------------------
async function enrol(files) {
  if (!current) return;
  const s = current;
  const bar = $("#enrol-progress"), count = $("#enrol-count"), log = $("#enrol-log");
  $("#enrol-progress-wrap").hidden = false;
  bar.max = files.length;
  bar.value = 0;
  log.replaceChildren();
  let done = 0, failed = 0;
  const update = () => { bar.value = done; count.textContent = `${done} of ${files.length} done${failed ? `, ${failed} failed` : ""}`; };
  update();
  const queue = [...files];
  const worker = async () => {
    for (let f = queue.shift(); f; f = queue.shift()) {
      try {
        const res = await api(`/v1/subjects/${s.id}/faces`, { method: "POST",
          form: imageForm({ image: f, collection: session.collection, largest: $("#enrol-largest").checked || "" }) });
        log.append(h("li", { class: "good" }, `✓ ${f.name}: face #${res.face.id}` +
          (res.faces_in_image > 1 ? ` (largest of ${res.faces_in_image})` : "")));
      } catch (err) {
        failed++;
        log.append(h("li", { class: "bad" }, `✗ ${f.name}: ${err.message} (${err.code || "error"})`));
      }
      done++;
      update();
    }
  };
  await Promise.all(Array.from({ length: Math.min(ENROL_PARALLEL, files.length) }, worker));
  if (current === s) await loadFaces();
  await loadSubjects();
  if (failed) showError(new Error(`${failed} of ${files.length} photo(s) were not enrolled; see the list under the progress bar.`), "Enrolment");
  else showInfo(`${files.length} photo(s) enrolled for ${s.name}.`);
}

export function init() {
  $("#collection-select").addEventListener("change", (e) => selectCollection(e.target.value));
  $("#col-form").addEventListener("submit", createCollection);
  $("#subj-form").addEventListener("submit", createSubject);
  $("#subj-search").addEventListener("submit", (e) => { e.preventDefault(); nameFilter = $("#subj-q").value.trim(); loadSubjects(true); });
  $("#subj-clear").addEventListener("click", () => { nameFilter = ""; $("#subj-q").value = ""; loadSubjects(true); });
  $("#subj-next").addEventListener("click", () => { if (nextCursor) { cursors.push(nextCursor); loadSubjects(); } });
  $("#subj-prev").addEventListener("click", () => { if (cursors.length > 1) { cursors.pop(); loadSubjects(); } });
  $("#rename-form").addEventListener("submit", renameSubject);
  $("#subject-delete").addEventListener("click", (e) => deleteSubject(e.currentTarget));
  $("#enrol-files").addEventListener("change", (e) => { const files = [...e.target.files]; e.target.value = ""; enrol(files); });
  dropZone($("#enrol-drop"), enrol);
}
