// Faces drawn over the image: an SVG in the image's own pixel coordinates,
// so boxes and landmarks line up at any display size.
import { h, s } from "./ui.js";

/**
 * marks: [{box: {x1,y1,x2,y2}, landmarks?: [[x,y]...], status, label}] where status is one of
 * match, maybe, unknown, live, spoof, plain (the colour) and label the text on the box.
 */
export function figure(url, marks, caption, size = null) {
  const img = h("img", { src: url, alt: caption });
  const svg = s("svg", { class: "overlay", role: "img", "aria-label": describe(marks), preserveAspectRatio: "none" });
  const frame = h("div", { class: "frame" }, img, svg);
  const draw = () => {
    const w = size?.width || img.naturalWidth, hgt = size?.height || img.naturalHeight;
    svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
    svg.replaceChildren(...marks.flatMap((m, i) => drawMark(m, i, w)));
  };
  if (img.complete && img.naturalWidth) draw(); else img.addEventListener("load", draw, { once: true });
  return h("figure", { class: "stage" }, frame, h("figcaption", {}, caption));
}

function describe(marks) {
  if (!marks.length) return "no faces found";
  return `${marks.length} face${marks.length > 1 ? "s" : ""}: ` + marks.map((m) => m.label).join("; ");
}

function drawMark(m, i, imageWidth) {
  const { x1, y1, x2, y2 } = m.box;
  const sw = Math.max(2, imageWidth / 250);
  const font = Math.max(12, imageWidth / 45);
  const g = s("g", { class: `face s-${m.status}`, "data-face": String(i) });
  g.append(s("rect", { class: `face-box s-${m.status}`, x: x1, y: y1, width: x2 - x1, height: y2 - y1,
    "stroke-width": sw }));
  for (const [x, y] of m.landmarks || []) {
    g.append(s("circle", { class: "landmark", cx: x, cy: y, r: sw * 1.4, "stroke-width": sw / 3 }));
  }
  const text = m.label;
  const tw = text.length * font * 0.6 + font * 0.6, th = font * 1.35;
  const ty = y1 - th >= 0 ? y1 - th : y2; // above the box, or below it at the top edge
  g.append(s("rect", { class: `lbl-${m.status}`, x: x1, y: ty, width: tw, height: th }));
  g.append(s("text", { class: "face-label", x: x1 + font * 0.3, y: ty + font * 1.05, "font-size": font }, text));
  return [g];
}
