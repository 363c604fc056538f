// The cbmir web page: pick a collection, give a query (a file, or a stored point), look at the top-k cases.
//
// It only talks to the HTTP API of `cbmir serve` (GET /api/collections, POST /api/collections/{name}/search,
// POST /api/collections/{name}/search/image, GET .../points/{id}/image); no search logic lives here.
// With an API key on the service, the page asks for it on the first 401 (see "API key" below) and fetches
// point images itself (an <img src> cannot carry the key).
// Every string that comes from the API or the URL is inserted as text (Node.append / textContent /
// setAttribute), never parsed as HTML, so class names such as "<b>x</b>" show as typed.
//
// State that can be shared lives in the URL: ?collection=&compare=&split=&index=&k=&label=0,2
// (opening such a link runs that stored query).

const API = "/api";
const THUMB_PX = 128; // size asked of the image endpoint for a hit
const LARGE_PX = 384; // size asked for the larger view

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("stored-form"), collection: $("collection"), collectionInfo: $("collection-info"),
  compareOn: $("compare-on"), compare: $("compare"), compareInfo: $("compare-info"),
  file: $("query-file"), dropzone: $("dropzone"), split: $("split"), index: $("index"),
  random: $("random"), k: $("k"), labelBoxes: $("label-boxes"), labels: $("labels"),
  messages: $("messages"), status: $("status"), queryPanel: $("query-panel"), rows: $("rows"),
  results: $("results"), service: $("service"),
  detail: $("detail"), detailTitle: $("detail-title"), detailBody: $("detail-body"), detailClose: $("detail-close"),
  keyForm: $("key-form"), keyInput: $("api-key"), keyCancel: $("key-cancel"), keyMessage: $("key-message"), forgetKey: $("forget-key"),
};

const state = {
  collections: new Map(), // name -> collection description (GET /api/collections)
  query: null,            // {kind: "point", split, index} | {kind: "file", file}
  run: 0,                 // id of the latest search; answers of older searches are dropped
  objectUrl: null,        // preview URL of the uploaded file
};

// ---------------------------------------------------------------- DOM helpers (text only, never HTML)

/** Element `tag` with attributes (null/false skipped, true = empty) and children (strings become text nodes). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** A same-origin URL for `url` with `params` set, or null for anything else (never a javascript: URL). */
function sameOriginUrl(url, params = {}) {
  if (typeof url !== "string" || !url) return null;
  let u;
  try { u = new URL(url, window.location.href); } catch { return null; }
  if (u.origin !== window.location.origin) return null;
  for (const [k, v] of Object.entries(params)) u.searchParams.set(k, String(v));
  return u.pathname + u.search;
}

function badges(c) {
  return [
    c.random_init ? el("span", { class: "badge warn", title: "random weights: a smoke test, not a real extractor" },
      "RANDOM-INIT") : null,
    c.baseline ? el("span", { class: "badge base", title: "weights-free handcrafted features" }, "BASELINE") : null,
  ];
}

const total = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);
const fmtInt = (n) => Number(n).toLocaleString("en-US");

/** Option text (the dataset is the option group): model, size, images, RANDOM-INIT / baseline. */
function collectionLabel(c) {
  const tags = [c.random_init ? "RANDOM-INIT" : "", c.baseline ? "baseline" : ""].filter(Boolean);
  return `${c.display_name || c.model} · ${c.size} px · ${fmtInt(total(c.counts))} images` +
    (tags.length ? ` · ${tags.join(", ")}` : "");
}

function describe(c) {
  if (!c) return [];
  const counts = Object.entries(c.counts || {}).map(([sp, n]) => `${sp} ${fmtInt(n)}`).join(" · ");
  return [
    el("div", { class: "badges" }, badges(c)),
    el("dl", {},
      el("dt", {}, "Dataset"), el("dd", {}, String(c.dataset)),
      el("dt", {}, "Model"), el("dd", {}, `${c.display_name || c.model}` + (c.family ? ` (${c.family})` : "")),
      el("dt", {}, "Size"), el("dd", {}, `${c.size} px` + (c.is_3d ? " (3D)" : "")),
      el("dt", {}, "Images"), el("dd", {}, `${fmtInt(total(c.counts))} (${counts})`),
      el("dt", {}, "Vector"), el("dd", {}, `${fmtInt(c.dim)} dims, ${c.distance}`)),
  ];
}

// ---------------------------------------------------------------- API key (only when the service asks)
//
// With `cbmir serve --api-key`, every /api/... call needs `X-API-Key`. The page learns that from a 401:
// it shows the key form, waits for the key and sends the call again. The key lives in sessionStorage
// (gone with the tab) and in `auth.key`; it is never put in a URL, a cookie or localStorage, never logged
// and never written into the page.

const KEY_STORAGE = "cbmir.apiKey";
const auth = { key: storedKey(), asking: null }; // asking: the promise of the open key form, if any

function storedKey() {
  try { return window.sessionStorage.getItem(KEY_STORAGE) || null; } catch { return null; }
}

/** Hold `key` (null: forget it) in memory and sessionStorage; the "Forget key" button shows while one is held. */
function setKey(key) {
  auth.key = key || null;
  try {
    if (auth.key) window.sessionStorage.setItem(KEY_STORAGE, auth.key);
    else window.sessionStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lives until the page is left */ }
  ui.forgetKey.hidden = !auth.key;
}

/** True for a same-origin path under /api (the only requests that carry the key). */
function isApi(path) {
  const u = new URL(path, window.location.href);
  return u.origin === window.location.origin && (u.pathname === API || u.pathname.startsWith(`${API}/`));
}

/** Show the key form (focus on its input) and resolve once a key is entered, or reject (a readable Error) when
 * the user cancels it (Cancel or Escape); calls that arrive while it is open wait on the same form. `detail`:
 * the service's reason when a key was refused (shown as text). */
function askForKey(detail) {
  if (auth.asking) return auth.asking;
  if (ui.detail.open) ui.detail.close(); // a modal dialog would make the form unreachable
  const back = document.activeElement;
  ui.keyMessage.textContent = detail || "";
  ui.keyMessage.hidden = !detail;
  if (detail) ui.keyMessage.setAttribute("role", "alert"); // announced; also the input's description
  else ui.keyMessage.removeAttribute("role");
  ui.keyForm.hidden = false;
  ui.keyInput.value = "";
  ui.keyInput.focus();
  auth.asking = new Promise((resolve, reject) => {
    const done = () => {
      ui.keyForm.removeEventListener("submit", submit);
      ui.keyCancel.removeEventListener("click", cancel);
      ui.keyForm.removeEventListener("keydown", escape);
      ui.keyForm.hidden = true;
      auth.asking = null;
      if (back && back !== document.body && back.isConnected) back.focus();
    };
    const submit = (e) => {
      e.preventDefault();
      const key = ui.keyInput.value.trim();
      ui.keyInput.value = "";
      if (!key) { ui.keyInput.focus(); return; }
      setKey(key);
      done();
      resolve();
    };
    // Cancel (button or Escape): every call waiting for the key fails with this message instead of waiting
    const cancel = () => {
      ui.keyInput.value = "";
      done();
      reject(new Error("no API key was given, and this service needs one: try again to enter it"));
    };
    const escape = (e) => { if (e.key === "Escape") { e.preventDefault(); cancel(); } };
    ui.keyForm.addEventListener("submit", submit);
    ui.keyCancel.addEventListener("click", cancel);
    ui.keyForm.addEventListener("keydown", escape);
  });
  return auth.asking;
}

/** The service's reason for refusing a key (the 401 body's `detail`), as text. */
function refusal(body) {
  return body && typeof body.detail === "string" ? body.detail : errorText(401, body);
}

/** `fetch(path, init)` with the key as `X-API-Key` on /api paths. A 401 there drops a refused key, asks for
 * one (see `askForKey`) and sends the request again, so callers never see a 401 from the API.
 * Throws Error(readable message) when the service cannot be reached or the key form is cancelled. */
async function send(path, init = {}) {
  const guarded = isApi(path);
  for (;;) {
    const key = guarded ? auth.key : null;
    const headers = new Headers(init.headers || {});
    if (key) headers.set("X-API-Key", key);
    let resp;
    try {
      resp = await fetch(path, { ...init, headers });
    } catch (err) {
      throw new Error(`The search service cannot be reached (${err.message}). Is \`cbmir serve\` running?`);
    }
    if (!guarded || resp.status !== 401) return resp;
    const body = await readBody(resp);
    if (key && auth.key === key) setKey(null); // this key was refused: forget it
    if (!auth.key) await askForKey(key ? refusal(body) : null);
    // then again, with the key just entered (or the one another call got meanwhile)
  }
}

// ---------------------------------------------------------------- API

/** A readable message from an API error body (FastAPI `detail` string or list, or `error`/`message`). */
function errorText(status, body) {
  let text = "";
  if (body && typeof body === "object") {
    const d = body.detail ?? body.error ?? body.message;
    if (typeof d === "string") text = d;
    else if (Array.isArray(d)) {
      text = d.map((e) => (e && typeof e === "object")
        ? [Array.isArray(e.loc) ? e.loc.join(".") : "", e.msg].filter(Boolean).join(": ") : String(e)).join("; ");
    } else if (d && typeof d === "object") text = d.message || d.error || JSON.stringify(d);
  } else if (typeof body === "string") text = body.slice(0, 500);
  const what = { 400: "bad request", 401: "API key missing or wrong", 404: "not found", 413: "file too large",
    415: "unsupported file type", 422: "invalid input" }[status] || `HTTP ${status}`;
  return text ? `${text} (${what})` : `The service answered ${what}.`;
}

/** The JSON or text body of `resp` (null / "" when unreadable). */
async function readBody(resp) {
  const type = resp.headers.get("content-type") || "";
  return type.includes("json") ? resp.json().catch(() => null) : resp.text().catch(() => "");
}

/** JSON of `path` (through `send`: the API key and its form); throws Error(readable message) on a network
 * failure or a non-2xx answer. */
async function api(path, init = {}) {
  const resp = await send(path, { ...init, headers: { Accept: "application/json", ...(init.headers || {}) } });
  const body = await readBody(resp);
  if (!resp.ok) throw new Error(errorText(resp.status, body));
  return body;
}

/** The image at the same-origin `path` as a Blob (sent with the API key); throws Error like `api`. */
async function apiBlob(path) {
  const resp = await send(path, { headers: { Accept: "image/*" } });
  if (!resp.ok) throw new Error(errorText(resp.status, await readBody(resp)));
  return resp.blob();
}

const enc = encodeURIComponent;

function searchOptions() {
  const k = Number.parseInt(ui.k.value, 10);
  const labels = [...ui.labelBoxes.querySelectorAll("input:checked")].map((b) => Number(b.value));
  return { k: Number.isFinite(k) ? k : ui.k.value, filter: labels.length ? { label: labels } : null };
}

function searchPoint(name, split, index, opts) {
  const body = { point: { split, index }, k: opts.k };
  if (opts.filter) body.filter = opts.filter;
  return api(`${API}/collections/${enc(name)}/search`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
}

function searchFile(name, file, opts) {
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("k", String(opts.k));
  if (opts.filter) form.append("filter", JSON.stringify(opts.filter));
  return api(`${API}/collections/${enc(name)}/search/image`, { method: "POST", body: form });
}

// ---------------------------------------------------------------- point images (fetched with the key)
//
// An <img src="/api/..."> cannot carry the key, so point images are fetched and shown through object URLs.
// Each group's URLs are revoked when its images are replaced ("results": query and hits; "detail": the
// larger view); an answer that arrives after its group was replaced is dropped.

const imageGroups = { results: { gen: 0, urls: [] }, detail: { gen: 0, urls: [] } };
const pendingImages = new WeakMap(); // <img> waiting to come into view -> [src, group]
const nearView = "IntersectionObserver" in window
  ? new IntersectionObserver(onNearView, { rootMargin: "1200px 0px" }) : null;

function onNearView(entries) {
  for (const entry of entries) {
    if (!entry.isIntersecting || !pendingImages.has(entry.target)) continue;
    nearView.unobserve(entry.target);
    const [src, group] = pendingImages.get(entry.target);
    pendingImages.delete(entry.target);
    loadImage(entry.target, src, group);
  }
}

/** Revoke the object URLs of `group` and drop its answers still on the way. */
function releaseImages(group) {
  const g = imageGroups[group];
  g.gen += 1;
  for (const url of g.urls) URL.revokeObjectURL(url);
  g.urls = [];
  if (group === "results" && nearView) nearView.disconnect();
}

/** An <img> (`attrs`: alt, class, width, height) showing the API image at the same-origin `src` once fetched
 * (with `lazy`, when it comes near the viewport). It carries `data-pending` until its object URL is set. */
function apiImage(src, attrs, group, lazy = false) {
  const img = el("img", { ...attrs, "data-pending": true });
  if (lazy && nearView) {
    pendingImages.set(img, [src, group]);
    nearView.observe(img);
  } else loadImage(img, src, group);
  return img;
}

/** Fetch `src` into `img`; on failure `img` becomes a "no image" placeholder (`data-image-failed`, the
 * reason as its title). */
async function loadImage(img, src, group) {
  const g = imageGroups[group];
  const gen = g.gen;
  try {
    const blob = await apiBlob(src);
    if (gen !== g.gen) return;
    const url = URL.createObjectURL(blob);
    g.urls.push(url);
    img.src = url;
    img.removeAttribute("data-pending");
  } catch (err) {
    if (gen !== g.gen) return;
    img.replaceWith(el("div", { class: `${img.getAttribute("class") || ""} placeholder`.trim(), role: "img",
      "aria-label": img.alt, title: err.message, "data-image-failed": true }, "no image"));
  }
}

// ---------------------------------------------------------------- messages

function showError(message) {
  ui.messages.replaceChildren(el("div", { class: "alert", role: "alert" },
    el("strong", {}, "Error: "), message,
    el("button", { type: "button", class: "dismiss", "aria-label": "Dismiss the error",
      onclick: () => ui.messages.replaceChildren() }, "×")));
}

function clearError() { ui.messages.replaceChildren(); }

function setStatus(text) { ui.status.textContent = text; }

// ---------------------------------------------------------------- collections

function fillSelect(select, names, chosen) {
  const groups = new Map();
  for (const name of names) {
    const c = state.collections.get(name);
    if (!groups.has(c.dataset)) groups.set(c.dataset, []);
    groups.get(c.dataset).push(c);
  }
  select.replaceChildren(...[...groups].map(([dataset, cs]) => el("optgroup", { label: `${dataset}` },
    cs.map((c) => el("option", { value: c.name, selected: c.name === chosen }, collectionLabel(c))))));
  if (chosen && state.collections.has(chosen)) select.value = chosen;
}

async function loadCollections() {
  const list = await api(`${API}/collections`);
  state.collections = new Map((Array.isArray(list) ? list : []).map((c) => [c.name, c]));
  const names = [...state.collections.keys()].sort();
  fillSelect(ui.collection, names, names[0]);
  fillSelect(ui.compare, names, names[1] ?? names[0]);
  if (!names.length) setStatus("The store holds no collection yet: ingest one with `cbmir ingest`.");
}

function current() { return state.collections.get(ui.collection.value); }
function second() { return ui.compareOn.checked ? state.collections.get(ui.compare.value) : null; }

/** Refresh what depends on the chosen collection: its description, splits, label boxes, the range of k. */
function onCollectionChanged() {
  const c = current();
  ui.collectionInfo.replaceChildren(...describe(c));
  ui.compare.disabled = !ui.compareOn.checked;
  ui.compareInfo.replaceChildren(...describe(second()));
  if (!c) return;
  const splits = Object.keys(c.counts || {}).filter((s) => s !== "train");
  const keep = ui.split.value;
  ui.split.replaceChildren(...(splits.length ? splits : Object.keys(c.counts || {}))
    .map((s) => el("option", { value: s }, `${s} (${fmtInt(c.counts[s])})`)));
  if ([...ui.split.options].some((o) => o.value === keep)) ui.split.value = keep;
  onSplitChanged();
  const db = (c.counts || {}).train;
  if (db) ui.k.max = String(db);
  const ticked = new Set([...ui.labelBoxes.querySelectorAll("input:checked")].map((b) => b.value));
  const names = Object.entries(c.class_names || {}).sort((a, b) => Number(a[0]) - Number(b[0]));
  ui.labels.hidden = !names.length;
  ui.labelBoxes.replaceChildren(...names.map(([label, name]) => el("label", { class: "check" },
    el("input", { type: "checkbox", value: label, checked: ticked.has(label) }), ` ${name} `,
    el("span", { class: "muted" }, `(${label})`))));
}

function onSplitChanged() {
  const n = (current()?.counts || {})[ui.split.value];
  if (n) ui.index.max = String(n - 1);
}

// ---------------------------------------------------------------- URL (deep links)

function readUrl() {
  const p = new URLSearchParams(window.location.search);
  const unknown = p.has("collection") && !state.collections.has(p.get("collection"));
  if (unknown) {
    showError(`Unknown collection "${p.get("collection")}" in the link; ` +
      `choose one of: ${[...state.collections.keys()].join(", ") || "(none stored)"}.`);
  } else if (p.has("collection")) ui.collection.value = p.get("collection");
  ui.compareOn.checked = p.has("compare") && state.collections.has(p.get("compare"));
  if (ui.compareOn.checked) ui.compare.value = p.get("compare");
  if (p.has("k")) ui.k.value = p.get("k");
  onCollectionChanged();
  const labels = new Set((p.get("label") || "").split(",").filter((s) => s !== ""));
  for (const box of ui.labelBoxes.querySelectorAll("input")) box.checked = labels.has(box.value);
  if (p.has("split") && [...ui.split.options].some((o) => o.value === p.get("split"))) ui.split.value = p.get("split");
  if (p.has("index")) ui.index.value = p.get("index");
  return p.has("index") && !unknown ? { kind: "point", split: p.get("split") || ui.split.value, index: p.get("index") }
    : null;
}

function writeUrl(query) {
  const p = new URLSearchParams();
  if (ui.collection.value) p.set("collection", ui.collection.value);
  if (second()) p.set("compare", ui.compare.value);
  if (query && query.kind === "point") { p.set("split", query.split); p.set("index", String(query.index)); }
  p.set("k", ui.k.value);
  const opts = searchOptions();
  if (opts.filter) p.set("label", opts.filter.label.join(","));
  const url = `${window.location.pathname}?${p}`;
  if (url !== window.location.pathname + window.location.search) window.history.pushState(null, "", url);
}

// ---------------------------------------------------------------- searching

/** Run `query` on the chosen collection (and the second one when comparing), then render. */
async function run(query, { push = true } = {}) {
  const a = current();
  if (!a) { showError("Choose a collection first."); return; }
  if (!query) { showError("Give a query: drop or choose a file, or pick a stored query."); return; }
  const targets = [a, second()].filter(Boolean);
  if (query.kind === "point") {
    const index = Number(query.index);
    if (!Number.isInteger(index) || index < 0) {
      showError(`Index "${query.index}" is not a row number: give an integer from 0.`); return;
    }
    query = { ...query, index };
    const other = targets.find((c) => c.dataset !== a.dataset);
    if (other) {
      showError(`A stored query of ${a.dataset} has no counterpart in ${other.name} (dataset ${other.dataset}): ` +
        "compare two collections of the same dataset, or upload a file."); return;
    }
  }
  state.query = query;
  if (push) writeUrl(query);
  const id = ++state.run;
  const opts = searchOptions();
  clearError();
  setStatus(`Searching ${targets.map((c) => c.name).join(" and ")}…`);
  ui.results.setAttribute("aria-busy", "true");
  const answers = await Promise.allSettled(targets.map((c) => (query.kind === "point"
    ? searchPoint(c.name, query.split, query.index, opts) : searchFile(c.name, query.file, opts))));
  if (id !== state.run) return; // a newer search started meanwhile
  ui.results.removeAttribute("aria-busy");
  releaseImages("results"); // the rows and the query below are replaced
  const failed = answers.map((r, i) => [r, targets[i]]).filter(([r]) => r.status === "rejected");
  if (failed.length) {
    showError(failed.map(([r, c]) => (targets.length > 1 ? `${c.name}: ` : "") + r.reason.message).join(" — "));
  }
  const done = answers.map((r, i) => [r, targets[i]]).filter(([r]) => r.status === "fulfilled");
  if (!done.length) { setStatus("No results."); ui.rows.replaceChildren(); ui.queryPanel.hidden = true; return; }
  renderQuery(query, done[0][1], done[0][0].value);
  ui.rows.replaceChildren(...done.map(([r, c]) => renderRow(c, r.value, targets.length > 1)));
  ui.rows.classList.toggle("compare", targets.length > 1);
  setStatus(`Top ${done[0][0].value.k ?? opts.k} of ${done.map(([, c]) => c.name).join(" and ")}.`);
}

function queryImageUrl(name, resp) {
  const q = (resp && resp.query) || {};
  if (q.image_url) return sameOriginUrl(q.image_url, { size: LARGE_PX });
  if (q.point_id !== undefined && q.point_id !== null) {
    return sameOriginUrl(`${API}/collections/${enc(name)}/points/${enc(q.point_id)}/image`, { size: LARGE_PX });
  }
  return null;
}

function renderQuery(query, c, resp) {
  const q = (resp && resp.query) || {};
  const title = query.kind === "point" ? `Stored query: ${query.split} #${query.index}` : `Uploaded: ${query.file.name}`;
  const known = q.class_name !== undefined && q.class_name !== null;
  const alt = `Query image (${title}${known ? `, class ${q.class_name}` : ""})`;
  const attrs = { alt, class: "query-img", width: 128, height: 128 };
  let img = null;
  if (query.kind === "point") {
    const src = queryImageUrl(c.name, resp);
    if (src) img = apiImage(src, attrs, "results");
  } else if (/^image\/(png|jpeg|gif|bmp|webp)$/.test(query.file.type)) {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(query.file);
    img = el("img", { src: state.objectUrl, ...attrs });
  }
  ui.queryPanel.replaceChildren(
    img || el("div", { class: "query-img placeholder", role: "img", "aria-label": alt }, "no preview"),
    el("div", { class: "query-text" },
      el("h2", {}, "Query"),
      el("p", {}, title),
      el("p", {}, known ? ["Class: ", el("strong", { class: "class-name" }, q.class_name),
        el("span", { class: "muted" }, ` (label ${q.label})`)] : el("span", { class: "muted" }, "Class unknown"))));
  ui.queryPanel.hidden = false;
}

const scoreKind = (c) => (c.distance === "euclidean" ? "distance" : "similarity");
const scoreText = (c, score) => `${scoreKind(c)} ${Number(score).toFixed(3)}`;

function renderVotes(resp) {
  const s = resp.summary;
  if (!s) return null;
  const votes = Object.entries(s.votes || {}).sort((a, b) => b[1] - a[1]);
  const verdict = s.query_label_in_majority === true ? el("span", { class: "ok" }, " ✓ query's class is in the majority")
    : s.query_label_in_majority === false ? el("span", { class: "bad" }, " ✗ query's class is not in the majority") : null;
  return el("div", { class: "summary" },
    el("span", {}, "Majority vote: "), el("strong", { class: "class-name" }, s.majority_class_name ?? String(s.majority_label)),
    verdict,
    el("ul", { class: "votes", "aria-label": "Votes per class" },
      votes.map(([name, n]) => el("li", {}, el("span", { class: "class-name" }, name), `: ${n}`))));
}

function renderRow(c, resp, comparing) {
  const qLabel = resp.query && Number.isInteger(resp.query.label) && resp.query.label >= 0 ? resp.query.label : null;
  const hits = Array.isArray(resp.hits) ? resp.hits : [];
  return el("section", { class: "row-result", "data-collection": c.name, "aria-label": `Results of ${c.name}` },
    el("h2", {}, comparing ? `${c.display_name || c.model} — ` : "", el("span", { class: "name" }, c.name), " ", badges(c),
      el("span", { class: "muted scores" }, `scores: ${c.distance} ${scoreKind(c)}` +
        (c.distance === "euclidean" ? ", lower is closer" : ", higher is closer"))),
    renderVotes(resp),
    (resp.notes || []).map((n) => el("p", { class: "note" }, n)),
    el("ol", { class: "hits" }, hits.map((h) => renderHit(c, h, qLabel))));
}

function renderHit(c, hit, qLabel) {
  const same = qLabel === null ? null : hit.label === qLabel;
  const mark = same === null ? null : el("span", { class: same ? "mark ok" : "mark bad",
    title: same ? "same class as the query" : "another class than the query" },
  same ? "✓" : "✗", el("span", { class: "sr" }, same ? " same class as the query" : " other class"));
  const name = hit.class_name ?? "unlabelled";
  const src = sameOriginUrl(hit.image_url, { size: THUMB_PX });
  const alt = `Rank ${hit.rank}: ${hit.split} #${hit.index}, class ${name}`;
  return el("li", { "data-hit-rank": hit.rank },
    el("button", { type: "button", class: "hit", onclick: () => openDetail(c, hit, same) },
      src ? apiImage(src, { alt, width: 112, height: 112 }, "results", true)
        : el("div", { class: "placeholder", role: "img", "aria-label": alt }, "no image"),
      el("span", { class: "hit-head" }, el("span", { class: "rank" }, `#${hit.rank}`), mark,
        el("span", { class: "score muted", title: `${c.distance} ${scoreKind(c)}` },
          el("span", { class: "sr" }, `${scoreKind(c)} `), Number(hit.score).toFixed(3))),
      el("span", { class: "class-name" }, name)));
}

function valueText(v) {
  return (v !== null && typeof v === "object") ? JSON.stringify(v) : String(v);
}

function openDetail(c, hit, same) {
  const name = hit.class_name ?? "unlabelled";
  ui.detailTitle.textContent = `Rank ${hit.rank} — ${name}`;
  const src = sameOriginUrl(hit.image_url, { size: LARGE_PX });
  const rows = [["collection", c.name], ["split", hit.split], ["index", hit.index], ["point id", hit.point_id],
    ["label", hit.label], ["class", name], ["score", scoreText(c, hit.score)],
    ...(same === null ? [] : [["same class as query", same ? "✓ yes" : "✗ no"]]),
    ...Object.entries(hit.payload || {}).map(([k, v]) => [`payload.${k}`, v])];
  releaseImages("detail");
  ui.detailBody.replaceChildren(
    src ? apiImage(src, { alt: `Larger view of rank ${hit.rank}: ${hit.split} #${hit.index}, class ${name}`,
      class: "large", width: LARGE_PX, height: LARGE_PX }, "detail") : null,
    el("table", { class: "payload" }, el("caption", {}, "Point and payload"),
      el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", { scope: "row" }, k), el("td", {}, valueText(v)))))));
  ui.detail.showModal();
  ui.detailClose.focus();
}

// ---------------------------------------------------------------- events

/** "Forget key": drop the key from this tab and the results it opened; the next API call asks again. */
function forgetKey() {
  setKey(null);
  state.run += 1; // answers still on the way are dropped
  releaseImages("results");
  if (ui.detail.open) ui.detail.close();
  if (state.objectUrl) { URL.revokeObjectURL(state.objectUrl); state.objectUrl = null; }
  ui.rows.replaceChildren();
  ui.queryPanel.replaceChildren();
  ui.queryPanel.hidden = true;
  ui.results.removeAttribute("aria-busy");
  clearError();
  setStatus("API key forgotten: the next search asks for it again.");
  ui.results.focus();
}

function fileQuery(file) {
  if (!file) return;
  run({ kind: "file", file });
}

function rerun() {
  if (state.query) run(state.query);
  else writeUrl(null);
}

function bind() {
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    run({ kind: "point", split: ui.split.value, index: ui.index.value.trim() });
  });
  ui.random.addEventListener("click", () => {
    const n = (current()?.counts || {})[ui.split.value] || 0;
    if (!n) { showError(`Split ${ui.split.value || "(none)"} of this collection is empty.`); return; }
    ui.index.value = String(Math.floor(Math.random() * n));
    run({ kind: "point", split: ui.split.value, index: ui.index.value });
  });
  ui.collection.addEventListener("change", () => { onCollectionChanged(); rerun(); });
  ui.compareOn.addEventListener("change", () => { onCollectionChanged(); rerun(); });
  ui.compare.addEventListener("change", () => { onCollectionChanged(); rerun(); });
  ui.split.addEventListener("change", onSplitChanged);
  ui.k.addEventListener("change", rerun);
  ui.labelBoxes.addEventListener("change", rerun);
  ui.file.addEventListener("change", () => fileQuery(ui.file.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    ui.dropzone.addEventListener(type, (e) => { e.preventDefault(); ui.dropzone.classList.add("over"); });
  }
  ui.dropzone.addEventListener("dragleave", () => ui.dropzone.classList.remove("over"));
  ui.dropzone.addEventListener("drop", (e) => {
    e.preventDefault();
    ui.dropzone.classList.remove("over");
    fileQuery(e.dataTransfer && e.dataTransfer.files[0]);
  });
  ui.detailClose.addEventListener("click", () => ui.detail.close());
  ui.detail.addEventListener("close", () => releaseImages("detail"));
  ui.forgetKey.addEventListener("click", forgetKey);
  ui.detail.addEventListener("click", (e) => { if (e.target === ui.detail) ui.detail.close(); });
  window.addEventListener("popstate", () => {
    const q = readUrl();
    if (q) run(q, { push: false });
  });
}

async function health() {
  try {
    const h = await api("/health");
    ui.service.textContent = `service ${h.status ?? "?"} · version ${h.version ?? "?"} · engine ${h.engine ?? "?"}`;
  } catch (err) {
    ui.service.textContent = "service unreachable";
  }
}

async function main() {
  setKey(auth.key); // shows "Forget key" when this tab already holds one
  bind();
  health();
  try {
    await loadCollections();
  } catch (err) {
    showError(`Could not list the collections: ${err.message}`);
    return;
  }
  const q = readUrl();
  document.body.dataset.ready = "true"; // collections loaded (tests wait for this)
  if (q) await run(q, { push: false });
}

main();
