// posttrain studio: one page, routed by the URL hash (#/runs, #/run/PATH, #/compare?p=A&p=B,
// #/launch, #/chat, #/data). Plain DOM code, no framework, no build step; every server value
// reaches the page as text (textContent), never as HTML.
"use strict";

const view = document.getElementById("view");
const studio = {info: null, cleanup: [], chat: null};
window.studio = studio; // the browser tests read a few counters from here

// ------------------------------------------------------------------------------ helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({error: `${res.status} ${res.statusText}`}));
  if (!res.ok) {
    const err = new Error(data.error || `${res.status}`);
    err.data = data;
    throw err;
  }
  return data;
}

function q(params) {
  return Object.entries(params).flatMap(([k, v]) => [].concat(v).map((x) => `${k}=${encodeURIComponent(x)}`)).join("&");
}

function badge(status) {
  return h("span", {class: `badge ${String(status).replace(/[^a-z_]/gi, "")}`}, String(status).replace(/_/g, " "));
}

function fmtNum(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "—" : String(v);
  if (Number.isInteger(v)) return v.toLocaleString();
  return Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(4);
}

function fmtTime(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "—";
}

function fmtSecs(s) {
  if (typeof s !== "number") return "—";
  if (s < 90) return `${s.toFixed(1)} s`;
  if (s < 5400) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MB`;
  return `${(n / (1 << 30)).toFixed(2)} GB`;
}

function runHash(path) {
  return `#/run/${path.split("/").map(encodeURIComponent).join("/")}`;
}

function runLink(path) {
  return h("a", {href: runHash(path)}, path);
}

function onLeave(fn) {
  studio.cleanup.push(fn);
}

function stream(url, handlers) {
  // EventSource with named handlers; closed at "end" (else it would reconnect) and when the page changes
  const es = new EventSource(url);
  es.onmessage = (e) => handlers.message(JSON.parse(e.data));
  es.addEventListener("reset", () => handlers.reset && handlers.reset());
  es.addEventListener("end", () => { es.close(); handlers.end && handlers.end(); });
  onLeave(() => es.close());
  return es;
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  onLeave(() => clearInterval(id));
}

function errorBox(err) {
  return h("div", {class: "errors"}, err.message || String(err));
}

// ------------------------------------------------------------------------------ router

async function route() {
  studio.cleanup.splice(0).forEach((fn) => fn());
  const hash = location.hash.slice(1) || "/runs";
  const cut = hash.indexOf("?");
  const path = decodeURIComponent(cut < 0 ? hash : hash.slice(0, cut)), query = cut < 0 ? "" : hash.slice(cut + 1);
  const params = new URLSearchParams(query || "");
  const page = path.split("/")[1] || "runs";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page ||
    (page === "run" || page === "compare") && a.dataset.page === "runs"));
  view.replaceChildren();
  try {
    if (!studio.info) {
      studio.info = await api("/api/info");
      document.getElementById("root").textContent = `root: ${studio.info.root}`;
    }
    if (page === "run") await runPage(path.slice("/run/".length));
    else if (page === "compare") await comparePage(params.getAll("p"));
    else if (page === "launch") await launchPage(params);
    else if (page === "chat") await chatPage();
    else if (page === "data") await dataPage();
    else await runsPage();
  } catch (err) {
    view.appendChild(errorBox(err));
  }
}

window.addEventListener("hashchange", route);

// ------------------------------------------------------------------------------ runs

async function runsPage() {
  const selected = new Set();
  const compareBtn = h("button", {disabled: true, onclick: () => {
    location.hash = `#/compare?${q({p: [...selected]})}`;
  }}, "Compare selected");
  const body = h("tbody");
  const table = h("table", {id: "runs"}, h("thead", {}, h("tr", {},
    ["", "run", "stage", "model", "status", "started", "duration", "key metrics"].map((c) => h("th", {}, c)))), body);
  const empty = h("p", {class: "muted"});
  view.append(h("h1", {}, "Runs"), h("div", {class: "row"}, compareBtn,
    h("a", {href: "#/launch"}, "start a run…"), h("span", {class: "muted small"}, "updates every 3 s")), table, empty);
  async function refresh() {
    const {runs} = await api("/api/runs");
    empty.textContent = runs.length ? "" : `No run directories under ${studio.info.root} yet.`;
    body.replaceChildren(...runs.map((r) => {
      const box = h("input", {type: "checkbox", checked: selected.has(r.path), onchange: (e) => {
        e.target.checked ? selected.add(r.path) : selected.delete(r.path);
        compareBtn.disabled = selected.size < 2;
      }});
      const metrics = Object.entries(r.metrics || {}).map(([k, v]) => `${k} ${fmtNum(v)}`).join(", ");
      return h("tr", {"data-run": r.path}, h("td", {}, box), h("td", {}, runLink(r.path)),
        h("td", {}, r.stage || "—"), h("td", {}, r.model || "—"), h("td", {}, badge(r.status)),
        h("td", {}, fmtTime(r.started)), h("td", {class: "num"}, fmtSecs(r.seconds)), h("td", {class: "small"}, metrics));
    }));
  }
  await refresh();
  every(3000, () => refresh().catch(() => {}));
}

// ------------------------------------------------------------------------------ one run

function curvesPanel(title) {
  // charts that grow as metrics rows arrive; one per curve key
  const panel = {rows: [], keys: [], el: h("div", {class: "charts", id: "curves"}), pending: false};
  panel.add = (rows, keys) => {
    panel.rows.push(...rows);
    if (keys) panel.keys = keys;
    if (!panel.pending) {
      panel.pending = true;
      requestAnimationFrame(() => { panel.pending = false; panel.render(); });
    }
  };
  panel.reset = () => { panel.rows = []; panel.render(); };
  panel.render = () => {
    const keys = panel.keys.length ? panel.keys : ["loss"];
    panel.el.replaceChildren(...keys.map((k) => lineChart(k, [{name: title || k,
      points: panel.rows.filter((r) => typeof r[k] === "number" && typeof r.step === "number").map((r) => [r.step, r[k]])}])));
    studio.curveRenders = (studio.curveRenders || []).concat([panel.rows.length]);
  };
  panel.render();
  return panel;
}

async function runPage(path) {
  let info = await api(`/api/run?${q({path})}`);
  const head = h("div", {class: "row"});
  const summaryLine = h("p", {class: "muted"});
  view.append(h("h1", {}, path), head, summaryLine);
  const sections = h("div");
  view.appendChild(sections);
  const actionErr = h("span", {class: "err"});

  function drawHead() {
    const s = info.summary;
    const buttons = [badge(s.status)];
    if (s.status === "running" && s.job) {
      buttons.push(h("button", {class: "danger", id: "stop", onclick: () => act("stop")}, "Stop"));
    } else if (s.kind === "pipeline" ? !!info.pipeline_yaml && s.status !== "done" : s.resumable) {
      buttons.push(h("button", {class: "primary", id: "resume", onclick: () => act("resume")}, "Resume"));
    }
    if (s.job) buttons.push(h("code", {class: "small"}, s.job.command));
    head.replaceChildren(...buttons, actionErr);
    summaryLine.textContent = `${s.kind === "pipeline" ? "pipeline" : `stage ${s.stage || "?"}`} · model ` +
      `${s.model || "—"} · started ${fmtTime(s.started)} · ${fmtSecs(s.seconds)}`;
  }

  async function act(what) {
    actionErr.textContent = "";
    try {
      await api(`/api/run/${what}`, {path});
      info = await api(`/api/run?${q({path})}`);
      drawHead();
      if (what === "resume") startStreams();
    } catch (err) {
      actionErr.textContent = err.message;
    }
  }

  const curves = curvesPanel();
  const log = h("pre", {class: "log", id: "log"});
  function startStreams() {
    if (info.summary.kind !== "pipeline") {
      curves.rows = [];
      stream(`/api/run/stream/metrics?${q({path})}`, {
        message: (d) => curves.add(d.rows, d.keys), reset: () => curves.reset(),
      });
    }
    log.textContent = "";
    stream(`/api/run/stream/log?${q({path})}`, {
      message: (d) => {
        const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
        log.textContent += d.text.split("\n").map((line) => line.slice(line.lastIndexOf("\r") + 1)).join("\n"); // progress bars: the last state
        if (atEnd) log.scrollTop = log.scrollHeight;
      },
      reset: () => { log.textContent = ""; },
    });
  }

  drawHead();
  const stages = h("div");
  const drawStages = () => stages.replaceChildren(...[pipelineStages(info), Object.keys(info.metric_table || {}).length ?
    h("div", {}, h("h2", {}, "Eval metrics by stage"), metricTable(info.metric_table)) : null].filter(Boolean));
  if (info.summary.kind === "pipeline") {
    drawStages();
    sections.append(h("h2", {}, "Stages"), stages);
  } else {
    sections.append(h("h2", {}, "Curves"), curves.el);
  }
  sections.append(h("h2", {}, "Log"), info.has_log ? log : h("p", {class: "muted"}, "— (not started from the studio)"));
  if (info.summary.kind !== "pipeline") {
    if (Object.keys(info.eval || {}).length) sections.append(h("h2", {}, "Eval"), evalTable(info.eval));
    if (info.gates) sections.append(h("h2", {}, "Gates"), gatesList(info.gates));
    if (info.pipeline) sections.append(h("p", {}, "part of pipeline ", runLink(info.pipeline)));
    sections.append(h("h2", {}, "Config"), h("pre", {id: "config"}, info.config || "—"));
    sections.append(h("h2", {}, "Manifest"), info.manifest ? h("details", {}, h("summary", {}, "manifest.json"),
      h("pre", {}, JSON.stringify(info.manifest, null, 2))) : h("p", {class: "muted"}, "— (written when the run finishes)"));
  } else if (info.pipeline_yaml) {
    sections.append(h("h2", {}, "Pipeline YAML"), h("pre", {}, info.pipeline_yaml));
  }
  const artifacts = h("div");
  sections.append(h("h2", {}, "Artifacts"), artifacts);
  const drawArtifacts = () => artifacts.replaceChildren(info.artifacts.length ? h("table", {}, h("tbody", {},
    info.artifacts.map((a) => h("tr", {}, h("td", {}, a.dir ? a.path + "/" : h("a", {href: `/api/file?${q({path: a.path})}`,
      target: "_blank", rel: "noopener"}, a.path)), h("td", {class: "num"}, fmtBytes(a.size)))))) : h("p", {class: "muted"}, "—"));
  drawArtifacts();
  if (info.summary.kind !== "pipeline" || info.has_log) startStreams();
  every(2000, async () => {
    if (info.summary.status !== "running") return;
    info = await api(`/api/run?${q({path})}`).catch(() => info);
    drawHead();
    drawArtifacts();
    if (info.summary.kind === "pipeline") drawStages();
    if (info.summary.status !== "running") route(); // finished: show the eval tables and manifest
  });
}

function metricTable(table) {
  const cols = Object.keys(table);
  const metrics = [...new Set(cols.flatMap((c) => Object.keys(table[c])))];
  return h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "metric"), cols.map((c) => h("th", {}, c)))),
    h("tbody", {}, metrics.map((m) => h("tr", {}, h("td", {}, m), cols.map((c) => h("td", {class: "num"}, fmtNum(table[c][m])))))));
}

function evalTable(evals) {
  const before = evals.before || {}, after = evals.after || {};
  const metrics = [...new Set([...Object.keys(before), ...Object.keys(after)])];
  return h("table", {id: "eval"}, h("thead", {}, h("tr", {}, ["metric", "before", "after", "delta"].map((c) => h("th", {}, c)))),
    h("tbody", {}, metrics.map((m) => h("tr", {}, h("td", {}, m), h("td", {class: "num"}, fmtNum(before[m])),
      h("td", {class: "num"}, fmtNum(after[m])),
      h("td", {class: "num"}, typeof before[m] === "number" && typeof after[m] === "number" ?
        (after[m] - before[m] >= 0 ? "+" : "") + fmtNum(after[m] - before[m]) : "—")))));
}

function gatesList(gates) {
  if (!gates.length) return h("p", {class: "muted"}, "none");
  return h("ul", {}, gates.map((g) => h("li", {}, badge(g.passed ? "passed" : "failed"), " ",
    `${g.label || g.metric} = ${fmtNum(g.value)} (needs ${[g.min !== null && g.min !== undefined ? `≥ ${g.min}` : "",
      g.max !== null && g.max !== undefined ? `≤ ${g.max}` : ""].filter(Boolean).join(" ")})`)));
}

function pipelineStages(info) {
  if (info.pipeline_error) return errorBox(new Error(info.pipeline_error));
  return h("table", {id: "stages"}, h("thead", {}, h("tr", {}, ["stage", "verb", "status", "seconds", "gates"].map((c) => h("th", {}, c)))),
    h("tbody", {}, (info.stages || []).map((s) => h("tr", {}, h("td", {}, s.run ? runLink(s.run) : s.name), h("td", {}, s.verb || "—"),
      h("td", {}, badge(s.status || "?"), s.error ? h("div", {class: "err"}, s.error) : null),
      h("td", {class: "num"}, fmtSecs(s.seconds)), h("td", {}, gatesList(s.gates))))));
}

// ------------------------------------------------------------------------------ compare

async function comparePage(paths) {
  view.append(h("h1", {}, `Compare ${paths.length} runs`));
  if (paths.length < 2) {
    view.append(h("p", {}, "Pick two or more runs on the ", h("a", {href: "#/runs"}, "runs page"), "."));
    return;
  }
  const diff = await api(`/api/compare?${q({path: paths})}`);
  const runs = Object.keys(diff.values);
  const showAll = h("input", {type: "checkbox", id: "show-all"});
  const tbody = h("tbody");
  const draw = () => tbody.replaceChildren(...(showAll.checked ? diff.keys : diff.differ).map((k) =>
    h("tr", {class: diff.differ.includes(k) ? "differ" : ""}, h("td", {}, k),
      runs.map((r) => h("td", {}, k in diff.values[r] ? JSON.stringify(diff.values[r][k]) : "(missing)")))));
  showAll.addEventListener("change", draw);
  draw();
  view.append(h("h2", {}, "Config"), h("p", {class: "muted"}, `${diff.differ.length} of ${diff.keys.length} keys differ `,
    h("label", {}, showAll, " show all keys")),
    h("table", {id: "diff"}, h("thead", {}, h("tr", {}, h("th", {}, "key"), runs.map((r) => h("th", {}, runLink(r))))), tbody));
  const metrics = await Promise.all(runs.map((r) => api(`/api/run/metrics?${q({path: r})}`)));
  const keys = [...new Set(metrics.flatMap((m) => m.keys))].slice(0, 8);
  const charts = h("div", {class: "charts", id: "curves"}, keys.map((k) => lineChart(k, runs.map((r, i) => ({
    name: r, points: metrics[i].rows.filter((row) => typeof row[k] === "number").map((row) => [row.step, row[k]]),
  })))));
  view.append(h("h2", {}, "Curves"), keys.length ? charts : h("p", {class: "muted"}, "— (no metrics.jsonl)"));
}

// ------------------------------------------------------------------------------ launch

async function launchPage(params) {
  const {recipes} = await api("/api/recipes");
  const mode = params.get("mode") === "pipeline" ? "pipeline" : "stage";
  view.append(h("h1", {}, "Launch"), h("div", {class: "tabs"},
    h("button", {class: mode === "stage" ? "active" : "", onclick: () => { location.hash = "#/launch"; }}, "Stage"),
    h("button", {class: mode === "pipeline" ? "active" : "", id: "tab-pipeline",
      onclick: () => { location.hash = "#/launch?mode=pipeline"; }}, "Pipeline")));
  if (mode === "pipeline") return pipelineLaunch(recipes);
  const verbSel = h("select", {id: "verb"}, studio.info.verbs.map((v) => h("option", {value: v.verb}, v.verb)));
  const recipeSel = h("select", {id: "recipe"});
  const help = h("p", {class: "muted"});
  const form = h("form", {id: "launch-form", novalidate: true});
  view.append(h("div", {class: "row"}, h("label", {}, "verb ", verbSel), h("label", {}, "recipe ", recipeSel)), help, form);
  const fillRecipes = () => {
    const mine = recipes.filter((r) => !r.pipeline && r.verb === verbSel.value);
    recipeSel.replaceChildren(h("option", {value: ""}, "(defaults)"), ...mine.map((r) => h("option", {value: r.path}, r.path)));
    if (mine.length) recipeSel.value = mine[0].path;
  };
  verbSel.addEventListener("change", () => { fillRecipes(); loadForm(); });
  recipeSel.addEventListener("change", () => loadForm());
  if (params.get("verb")) verbSel.value = params.get("verb");
  fillRecipes();
  if (params.get("recipe")) recipeSel.value = params.get("recipe");

  async function loadForm() {
    const schema = await api(`/api/schema?${q({verb: verbSel.value, recipe: recipeSel.value})}`);
    help.textContent = schema.help;
    buildForm(form, schema);
  }
  await loadForm();
}

function buildForm(form, schema) {
  const inputs = {};
  const sections = new Map();
  const topErrors = h("div", {class: "errors", id: "form-errors", hidden: true});
  const status = h("span", {class: "muted", id: "form-status"});
  const overwrite = h("input", {type: "checkbox", id: "overwrite"});
  const start = h("button", {type: "submit", class: "primary", id: "start"}, "Start");
  form.replaceChildren(topErrors);
  for (const f of schema.fields) {
    const section = f.section || "run";
    if (!sections.has(section)) {
      const fs = h("fieldset", {"data-section": section}, h("legend", {}, section), h("div", {class: "err", "data-error": section}));
      sections.set(section, fs);
      form.appendChild(fs);
    }
    const value = schema.values[f.key] ?? "";
    const fixed = schema.fixed.includes(f.key);
    let input;
    if (f.kind === "bool") {
      input = h("input", {type: "checkbox", checked: value === "true", disabled: fixed});
    } else if (f.kind === "choice") {
      input = h("select", {disabled: fixed}, (f.nullable ? [""] : []).concat(f.choices).map((c) =>
        h("option", {value: c}, c === "" ? "(none)" : c)));
      input.value = value;
    } else if (f.kind === "yaml") {
      input = h("textarea", {rows: value.length > 60 ? 3 : 1, spellcheck: "false", disabled: fixed});
      input.value = value;
    } else {
      input = h("input", {type: "text", value, spellcheck: "false", disabled: fixed,
        placeholder: f.nullable ? "(none)" : f.required ? "required" : ""});
    }
    input.name = f.key;
    input.id = `f-${f.key}`;
    inputs[f.key] = {input, field: f};
    const label = h("label", {for: input.id, title: f.help}, f.key + (f.required ? " *" : ""));
    sections.get(section).appendChild(h("div", {class: "field", "data-key": f.key}, label,
      h("div", {}, input, h("div", {class: "err", "data-error": f.key})),
      h("div", {class: "help"}, f.help + (f.kind === "yaml" ? " (YAML)" : ""))));
  }
  form.append(h("div", {class: "row actions"}, start, h("label", {}, overwrite, " overwrite an existing run in output_dir"), status));

  const values = () => Object.fromEntries(Object.entries(inputs).map(([k, {input, field}]) =>
    [k, field.kind === "bool" ? (input.checked ? "true" : "false") : input.value]));

  function showErrors(errors) {
    form.querySelectorAll("[data-error]").forEach((el) => { el.textContent = ""; });
    form.querySelectorAll(".field.invalid").forEach((el) => el.classList.remove("invalid"));
    const loose = [];
    for (const {key, message} of errors) {
      // the field itself, else the longest field or section the key starts with (list items, sections)
      let target = inputs[key] ? key : Object.keys(inputs).filter((k) => key.startsWith(k + ".")).sort((a, b) => b.length - a.length)[0];
      if (!target && sections.has(key)) target = key;
      const slot = target && form.querySelector(`[data-error="${CSS.escape(target)}"]`);
      if (slot) {
        slot.textContent += (slot.textContent ? "; " : "") + (target === key ? message : `${key}: ${message}`);
        const row = form.querySelector(`.field[data-key="${CSS.escape(target)}"]`);
        if (row) row.classList.add("invalid");
      } else {
        loose.push(`${key}: ${message}`);
      }
    }
    topErrors.hidden = !loose.length;
    topErrors.replaceChildren(...loose.map((l) => h("div", {}, l)));
    status.textContent = errors.length ? `${errors.length} problem(s)` : "valid";
    studio.formErrors = errors;
  }

  let timer = null, seq = 0;
  async function validate() {
    const mine = ++seq;
    const res = await api("/api/validate", {verb: schema.verb, values: values(), overwrite: overwrite.checked});
    if (mine === seq) showErrors(res.ok ? [] : res.errors);
    return res;
  }
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => validate().catch(() => {}), 300); });
  form.addEventListener("change", () => { clearTimeout(timer); timer = setTimeout(() => validate().catch(() => {}), 100); });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearTimeout(timer);
    start.disabled = true;
    status.textContent = "starting…";
    try {
      const res = await api("/api/launch", {verb: schema.verb, values: values(), overwrite: overwrite.checked});
      if (!res.ok) { showErrors(res.errors); return; }
      location.hash = runHash(res.run);
    } catch (err) {
      showErrors([{key: "(launch)", message: err.message}]);
    } finally {
      start.disabled = false;
    }
  });
  showErrors(schema.errors || []);
  if (!(schema.errors || []).length) status.textContent = "";
}

// The pipeline editor: the form mirrors the YAML (a problem keyed stages.1.gate.0.metric is
// shown beside that field), the server turns it into YAML (/api/pipeline/yaml) and back
// (/api/pipeline/form), and "Edit as YAML" is the fallback for anything the form has no field for.
async function pipelineLaunch(recipes) {
  const schema = await api("/api/pipeline/schema");
  const verbNames = schema.verbs.map((v) => v.verb);
  const help = (key) => schema.help[key] || "";
  const ed = studio.pipeline = {form: null, mode: "form", dirty: false, source: "", evalMetrics: [], plans: 0};
  const pipelineRecipes = recipes.filter((r) => r.pipeline);
  const sel = h("select", {id: "pipeline-recipe"}, h("option", {value: ""}, "(write one)"),
    pipelineRecipes.map((r) => h("option", {value: r.path}, r.path)));
  const modeBtn = h("button", {id: "pipeline-mode", type: "button"}, "Edit as YAML");
  const note = h("span", {class: "muted small", id: "pipeline-note"});
  const text = h("textarea", {id: "pipeline-yaml", rows: 22, spellcheck: "false", hidden: true});
  const formBox = h("div", {id: "pipeline-form"});
  const errors = h("div", {class: "errors", hidden: true, id: "pipeline-errors"});
  const plan = h("div", {id: "plan"});
  const start = h("button", {class: "primary", id: "pipeline-start", disabled: true}, "Start");
  const showPlan = h("button", {id: "show-plan"}, "Show plan");
  const status = h("span", {class: "muted", id: "pipeline-status"});
  const lists = h("div", {hidden: true});
  view.append(h("div", {class: "row"}, h("label", {}, "pipeline ", sel), modeBtn, note), errors, formBox, text,
    h("div", {class: "row actions"}, showPlan, start, status), plan, lists);

  function datalists() {
    // per verb: its recipes (a stage's config) and the metric names a gate can name
    lists.replaceChildren(...verbNames.flatMap((v) => [
      h("datalist", {id: `recipes-${v}`}, recipes.filter((r) => !r.pipeline && r.verb === v).map((r) => h("option", {value: r.path}))),
      h("datalist", {id: `metrics-${v}`}, [...new Set([...ed.evalMetrics, ...(schema.metrics[v] || [])])].map((m) => h("option", {value: m}))),
    ]));
  }

  function changed() {
    ed.dirty = true;
    start.disabled = true;
    status.textContent = plan.childElementCount ? "changed: show the plan again before starting" : "";
  }

  function slot(path) {
    return h("div", {class: "err", "data-error": path});
  }

  function field(path, label, input, helpKey, extra) {
    input.dataset.path = path;
    if (!input.id) input.id = `p-${path}`;
    return h("div", {class: `pfield ${extra || ""}`, "data-key": path},
      h("label", {for: input.id, title: help(helpKey)}, label), input, slot(path));
  }

  function text_(obj, key, attrs) {
    const input = h("input", {type: "text", spellcheck: "false", value: obj[key], ...(attrs || {})});
    input.addEventListener("input", () => { obj[key] = input.value; changed(); });
    return input;
  }

  function yamlArea(obj, key, rows, placeholder) {
    const area = h("textarea", {rows, spellcheck: "false", placeholder});
    area.value = obj[key];
    area.addEventListener("input", () => { obj[key] = area.value; changed(); });
    return area;
  }

  function check(obj, key) {
    const box = h("input", {type: "checkbox", checked: !!obj[key]});
    box.addEventListener("change", () => { obj[key] = box.checked; changed(); });
    return box;
  }

  function structural(fn) {
    // add / remove / move: change the form, then draw it again
    return () => { fn(); changed(); renderForm(); };
  }

  function stageCard(stage, i, stages) {
    const p = `stages.${i}`;
    const verb = h("select", {}, (verbNames.includes(stage.verb) ? [] : [stage.verb]).concat(verbNames).map((v) =>
      h("option", {value: v, title: (schema.verbs.find((x) => x.verb === v) || {}).help || ""}, v || "(choose)")));
    verb.value = stage.verb;
    verb.addEventListener("change", structural(() => { stage.verb = verb.value; }));
    const name = text_(stage, "name", {size: 14});
    const legend = h("legend", {}, `${i + 1}. ${stage.name || "(unnamed)"}`);
    name.addEventListener("input", () => { legend.textContent = `${i + 1}. ${stage.name || "(unnamed)"}`; });
    const overrides = stage.overrides.map((row, k) => {
      const key = h("input", {type: "text", spellcheck: "false", value: row[0], size: 22, placeholder: "dotted.key",
        class: "override-key"});
      const value = h("input", {type: "text", spellcheck: "false", value: row[1], size: 26, placeholder: "value (YAML)",
        class: "override-value", "data-path": `${p}.overrides.${row[0]}`});
      const err = slot(`${p}.overrides.${row[0]}`);
      key.addEventListener("input", () => {
        row[0] = key.value;
        value.dataset.path = err.dataset.error = `${p}.overrides.${row[0]}`;
        changed();
      });
      value.addEventListener("input", () => { row[1] = value.value; changed(); });
      return h("tr", {class: "override"}, h("td", {}, key), h("td", {}, "="), h("td", {}, value, err),
        h("td", {}, h("button", {type: "button", class: "small-btn", title: "remove this override",
          onclick: structural(() => stage.overrides.splice(k, 1))}, "×")));
    });
    const gates = stage.gate.map((g, k) => {
      const gp = `${p}.gate.${k}`;
      const metric = text_(g, "metric", {size: 22, list: `metrics-${stage.verb}`, placeholder: "metric", class: "gate-metric"});
      const min = text_(g, "min", {size: 7, placeholder: "min", class: "gate-min"});
      const max = text_(g, "max", {size: 7, placeholder: "max", class: "gate-max"});
      const rel = check(g, "relative_to_previous");
      [[metric, "metric"], [min, "min"], [max, "max"], [rel, "relative_to_previous"]].forEach(([el, k2]) => {
        el.dataset.path = `${gp}.${k2}`;
        el.title = help(`gate.${k2}`);
      });
      return h("tr", {class: "gate", "data-gate": gp}, h("td", {}, metric, slot(`${gp}.metric`)),
        h("td", {}, min, slot(`${gp}.min`)), h("td", {}, max, slot(`${gp}.max`)),
        h("td", {}, h("label", {title: help("gate.relative_to_previous")}, rel, " change from input"),
          slot(`${gp}.relative_to_previous`), slot(gp)),
        h("td", {}, h("button", {type: "button", class: "small-btn remove-gate", title: "remove this gate",
          onclick: structural(() => stage.gate.splice(k, 1))}, "×")));
    });
    const move = (d) => structural(() => { stages.splice(i + d, 0, stages.splice(i, 1)[0]); });
    return h("fieldset", {class: "stage", "data-index": i}, legend, slot(p),
      h("div", {class: "prow"},
        field(`${p}.name`, "name", name, "stage.name"),
        field(`${p}.verb`, "verb", verb, "stage.verb"),
        field(`${p}.config`, "config (recipe)", text_(stage, "config", {size: 30, list: `recipes-${stage.verb}`,
          placeholder: "(the verb's defaults)"}), "stage.config", "wide"),
        field(`${p}.eval`, "eval", check(stage, "eval"), "stage.eval"),
        h("div", {class: "stage-tools"},
          h("button", {type: "button", class: "small-btn move-up", title: "move up", disabled: i === 0, onclick: move(-1)}, "↑"),
          h("button", {type: "button", class: "small-btn move-down", title: "move down", disabled: i === stages.length - 1,
            onclick: move(1)}, "↓"),
          h("button", {type: "button", class: "small-btn remove-stage", title: "remove this stage",
            onclick: structural(() => stages.splice(i, 1))}, "remove"))),
      h("div", {class: "sub"}, h("span", {class: "sub-title", title: help("stage.overrides")}, "overrides"), slot(`${p}.overrides`),
        overrides.length ? h("table", {class: "overrides"}, h("tbody", {}, overrides)) : null,
        h("button", {type: "button", class: "small-btn add-override", onclick: structural(() => stage.overrides.push(["", ""]))},
          "+ override")),
      h("div", {class: "sub"}, h("span", {class: "sub-title", title: help("stage.gate")}, "gates"), slot(`${p}.gate`),
        gates.length ? h("table", {class: "gates"}, h("thead", {}, h("tr", {}, ["metric", "min", "max", "", ""].map((c) => h("th", {}, c)))),
          h("tbody", {}, gates)) : null,
        h("button", {type: "button", class: "small-btn add-gate", onclick: structural(() =>
          stage.gate.push({metric: "", min: "", max: "", relative_to_previous: false}))}, "+ gate")));
  }

  function renderForm() {
    const f = ed.form;
    datalists();
    const sections = ["data", "eval", "deploy"];
    formBox.replaceChildren(
      h("fieldset", {}, h("legend", {}, "pipeline"), h("div", {class: "prow"},
        field("name", "name", text_(f, "name", {size: 16}), "name"),
        field("output_dir", "output_dir", text_(f, "output_dir", {size: 24}), "output_dir"),
        field("model.name", "model", text_(f.model, "name", {size: 22, placeholder: "default"}), "model.name"),
        field("model.dtype", "model.dtype", text_(f.model, "dtype", {size: 8, placeholder: "(recipe's)"}), "model.dtype"),
        field("model.adapter", "model.adapter (YAML)", text_(f.model, "adapter", {size: 34, placeholder: "{method: lora, r: 16}"}),
          "model.adapter", "wide"))),
      h("h3", {}, "Stages"), slot("stages"),
      h("div", {id: "stages-edit"}, f.stages.map((s, i) => stageCard(s, i, f.stages))),
      h("button", {type: "button", id: "add-stage", onclick: structural(() => f.stages.push({
        name: `stage${f.stages.length + 1}`, verb: verbNames[0], config: "", eval: true, overrides: [], gate: []}))}, "+ stage"),
      h("details", {open: sections.some((k) => f[k].trim()), id: "pipeline-sections"},
        h("summary", {}, "data, eval and deploy sections (YAML)"),
        sections.map((k) => field(k, k, yamlArea(f, k, Math.min(12, Math.max(3, f[k].split("\n").length + 1)),
          k === "data" ? "NAME: {source: data/x.jsonl}" : k === "eval" ? "tasks: [...]" : "source: STAGE"), k, "block"))));
  }

  function setMode(mode) {
    ed.mode = mode;
    formBox.hidden = mode !== "form";
    text.hidden = mode !== "yaml";
    modeBtn.textContent = mode === "form" ? "Edit as YAML" : "Edit as form";
  }

  function showErrors(errs) {
    errors.hidden = true;
    formBox.querySelectorAll("[data-error]").forEach((el) => { el.textContent = ""; });
    formBox.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
    const slots = ed.mode === "form" ? [...formBox.querySelectorAll("[data-error]")] : [];
    const loose = [];
    for (const {key, message} of errs) {
      // the field itself, else the longest field or section the key starts with
      const el = slots.filter((s) => key === s.dataset.error || key.startsWith(s.dataset.error + "."))
        .sort((a, b) => b.dataset.error.length - a.dataset.error.length)[0];
      if (!el) { loose.push(`${key}: ${message}`); continue; }
      const target = el.dataset.error;
      el.textContent += (el.textContent ? "; " : "") + (target === key ? message : `${key.slice(target.length + 1)}: ${message}`);
      formBox.querySelectorAll(`[data-path="${CSS.escape(target)}"]`).forEach((input) => input.classList.add("invalid"));
      const card = el.closest(".stage");
      if (card) card.classList.add("invalid");
      const folded = el.closest("details");
      if (folded) folded.open = true; // a problem in the data / eval / deploy sections is shown, not folded away
    }
    if (loose.length) {
      errors.hidden = false;
      errors.replaceChildren(...loose.map((l) => h("div", {}, l)));
    }
    status.textContent = errs.length ? `${errs.length} problem(s)` : "";
    studio.pipelineErrors = errs;
  }

  async function loadText(yamlText) {
    text.value = ed.source = yamlText;
    ed.dirty = false;
    note.textContent = "";
    const res = await api("/api/pipeline/form", {yaml: yamlText}).catch((err) => ({ok: false, errors: [{key: "yaml", message: err.message}]}));
    if (!res.ok) { setMode("yaml"); showErrors(res.errors); return; }
    ed.evalMetrics = res.eval_metrics;
    if (res.unshown.length) {
      setMode("yaml");
      note.textContent = `the form has no field for ${res.unshown.join(", ")}: edit it as YAML`;
      return;
    }
    ed.form = res.form;
    setMode("form");
    renderForm();
    showErrors([]);
  }

  function source() {
    return ed.mode === "yaml" || !ed.dirty ? {yaml: ed.mode === "yaml" ? text.value : ed.source} : {form: ed.form};
  }

  sel.addEventListener("change", async () => {
    plan.replaceChildren();
    start.disabled = true;
    if (!sel.value) {
      ed.form = {name: "", output_dir: "runs/", model: {name: "default", dtype: "", adapter: ""}, data: "", eval: "", deploy: "",
        stages: [{name: "sft", verb: verbNames[0], config: "", eval: true, overrides: [], gate: []}]};
      ed.dirty = true;
      setMode("form");
      renderForm();
      showErrors([]);
      return;
    }
    const res = await fetch(`/api/file?${q({path: sel.value})}`);
    await loadText(await res.text());
  });
  modeBtn.addEventListener("click", async () => {
    if (ed.mode === "form") {
      if (ed.dirty) {
        const res = await api("/api/pipeline/yaml", {form: ed.form}).catch((err) => ({ok: false, errors: [{key: "form", message: err.message}]}));
        if (!res.ok) return showErrors(res.errors);
        text.value = ed.source = res.yaml;
        ed.dirty = false;
      }
      setMode("yaml");
      showErrors([]);
    } else {
      await loadText(text.value);
    }
  });
  text.addEventListener("input", () => { start.disabled = true; });
  showPlan.addEventListener("click", async () => {
    plan.replaceChildren(h("p", {class: "muted"}, "planning…"));
    status.textContent = "";
    const res = await api("/api/pipeline/plan", source()).catch((err) => ({ok: false, errors: [{key: "plan", message: err.message}]}));
    if (!res.ok) { plan.replaceChildren(); showErrors(res.errors); return; }
    showErrors([]);
    plan.replaceChildren(planView(res.plan));
    ed.plans += 1;
    start.disabled = res.running;
    status.textContent = res.running ? "this pipeline is running now" : "planned: Start runs it";
  });
  start.addEventListener("click", async () => {
    start.disabled = true;
    const res = await api("/api/pipeline/launch", source()).catch((err) => ({ok: false, errors: [{key: "launch", message: err.message}]}));
    if (!res.ok) return showErrors(res.errors);
    location.hash = runHash(res.run);
  });
  setMode("form");
  if (pipelineRecipes.length) sel.value = pipelineRecipes[0].path;
  sel.dispatchEvent(new Event("change"));
}

function planView(plan) {
  const gates = (gs) => gs.length ? gs.map((g) => `${g.metric}${g.relative_to_previous ? " (change)" : ""} ` +
    [g.min !== null ? `≥ ${g.min}` : "", g.max !== null ? `≤ ${g.max}` : ""].filter(Boolean).join(" ")).join("; ") : "—";
  const parts = [h("h2", {}, `Plan: ${plan.name} → ${plan.output_dir}`)];
  if (plan.data.length) {
    parts.push(h("h3", {}, "Data"), h("table", {}, h("thead", {}, h("tr", {}, ["entry", "sources", "synth", "filters", "last run"].map((c) => h("th", {}, c)))),
      h("tbody", {}, plan.data.map((d) => h("tr", {}, h("td", {}, d.name), h("td", {}, [].concat(d.source).join(", ") || "—"),
        h("td", {}, d.synth || "—"), h("td", {}, d.filters ? "yes" : "no"), h("td", {}, d.last_status || "—"))))));
  }
  parts.push(h("h3", {}, "Stages"), h("table", {id: "plan-stages"}, h("thead", {}, h("tr", {},
    ["#", "stage", "verb", "reads model", "run dir", "gates", "will"].map((c) => h("th", {}, c)))),
    h("tbody", {}, plan.stages.map((s, i) => h("tr", {}, h("td", {class: "num"}, i + 1), h("td", {}, s.name), h("td", {}, s.verb),
      h("td", {}, s.input_model), h("td", {}, s.run_dir), h("td", {}, gates(s.gates)), h("td", {}, badge(s.action)))))));
  if (plan.swap) parts.push(h("p", {}, `then swap ${plan.swap.source}'s adapter into ${plan.swap.into} as ${plan.swap.name}`));
  parts.push(h("p", {class: "muted small"}, "“skip” assumes the data entries come out as they are on disk now; a failed gate stops the run."));
  return h("div", {}, parts);
}

// ------------------------------------------------------------------------------ chat

async function chatPage() {
  const {models, feedback} = await api("/api/chat/models");
  const options = (none) => (none ? [h("option", {value: ""}, "(none)")] : []).concat(models.map((m) => h("option", {value: m.model}, m.label)));
  const selA = h("select", {id: "model-a"}, options(false));
  const selB = h("select", {id: "model-b"}, options(true));
  const system = h("input", {type: "text", id: "system", placeholder: "system prompt (optional)", size: 50});
  const maxTokens = h("input", {type: "text", id: "max-tokens", value: "128", size: 5});
  const temperature = h("input", {type: "text", id: "temperature", value: "0", size: 4});
  const load = h("button", {id: "load"}, "Load");
  const status = h("span", {class: "muted", id: "chat-status"});
  const cols = {a: h("div", {class: "column", id: "col-a"}), b: h("div", {class: "column", id: "col-b"})};
  const grid = h("div", {class: "chat single"}, cols.a);
  const input = h("textarea", {id: "message", rows: 2, placeholder: "message (Enter sends, Shift+Enter for a new line)"});
  const send = h("button", {class: "primary", id: "send", disabled: true}, "Send");
  view.append(h("h1", {}, "Chat"), h("div", {class: "row"}, h("label", {}, "A ", selA), h("label", {}, "B ", selB), load, status),
    h("div", {class: "row"}, system, h("label", {}, "max tokens ", maxTokens), h("label", {}, "temperature ", temperature)),
    h("p", {class: "muted small"}, feedback ? `Thumbs and “which is better” go to the feedback database (${studio.info.feedback_db}); ` +
      "export them with `posttrain feedback export`. Side by side, both models see the same conversation: it continues with the reply you chose (A's if none)."
      : "Feedback storage is off (--feedback-db off)."),
    grid, h("div", {class: "row compose"}, input, send));
  const chat = studio.chat = {slots: {}, history: [], turn: 0, busy: false, chunks: 0};

  load.addEventListener("click", async () => {
    send.disabled = true;
    chat.slots = {};
    chat.history = [];
    const wanted = {a: selA.value, b: selB.value};
    grid.classList.toggle("single", !wanted.b);
    grid.replaceChildren(...(wanted.b ? [cols.a, cols.b] : [cols.a]));
    for (const c of ["a", "b"]) cols[c].replaceChildren(h("h3", {}, `${c.toUpperCase()}: ${wanted[c] || "—"}`));
    status.textContent = "loading model(s)… (the first load of a model takes a few seconds)";
    try {
      const started = await Promise.all(Object.entries(wanted).filter(([, m]) => m).map(async ([c, m]) =>
        [c, await api("/api/chat/start", {model: m})]));
      for (const [c, info] of started) chat.slots[c] = info;
      status.textContent = "ready";
      send.disabled = false;
    } catch (err) {
      status.textContent = err.message;
    }
  });

  async function ask(c, messages, bubble) {
    const slot = chat.slots[c];
    const res = await fetch(`/api/chat/${slot.slot}/v1/chat/completions`, {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: slot.model, messages, stream: true, max_tokens: parseInt(maxTokens.value, 10) || 128,
                            temperature: parseFloat(temperature.value) || 0})});
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || body.error || `${res.status}`);
    }
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "", text = "", replyId = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const data = JSON.parse(line.slice(6));
          const choice = (data.choices || [])[0];
          if (!choice) continue;
          replyId = choice.reply_id || replyId;
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            text += piece;
            bubble.text.textContent = text;
            chat.chunks += 1;
            bubble.el.dataset.chunks = String(Number(bubble.el.dataset.chunks || 0) + 1);
          }
        }
      }
    }
    return {text, replyId};
  }

  function bubble(c, role, text) {
    const t = h("div", {class: "content"}, text);
    const el = h("div", {class: `msg ${role}`}, t);
    cols[c].appendChild(el);
    return {el, text: t};
  }

  async function rate(c, replyId, body, note) {
    try {
      await api(`/api/chat/${chat.slots[c].slot}/v1/feedback`, body);
      note.textContent = "saved";
      note.className = "small saved";
    } catch (err) {
      note.textContent = err.message;
      note.className = "err";
    }
  }

  async function sendMessage() {
    const content = input.value.trim();
    if (!content || chat.busy || !Object.keys(chat.slots).length) return;
    chat.busy = true;
    send.disabled = true;
    input.value = "";
    document.querySelectorAll(".choose").forEach((el) => el.remove());
    const turn = ++chat.turn;
    const messages = (system.value.trim() ? [{role: "system", content: system.value.trim()}] : [])
      .concat(chat.history, [{role: "user", content}]);
    const replies = {};
    await Promise.all(Object.keys(chat.slots).map(async (c) => {
      bubble(c, "user", content);
      const b = bubble(c, "assistant", "…");
      b.el.dataset.turn = String(turn);
      try {
        replies[c] = await ask(c, messages, b);
        if (feedback && replies[c].replyId) {
          const note = h("span", {class: "small"});
          b.el.appendChild(h("div", {class: "tools"},
            h("button", {class: "thumb-up", title: "good reply", onclick: () => rate(c, replies[c].replyId, {reply_id: replies[c].replyId, rating: "up"}, note)}, "▲ good"),
            h("button", {class: "thumb-down", title: "bad reply", onclick: () => rate(c, replies[c].replyId, {reply_id: replies[c].replyId, rating: "down"}, note)}, "▼ bad"),
            note));
        }
      } catch (err) {
        b.text.textContent = "";
        b.el.appendChild(h("div", {class: "err"}, err.message));
      }
    }));
    chat.history.push({role: "user", content}, {role: "assistant", content: (replies.a || replies.b || {text: ""}).text});
    if (feedback && replies.a && replies.b && replies.a.replyId && replies.b.replyId) {
      const note = h("span", {class: "small"});
      const choose = (winner) => {
        const loser = winner === "a" ? "b" : "a";
        chat.history[chat.history.length - 1] = {role: "assistant", content: replies[winner].text};
        rate(winner, replies[winner].replyId, {reply_ids: [replies.a.replyId, replies.b.replyId],
                                               chosen: replies[winner].replyId}, note);
        note.dataset.chosen = winner + ">" + loser;
      };
      grid.after(h("div", {class: "row choose"}, h("span", {}, "Which is better?"),
        h("button", {id: "a-better", onclick: () => choose("a")}, "A is better"),
        h("button", {id: "b-better", onclick: () => choose("b")}, "B is better"), note));
    }
    chat.busy = false;
    send.disabled = false;
  }
  send.addEventListener("click", sendMessage);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendMessage(); }
  });
}

// ------------------------------------------------------------------------------ data

async function dataPage() {
  const [{files}, {models}] = await Promise.all([api("/api/data/files"), api("/api/chat/models")]);
  const path = h("input", {type: "text", id: "data-path", list: "data-files", size: 50, value: files[0] || ""});
  const list = h("datalist", {id: "data-files"}, files.map((f) => h("option", {value: f})));
  const model = h("select", {id: "data-model"}, models.map((m) => h("option", {value: m.model}, m.label)));
  const kind = h("select", {id: "data-kind"}, ["", "chat", "completion", "text", "preference", "prompt", "unpaired"].map((k) =>
    h("option", {value: k}, k || "(detect)")));
  const n = h("input", {type: "text", id: "data-n", value: "5", size: 4});
  const maxLength = h("input", {type: "text", id: "data-max-length", value: "1024", size: 6});
  const go = h("button", {class: "primary", id: "inspect"}, "Inspect");
  const out = h("div", {id: "data-out"});
  view.append(h("h1", {}, "Data"), h("p", {class: "muted"}, "A data file as the trainer sees it: rendered through the model's chat template, ",
    h("span", {class: "loss"}, "tokens that carry loss"), " marked, invalid rows named by line (posttrain data inspect)."),
    h("div", {class: "row"}, h("label", {}, "file ", path), list, h("label", {}, "tokenizer of ", model), h("label", {}, "kind ", kind),
      h("label", {}, "records ", n), h("label", {}, "max length ", maxLength), go), out);
  go.addEventListener("click", async () => {
    out.replaceChildren(h("p", {class: "muted"}, "reading…"));
    try {
      const r = await api("/api/data/inspect", {path: path.value, model: model.value, kind: kind.value,
                                                n: parseInt(n.value, 10) || 5, max_length: parseInt(maxLength.value, 10) || 1024});
      out.replaceChildren(...[
        h("p", {id: "data-summary"}, `${r.path}: ${r.valid} valid records of kind '${r.kind}', ${r.invalid} invalid`),
        r.errors.length ? h("div", {class: "errors", id: "data-errors"}, h("b", {}, "invalid rows" + (r.invalid > r.errors.length ? ` (first ${r.errors.length})` : "")),
          r.errors.map((e) => h("div", {}, e))) : null,
        ...r.records.map((rec) => h("div", {class: "record"}, h("h3", {}, rec.spans.length ?
          `record ${rec.index}: ${rec.tokens} tokens, ${rec.loss_tokens} carry loss` : `record ${rec.index}: no loss tokens within ${r.max_length} tokens`),
          h("div", {class: "text"}, rec.spans.map(([text, loss]) => loss ? h("span", {class: "loss"}, text) : text)))),
        r.kind && !r.records.length && r.valid ? h("p", {class: "muted"}, `${r.kind} records have no single sequence to render.`) : null,
      ].filter(Boolean));
    } catch (err) {
      out.replaceChildren(errorBox(err));
    }
  });
}

route();
