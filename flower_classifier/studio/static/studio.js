// The studio page: galleries of the data check's findings, one-click decisions saved at once
// (POST api/decisions), bulk relabelling, the quick retrain and its mistakes with heatmaps.
"use strict";

const $ = (id) => document.getElementById(id);
const SHOWN = 120;            // photos per gallery page (state.py PHOTOS_SHOWN: made ahead)
const EXAMPLES = 4;           // photos of the suggested class beside a suspect
let S = null;                 // GET api/state
let decisions = {};           // {id: {label, at}}
const selected = new Set();
const cards = new Map();      // id -> [card elements showing it]
const predictedOf = new Map(); // new photo's id -> the class of its batch (api/suggestions)

const fromAddress = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromAddress) {
  localStorage.setItem("studio-token", fromAddress);
  history.replaceState(null, "", location.pathname + location.search);
}
const token = () => localStorage.getItem("studio-token");
const authHeaders = () => (token() ? { Authorization: "Bearer " + token() } : {});

function setStatus(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text;
}

class NeedsToken extends Error {}

async function api(path, options = {}) {
  const answer = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (answer.status === 401) throw new NeedsToken("This studio needs its token.");
  const body = answer.headers.get("content-type")?.includes("json") ? await answer.json() : null;
  if (!answer.ok) throw new Error((body && body.error) || "The studio answered " + answer.status + ".");
  return body;
}

function post(path, data) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data || {}) });
}

// Images: plain URLs without a token; with one, fetched with the header into blob URLs.
async function showImage(img, url) {
  if (!token()) { img.src = url; return; }
  try {
    const answer = await fetch(url, { headers: authHeaders() });
    if (answer.ok) img.src = URL.createObjectURL(await answer.blob());
  } catch (error) { /* the card keeps its alt text */ }
}

// Thumbnails come a page at a time: the cards drawn in one go queue theirs, and few requests
// (api/thumbs: the JPEGs one after the other) bring them all, as data: URLs. A browser's request
// costs more than a thumbnail (120 per page kept Browse waiting), a blob: URL loads like one,
// and the first screenful comes in a small request of its own, so it is not behind the rest.
const MAX_THUMBS = 240;        // app.py MAX_THUMBS: ids in one request
const FIRST_THUMBS = 30;       // the first request's: about a laptop screen of cards
let thumbQueue = [];
function showThumb(img, id) {
  if (!thumbQueue.length) queueMicrotask(() => { const queued = thumbQueue; thumbQueue = []; loadThumbs(queued); });
  thumbQueue.push([img, id]);
}

// The first screenful loads at once: a lazy image waits a frame to find it is on the screen.
function loadThumbs(queued) {
  loadThumbPart(queued.slice(0, FIRST_THUMBS), "eager");
  for (let start = FIRST_THUMBS; start < queued.length; start += MAX_THUMBS) loadThumbPart(queued.slice(start, start + MAX_THUMBS));
}

async function loadThumbPart(part, loading = "lazy") {
  try {
    const answer = await fetch("api/thumbs?ids=" + part.map(([, id]) => id).join(","), { headers: authHeaders() });
    if (!answer.ok) return;
    const lengths = answer.headers.get("X-Lengths").split(",").map(Number);
    const bytes = new Uint8Array(await answer.arrayBuffer());
    let offset = 0;
    part.forEach(([img], index) => {
      const end = offset + lengths[index];
      img.loading = loading;
      if (end > offset && img.isConnected) img.src = "data:image/jpeg;base64," + base64(bytes.subarray(offset, end));
      offset = end;
    });
  } catch (error) { /* the cards keep their alt text */ }
}

function base64(bytes) {
  let text = "";
  for (let start = 0; start < bytes.length; start += 8192) text += String.fromCharCode(...bytes.subarray(start, start + 8192));
  return btoa(text);
}

const className = (index) => S.classes[index].name;
const folderOf = (index) => S.classes[index].folder;
const indexOfFolder = (folder) => S.classes.findIndex((c) => c.folder === folder);
const percent = (p) => (100 * p).toFixed(1) + "%";
const isNew = (id) => S.photos[id][1] === "new";
// What "keep" says: the class a photo is filed under, or the class a new photo's batch suggests.
const keepLabel = (id) => folderOf(isNew(id) ? predictedOf.get(id) : S.photos[id][0]);

function stateOf(id) {
  const decision = decisions[id];
  if (!decision) return ["", ""];
  if (isNew(id)) return decision.label === null ? ["dropped", "left out"] : ["added", "added as " + className(indexOfFolder(decision.label))];
  if (decision.label === null) return ["dropped", "dropped"];
  const index = indexOfFolder(decision.label);
  if (index === S.photos[id][0]) return ["kept", "kept"];
  return ["relabelled", "→ " + className(index)];
}

function paint(id) {
  const [kind, text] = stateOf(id);
  for (const card of cards.get(id) || []) {
    card.classList.remove("dropped", "kept", "relabelled", "added");
    if (kind) card.classList.add(kind);
    card.classList.toggle("selected", selected.has(id));
    card.querySelector(".state").textContent = text;
  }
}

function classOptions(select, placeholder) {
  select.replaceChildren();
  if (placeholder) select.append(new Option(placeholder, ""));
  S.classes.forEach((c) => select.append(new Option(c.name, c.folder)));
}

// A card's relabel menu holds only its placeholder until it is first reached (pointer, touch,
// focus, keys, click): 120 cards with every class's options were 77,000 elements for Chromium
// to style and lay out each time a gallery was drawn. The options are copied from one menu,
// made once.
let relabelTemplate = null;
function relabelMenu() {
  if (!relabelTemplate) {
    relabelTemplate = document.createElement("select");
    relabelTemplate.className = "relabel";
    relabelTemplate.setAttribute("aria-label", "relabel as");
    classOptions(relabelTemplate, "relabel…");
  }
  const menu = document.createElement("select");
  menu.className = relabelTemplate.className;
  menu.setAttribute("aria-label", relabelTemplate.getAttribute("aria-label"));
  menu.append(relabelTemplate.options[0].cloneNode(true));
  const fill = () => {
    if (menu.options.length === 1) menu.append(...[...relabelTemplate.cloneNode(true).options].slice(1));
  };
  // click and keydown too: a screen reader may open the menu without pointer events or focus
  for (const event of ["pointerdown", "mousedown", "touchstart", "focus", "keydown", "click"]) {
    menu.addEventListener(event, fill, { passive: true });
  }
  return menu;
}

function card(id, note, open) {
  const [label, split, name] = S.photos[id];
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.tabIndex = 0;
  figure.dataset.id = id;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = name;
  showThumb(img, id);
  img.addEventListener("click", open || (() => openViewer(id, false)));
  const caption = document.createElement("figcaption");
  caption.textContent = (label === null ? "new photo" : className(label) + " · " + split) + (note ? " · " + note : "") + " ";
  caption.title = name + (label === null ? "" : " (folder " + folderOf(label) + ")");
  const state = document.createElement("span");
  state.className = "state";
  caption.append(state);
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = (text, action) => {
    const b = document.createElement("button");
    b.textContent = text;
    b.dataset.action = action;
    b.addEventListener("click", () => act(id, action));
    return b;
  };
  const relabel = relabelMenu();
  relabel.addEventListener("change", () => { if (relabel.value) decide([{ id, label: relabel.value }]); relabel.value = ""; });
  actions.append(button("Keep", "keep"), button("Drop", "drop"), relabel, button("Undo", "undo"));
  figure.append(img, caption, actions);
  figure.addEventListener("keydown", (event) => onKey(event, id, figure));
  if (!cards.has(id)) cards.set(id, []);
  cards.get(id).push(figure);
  paint(id);
  return figure;
}

function onKey(event, id, figure) {
  if (event.target !== figure) return;
  const actions = { k: "keep", d: "drop", u: "undo", x: "select" };
  if (event.key === "r") { figure.querySelector("select.relabel").focus(); event.preventDefault(); }
  else if (actions[event.key]) { act(id, actions[event.key]); event.preventDefault(); }
  else if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
    const next = event.key === "ArrowRight" ? figure.nextElementSibling : figure.previousElementSibling;
    if (next && next.classList.contains("card")) next.focus();
  }
}

function act(id, action) {
  if (action === "select") {
    selected.has(id) ? selected.delete(id) : selected.add(id);
    paint(id);
    updateBulk();
    return;
  }
  const change = { keep: { id, label: keepLabel(id) }, drop: { id, label: null }, undo: { id, forget: true } }[action];
  decide([change]);
}

async function decide(changes) {
  try {
    const answer = await post("api/decisions", { decisions: changes });
    decisions = answer.decisions;
    changes.forEach((c) => paint(c.id));
    renderClasses();
    setStatus("ready", "Saved " + changes.length + " decision(s); " + Object.keys(decisions).length + " in " + S.corrections + ".");
  } catch (error) {
    failed(error);
  }
}

function updateBulk() {
  $("bulk").hidden = selected.size === 0;
  $("bulk-count").textContent = selected.size + " selected";
}

async function bulk(action) {
  const ids = [...selected];
  if (action === "relabel" && !$("bulk-class").value) { setStatus("error", "Choose the class for the selected photos first."); return; }
  const changes = ids.map((id) => action === "relabel" ? { id, label: $("bulk-class").value }
    : action === "keep" ? { id, label: keepLabel(id) } : { id, label: null });
  await decide(changes);
  selected.clear();
  ids.forEach(paint);
  updateBulk();
}

// Empty a gallery drawn anew, forgetting its cards: paint() would go on updating them unseen,
// and a long look through a big folder would keep every card ever drawn.
function clearGallery(container) {
  container.querySelectorAll(".card").forEach((element) => {
    const id = Number(element.dataset.id);
    const shown = (cards.get(id) || []).filter((other) => other !== element);
    if (shown.length) cards.set(id, shown); else cards.delete(id);
  });
  container.replaceChildren();
}

// The first `step` items drawn (cards of ids by default), then a button for the next step:
// a folder of 50,000 photos must not put them all in the page at once.
function gallery(container, items, note, draw = (id) => card(id, note && note(id)), step = SHOWN) {
  items.slice(0, step).forEach((item) => container.append(draw(item)));
  const left = items.length - step;
  if (left > 0) {
    const more = document.createElement("button");
    more.className = "more";
    more.textContent = "Show " + Math.min(step, left) + " more (" + left + " left)";
    more.addEventListener("click", () => { more.remove(); gallery(container, items.slice(step), note, draw, step); });
    container.append(more);
  }
}

function heading(section, text) {
  const h = document.createElement("h2");
  h.textContent = text;
  section.append(h);
}

function renderDuplicates() {
  const section = $("duplicates");
  const { exact_duplicates: exact, near_duplicates: near } = S.findings;
  heading(section, exact.length + " groups of identical files, " + near.length + " pairs of near-copies");
  const groups = [...exact.map((g) => [g, "identical"]), ...near.map((g) => [g, "near-copy"])];
  gallery(section, groups, null, ([group, kind]) => {
    const row = document.createElement("div");
    row.className = "group" + (group.kinds.includes("across_splits") ? " cross" : "");
    const label = document.createElement("span");
    label.className = group.kinds.includes("across_splits") ? "badge" : "";
    label.textContent = kind + (group.kinds.includes("across_splits") ? ": crosses splits" : "")
      + (group.kinds.includes("across_classes") ? ", filed under different classes" : "");
    row.append(label);
    group.ids.forEach((id) => row.append(card(id)));
    return row;
  }, SHOWN / 4);
}

function examplesOf(classIndex, except) {
  const ids = [];
  for (let id = 0; id < S.photos.length && ids.length < EXAMPLES; id++) {
    if (S.photos[id][0] === classIndex && id !== except) ids.push(id);
  }
  return ids;
}

function renderSuspects() {
  const section = $("suspects");
  const suspects = S.findings.mislabelled;
  heading(section, suspects.length + " photos likely filed under the wrong class, least likely first");
  gallery(section, suspects, null, (suspect) => {
    const row = document.createElement("div");
    row.className = "group suspect";
    row.append(card(suspect.id));
    const side = document.createElement("div");
    side.className = "suggest";
    const text = document.createElement("p");
    text.textContent = "Looks like " + className(suspect.suggested) + " (" + percent(suspect.probability) + ")";
    const accept = document.createElement("button");
    accept.className = "accept";
    accept.textContent = "Relabel as " + className(suspect.suggested);
    accept.addEventListener("click", () => decide([{ id: suspect.id, label: folderOf(suspect.suggested) }]));
    const examples = document.createElement("div");
    examples.className = "examples";
    for (const id of examplesOf(suspect.suggested, suspect.id)) {
      const img = document.createElement("img");
      img.alt = className(suspect.suggested);
      img.loading = "lazy";
      showThumb(img, id);
      examples.append(img);
    }
    side.append(text, accept, examples);
    row.append(side);
    return row;
  }, SHOWN / 4);
}

function renderBroken() {
  const section = $("broken");
  const { unreadable, tiny } = S.findings;
  heading(section, unreadable.length + " unreadable");
  const a = document.createElement("div");
  a.className = "gallery";
  gallery(a, unreadable);
  heading(section, tiny.length + " tiny");
  const b = document.createElement("div");
  b.className = "gallery";
  gallery(b, tiny);
  section.append(a, b);
}

function renderClasses() {
  const after = S.classes.map((c) => c.total);
  for (const [id, decision] of Object.entries(decisions)) {
    const from = S.photos[id][0];
    if (from !== null) after[from] -= 1;  // a new photo's label adds it
    if (decision.label !== null) after[indexOfFolder(decision.label)] += 1;
  }
  const body = $("class-table").tBodies[0];
  body.replaceChildren();
  S.classes.forEach((c, i) => {
    const row = body.insertRow();
    for (const value of [c.name, c.train || 0, c.valid || 0, c.test || 0, c.total, after[i]]) row.insertCell().textContent = value;
    row.cells[0].title = "folder " + c.folder;
  });
}

function renderBrowse() {
  classOptions($("browse-class"));
  const show = () => {
    const index = indexOfFolder($("browse-class").value);
    const ids = [];
    S.photos.forEach((p, id) => { if (p[0] === index) ids.push(id); });
    clearGallery($("browse-gallery"));
    gallery($("browse-gallery"), ids);
  };
  $("browse-class").addEventListener("change", show);
  show();
}

async function openViewer(id, withHeatmap) {
  const [label, split, name] = S.photos[id];
  $("viewer-caption").textContent = name + (label === null ? " · new photo" : " · filed as " + className(label) + " · " + split);
  $("viewer-heatmap").hidden = !withHeatmap;
  $("viewer-photo").removeAttribute("src");
  $("viewer-heatmap").removeAttribute("src");
  $("viewer").showModal();
  showImage($("viewer-photo"), "api/photos/" + id + "/image");
  if (withHeatmap) {
    $("viewer-heatmap").dataset.loaded = "false";
    $("viewer-heatmap").onload = () => { $("viewer-heatmap").dataset.loaded = "true"; };
    showImage($("viewer-heatmap"), "api/photos/" + id + "/heatmap");
  }
}

function describeChanges(changes, before) {
  if (!changes) return "";
  const delta = (key) => (before && before[key] !== changes[key] ? " (" + (changes[key] > before[key] ? "+" : "") + (changes[key] - before[key]) + ")" : "");
  return changes.dropped + delta("dropped") + " dropped, " + changes.relabelled + delta("relabelled") + " relabelled"
    + (changes.added ? ", " + changes.added + delta("added") + " added" : "") + "; train " + changes.train + ", valid " + changes.valid;
}

// Accuracy against the first run (the folder as filed), in points ("" for the first itself).
// This studio's first run on the folder as filed, once done: what the others are measured against.
const firstRun = (runs) => runs.find((r) => r.kind === "as filed" && !r.earlier && r.status === "done");

function againstFirst(run, runs) {
  const first = firstRun(runs);
  if (!first || first === run || run.valid_accuracy === null) return "";
  const points = 100 * (run.valid_accuracy - first.valid_accuracy);
  return (points >= 0 ? "+" : "") + points.toFixed(1) + " points";
}

function runProgress(run) {
  const what = run.kind === "as filed" ? "Training on the folder as filed… " : "Retraining… ";
  return what + "epoch " + run.epoch + "/" + run.epochs
    + (run.valid_accuracy !== null ? ", valid accuracy " + percent(run.valid_accuracy) : "")
    + (run.seconds_left !== null ? ", about " + Math.ceil(run.seconds_left) + " s left" : "");
}

function renderRuns(runs) {
  const body = $("runs").tBodies[0];
  body.replaceChildren();
  runs.forEach((run, index) => {
    const row = body.insertRow();
    const before = index > 0 ? runs[index - 1].changes : null;
    const accuracy = run.status === "failed" ? run.error : run.valid_accuracy === null ? "…" : percent(run.valid_accuracy) + (run.status === "running" ? " (epoch " + run.epoch + "/" + run.epochs + ")" : "");
    const kind = (run.kind || "") + (run.earlier ? " (earlier session)" : "");
    for (const value of ["#" + run.id, kind, accuracy, againstFirst(run, runs), describeChanges(run.changes, before), run.seconds ?? "…"]) row.insertCell().textContent = value;
  });
  renderDownload(runs);
}

function renderMistakes(run) {
  const box = $("mistakes");
  clearGallery(box);
  for (const mistake of run.mistakes) {
    const element = card(mistake.id, "named " + className(mistake.predicted) + " " + percent(mistake.probability),
      () => openViewer(mistake.id, true));
    element.classList.add("mistake");
    box.append(element);
  }
}

// Poll the runs until the latest has ended, showing its progress; then its results.
async function watchRuns() {
  for (;;) {
    const { runs } = await api("api/runs");
    renderRuns(runs);
    const run = runs[runs.length - 1];
    if (!run) return;
    const points = againstFirst(run, runs);
    const versus = points && points + " against the folder as filed";
    $("retrain-progress").textContent = run.status === "running" ? runProgress(run)
      : run.status === "done" ? (run.kind === "as filed" ? "Valid accuracy of the folder as filed: " : "New valid accuracy: ")
        + percent(run.valid_accuracy) + " (" + (versus ? versus + "; " : "") + run.seconds + " s)" : run.error;
    $("retrain-progress").dataset.status = run.status;
    $("retrain-button").disabled = run.status === "running";
    if (run.status !== "running") { if (run.status === "done") renderResults(run, runs); return; }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

// serve.py on the final model, in a process of the studio's: a link to its page (on a phone
// when the studio listens on the network, with the same token).
async function tryWithCamera() {
  $("camera-button").disabled = true;
  $("camera-link").textContent = "Starting serve.py on the final model…";
  try {
    const { url } = await post("api/final/camera");
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = url;
    $("camera-link").replaceChildren("Open ", link, " (on your phone when the studio listens on the network) and take a photo.");
  } catch (error) {
    $("camera-link").textContent = "";
    failed(error);
  } finally {
    $("camera-button").disabled = false;
  }
}

// Start a run (POST path) with its button disabled, then follow it with watch() until it ends.
async function startAndWatch(button, path, watch) {
  $(button).disabled = true;
  try {
    await post(path);
    await watch();
  } catch (error) {
    failed(error);
    $(button).disabled = false;
  }
}

function renderResults(run, runs) {
  renderMistakes(run);
  if (!run.classes) return;
  const first = firstRun(runs);
  renderClassResults(run, first === run ? null : first);
  renderConfusions(run.classes.confusions);
}

// Per-class recall and precision on valid/ of the latest run (and the first run's recall beside
// it); a click on a heading sorts by that column.
function renderClassResults(run, first) {
  const table = $("class-results");
  const rows = S.classes.map((c, i) => [c.name, run.classes.recall[i], run.classes.precision[i],
    first && first.classes ? first.classes.recall[i] : null]);
  const draw = (column, descending) => {
    const key = (row) => (row[column] === null ? -1 : row[column]);
    rows.sort((a, b) => (column === 0 ? a[0].localeCompare(b[0]) : key(a) - key(b)) * (descending ? -1 : 1));
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const row of rows) {
      const tr = body.insertRow();
      row.forEach((value, index) => { tr.insertCell().textContent = index === 0 ? value : value === null ? "–" : percent(value); });
    }
  };
  table.tHead.querySelectorAll("th").forEach((th, column) => {
    th.onclick = () => { const descending = th.dataset.sorted === "up"; table.tHead.querySelectorAll("th").forEach((h) => delete h.dataset.sorted); th.dataset.sorted = descending ? "down" : "up"; draw(column, descending); };
  });
  table.hidden = false;
  table.tHead.querySelectorAll("th").forEach((h) => delete h.dataset.sorted);
  table.tHead.rows[0].cells[1].dataset.sorted = "up";
  draw(1, false);  // the least recalled classes first
}

// "camellia taken for rose 7 times": each opens its photos.
function renderConfusions(pairs) {
  const list = $("confusions");
  list.replaceChildren();
  clearGallery($("confusion-photos"));  // the previous run's
  for (const pair of pairs) {
    const button = document.createElement("button");
    button.className = "confusion";
    button.textContent = className(pair.true) + " taken for " + className(pair.predicted) + " " + pair.count + (pair.count === 1 ? " time" : " times");
    button.addEventListener("click", () => {
      clearGallery($("confusion-photos"));
      gallery($("confusion-photos"), pair.ids, () => "scored as " + className(pair.true) + ", named " + className(pair.predicted));
    });
    list.append(button);
  }
}

// The new photos worth labelling next (api/suggestions: the latest run's least sure, no two
// near-copies), in batches of one predicted class: "Confirm all" labels a batch at once, and a
// card's own buttons label the few that are wrong. Drawn anew each time the tab opens (only the
// latest request's answer is drawn).
let labelRequest = 0;
async function renderLabel() {
  const section = $("label");
  const request = ++labelRequest;
  let answer, error;
  try {
    answer = await api("api/suggestions");
  } catch (caught) {
    error = caught;
  }
  if (request !== labelRequest) return;
  clearGallery(section);
  const note = (text) => { const p = document.createElement("p"); p.className = "note"; p.textContent = text; section.append(p); };
  if (error) { note(error.message); return; }
  heading(section, answer.undecided + " of " + answer.new + " new photos have no label yet" + (answer.unreadable ? " (" + answer.unreadable + " cannot be read)" : "") + "; these are the ones worth labelling next (run #" + answer.run + " is least sure of them), by predicted class");
  note("A label adds the photo to train/ through corrections.json; the photo stays where it is. Retrain, then come back for the next ones.");
  if (!answer.batches.length) note("Every new photo has a decision.");
  for (const batch of answer.batches) {
    batch.ids.forEach((id) => predictedOf.set(id, batch.predicted));
    const row = document.createElement("div");
    row.className = "group batch";
    const looks = document.createElement("div");
    looks.className = "looks";
    const text = document.createElement("span");
    text.textContent = "Looks like " + className(batch.predicted) + " (" + batch.ids.length + ")";
    const confirm = document.createElement("button");
    confirm.className = "confirm";
    confirm.textContent = "Confirm all as " + className(batch.predicted);
    confirm.addEventListener("click", () => {
      const changes = batch.ids.filter((id) => !decisions[id]).map((id) => ({ id, label: folderOf(batch.predicted) }));
      if (changes.length) decide(changes);
    });
    looks.append(text, confirm);
    row.append(looks);
    batch.ids.forEach((id, index) => row.append(card(id, "looks like " + className(batch.predicted) + " " + percent(batch.probabilities[index]))));
    section.append(row);
  }
  const next = document.createElement("button");
  next.className = "more";
  next.textContent = "Show the next photos";
  next.addEventListener("click", renderLabel);
  section.append(next);
}

// A tab's galleries are drawn when it is first shown, so the page is ready as soon as the
// class table is.
function showTab(name) {
  const renderers = { duplicates: renderDuplicates, suspects: renderSuspects, broken: renderBroken, browse: renderBrowse };
  if (S && renderers[name] && !$(name).dataset.drawn) {
    $(name).dataset.drawn = "true";
    renderers[name]();
  }
  if (S && name === "label") renderLabel();
  document.querySelectorAll(".tab").forEach((tab) => { tab.hidden = tab.id !== name; });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
}

// A file from the API saved by the browser: fetched with the token header (a plain link would
// lack it), named as the studio's Content-Disposition says, else `name`.
async function saveDownload(path, name) {
  const answer = await fetch(path, { headers: authHeaders() });
  if (answer.status === 401) throw new NeedsToken("This studio needs its token.");
  if (!answer.ok) throw new Error((await answer.json()).error);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await answer.blob());
  link.download = /filename="([^"]+)"/.exec(answer.headers.get("content-disposition") || "")?.[1] || name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);  // a model file holds the backbone
  return link.download;
}

// The model of the latest run that ended well: only its classifier is kept (and none of an
// earlier start of the studio).
function renderDownload(runs) {
  const run = [...runs].reverse().find((r) => r.status === "done" && !r.earlier);
  const button = $("download-model");
  button.hidden = !run;
  if (run) button.dataset.run = run.id;
}

async function downloadModel() {
  const button = $("download-model");
  button.disabled = true;
  setStatus("ready", "Exporting run #" + button.dataset.run + " as ONNX with its class names inside…");
  try {
    const name = await saveDownload("api/runs/" + button.dataset.run + "/model?format=onnx", "model.onnx");
    setStatus("ready", "Downloaded " + name + ": run #" + button.dataset.run + "'s model with its class names inside.");
  } catch (error) {
    failed(error);
  } finally {
    button.disabled = false;
  }
}

// The final model: train.py with the decisions (POST api/final), followed until it ends.
function finalText(final) {
  if (final.status === "running") {
    return "Training the final model… " + (final.epoch ? "epoch " + final.epoch + "/" + final.epochs + ", valid accuracy " + percent(final.valid_accuracy) : final.line);
  }
  if (final.status === "failed") return "The final model was not trained: " + final.error;
  if (final.status !== "done") return "";
  return "Final model: valid accuracy " + percent(final.valid_accuracy)
    + (final.test_accuracy !== null ? ", test accuracy " + percent(final.test_accuracy) : "") + " (" + final.seconds + " s). "
    + "Saved in " + final.save_dir + " (" + final.checkpoint + "): try it with the camera below, or export it with export.py.";
}

async function watchFinal() {
  for (;;) {
    const final = await api("api/final");
    $("final-progress").textContent = finalText(final);
    $("final-progress").dataset.status = final.status;
    $("final-button").disabled = final.status === "running";
    $("camera-button").hidden = final.status !== "done";
    if (final.status !== "running") return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function failed(error) {
  if (error instanceof NeedsToken) {
    $("token-form").hidden = false;
    setStatus("error", error.message);
  } else {
    setStatus("error", error.message || "The studio cannot be reached; check that studio.py is running.");
  }
}

async function load() {
  try {
    S = await api("api/state");
    decisions = (await api("api/decisions")).decisions;
  } catch (error) {
    failed(error);
    return;
  }
  $("token-form").hidden = true;
  const newPhotos = S.photos.filter((photo) => photo[1] === "new").length;
  $("folder").textContent = S.folder + " · " + (S.photos.length - newPhotos) + " photos, " + S.classes.length + " classes" + (newPhotos ? ", " + newPhotos + " new" : "");
  classOptions($("bulk-class"), "class…");
  $("label-tab").hidden = !S.unlabelled;
  const { exact_duplicates: exact, near_duplicates: near, mislabelled, unreadable, tiny } = S.findings;
  $("n-duplicates").textContent = exact.length + near.length;
  $("n-suspects").textContent = mislabelled.length;
  $("n-broken").textContent = unreadable.length + tiny.length;
  renderClasses();
  showTab(document.querySelector("#tabs button.active").dataset.tab);
  watchRuns().catch(failed);  // the first run trains as the studio opens
  watchFinal().catch(failed);  // one started before a reload
  setStatus("ready", Object.keys(decisions).length + " decisions so far, saved in " + S.corrections + ".");
}

document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("studio-token", $("token").value);
  load();
});
$("retrain-button").addEventListener("click", () => startAndWatch("retrain-button", "api/retrain", watchRuns));
async function folders(path, question) {
  if (question && !window.confirm(question)) return;
  try {
    setStatus("ready", (await post(path)).message);
  } catch (error) {
    failed(error);
  }
}
$("apply-folders").addEventListener("click", () => folders("api/apply-to-folders",
  "Move the relabelled photos into their class folders and the dropped ones into the studio's set_aside folder? Nothing is deleted, and Undo puts them back."));
$("undo-folders").addEventListener("click", () => folders("api/undo-folders"));
$("download").addEventListener("click", () => saveDownload("api/corrections", "corrections.json").catch(failed));
$("download-model").addEventListener("click", downloadModel);
$("final-button").addEventListener("click", () => { $("camera-link").textContent = ""; startAndWatch("final-button", "api/final", watchFinal); });
$("camera-button").addEventListener("click", tryWithCamera);
$("bulk-relabel").addEventListener("click", () => bulk("relabel"));
$("bulk-keep").addEventListener("click", () => bulk("keep"));
$("bulk-drop").addEventListener("click", () => bulk("drop"));
$("bulk-clear").addEventListener("click", () => { const ids = [...selected]; selected.clear(); ids.forEach(paint); updateBulk(); });
showTab("classes");
load();
