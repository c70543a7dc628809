// The Project Mappings page: a thin client of the admin REST API (/api/v1).
"use strict";

const api = "/api/v1";
let services = [];
let editing = null; // mapping being edited, or null when adding

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("blametrail-token"); }

async function call(method, path, body) {
  const response = await fetch(api + path, {
    method,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) { sessionStorage.removeItem("blametrail-token"); show(); throw new Error("signed out"); }
  if (response.status === 204) return null;
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

function say(text, kind) { const m = $("message"); m.textContent = text; m.className = kind || ""; }

function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); return td; }

function button(label, onClick, name) {
  const b = document.createElement("button"); b.type = "button"; b.textContent = label; b.name = name || label;
  b.addEventListener("click", onClick); return b;
}

function when(value) { return value ? new Date(value).toLocaleString() : "never"; }

async function load() {
  const [integration, mappings, unmapped] = await Promise.all([
    call("GET", "/integrations/sentry"),
    call("GET", "/integrations/sentry/mappings"),
    call("GET", "/integrations/sentry/unmapped-projects"),
  ]);
  services = await call("GET", "/services");
  $("webhook-url").textContent = integration.webhook_url;
  const select = $("service"); select.replaceChildren();
  for (const s of services) { const o = document.createElement("option"); o.value = s.id; o.textContent = s.name; select.appendChild(o); }

  const body = $("mappings").querySelector("tbody"); body.replaceChildren();
  for (const m of mappings) {
    const row = document.createElement("tr"); row.dataset.slug = m.sentry_project_slug;
    cell(row, m.sentry_project_slug);
    cell(row, m.service_name);
    const status = cell(row, ""); const badge = document.createElement("span");
    badge.className = "status " + (m.active ? "active" : "inactive"); badge.textContent = m.active ? "Active" : "Inactive";
    status.appendChild(badge);
    cell(row, when(m.last_event_at));
    const actions = cell(row, "");
    actions.append(
      button(m.active ? "Disable" : "Enable", () => change(m, { active: !m.active }, m.active ? "disabled" : "enabled")),
      button("Edit", () => openForm(m)),
      button("Delete", () => remove(m)),
    );
    body.appendChild(row);
  }
  $("empty").hidden = mappings.length > 0;

  const inbox = $("unmapped").querySelector("tbody"); inbox.replaceChildren();
  const suggestions = $("unmapped-slugs"); suggestions.replaceChildren();
  for (const p of unmapped) {
    const row = document.createElement("tr"); row.dataset.slug = p.slug;
    cell(row, p.slug); cell(row, String(p.events)); cell(row, when(p.last_seen_at));
    cell(row, "").appendChild(button("Map", () => openForm(null, p.slug), "Map"));
    inbox.appendChild(row);
    const o = document.createElement("option"); o.value = p.slug; suggestions.appendChild(o);
  }
}

function openForm(mapping, slug) {
  editing = mapping;
  $("form-title").textContent = mapping ? "Edit Mapping" : "Add Mapping";
  $("slug").value = mapping ? mapping.sentry_project_slug : (slug || "");
  $("slug").disabled = Boolean(mapping);
  if (mapping) $("service").value = String(mapping.service_id);
  $("new-service").value = "";
  $("mapping-form").hidden = false;
  (mapping ? $("service") : $("slug")).focus();
}

async function save(event) {
  event.preventDefault();
  try {
    let serviceId = Number($("service").value);
    const newName = $("new-service").value.trim();
    if (newName) serviceId = (await call("POST", "/services", { name: newName })).id;
    if (editing) {
      await call("PATCH", "/integrations/sentry/mappings/" + editing.id, { service_id: serviceId });
      say(`${editing.sentry_project_slug} now routes to its new service; existing incidents stay where they are.`, "ok");
    } else {
      const slug = $("slug").value.trim();
      await call("POST", "/integrations/sentry/mappings", { sentry_project_slug: slug, service_id: serviceId });
      say(`${slug} mapped.`, "ok");
    }
    $("mapping-form").hidden = true;
    await load();
  } catch (error) { say(error.message, "error"); }
}

async function change(mapping, patch, verb) {
  try {
    await call("PATCH", "/integrations/sentry/mappings/" + mapping.id, patch);
    say(`${mapping.sentry_project_slug} ${verb}.`, "ok");
    await load();
  } catch (error) { say(error.message, "error"); }
}

async function remove(mapping) {
  if (!window.confirm(`Delete the mapping of ${mapping.sentry_project_slug}? Its webhooks will be ignored.`)) return;
  try {
    await call("DELETE", "/integrations/sentry/mappings/" + mapping.id);
    say(`${mapping.sentry_project_slug} deleted.`, "ok");
    await load();
  } catch (error) { say(error.message, "error"); }
}

function show() {
  const signedIn = Boolean(token());
  $("signin").hidden = signedIn; $("app").hidden = !signedIn;
  if (signedIn) load().catch((error) => say(error.message, "error"));
}

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault(); sessionStorage.setItem("blametrail-token", $("token").value.trim()); show();
});
$("add-button").addEventListener("click", () => openForm(null));
$("cancel").addEventListener("click", () => { $("mapping-form").hidden = true; });
$("mapping-form").addEventListener("submit", save);
show();
