// The Incidents page: incidents per service and status, newest first (GET /incidents).
"use strict";

const STATUSES = [["open", "open"], ["archived", "archived"], ["resolved", "resolved"], ["all", "any status"]];
let services = new Map();

function makeRow(i) {
  const row = el("tr", { "data-incident": String(i.id) });
  cell(row, link(incidentUrl(i.id), i.title));
  cell(row, services.get(i.service_id) || `service ${i.service_id}`);
  cell(row, i.level || "—");
  cell(row, el("span", { className: "status " + i.status }, i.status));
  cell(row, String(i.event_count));
  cell(row, when(i.first_seen_at));
  cell(row, when(i.last_seen_at));
  cell(row, (i.web_url && outsideLink(i.web_url, "Sentry issue")) || "");
  return row;
}

const showFirst = pagedTable("incidents", makeRow);

async function load() {
  const known = await serviceNames();
  services = known.name;
  const q = query();
  const status = q.status || "open";
  fillSelect($("service"), [["", "all services"], ...known.services.map((s) => [s.id, s.name])], q.service_id || "");
  fillSelect($("status"), STATUSES, status);
  const params = { service_id: q.service_id, status: status === "all" ? "" : status, limit: q.limit };
  await showFirst(pageUrl("/incidents", params));
}

$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  setQuery({ service_id: $("service").value, status: $("status").value, limit: query().limit });
  load().catch((error) => say(error.message, "error"));
});
startPage("Incidents", load);
