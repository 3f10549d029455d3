// The live dashboard: one EventSource on /api/status/stream; rates come from the
// difference between two snapshots, so the server keeps no history for it.
"use strict";

const $ = (id) => document.getElementById(id);
let previous = null;
let lastToken = null;

function cell(text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "num";
  return td;
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows.map(({ cells, className }) => {
    const tr = document.createElement("tr");
    if (className) tr.className = className;
    tr.append(...cells);
    return tr;
  }));
}

function applied(status) {
  // Events each projection has applied, summed over projections: lag's complement.
  const behind = status.lags.reduce((sum, lag) => sum + lag.events, 0);
  const projections = new Set(status.lags.map((lag) => lag.projection)).size || 1;
  return status.last_position * projections - behind;
}

function rate(now, before, value) {
  if (!before) return null;
  const seconds = (Date.parse(now.taken_at) - Date.parse(before.taken_at)) / 1000;
  return seconds > 0 ? Math.max(0, (value(now) - value(before)) / seconds) : null;
}

function show(status) {
  const appendRate = rate(status, previous, (s) => s.last_position);
  const projectRate = rate(status, previous, applied);
  previous = status;
  const lagEvents = status.lags.reduce((max, lag) => Math.max(max, lag.events), 0);
  const lagSeconds = status.lags.reduce((max, lag) => Math.max(max, lag.seconds), 0);
  const parked = Object.values(status.dead_letters).reduce((a, b) => a + b, 0);
  const owners = new Set(Object.values(status.leases));

  $("last-position").textContent = status.last_position;
  $("append-rate").textContent = appendRate === null ? "–" : appendRate.toFixed(0);
  $("project-rate").textContent = projectRate === null ? "–" : projectRate.toFixed(0);
  $("partitions").textContent = status.partitions;
  $("owners").textContent = owners.size ? owners.size : "in process";
  $("lag-events").textContent = lagEvents;
  $("lag-seconds").textContent = lagSeconds.toFixed(1);
  $("node-query-db").classList.toggle("behind", lagEvents > 0);
  $("node-processors").classList.toggle("parked", parked > 0);
  $("taken-at").textContent = new Date(status.taken_at).toLocaleTimeString();

  fillTable("lag-table", status.lags.map((lag) => ({
    className: lag.events > 0 ? "behind" : "",
    cells: [
      cell(lag.projection), cell(lag.partition, true), cell(lag.checkpoint, true),
      cell((lag.exact ? "" : "≈") + lag.events, true), cell(lag.seconds.toFixed(1), true),
      cell(status.leases[String(lag.partition)] || "–"),
    ],
  })));
  fillTable("dead-letters", Object.entries(status.dead_letters).map(([name, count]) => ({
    className: count > 0 ? "behind" : "",
    cells: [cell(name), cell(count, true)],
  })));
  fillTable("recent", status.recent.map((e) => ({
    cells: [cell(e.position, true), cell(e.type), cell(e.stream_id), cell(e.version, true),
            cell(new Date(e.recorded_at).toLocaleTimeString())],
  })));
}

function connect() {
  const badge = $("connection");
  const source = new EventSource("/api/status/stream");
  source.onopen = () => { badge.textContent = "live"; badge.className = "badge live"; };
  source.onmessage = (message) => show(JSON.parse(message.data));
  source.onerror = () => { badge.textContent = "reconnecting…"; badge.className = "badge down"; };
}

async function answer(response, target) {
  const text = await response.text();
  let body = text;
  try { body = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON */ }
  target.textContent = `${response.status} ${response.statusText}\n${body}`;
  target.classList.toggle("error", !response.ok);
  return response.ok ? JSON.parse(text) : null;
}

async function insertRecord(event) {
  event.preventDefault();
  const target = $("insert-result");
  let data;
  try {
    data = JSON.parse($("insert-data").value);
  } catch (error) {
    target.textContent = `not JSON: ${error.message}`;
    target.classList.add("error");
    return;
  }
  const response = await fetch("/api/command/insert", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ data }),
  });
  const accepted = await answer(response, target);
  if (accepted) {
    lastToken = accepted.consistency_token;
    $("query-id").value = accepted.id;
  }
}

async function queryRecord(event) {
  event.preventDefault();
  const id = $("query-id").value.trim();
  const headers = lastToken ? { "X-Consistency-Token": lastToken } : {};
  const response = await fetch(`/api/query/get?id=${encodeURIComponent(id)}`, { headers });
  const target = $("query-result");
  await answer(response, target);
  const consistency = response.headers.get("X-Consistency");
  if (consistency) target.textContent = `(${consistency} read)\n` + target.textContent;
}

async function offerRecords() {
  // The form needs the built-in records domain; a service without it hides the form.
  const schema = await (await fetch("/openapi.json")).json();
  if (!schema.paths["/api/command/insert"]) return;
  $("records").hidden = false;
  $("insert-form").addEventListener("submit", insertRecord);
  $("query-form").addEventListener("submit", queryRecord);
}

connect();
offerRecords();
