// The phone page: send the photo to POST predict, show the top names with bars.
"use strict";

const TOP_K = 5;
const UNREACHABLE = "The server cannot be reached; check that it is running and this phone is on its network.";
const $ = (id) => document.getElementById(id);

// A token given as http://host:port/#token=... is kept on this phone and removed from the address.
const fromAddress = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromAddress) {
  localStorage.setItem("token", fromAddress);
  history.replaceState(null, "", location.pathname + location.search);
}

function authHeaders() {
  const token = localStorage.getItem("token");
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text;
}

const percent = (p) => (100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1) + "%";

function render(prediction) {
  const list = $("results");
  list.replaceChildren();
  prediction.names.forEach((name, i) => {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(prediction.probabilities[i]);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = (100 * prediction.probabilities[i]).toFixed(1) + "%";
    item.append(label, value, bar);
    list.append(item);
  });
  const top = prediction.names[0] + " " + percent(prediction.probabilities[0]);
  const unknown = prediction.known === false;  // absent or null: the checkpoint has no verdict
  $("headline").textContent = unknown ? "Not one of the known classes (closest: " + top + ")" : top;
  $("result").classList.toggle("unknown", unknown);
}

async function classify(file) {
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  $("result").hidden = false;
  $("headline").textContent = "";
  $("results").replaceChildren();
  setStatus("busy", "Looking…");
  const form = new FormData();
  form.append("file", file, file.name || "photo.jpg");
  let response, body;
  try {
    response = await fetch("predict?top_k=" + TOP_K, { method: "POST", body: form, headers: authHeaders() });
    body = await response.json().catch(() => ({ error: "The server answered " + response.status + "." }));
  } catch (error) {
    $("result").hidden = true;
    setStatus("error", UNREACHABLE);
    return;
  }
  if (response.status === 401) $("token-form").hidden = false;
  if (!response.ok) {
    $("result").hidden = true;
    setStatus("error", body.error || "The server answered " + response.status + ".");
    return;
  }
  setStatus("done", "");
  render(body);
}

for (const id of ["camera", "picker"]) {
  $(id).addEventListener("change", (event) => {
    classify(event.target.files[0]);
    event.target.value = "";  // the same photo chosen again is sent again
  });
}

// A server started with --token says so in /health: ask for the token as the page opens, not
// only after a photo was refused.
async function askForTokenIfNeeded() {
  try {
    const health = await (await fetch("health")).json();
    if (health.token_required && !localStorage.getItem("token")) {
      $("token-form").hidden = false;
      setStatus("ready", "Enter the server's token, then take or choose a photo.");
    }
  } catch (error) {
    setStatus("error", UNREACHABLE);
  }
}
askForTokenIfNeeded();

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("token", $("token").value);
  $("token-form").hidden = true;
  setStatus("ready", "Token saved; take or choose a photo.");
});
