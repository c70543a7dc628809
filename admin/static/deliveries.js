// The Deliveries page: the audit trail of Sentry webhooks, newest first (GET /integrations/sentry/audit).
"use strict";

const OUTCOMES = [["", "any outcome"], ["routed", "routed"], ["ignored", "ignored"], ["failed", "failed"]];
const REASONS = [
  ["", "any reason"], ["unmapped", "project not mapped"], ["mapping_inactive", "mapping disabled"],
  ["no_project", "no project in this webhook"], ["unsupported_resource", "resource not supported"],
  ["unknown_org", "organization not known"], ["rejected", "rejected by the database"],
  ["tenant_mismatch", "service of another organization"], ["invalid_event", "event could not be read"],
];
const RANGES = [["", "any time"], ["1h", "in the last hour"], ["24h", "in the last 24 hours"],
  ["7d", "in the last 7 days"], ["30d", "in the last 30 days"]];
const HOURS = { "1h": 1, "24h": 24, "7d": 24 * 7, "30d": 24 * 30 };
const FILTERS = ["project", "outcome", "reason", "range"];

let services = new Map();

// The reason of a record in words, with what to do about it (links to the mappings page).
function explain(r) {
  const words = REASONS.find(([value]) => value === r.reason);
  const text = words ? words[1] : (r.reason || "");
  const slug = r.project_slug;
  if (r.outcome === "routed") {
    const name = services.get(r.service_id);
    return [name ? `routed to ${name}` : "routed"];
  }
  if (r.reason === "unmapped" && slug) return [`${text} — `, link(pageUrl(PAGES[0][1], { map: slug }), "Map it…", `Map ${slug}…`)];
  if (r.reason === "mapping_inactive" && slug) {
    return [`${text} — `, link(pageUrl(PAGES[0][1], { enable: slug }), "Enable…", `Enable the mapping of ${slug}…`)];
  }
  if (r.outcome === "failed") return [`${text} — see the error`];
  return [text];
}

function details(r) {
  const parts = [];
  if (r.renamed_from) parts.push(el("span", { className: "detail" }, `project renamed from ${r.renamed_from}`));
  if (r.replay_id) {
    const before = r.previous_outcome ? ` (was ${r.previous_outcome}${r.previous_reason ? `: ${r.previous_reason}` : ""})` : "";
    parts.push(el("span", { className: "replay" }, `replay ${r.replay_id}${before}`));
  }
  if (r.flags && r.flags.length) parts.push(el("span", { className: "detail" }, `flags: ${r.flags.join(", ")}`));
  if (r.error) {
    const where = r.dlq_partition !== null ? ` (dead letter: partition ${r.dlq_partition}, offset ${r.dlq_offset})` : "";
    parts.push(el("code", { className: "error" }, r.error + where));
  }
  return parts;
}

function makeRow(r) {
  const row = el("tr", { "data-delivery": r.delivery_id, "data-outcome": r.outcome });
  cell(row, el("time", { dateTime: r.received_at }, when(r.received_at)));
  cell(row, `${r.resource}.${r.action}`);
  cell(row, r.project_slug || "—");
  cell(row, el("span", { className: "outcome " + r.outcome }, r.outcome));
  cell(row, ...explain(r), ...details(r));
  cell(row, r.incident_id ? link(incidentUrl(r.incident_id), `Incident ${r.incident_id}`) : "");
  return row;
}

const showFirst = pagedTable("deliveries", makeRow);

async function load() {
  services = (await serviceNames()).name;
  const q = query();
  for (const name of FILTERS) $(name).value = q[name] || "";
  const params = { project: q.project, outcome: q.outcome, reason: q.reason, limit: q.limit };
  if (HOURS[q.range]) params.since = new Date(Date.now() - HOURS[q.range] * 3600e3).toISOString();
  await showFirst(pageUrl("/integrations/sentry/audit", params));
}

function applyFilters(event) {
  event.preventDefault();
  const params = Object.fromEntries(FILTERS.map((name) => [name, $(name).value.trim()]));
  params.limit = query().limit;
  setQuery(params);
  load().catch((error) => say(error.message, "error"));
}

fillSelect($("outcome"), OUTCOMES);
fillSelect($("reason"), REASONS);
fillSelect($("range"), RANGES);
$("filters").addEventListener("submit", applyFilters);
$("clear").addEventListener("click", (event) => { for (const name of FILTERS) $(name).value = ""; applyFilters(event); });
startPage("Deliveries", load);
