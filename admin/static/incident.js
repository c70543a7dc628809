// One incident and its timeline (GET /incidents/{id} and /incidents/{id}/events).
"use strict";

const CHANGES = {
  opened: "First occurrence — incident opened", updated: "Occurrence", resolved: "Resolved",
  reopened: "Reopened", archived: "Archived",
};
const ATTACHED = { comment: "Comment", seer: "Seer note", issue: "Issue" };

// What one timeline entry did, in words.
function happened(e) {
  if (CHANGES[e.change]) return CHANGES[e.change];
  const what = ATTACHED[e.resource] || e.resource;
  return `${what} ${e.action}`;
}

function term(list, name, ...value) { list.append(el("dt", {}, name), el("dd", {}, ...value)); }

async function load() {
  const id = decodeURIComponent(window.location.pathname.split("/").pop());
  let incident, timeline;
  try {
    if (!/^[0-9]{1,19}$/.test(id)) throw new ApiError(404, "not found");
    [incident, timeline] = await Promise.all([call("GET", `/incidents/${id}`), call("GET", `/incidents/${id}/events`)]);
  } catch (error) {
    $("title").textContent = error.status === 404 ? "Incident not found" : "Incident";
    $("crumb").textContent = id;
    say(failure(error, `Incident ${id}`), "error");
    return;
  }
  const { name } = await serviceNames();
  $("title").textContent = incident.title;
  $("crumb").textContent = `Incident ${incident.id}`;
  document.title = `${incident.title} · BlameTrail`;
  const summary = $("summary"); summary.replaceChildren();
  term(summary, "Status", el("span", { className: "status " + incident.status }, incident.status));
  term(summary, "Service", name.get(incident.service_id) || `service ${incident.service_id}`);
  term(summary, "Level", incident.level || "—");
  term(summary, "Events", String(incident.event_count));
  term(summary, "First seen", when(incident.first_seen_at));
  term(summary, "Last seen", when(incident.last_seen_at));
  const sentry = incident.web_url && outsideLink(incident.web_url, `Sentry issue ${incident.sentry_issue_id || ""}`.trim());
  if (sentry) term(summary, "Sentry", sentry);
  summary.hidden = false;

  const body = $("timeline").querySelector("tbody"); body.replaceChildren();
  for (const e of timeline) {
    const row = el("tr", { "data-change": e.change, "data-resource": e.resource });
    cell(row, el("time", { dateTime: e.received_at }, when(e.received_at)));
    cell(row, happened(e), e.replay_id ? el("span", { className: "replay" }, `replay ${e.replay_id}`) : null);
    cell(row, e.project_slug || "—");
    cell(row, [e.title, e.level].filter(Boolean).join(" · "));
    cell(row, el("code", { title: e.delivery_id }, e.delivery_id.slice(0, 12)));
    body.appendChild(row);
  }
  $("timeline-section").hidden = false;
}

startPage("Incidents", load);
