// The Project Mappings page: a thin client of the admin REST API (/api/v1); helpers in common.js.
"use strict";

let editing = null; // mapping being edited, or null when adding

// Rebuild the page from the API; then put the keyboard focus on `focus` ([slug, action] of a row's
// button, or an element id) so that a keyboard user keeps their place after the table is redrawn.
async function load(focus) {
  const [integration, mappings, unmapped, { services }] = await Promise.all([
    call("GET", "/integrations/sentry"),
    call("GET", "/integrations/sentry/mappings"),
    call("GET", "/integrations/sentry/unmapped-projects"),
    serviceNames(),
  ]);
  $("webhook-url").textContent = integration.webhook_url;
  fillSelect($("service"), services.map((s) => [s.id, s.name]));

  const body = $("mappings").querySelector("tbody"); body.replaceChildren();
  for (const m of mappings) {
    const slug = m.sentry_project_slug;
    const row = el("tr", { "data-slug": slug });
    const project = cell(row, el("span", { className: "slug" }, slug));
    if (m.sentry_project_id) project.append(el("span", { className: "detail" }, `Sentry project id ${m.sentry_project_id}`));
    if (m.renamed_to) {
      project.append(el("span", { className: "renamed" }, `renamed in Sentry to ${m.renamed_to} `,
        action(button("Update", () => change(m, { sentry_project_slug: m.renamed_to }, `now follows ${m.renamed_to}`,
          [m.renamed_to, "edit"]), `Update ${slug} to ${m.renamed_to}`), "update")));
    }
    cell(row, m.service_name);
    cell(row, el("span", { className: "status " + (m.active ? "active" : "inactive") }, m.active ? "Active" : "Inactive"));
    cell(row, String(m.events_24h)).className = "events";
    cell(row, link(deliveriesUrl(slug), when(m.last_event_at), `Last event of ${slug}: ${when(m.last_event_at)}, see its deliveries`));
    const verb = m.active ? "Disable" : "Enable";
    cell(row, el("div", { className: "actions" },
      action(button(verb, () => change(m, { active: !m.active }, m.active ? "disabled" : "enabled", [slug, "toggle"]),
        `${verb} ${slug}`), "toggle"),
      action(button("Edit", () => openForm(m), `Edit ${slug}`), "edit"),
      action(button("Delete", () => remove(m), `Delete ${slug}`), "delete"),
    ));
    body.appendChild(row);
  }
  $("empty").hidden = mappings.length > 0;

  const inbox = $("unmapped").querySelector("tbody"); inbox.replaceChildren();
  const suggestions = $("unmapped-slugs"); suggestions.replaceChildren();
  for (const p of unmapped) {
    const row = el("tr", { "data-slug": p.slug });
    cell(row, p.slug); cell(row, String(p.events)); cell(row, when(p.last_seen_at));
    cell(row, action(button("Map", () => openForm(null, p.slug), `Map ${p.slug}`), "map"));
    inbox.appendChild(row);
    suggestions.appendChild(el("option", { value: p.slug }));
  }
  restoreFocus(focus);
}

function action(node, name) { node.dataset.action = name; return node; }

function restoreFocus(focus) {
  if (!focus) return;
  const target = typeof focus === "string" ? $(focus)
    : document.querySelector(`#mappings tr[data-slug="${CSS.escape(focus[0])}"] [data-action="${focus[1]}"]`);
  (target || $("add-button")).focus();
}

function openForm(mapping, slug) {
  editing = mapping;
  $("form-title").textContent = mapping ? `Edit Mapping of ${mapping.sentry_project_slug}` : "Add Mapping";
  $("slug").value = mapping ? mapping.sentry_project_slug : (slug || "");
  $("slug").disabled = Boolean(mapping);
  if (mapping) $("service").value = String(mapping.service_id);
  $("new-service").value = "";
  $("mapping-form").hidden = false;
  (mapping || slug ? $("service") : $("slug")).focus();
}

function closeForm() {
  $("mapping-form").hidden = true;
  (editing ? restoreFocus([editing.sentry_project_slug, "edit"]) : $("add-button").focus());
}

async function save(event) {
  event.preventDefault();
  try {
    let serviceId = Number($("service").value);
    const newName = $("new-service").value.trim();
    if (newName) serviceId = (await call("POST", "/services", { name: newName })).id;
    let slug;
    if (editing) {
      slug = editing.sentry_project_slug;
      await call("PATCH", "/integrations/sentry/mappings/" + editing.id, { service_id: serviceId });
      say(`${slug} now routes to its new service; existing incidents stay where they are.`, "ok");
    } else {
      slug = $("slug").value.trim();
      await call("POST", "/integrations/sentry/mappings", { sentry_project_slug: slug, service_id: serviceId });
      say(`${slug} mapped.`, "ok");
    }
    $("mapping-form").hidden = true;
    await load([slug, "edit"]);
  } catch (error) { say(error.message, "error"); }
}

async function change(mapping, patch, verb, focus) {
  try {
    await call("PATCH", "/integrations/sentry/mappings/" + mapping.id, patch);
    say(`${mapping.sentry_project_slug} ${verb}.`, "ok");
    await load(focus);
  } catch (error) { say(error.message, "error"); }
}

async function remove(mapping) {
  const slug = mapping.sentry_project_slug;
  const question = `Delete the mapping of the Sentry project "${slug}" to ${mapping.service_name}?\n\n` +
    `Its webhooks will be ignored from now on. Existing incidents stay on ${mapping.service_name}.`;
  if (!window.confirm(question)) return;
  try {
    await call("DELETE", "/integrations/sentry/mappings/" + mapping.id);
    say(`${slug} deleted; its existing incidents stay.`, "ok");
    await load("add-button");
  } catch (error) { say(error.message, "error"); }
}

// Links from the Deliveries page: ?map=<slug> opens the form for it, ?enable=<slug> goes to its toggle.
async function loadFromLink() {
  const { map, enable } = query();
  await load(enable ? [enable, "toggle"] : undefined);
  if (map) openForm(null, map);
  if (map || enable) setQuery({});
}

$("add-button").addEventListener("click", () => openForm(null));
$("cancel").addEventListener("click", closeForm);
$("mapping-form").addEventListener("submit", save);
$("mapping-form").addEventListener("keydown", (event) => { if (event.key === "Escape") closeForm(); });
startPage("Mappings", loadFromLink);
