// corolla monitor: polls /api/swarm and draws each model's coverage, spans and peers. Every string that
// comes from the swarm is set as text (textContent), never parsed as HTML.
"use strict";

const MIN_POLL_MS = 250;
const MAX_POLL_MS = 5000;
let pollMs = 1000;
let rendered = null; // `updated_at` of the snapshot drawn: the same one is not drawn again

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function ranges(list) {
  // [[start, end), ...] shown inclusively, as `corolla health` does: "0..3, 7"
  return list.map(([start, end]) => (end - start === 1 ? `${start}` : `${start}..${end - 1}`)).join(", ");
}

function fixed(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function peerState(peer) {
  // the monitor calls only peers whose certificate binds to their id, and says whether they answered, not why
  if (peer.verified === false && peer.state !== "offline") return [`${peer.state}, unverified`, true];
  if (peer.reachable === false && peer.state !== "offline") return [`${peer.state}, unreachable`, true];
  return [peer.state, false];
}

function coverageBar(model) {
  const best = Math.max(...model.throughput, 1e-9);
  const weakest = new Set();
  for (const [start, end] of model.bottleneck.blocks) for (let b = start; b < end; b++) weakest.add(b);
  const bar = el("div", { class: "coverage", "data-missing": model.missing.length, role: "img" });
  bar.setAttribute("aria-label", model.served ? "every block served" : `blocks ${ranges(model.missing)} not served`);
  model.coverage.forEach((count, block) => {
    const height = count ? Math.max(8, (100 * model.throughput[block]) / best) : 100;
    const cell = el(
      "div",
      { class: weakest.has(block) && count ? "block bottleneck" : "block", "data-block": block, "data-peers": count },
      el("div", { class: "fill", style: { height: `${height}%` } }),
    );
    cell.title = `block ${block}: ${count} online peer${count === 1 ? "" : "s"}, ${fixed(model.throughput[block], 1)} steps/s`;
    bar.append(cell);
  });
  return bar;
}

function lanes(model) {
  const box = el("div", { class: "lanes" });
  for (const peer of model.peers) {
    const [state, unreachable] = peerState(peer);
    const left = (100 * peer.start) / model.num_blocks;
    const width = (100 * (peer.end - peer.start)) / model.num_blocks;
    const span = el(
      "div",
      {
        class: unreachable ? "span unreachable" : "span",
        "data-state": peer.state,
        style: { left: `${left}%`, width: `${width}%` },
      },
      `${peer.public_name || peer.short_id} [${peer.start},${peer.end})`,
    );
    span.title = `${peer.peer_id}: ${state}, ${fixed(peer.throughput, 1)} steps/s`;
    box.append(el("div", { class: "lane" }, span));
  }
  return box;
}

function peerTable(model) {
  const columns = [
    ["peer"], ["state"], ["address"], ["span"], ["version"], ["weights"], ["steps/s", "num"],
    ["sessions", "num"], ["queued", "num"], ["free cache", "num"], ["latency ms", "num"], ["name"],
  ];
  const head = el("tr", {}, ...columns.map(([name, cls]) => el("th", cls ? { class: cls } : {}, name)));
  const rows = model.peers.map((peer) => {
    const [state, unreachable] = peerState(peer);
    const live = peer.live || {};
    const weights = peer.quantization === "none" ? peer.dtype : `${peer.dtype}+${peer.quantization}`;
    const cells = [
      el("td", {}, el("code", { title: peer.peer_id }, peer.short_id)),
      el("td", { class: unreachable ? "state unreachable" : "state", "data-state": peer.state }, state),
      el("td", {}, peer.address),
      el("td", {}, `[${peer.start}, ${peer.end})`),
      el("td", {}, peer.version),
      el("td", {}, weights),
      el("td", { class: "num" }, fixed(peer.throughput, 1)),
      el("td", { class: "num" }, live.num_sessions ?? peer.num_sessions),
      el("td", { class: "num" }, live.queued ?? peer.queued),
      el("td", { class: "num" }, live.free_cache_tokens ?? peer.free_cache_tokens),
      el("td", { class: "num" }, fixed(peer.latency_ms, 1)),
      el("td", {}, peer.public_name || "–"),
    ];
    return el(
      "tr",
      { class: "peer", "data-peer-id": peer.peer_id, "data-state": peer.state, "data-serving": peer.serving },
      ...cells,
    );
  });
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
}

function modelSection(model) {
  const summary = model.served
    ? `all ${model.num_blocks} blocks served`
    : `blocks ${ranges(model.missing)} not served`;
  const head = el(
    "div",
    { class: "model-head" },
    el("h2", {}, model.model_id),
    el("span", { class: "summary", "data-served": model.served }, summary),
    el(
      "span",
      { class: "facts" },
      `${model.num_blocks} blocks · ${model.num_online} of ${model.peers.length} peers online · ` +
        `bottleneck ${fixed(model.bottleneck.throughput, 1)} steps/s at blocks ${ranges(model.bottleneck.blocks)}`,
    ),
  );
  const axis = el("div", { class: "axis" }, el("span", {}, "block 0"), el("span", {}, `${model.num_blocks - 1}`));
  return el(
    "section",
    { class: "model", "data-model-id": model.model_id, "data-served": model.served },
    head,
    coverageBar(model),
    axis,
    lanes(model),
    peerTable(model),
  );
}

function render(snapshot) {
  const period = Number(snapshot.refresh_period) || 4;
  pollMs = Math.min(MAX_POLL_MS, Math.max(MIN_POLL_MS, (period * 1000) / 4));
  const status = document.getElementById("status");
  if (snapshot.updated_at) {
    const age = Math.max(0, Date.now() / 1000 - snapshot.updated_at);
    status.textContent = `updated ${age.toFixed(0)} s ago · refreshed every ${period} s · corolla ${snapshot.version}`;
    status.classList.toggle("stale", age > 3 * period);
  }
  const error = document.getElementById("error");
  error.hidden = !snapshot.error;
  error.textContent = snapshot.error || "";
  if (snapshot.updated_at === rendered) return;
  rendered = snapshot.updated_at;
  document.getElementById("models").replaceChildren(...snapshot.models.map(modelSection));
  document.body.dataset.updatedAt = snapshot.updated_at || "";
}

async function poll() {
  try {
    const reply = await fetch("/api/swarm", { cache: "no-store" });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    render(await reply.json());
  } catch (e) {
    const status = document.getElementById("status");
    status.textContent = `cannot reach the monitor: ${e.message}`;
    status.classList.add("stale");
  }
  setTimeout(poll, pollMs);
}

poll();
