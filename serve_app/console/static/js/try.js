// "Try it": one image (file, drop or webcam frame) through detect, liveness,
// identify or verify, drawn on the image with the answer's every field.
import { api, cropUrl, imageForm, session, subjectFaces, withCollection } from "./api.js";
import { figure } from "./overlay.js";
import { $, busy, fmt, h, kv, showError, timingsChart } from "./ui.js";

let image = null; // {blob, url, name}
let image2 = null;
let stream = null;

function setImage(blob, name) {
  if (image) URL.revokeObjectURL(image.url);
  image = { blob, name, url: URL.createObjectURL(blob) };
  $("#try-current").textContent = `Image: ${name} (${Math.round(blob.size / 1024)} KB)`;
  // Not an image to this browser: no broken preview; the service will say what it makes of it.
  const preview = !blob.type || blob.type.startsWith("image/")
    ? figure(image.url, [], `${name}: not analysed yet`)
    : h("p", { class: "empty" }, `${name} is ${blob.type}, not an image this page can preview.`);
  $("#try-result").replaceChildren(preview);
}

function setImage2(file) {
  if (image2) URL.revokeObjectURL(image2.url);
  image2 = file ? { blob: file, name: file.name, url: URL.createObjectURL(file) } : null;
}

const verifyMode = () => document.querySelector('input[name="verify-mode"]:checked').value;
const liveness = () => $("#try-liveness").value;

// --- renderers ------------------------------------------------------------------------
function qualityText(q) {
  if (!q) return "";
  return q.reasons?.length ? ` · q ${fmt(q.score)} (${q.reasons.join(", ")})` : ` · q ${fmt(q.score)}`;
}

function liveStatus(l) { return l ? (l.live ? "live" : "spoof") : null; }

function faceCard(title, face, skip, ...extra) {
  return h("li", {}, h("h2", {}, title), kv(face, skip), ...extra);
}

function renderDetect(res) {
  const marks = res.faces.map((f, i) => ({
    box: f.box, landmarks: f.landmarks, status: liveStatus(f.liveness) || "plain",
    label: `${i + 1} · ${fmt(f.score)}${f.liveness ? ` · ${liveStatus(f.liveness)} ${fmt(f.liveness.score)}` : ""}${qualityText(f.quality)}`,
  }));
  return [
    figure(image.url, marks, `${image.name}: ${res.faces.length} face(s) detected`, res.image),
    h("ol", { class: "face-list" }, res.faces.map((f, i) => faceCard(`Face ${i + 1}`, f, ["landmarks"]))),
    timingsChart(res.timings_ms),
  ];
}

function renderLiveness(res) {
  const marks = res.faces.map((f, i) => ({
    box: f.box, status: f.live ? "live" : "spoof", label: `${i + 1} · ${f.live ? "live" : "spoof"} ${fmt(f.score)}`,
  }));
  return [
    figure(image.url, marks, `${image.name}: liveness of ${res.faces.length} face(s)`),
    h("ol", { class: "face-list" }, res.faces.map((f, i) => faceCard(`Face ${i + 1}`, f, [],
      h("p", { class: `decision ${f.live ? "live" : "spoof"}` }, f.live ? "Live" : "Spoof")))),
    timingsChart(res.timings_ms),
  ];
}

function thumbs(subjectId, name, n = 3) {
  const box = h("span", { class: "thumbs" });
  subjectFaces(subjectId).then(async (faces) => {
    for (const f of faces.slice(0, n)) {
      const url = await cropUrl(subjectId, f.id);
      box.append(h("img", { src: url, alt: `enrolled face ${f.id} of ${name || subjectId}` }));
    }
    if (!faces.length) box.append(h("span", { class: "muted" }, "no faces"));
  }).catch(() => box.append(h("span", { class: "muted" }, "crops unavailable")));
  return box;
}

function candidates(list) {
  if (!list?.length) return h("p", { class: "muted" }, "No candidates.");
  return h("ol", { class: "cands", "aria-label": "Candidates" }, list.map((c) =>
    h("li", {}, h("div", {}, h("strong", {}, c.name || c.subject_id), kv(c, ["name", "subject_id"])),
      thumbs(c.subject_id, c.name, 2))));
}

function renderIdentify(res) {
  const marks = res.faces.map((f, i) => {
    const who = f.subject?.name || f.subject?.id || f.candidates?.[0]?.name;
    const sim = f.subject?.similarity ?? f.candidates?.[0]?.similarity;
    let label = "unknown";
    if (f.decision === "match") label = `${who} ${fmt(sim)}`;
    else if (f.decision === "maybe") label = `maybe ${who}? ${fmt(sim)}`;
    const live = liveStatus(f.liveness);
    return { box: f.box, landmarks: f.landmarks, status: live === "spoof" ? "spoof" : f.decision,
      label: `${i + 1} · ${label}${live === "spoof" ? " · spoof" : ""}` };
  });
  const matched = res.faces.filter((f) => f.decision === "match").length;
  return [
    figure(image.url, marks, `${image.name}: ${res.faces.length} face(s), ${matched} matched in ${res.collection}`),
    kv(res, ["faces", "timings_ms"]),
    h("ol", { class: "face-list" }, res.faces.map((f, i) => faceCard(`Face ${i + 1}`, f,
      ["landmarks", "candidates", "box", "decision", "subject"],
      h("p", { class: `decision ${f.decision}` }, f.decision), candidates(f.candidates)))),
    timingsChart(res.timings_ms),
  ];
}

function faceMark(f, status, label) {
  return { box: f.box, landmarks: f.landmarks, status, label };
}

function renderVerify(res, against) {
  const status = res.decision || (res.match ? "match" : "no_match");
  const colour = status;
  const word = { match: "Match", maybe: "Maybe", no_match: "No match" }[status] || status;
  const figs = [];
  if (res.faces) {
    figs.push(figure(image.url, [faceMark(res.faces.image1, colour, `image 1 · ${word}`)], `Image 1: ${image.name}`));
    figs.push(figure(against.url, [faceMark(res.faces.image2, colour, `image 2 · ${word}`)], `Image 2: ${against.name}`));
  } else {
    figs.push(figure(image.url, [faceMark(res.face, colour, `${word} · ${res.subject?.name}`)], `Probe: ${image.name}`));
    figs.push(h("div", { class: "panel" }, h("h2", {}, `Subject ${res.subject?.name}`), thumbs(res.subject.id, res.subject.name, 6),
      kv(res.subject, ["name"])));
  }
  return [
    h("p", { class: `decision ${status}` }, `${word}: similarity ${fmt(res.similarity)} (threshold ${fmt(res.threshold)})`),
    h("div", { class: "stages" }, figs),
    kv(res, ["faces", "face", "subject", "timings_ms"]),
    timingsChart(res.timings_ms),
  ];
}

// --- actions --------------------------------------------------------------------------
async function run(kind, button) {
  if (!image) {
    showError(new Error("Choose an image first (a file, a drop, or a webcam frame)."), kind);
    $("#try-file").focus();
    return;
  }
  await busy(button, async () => {
    const out = $("#try-result");
    try {
      let parts;
      if (kind === "verify") {
        const fields = { image1: image.blob, liveness: liveness() };
        let against = null;
        if (verifyMode() === "image") {
          if (!image2) throw new Error("Choose the second image to verify against.");
          fields.image2 = image2.blob;
          against = image2;
        } else {
          const sid = $("#verify-subject").value;
          if (!sid) throw new Error("Choose a subject to verify against (enrol one under Manage).");
          Object.assign(fields, { subject_id: sid, collection: session.collection });
        }
        const res = await api("/v1/verify", { method: "POST", form: imageForm(fields) });
        parts = renderVerify(res, against);
      } else {
        const fields = { image: image.blob, liveness: liveness() };
        if (kind === "identify") Object.assign(fields, { collection: session.collection, top_k: $("#try-topk").value });
        const res = await api(`/v1/${kind}`, { method: "POST", form: imageForm(fields) });
        parts = { detect: renderDetect, liveness: renderLiveness, identify: renderIdentify }[kind](res);
      }
      out.replaceChildren(...parts.filter(Boolean));
      out.dataset.result = kind;
    } catch (err) {
      out.dataset.result = "error";
      showError(err, kind[0].toUpperCase() + kind.slice(1));
    }
  });
}

export async function loadVerifySubjects() {
  const sel = $("#verify-subject");
  try {
    const res = await api("/v1/subjects", { query: withCollection({ limit: 500 }) });
    sel.replaceChildren(...res.subjects.map((s) => h("option", { value: s.id }, `${s.name} (${s.face_count} faces)`)));
    if (!res.subjects.length) sel.append(h("option", { value: "" }, "no subjects in this collection"));
  } catch (err) {
    showError(err, "Listing subjects");
  }
}

// --- webcam ---------------------------------------------------------------------------
async function camStart() {
  if (!navigator.mediaDevices?.getUserMedia) {
    showError(new Error("This browser gives no camera here (it needs HTTPS or localhost)."), "Webcam");
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 1280, height: 720 }, audio: false });
  } catch (err) {
    showError(new Error(`The camera could not be opened: ${err.message}`), "Webcam");
    return;
  }
  const v = $("#cam-video");
  v.srcObject = stream;
  v.hidden = false;
  await v.play();
  $("#cam-shot").hidden = $("#cam-stop").hidden = false;
  $("#cam-shot").focus();
}

function camStop() {
  stream?.getTracks().forEach((t) => t.stop());
  stream = null;
  $("#cam-video").hidden = $("#cam-shot").hidden = $("#cam-stop").hidden = true;
}

function camShot() {
  const v = $("#cam-video");
  const c = document.createElement("canvas");
  c.width = v.videoWidth;
  c.height = v.videoHeight;
  c.getContext("2d").drawImage(v, 0, 0);
  c.toBlob((blob) => { if (blob) setImage(blob, "webcam frame"); }, "image/jpeg", 0.92);
}

export function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const files = [...(e.dataTransfer?.files || [])];
    if (files.length) onFiles(files);
  });
}

export function init() {
  $("#try-file").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) setImage(f, f.name); });
  $("#try-file2").addEventListener("change", (e) => setImage2(e.target.files[0]));
  dropZone($("#try-drop"), (files) => setImage(files[0], files[0].name));
  for (const kind of ["detect", "liveness", "identify", "verify"]) {
    const b = $(`#run-${kind}`);
    b.addEventListener("click", () => run(kind, b));
  }
  for (const r of document.querySelectorAll('input[name="verify-mode"]')) {
    r.addEventListener("change", () => {
      const subj = verifyMode() === "subject";
      $("#verify-image-row").hidden = subj;
      $("#verify-subject-row").hidden = !subj;
      if (subj) loadVerifySubjects();
    });
  }
  $("#cam-start").addEventListener("click", camStart);
  $("#cam-stop").addEventListener("click", camStop);
  $("#cam-shot").addEventListener("click", camShot);
}
