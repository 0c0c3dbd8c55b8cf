// interplab workbench: plain JavaScript over the server's own API (the same routes scripts use).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, sae: null };

// --- talking to the server -------------------------------------------------------------------
function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new Error(response.status === 401 ? "This server needs an API key: enter it at the top right." : message);
  }
  return body;
}

function say(message) { $("status").textContent = message || ""; }

// Stream a chat completion into `target` (server-sent events, ending in [DONE]).
async function streamChat(body, target) {
  target.textContent = "";
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }),
  });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error((error.error && error.error.message) || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      target.textContent += chunk.choices[0].delta.content || "";
    }
  }
}

// --- tabs ------------------------------------------------------------------------------------
function show(view) {
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === view));
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === view));
}
document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => show(t.dataset.view)));

// --- playground ------------------------------------------------------------------------------
function fillSources(info, preset) {
  const select = $("source");
  select.innerHTML = "";
  for (const v of info.vectors) select.add(new Option(`vector: ${v.name} (layers ${v.layers.join(",")})`, `vector:${v.name}`));
  if (preset) select.add(new Option(`feature ${preset.feature} of ${preset.sae}`, `feature:${preset.sae}:${preset.feature}`));
  if (preset) select.value = `feature:${preset.sae}:${preset.feature}`;
  if (!select.options.length) select.add(new Option("(no vectors: upload one, or pick a feature)", ""));
  updateMode();
}

function updateMode() { $("mode-box").hidden = !$("source").value.startsWith("feature:"); }
$("source").addEventListener("change", updateMode);
$("scale").addEventListener("input", () => { $("scale-value").textContent = $("scale").value; });

function steeringEdit() {
  const source = $("source").value;
  const scale = parseFloat($("scale").value);
  const positions = $("positions").value;
  if (source.startsWith("vector:")) {
    const edit = { vector: source.slice(7), scale, positions };
    const layers = $("layers").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
    if (layers.length) edit.layers = layers;
    return edit;
  }
  if (source.startsWith("feature:")) {
    const [, sae, feature] = source.split(":");
    return { sae, feature: Number(feature), mode: $("mode").value, value: scale, positions };
  }
  return null;
}

$("generate").addEventListener("click", async () => {
  say("");
  const edit = steeringEdit();
  if (!edit) { say("Choose a vector or a feature to steer with."); return; }
  const body = {
    messages: [{ role: "user", content: $("prompt").value }],
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), seed: 0,
  };
  $("generate").disabled = true;
  try {
    // both requests go out together, so the server runs them in one batch
    await Promise.all([streamChat(body, $("baseline")), streamChat({ ...body, steering: [edit] }, $("steered"))]);
    await abNumbers(edit);
  } catch (error) {
    say(error.message);
  } finally {
    $("generate").disabled = false;
  }
});

async function abNumbers(edit) {
  const dataset = $("dataset").value;
  $("ab").innerHTML = "";
  if (!dataset || edit.mode === "logit_bias") return;
  $("ab").textContent = "computing A/B numbers…";
  const r = await api("/api/ab", { method: "POST", body: JSON.stringify({ dataset, steering: [edit], n_pairs: 16 }) });
  const f = (x) => x.toFixed(3);
  $("ab").innerHTML = `<h2>${escapeHtml(r.dataset)} <span class="muted">(${r.n_pairs} A/B items)</span></h2>
    <table><tr><th></th><th>p(matching answer)</th><th>p(A)+p(B)</th><th>CE on neutral text</th></tr>
    <tr><th>baseline</th><td>${f(r.baseline.p_match)}</td><td>${f(r.baseline.p_ab)}</td><td>${f(r.baseline.neutral_ce)}</td></tr>
    <tr><th>steered</th><td>${f(r.steered.p_match)}</td><td>${f(r.steered.p_ab)}</td><td>${f(r.steered.neutral_ce)}</td></tr></table>
    <p>damage (CE rise): <b>${f(r.damage)}</b> nats · KL to baseline: ${f(r.kl)}</p>`;
}

// --- feature browser -------------------------------------------------------------------------
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

$("feature-search").addEventListener("click", async () => {
  say("");
  const list = $("feature-results");
  list.innerHTML = "";
  try {
    const sae = $("sae").value;
    const r = await api(`/api/saes/${encodeURIComponent(sae)}/features?q=${encodeURIComponent($("feature-query").value)}`);
    if (!r.data.length) list.innerHTML = "<li class='muted'>no feature matches</li>";
    for (const hit of r.data) {
      const li = document.createElement("li");
      li.className = "hit";
      li.dataset.feature = hit.feature;
      li.innerHTML = `<b>#${hit.feature}</b> ${escapeHtml(hit.label)} <span class="muted">${hit.matched}</span>`;
      li.addEventListener("click", () => openFeature(sae, hit.feature));
      list.appendChild(li);
    }
  } catch (error) { say(error.message); }
});

$("feature-open").addEventListener("click", () => openFeature($("sae").value, Number($("feature-id").value)));

async function openFeature(sae, feature) {
  say("");
  try {
    const card = await api(`/api/saes/${encodeURIComponent(sae)}/features/${feature}?contexts=8`);
    renderCard(sae, card);
  } catch (error) { say(error.message); }
}

function tokenSpan(token, act, max, isMax) {
  const alpha = max > 0 ? Math.max(0, Math.min(1, act / max)) : 0;
  const style = alpha > 0 ? ` style="background: rgba(234, 88, 12, ${alpha.toFixed(3)})"` : "";
  return `<span class="tok${isMax ? " max" : ""}${alpha > 0 ? " lit" : ""}"${style} title="${act.toFixed(3)}">${escapeHtml(token)}</span>`;
}

// top contexts: the tokens around each window's maximum, shaded by activation, the maximum marked
function contextRows(contexts, max) {
  return contexts.map((ctx) => {
    const lo = Math.max(0, ctx.max_pos - 16), hi = Math.min(ctx.tokens.length, ctx.max_pos + 6);
    const spans = ctx.tokens.slice(lo, hi).map((t, i) => tokenSpan(t, ctx.acts[lo + i], max, lo + i === ctx.max_pos));
    return `<div class="ctx"><span class="value">${ctx.activation.toFixed(2)}</span>${spans.join("")}</div>`;
  }).join("") || "<p>No context activates this feature.</p>";
}

function renderCard(sae, c) {
  const contexts = contextRows(c.contexts, c.max_act || 1);
  const table = (title, rows, cls) => `<div><h3>${title}</h3><table>${rows.map(([t, v]) =>
    `<tr><td>${escapeHtml(JSON.stringify(t))}</td><td class="${cls}">${v.toFixed(3)}</td></tr>`).join("")}</table></div>`;
  $("feature-card").innerHTML = `
    <h2>Feature ${c.feature} <span class="muted">${escapeHtml(c.site || "")}</span></h2>
    <p class="label">${escapeHtml(c.label || "(never fired on the indexed corpus)")}</p>
    <p class="muted">density ${(100 * c.density).toFixed(3)}% · max ${(c.max_act || 0).toFixed(3)} · mean ${(c.mean_act || 0).toFixed(3)}</p>
    <button id="steer-feature" class="primary">Steer with this feature</button>
    <h3>Top-activating contexts</h3>${contexts}
    <div class="effects">${table("Promotes", c.promoted, "pos")}${table("Suppresses", c.suppressed, "neg")}</div>
    <h3>Activation histogram</h3>${histogram(c.histogram)}`;
  $("steer-feature").addEventListener("click", () => {
    fillSources(state.info, { sae, feature: c.feature });
    $("mode").value = "add";
    const scale = Math.max(-20, Math.min(20, Math.round(2 * (c.max_act || 4)) / 2 || 4));
    $("scale").value = scale;
    $("scale-value").textContent = $("scale").value;
    show("playground");
  });
}

function histogram({ edges, counts }) {
  const width = 480, height = 120, top = Math.max(1, ...counts);
  const w = width / Math.max(1, counts.length);
  const bars = counts.map((n, i) => {
    const h = (height - 14) * n / top;
    return `<rect x="${(i * w).toFixed(1)}" y="${(height - 14 - h).toFixed(1)}" width="${(w - 1).toFixed(1)}" height="${h.toFixed(1)}" fill="#ea580c"><title>${edges[i].toFixed(2)}–${edges[i + 1].toFixed(2)}: ${n}</title></rect>`;
  }).join("");
  return `<svg class="hist" width="${width}" height="${height}">${bars}<text x="0" y="${height - 2}" font-size="10">0</text><text x="${width - 40}" y="${height - 2}" font-size="10">${edges[edges.length - 1].toFixed(2)}</text></svg>`;
}

// --- lens ------------------------------------------------------------------------------------
function heat(value) { return `rgba(37, 99, 235, ${Math.max(0, Math.min(1, value)).toFixed(3)})`; }

$("lens-run").addEventListener("click", async () => {
  say("");
  try {
    const body = { prompt: $("lens-prompt").value, layer: Number($("lens-layer").value), head: Number($("lens-head").value) };
    const r = await api("/api/lens", { method: "POST", body: JSON.stringify(body) });
    const head = "<tr><th></th>" + r.tokens.map((t) => `<th>${escapeHtml(JSON.stringify(t))}</th>`).join("") + "</tr>";
    const rows = r.rows.map((name, i) => `<tr><th>${name}</th>` + r.top_tokens[i].map((cell, p) => {
      const prob = r.top_probs[i][p][0];
      return `<td style="background:${heat(prob)}; color:${prob > 0.55 ? "white" : "black"}" title="${prob.toFixed(3)}">${escapeHtml(cell[0])}</td>`;
    }).join("") + "</tr>").join("");
    $("lens-grid").innerHTML = `<table>${head}${rows}</table>`;
    const a = r.attention;
    $("attn-title").textContent = `(layer ${a.layer}, head ${a.head}; row: query token, column: key token)`;
    const attn = a.pattern.map((row, q) => `<tr><th>${escapeHtml(JSON.stringify(r.tokens[q]))}</th>` +
      row.map((v) => `<td style="background:${heat(v)}" title="${v.toFixed(3)}">${v >= 0.05 ? v.toFixed(2) : ""}</td>`).join("") + "</tr>").join("");
    $("attn-grid").innerHTML = `<table>${head}${attn}</table>`;
  } catch (error) { say(error.message); }
});

// --- attribution graph (drawn by graph.js, the script the standalone graph.html inlines) ------
function showGraph(G, transcoders) {
  // a graph built here: feature cards add the transcoder's logit effects; one opened from a file
  // may come from other transcoders, so its cards show only the graph's own numbers
  const extraCard = transcoders ? (node) => graphFeatureEffects(transcoders, node) : null;
  renderGraph(G, $("graph-svg"), $("graph-card"), { extraCard, fitWidth: $("graph-svg").parentElement.clientWidth - 4 });
  $("graph-card").innerHTML = "<p class='muted'>Click a node.</p>";
  delete $("graph-card").dataset.node;
  const m = G.meta || {}, t = G.target || {};
  const kept = m.pruned ? ` · ${m.features_kept}/${m.features_total} features kept (${(100 * m.node_influence_kept).toFixed(1)}% of the influence)` : "";
  const prob = t.probability === undefined ? "" : ` (p = ${t.probability.toFixed(3)})`;
  $("graph-summary").textContent = `target ${JSON.stringify(t.token)}${prob} after ${G.tokens.length} tokens · ` +
    `${G.nodes.length} nodes, ${G.edges.length} edges${kept}` + (transcoders ? "" : " · opened from a file");
}

async function graphFeatureEffects(transcoders, node) {
  if (node.kind !== "feature") return "";
  const r = await api(`/api/transcoders/${encodeURIComponent(transcoders)}/layers/${node.layer}/features/${node.feature}?n=8&contexts=6`);
  const rows = (list, cls) => list.map(([t, v]) => `<tr><td>${escapeHtml(JSON.stringify(t))}</td><td class="${cls}">${v.toFixed(3)}</td></tr>`).join("");
  return `<h4>logit effects <span class="muted">(per unit of activation)</span></h4><div class="effects">
    <div><h4>Promotes</h4><table class="graph-promoted">${rows(r.promoted, "pos")}</table></div>
    <div><h4>Suppresses</h4><table>${rows(r.suppressed, "neg")}</table></div></div>` + graphTopContexts(r.index, node.layer);
}

function graphTopContexts(index, layer) {
  if (!index) {
    return `<p class="muted">No top contexts: this layer has no feature index (build one with
      <code>interplab sae features FOLDER --layers ${layer} --corpus ...</code>).</p>`;
  }
  return `<h4>top contexts <span class="muted">(indexed corpus · density ${(100 * index.density).toFixed(3)}% ·
    max ${(index.max_act || 0).toFixed(3)})</span></h4><div class="graph-contexts">${contextRows(index.contexts, index.max_act || 1)}</div>`;
}

$("graph-build").addEventListener("click", async () => {
  say("");
  const transcoders = $("graph-transcoders").value;
  if (!transcoders) { say("This server has no transcoders: start it with --transcoders NAME=FOLDER."); return; }
  const body = { prompt: $("graph-prompt").value, transcoders,
    node_threshold: Number($("graph-node-threshold").value), edge_threshold: Number($("graph-edge-threshold").value) };
  if ($("graph-target").value) body.target = $("graph-target").value;
  $("graph-build").disabled = true;
  $("graph-summary").textContent = "building the graph (a backward pass per feature node)…";
  try {
    showGraph(await api("/api/graph", { method: "POST", body: JSON.stringify(body) }), transcoders);
  } catch (error) {
    $("graph-summary").textContent = "";
    say(error.message);
  } finally {
    $("graph-build").disabled = false;
  }
});

$("graph-file").addEventListener("change", async () => {
  say("");
  const file = $("graph-file").files[0];
  if (!file) return;
  try {
    showGraph(JSON.parse(await file.text()), null);
  } catch (error) { say(`${file.name}: ${error.message}`); }
});

// --- start -----------------------------------------------------------------------------------
async function start() {
  $("api-key").value = localStorage.getItem("interplab-api-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("interplab-api-key", $("api-key").value); start(); });
  try {
    const info = await api("/api/info");
    state.info = info;
    say("");
    $("model-name").textContent = `${info.model} · ${info.n_layers} layers · d_model ${info.d_model}`;
    fillSources(info, null);
    $("sae").innerHTML = "";
    for (const s of info.saes) $("sae").add(new Option(`${s.name} (${s.site}, ${s.d_sae} latents)`, s.name));
    $("dataset").innerHTML = "<option value=''>(none)</option>";
    for (const d of info.datasets) $("dataset").add(new Option(d, d));
    $("graph-transcoders").innerHTML = "";
    for (const t of info.transcoders) $("graph-transcoders").add(new Option(`${t.name} (layers ${t.layers.join(",")})`, t.name));
    if (!info.transcoders.length) $("graph-transcoders").add(new Option("(none: start with --transcoders)", ""));
    $("lens-layer").max = info.n_layers - 1;
    $("lens-head").max = info.n_heads - 1;
    document.body.dataset.ready = "1";
  } catch (error) { say(error.message); }
}
start();
