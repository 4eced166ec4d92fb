// lmforge console: the playground and the operators' view. No framework, no build step, no inline script.
// The API key lives in this closure only (never in localStorage, sessionStorage or a cookie); every call
// sends it as "Authorization: Bearer <key>". Streams are read with fetch + ReadableStream (EventSource
// cannot send the header).
"use strict";

(() => {
  const BASE = location.pathname.replace(/console\/[^/]*$/, "");  // where the API is mounted (serve.route_prefix)
  const $ = (id) => document.getElementById(id);
  let apiKey = null;           // in memory only
  let whoami = null;           // {name, role, model, rag, feedback}
  let lastAnswer = null;       // {id, version}
  let aborter = null;          // the stream being read
  let statsTimer = null;
  let registry = null;         // the registry view last shown

  // ------------------------------------------------------------------------------------------ helpers

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function row(cells, cls) {
    const tr = el("tr", null, cls);
    for (const c of cells) {
      const td = el("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "–" : String(c);
      tr.appendChild(td);
    }
    return tr;
  }

  function fill(tableId, rows) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren(...rows);
  }

  function fmt(x, digits = 4) {
    if (x === null || x === undefined) return "–";
    return typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(digits)) : String(x);
  }

  function utc(seconds) {
    return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "–";
  }

  function headers(json) {
    const h = { Authorization: "Bearer " + apiKey };
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  async function errorOf(resp) {
    try {
      const body = await resp.json();
      return `${resp.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
    } catch (e) {
      return `${resp.status} ${resp.statusText}`;
    }
  }

  async function api(path, options = {}) {
    const resp = await fetch(BASE + "v1/" + path, {
      method: options.method || "GET", headers: headers(options.body !== undefined),
      body: options.body === undefined ? undefined : JSON.stringify(options.body), cache: "no-store",
    });
    if (!resp.ok) throw new Error(await errorOf(resp));
    return options.raw ? resp : resp.json();
  }

  // ------------------------------------------------------------------------------------------ the key

  async function connect() {
    const given = $("key").value.trim();
    $("key").value = "";  // not left in the page
    if (!given) return;
    apiKey = given;
    try {
      whoami = await api("console/whoami");
    } catch (err) {
      apiKey = null;
      whoami = null;
      $("who").textContent = "refused: " + err.message;
      $("who").className = "error";
      return;
    }
    $("who").textContent = `connected as ${whoami.name} (${whoami.role}), model ${whoami.model}`;
    $("who").className = "muted";
    $("connect").hidden = true;
    $("key").hidden = true;
    $("disconnect").hidden = false;
    $("tabs").hidden = false;
    $("rag").disabled = !whoami.rag;
    $("tab-operations").hidden = whoami.role !== "operator";
    show("playground");
  }

  function disconnect() {
    apiKey = null;
    whoami = null;
    if (aborter) aborter.abort();
    clearInterval(statsTimer);
    for (const id of ["playground", "operations"]) $(id).hidden = true;
    $("tabs").hidden = true;
    $("key").hidden = false;
    $("connect").hidden = false;
    $("disconnect").hidden = true;
    $("who").textContent = "not connected: the key stays in this page's memory only";
  }

  function show(view) {
    for (const id of ["playground", "operations"]) $(id).hidden = id !== view;
    for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
    clearInterval(statsTimer);
    if (view === "operations") {
      loadOperations();
      statsTimer = setInterval(loadStats, 2000);
    }
  }

  // ------------------------------------------------------------------------------------- playground

  function requestBody() {
    const route = $("route").value;
    const prompt = $("prompt").value;
    const body = { model: whoami.model, stream: true, temperature: Number($("temperature").value),
                   top_p: Number($("top_p").value), max_tokens: Number($("max_tokens").value) };
    if ($("top_k").value !== "") body.top_k = Number($("top_k").value);
    if ($("seed").value !== "") body.seed = Number($("seed").value);
    const stops = $("stop").value.split("\n").filter((s) => s.length > 0);
    if (stops.length) body.stop = stops;
    if ($("rag").checked) body.rag = true;
    if (route === "chat") body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    return [route === "chat" ? "chat/completions" : "completions", body];
  }

  function showSources(sources) {
    $("sources").replaceChildren(...sources.map((s) => {
      const li = el("li");
      li.appendChild(el("strong", `${s.source} (${s.doc}, score ${fmt(s.score, 3)}): `));
      li.appendChild(el("span", s.text));
      return li;
    }));
    $("sources-box").hidden = sources.length === 0;
  }

  function onEvent(data, answer) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    answer.id = chunk.id || answer.id;
    const choice = (chunk.choices || [])[0];
    if (!choice) return;
    if (choice.sources) showSources(choice.sources);
    const text = choice.text !== undefined ? choice.text : (choice.delta && choice.delta.content) || "";
    if (text) $("output").textContent += text;
    if (choice.finish_reason) answer.finish = choice.finish_reason;
  }

  async function readEvents(resp, answer) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) onEvent(line.slice(6), answer);
        }
      }
    }
  }

  async function send() {
    const [path, body] = requestBody();
    $("output").textContent = "";
    $("answer-error").hidden = true;
    $("feedback").hidden = true;
    $("sources-box").hidden = true;
    $("answer-meta").textContent = "waiting for the model…";
    $("send").disabled = true;
    $("stop-stream").disabled = false;
    aborter = new AbortController();
    const answer = { id: null, version: null, finish: null };
    try {
      const resp = await fetch(BASE + "v1/" + path, { method: "POST", headers: headers(true),
                                                      body: JSON.stringify(body), signal: aborter.signal });
      if (!resp.ok) throw new Error(await errorOf(resp));
      answer.version = resp.headers.get("x-lmforge-model-version");
      $("answer-meta").textContent = `model version ${answer.version}: streaming…`;
      await readEvents(resp, answer);
    } catch (err) {
      if (err.name !== "AbortError") {
        $("answer-error").textContent = err.message;
        $("answer-error").hidden = false;
      }
    } finally {
      $("send").disabled = false;
      $("stop-stream").disabled = true;
      aborter = null;
    }
    $("answer-meta").textContent = answer.version
      ? `answered by model version ${answer.version} · id ${answer.id} · ${answer.finish || "stopped"}` : "";
    $("answer-meta").dataset.version = answer.version || "";
    $("answer-meta").dataset.id = answer.id || "";
    lastAnswer = answer.id ? answer : null;
    $("feedback").hidden = !(lastAnswer && whoami.feedback);
    $("feedback-status").textContent = "";
    $("correction").value = "";
    for (const b of ["thumbs-up", "thumbs-down"]) $(b).classList.remove("chosen");
  }

  async function feedback(rating) {
    if (!lastAnswer) return;
    const correction = $("correction").value.trim();
    const body = { id: lastAnswer.id };
    if (rating !== null) body.rating = rating;
    if (correction) body.correction = correction;
    if (body.rating === undefined && !body.correction) {
      $("feedback-status").textContent = "give a rating or a correction";
      return;
    }
    $("thumbs-up").classList.toggle("chosen", rating === 1);
    $("thumbs-down").classList.toggle("chosen", rating === -1);
    try {
      await api("feedback", { method: "POST", body });
      $("feedback-status").textContent = `recorded (${rating === 1 ? "good" : rating === -1 ? "bad" : "no rating"}`
        + `${correction ? ", with a correction" : ""})`;
      $("feedback-status").dataset.recorded = lastAnswer.id;
    } catch (err) {
      $("feedback-status").textContent = "not recorded: " + err.message;
    }
  }

  function currentRating() {
    return $("thumbs-up").classList.contains("chosen") ? 1 : $("thumbs-down").classList.contains("chosen") ? -1 : null;
  }

  // ------------------------------------------------------------------------------------- operations

  async function loadOperations() {
    await Promise.all([loadRegistry(), loadStats(), loadIterations(), loadTraining()]);
  }

  function reportButton(vid) {
    const b = el("button", "gate report");
    b.type = "button";
    b.addEventListener("click", () => loadReport(vid));
    return b;
  }

  async function loadRegistry() {
    try {
      registry = await api("console/registry");
    } catch (err) {
      $("aliases").textContent = err.message;
      return;
    }
    const aliases = registry.aliases;
    const aliasOf = Object.fromEntries(Object.entries(aliases).map(([a, v]) => [v, a]));
    $("aliases").textContent = `production: ${aliases.production || "–"} · previous: ${aliases.previous || "–"}`
      + ` · ${registry.versions.length} versions (${registry.uri})`;
    $("aliases").dataset.production = aliases.production || "";
    fill("registry", registry.versions.map((v) => {
      const status = el("span", v.status, "status-" + v.status);
      const r = row([v.id, status, aliasOf[v.id] || "", v.parent, utc(v.created), v.reason || v.note,
                     v.gate_report ? reportButton(v.id) : ""], v.status);
      r.dataset.version = v.id;
      return r;
    }));
    $("rollback").disabled = !aliases.previous;
    const withReport = registry.versions.find((v) => v.gate_report);
    if (withReport && !$("report-version").dataset.version) loadReport(withReport.id);
  }

  function askRollback() {
    const a = registry.aliases;
    $("rollback-question").textContent = `Roll production back from ${a.production} to ${a.previous}? `
      + `${a.production} will be marked rejected, and the replicas following the registry swap back to ${a.previous}.`;
    $("rollback-confirm").dataset.production = a.production;
    $("rollback-confirm").hidden = false;
  }

  async function rollback() {
    const production = $("rollback-confirm").dataset.production;
    $("rollback-confirm").hidden = true;
    try {
      const done = await api("console/rollback", { method: "POST",
                                                   body: { production, reason: $("rollback-reason").value.trim() } });
      $("rollback-status").textContent = `rolled back ${done.rolled_back}: production is ${done.production}`;
    } catch (err) {
      $("rollback-status").textContent = "rollback refused: " + err.message;
    }
    $("rollback-reason").value = "";
    await loadRegistry();
  }

  async function plotImage(path, caption) {
    const figure = el("figure");
    try {
      const resp = await api(path, { raw: true });
      const img = el("img");
      img.alt = caption;
      img.src = URL.createObjectURL(await resp.blob());  // an <img src> could not send the key
      figure.appendChild(img);
    } catch (err) {
      figure.appendChild(el("p", err.message, "error"));
    }
    figure.appendChild(el("figcaption", caption));
    return figure;
  }

  async function loadReport(vid) {
    let r;
    try {
      r = await api(`console/versions/${vid}/report`);
    } catch (err) {
      $("report-verdict").textContent = err.message;
      return;
    }
    $("report-version").textContent = `of ${r.version} (${r.status})`;
    $("report-version").dataset.version = r.version;
    const c = r.comparison;
    $("report-verdict").replaceChildren(c ? el("span", c.passed ? "PASSED" : "FAILED", c.passed ? "passed" : "failed")
                                          : el("span", r.note || "no comparison in this report", "muted"));
    if (r.baseline) $("report-verdict").appendChild(el("span", ` against ${r.baseline}`, "muted"));
    $("report-reasons").replaceChildren(...(c ? c.reasons : []).map((x) => el("li", x)));
    fill("report-checks", (c ? c.checks : []).map((k) => row([k.key, fmt(k.candidate), fmt(k.baseline),
      fmt(k.improvement), fmt(k.max_regression), fmt(k.min_improvement), k.passed ? "yes" : "no"],
      k.passed ? "passed" : "failed")));
    fill("report-metrics", Object.entries(r.metrics || {}).map(([k, v]) => row([k, fmt(v)])));
    const plots = await Promise.all(r.plots.map((p) => plotImage(`console/versions/${vid}/plots/${p}`, p)));
    $("report-plots").replaceChildren(...plots);
  }

  async function loadIterations() {
    let its;
    try {
      its = (await api("console/iterations")).iterations;
    } catch (err) {
      fill("iterations", [row([err.message])]);
      return;
    }
    fill("iterations", its.map((it) => {
      const o = it.outcome || {};
      const link = o.version ? reportButton(o.version) : "";
      const inputs = el("span", `${it.inputs.length}`);
      inputs.title = it.inputs.join("\n");
      return row([it.n, utc(it.claimed_at), inputs, it.outcome ? o.verdict : "running", o.version, o.parent, link]);
    }));
  }

  async function loadStats() {
    let s;
    try {
      s = await api("console/stats");
    } catch (err) {
      $("serving").textContent = err.message;
      return;
    }
    $("serving").textContent = `serving model version ${s.serving.version} (${s.serving.model_uri})`;
    $("serving").dataset.version = s.serving.version || "";
    const replicas = Object.entries(s.replicas).map(([d, states]) =>
      `${d}: ${Object.entries(states).map(([k, n]) => `${n} ${k.toLowerCase()}`).join(", ")}`).join(" · ");
    fill("stats-summary", [
      row(["tokens/s (last minute)", fmt(s.tokens_per_s, 1)]), row(["tokens generated", s.tokens_total]),
      row(["cache hit rate", s.cache.hit_rate === null ? "no lookups yet"
        : `${(100 * s.cache.hit_rate).toFixed(1)}% (${s.cache.hits} hits, ${s.cache.misses} misses)`]),
      row(["replicas", replicas || "unknown"]), row(["this ingress replica up for", `${Math.round(s.uptime_s)} s`]),
    ]);
    fill("stats-requests", s.requests.map((r) => row([r.route, r.status, r.count])));
    fill("stats-latency", Object.entries(s.latency_ms).map(([route, l]) =>
      row([route, fmt(l.p50, 1), fmt(l.p90, 1), fmt(l.p99, 1), l.samples])));
  }

  function curve(tag, points) {
    const NS = "http://www.w3.org/2000/svg";
    const [w, h, pad] = [340, 180, 30];
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (x) => pad + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (w - 2 * pad);
    const sy = (y) => h - pad + (y1 > y0 ? -(y - y0) / (y1 - y0) : -0.5) * (h - 2 * pad);
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "curve");
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    svg.appendChild(line);
    const labels = [[tag, pad, 14], [fmt(y1, 3), 2, pad], [fmt(y0, 3), 2, h - pad],
                    [`step ${x0}`, pad, h - 8], [`step ${x1}`, w - pad - 40, h - 8]];
    for (const [text, x, y] of labels) {
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", x);
      t.setAttribute("y", y);
      t.textContent = text;
      svg.appendChild(t);
    }
    const figure = el("figure");
    figure.appendChild(svg);
    return figure;
  }

  async function loadTraining() {
    let t;
    try {
      t = await api("console/training");
    } catch (err) {
      $("training-note").textContent = err.message;
      return;
    }
    $("training-note").textContent = `version ${t.version}, run ${t.run}: ${t.note}`;
    $("training").replaceChildren(...Object.entries(t.curves).map(([tag, points]) => curve(tag, points)));
  }

  // ---------------------------------------------------------------------------------------- wiring

  document.addEventListener("DOMContentLoaded", () => {
    $("connect").addEventListener("click", connect);
    $("key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
    $("disconnect").addEventListener("click", disconnect);
    for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
    $("send").addEventListener("click", send);
    $("stop-stream").addEventListener("click", () => aborter && aborter.abort());
    $("thumbs-up").addEventListener("click", () => feedback(1));
    $("thumbs-down").addEventListener("click", () => feedback(-1));
    $("send-correction").addEventListener("click", () => feedback(currentRating()));
    $("rollback").addEventListener("click", askRollback);
    $("rollback-no").addEventListener("click", () => { $("rollback-confirm").hidden = true; });
    $("rollback-yes").addEventListener("click", rollback);
  });
})();
