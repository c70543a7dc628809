// Shared by every BlameTrail web page: the API client, sign-in, navigation and DOM helpers.
// Values from webhooks and users are only ever written as text (textContent, text nodes), never as
// HTML; links to outside (Sentry) must be http(s). The API token lives in sessionStorage (this tab
// only) and is sent in the Authorization header, never in a URL.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "blametrail-token";
const PAGES = [
  ["Mappings", "/integrations/sentry/mappings"],
  ["Deliveries", "/integrations/sentry/deliveries"],
  ["Incidents", "/incidents"],
];

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// Call the API: `path` under /api/v1 (or a `next` link the API answered, which starts with it).
async function call(method, path, body) {
  const url = path.startsWith(API + "/") ? path : API + path;
  const response = await fetch(url, {
    method,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) { sessionStorage.removeItem(TOKEN_KEY); showPage(); throw new ApiError(401, "signed out"); }
  if (response.status === 204) return null;
  const data = await response.json();
  if (!response.ok) throw new ApiError(response.status, data.error ? data.error.message : response.statusText);
  return data;
}

// An element: attributes set as properties (or aria-*/data-* attributes), children appended as text
// when they are strings. Never HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("aria-") || key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function say(text, kind) { const m = $("message"); m.textContent = text; m.className = kind || ""; }

function cell(row, ...content) { const td = el("td", {}, ...content); row.appendChild(td); return td; }

// A button whose accessible name is `name` (it must start with the visible `label`).
function button(label, onClick, name) {
  const b = el("button", { type: "button", "aria-label": name || label }, label);
  b.addEventListener("click", onClick);
  return b;
}

function link(href, text, name) { return el("a", { href, "aria-label": name }, text); }

// A link to outside BlameTrail (a Sentry issue): only http(s) URLs, else null.
function outsideLink(url, text) {
  try {
    const parsed = new URL(url);
    if (parsed.protocol !== "https:" && parsed.protocol !== "http:") return null;
    return el("a", { href: parsed.href, target: "_blank", rel: "noopener noreferrer" }, text);
  } catch { return null; }
}

function when(value) { return value ? new Date(value).toLocaleString() : "never"; }

function pageUrl(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) if (value) query.set(key, value);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

function incidentUrl(id) { return `/incidents/${encodeURIComponent(id)}`; }

function deliveriesUrl(project) { return pageUrl(PAGES[1][1], { project }); }

// The page's query string as an object; setQuery() keeps filters in the URL (never the token).
function query() { return Object.fromEntries(new URLSearchParams(window.location.search)); }

function setQuery(params) { history.replaceState(null, "", pageUrl(window.location.pathname, params)); }

// Fill a <select> with [value, label] pairs, keeping `selected`.
function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => el("option", { value: String(value) }, label)));
  if (selected !== undefined) select.value = String(selected);
}

async function serviceNames() {
  const services = await call("GET", "/services");
  return { services, name: new Map(services.map((s) => [s.id, s.name])) };
}

// "Not found" for a missing id or another org's (the API answers both 404), else the message.
function failure(error, what) {
  if (error.status === 404) return `${what} not found: it does not exist in your organization.`;
  return error.message;
}

// Header with navigation, the sign-in form, and the page itself (#app) once a token is stored.
let loadPage = null;

function chrome(current) {
  const nav = el("nav", { "aria-label": "Main" });
  for (const [label, href] of PAGES) {
    const a = link(href, label);
    if (label === current) a.setAttribute("aria-current", "page");
    nav.appendChild(a);
  }
  document.body.prepend(el("header", {}, el("span", { className: "brand" }, "BlameTrail"), nav));

  const input = el("input", { id: "token", type: "password", autocomplete: "off", required: true });
  const form = el("form", { id: "signin-form", method: "post" },  // never GET: the token stays out of URLs
    el("label", {}, "API token ", input), el("button", { type: "submit" }, "Continue"));
  form.addEventListener("submit", (event) => {
    event.preventDefault(); sessionStorage.setItem(TOKEN_KEY, input.value.trim()); input.value = ""; showPage();
  });
  const signin = el("section", { id: "signin", hidden: true }, el("h1", {}, "Sign in"),
    el("p", {}, "Paste your organization's API token (from ", el("code", {}, "blametrail org create"), ")."), form);
  document.querySelector("main").prepend(signin);
}

function showPage() {
  const signedIn = Boolean(token());
  $("signin").hidden = signedIn; $("app").hidden = !signedIn;
  if (signedIn && loadPage) loadPage().catch((error) => { if (error.status !== 401) say(error.message, "error"); });
}

function startPage(current, load) {
  loadPage = load;
  chrome(current);
  showPage();
}

// A keyset-paged table of the API's {items, next}: the returned function shows the first page of
// `path`; the page's "Older" button (#older) appends the next one. `makeRow(item)` returns a <tr>.
function pagedTable(tableId, makeRow) {
  const body = $(tableId).querySelector("tbody");
  let next = null;
  async function fetchPage(path) {
    const page = await call("GET", path);
    next = page.next;
    for (const item of page.items) body.appendChild(makeRow(item));
    $("empty").hidden = body.children.length > 0;
    $("older").hidden = !next;
  }
  $("older").addEventListener("click", () => fetchPage(next).catch((error) => say(error.message, "error")));
  return (path) => { body.replaceChildren(); say(""); return fetchPage(path); };
}
