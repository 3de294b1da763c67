/**
 * The review page that ReviewServer serves: plain HTML, a script and a style sheet, with no
 * framework and no external resources, so it runs under the server's Content-Security-Policy
 * (scripts and styles from the same origin only, no inline code).
 *
 * The page shows the pending examples one at a time, highest priority first. Keys 1-9 label with
 * the class of that number, x discards, s skips and n focuses the new-class field. The script writes
 * every catalogue value with textContent, never as HTML.
 */

export const REVIEW_PAGE_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sortline review</title>
<link rel="stylesheet" href="/review.css">
<script src="/review.js" defer></script>
</head>
<body>
<header>
  <h1>sortline review</h1>
  <p class="counts"><span id="count-pending">-</span> pending <span class="dot">&middot;</span> <span id="count-labelled">-</span> labelled</p>
  <label class="reviewer">Reviewer <input id="reviewer" maxlength="64" autocomplete="name" placeholder="your name"></label>
</header>
<p id="error" role="alert" hidden></p>
<main>
  <section id="empty" hidden>
    <p>No examples are waiting for a label.</p>
    <button type="button" id="reload">Check again</button>
  </section>
  <section id="example" hidden>
    <figure><img id="image" alt="Camera frame to label"></figure>
    <div class="info">
      <h2>Model guesses</h2>
      <ol id="guesses"></ol>
      <h2>Picked because</h2>
      <ul id="reasons"></ul>
      <dl id="details"></dl>
    </div>
  </section>
  <section id="actions" hidden>
    <div id="classes" class="class-buttons"></div>
    <form id="new-class-form" autocomplete="off">
      <input id="new-class" maxlength="32" placeholder="new class, e.g. styrofoam" aria-label="New class name">
      <button type="submit" id="new-class-submit">Add class and label</button>
    </form>
    <div class="row">
      <button type="button" id="discard" class="discard">Discard <kbd>x</kbd></button>
      <button type="button" id="skip" class="skip">Skip <kbd>s</kbd></button>
    </div>
  </section>
</main>
</body>
</html>
`;

export const REVIEW_PAGE_STYLE = `
* { box-sizing: border-box; }
html { font-family: system-ui, sans-serif; font-size: 18px; }
body { margin: 0; background: #f3f4f6; color: #111827; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem 1.5rem; padding: 0.75rem 1rem; background: #1f2937; color: #fff; }
h1 { font-size: 1.25rem; margin: 0; }
.counts { margin: 0; font-size: 1.2rem; font-weight: 600; }
.reviewer { margin-left: auto; }
.reviewer input { font-size: 1rem; padding: 0.4rem; width: 10rem; }
#error { margin: 0; padding: 0.75rem 1rem; background: #fee2e2; color: #991b1b; font-weight: 600; border-bottom: 2px solid #991b1b; }
main { padding: 1rem; max-width: 1400px; margin: 0 auto; }
#example { display: grid; grid-template-columns: minmax(0, 3fr) minmax(16rem, 2fr); gap: 1rem; }
figure { margin: 0; background: #000; display: flex; align-items: center; justify-content: center; min-height: 40vh; }
#image { max-width: 100%; max-height: 65vh; object-fit: contain; }
.info h2 { font-size: 1rem; margin: 0.5rem 0; text-transform: uppercase; color: #4b5563; }
#guesses { list-style: none; padding: 0; margin: 0; }
#guesses li { display: grid; grid-template-columns: 8rem 1fr 4.5rem; align-items: center; gap: 0.5rem; margin-bottom: 0.4rem; }
.bar { height: 1rem; background: #e5e7eb; border-radius: 0.5rem; overflow: hidden; }
.bar > div { height: 100%; background: #2563eb; }
.percent { text-align: right; font-variant-numeric: tabular-nums; }
#reasons { margin: 0; padding-left: 1.25rem; }
#details { display: grid; grid-template-columns: auto 1fr; gap: 0.25rem 0.75rem; margin-top: 1rem; }
#details dt { color: #4b5563; }
#details dd { margin: 0; overflow-wrap: anywhere; }
#actions { margin-top: 1rem; }
button { font: inherit; font-size: 1.2rem; min-height: 4rem; padding: 0.5rem 1rem; border-radius: 0.5rem; border: 2px solid #1f2937; background: #fff; cursor: pointer; touch-action: manipulation; }
button:disabled { opacity: 0.5; cursor: wait; }
button:focus-visible, input:focus-visible { outline: 3px solid #f59e0b; outline-offset: 2px; }
.class-buttons { display: grid; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr)); gap: 0.75rem; }
.class-buttons button { background: #dbeafe; font-weight: 600; }
.class-buttons button.predicted { border-color: #2563eb; border-width: 4px; }
kbd { display: inline-block; min-width: 1.5rem; margin-left: 0.4rem; padding: 0 0.3rem; border: 1px solid #6b7280; border-radius: 0.25rem; font-size: 0.9rem; background: #f9fafb; }
#new-class-form { display: flex; flex-wrap: wrap; gap: 0.75rem; margin-top: 1rem; }
#new-class { flex: 1 1 14rem; font-size: 1.2rem; min-height: 4rem; padding: 0.5rem; border: 2px solid #1f2937; border-radius: 0.5rem; }
.row { display: flex; gap: 0.75rem; margin-top: 1rem; }
.row button { flex: 1; }
.discard { background: #fee2e2; }
.skip { background: #f3f4f6; }
#empty { text-align: center; padding: 3rem 1rem; font-size: 1.3rem; }
@media (max-width: 800px) {
  #example { grid-template-columns: 1fr; }
  .reviewer { margin-left: 0; }
}
`;

export const REVIEW_PAGE_SCRIPT = `"use strict";
(function () {
  var REASONS = {
    "low-confidence": "Low confidence: the best guess is uncertain",
    "small-margin": "Small margin between the two best guesses",
    "novelty": "Novelty: unlike the examples seen so far",
    "reject": "Rejected on the line",
    "random": "Random sample for quality checks"
  };
  var PAGE_SIZE = 50;
  var state = { queue: [], current: null, skipped: new Set(), classes: [], busy: false };

  function byId(id) { return document.getElementById(id); }

  function showError(message) {
    var box = byId("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    var box = byId("error");
    box.textContent = "";
    box.hidden = true;
  }

  function reviewer() {
    return byId("reviewer").value.trim();
  }

  async function api(method, path, body) {
    var options = { method: method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    var response = await fetch(path, options);
    var data = null;
    try {
      data = await response.json();
    } catch (parseError) {
      data = null;
    }
    if (!response.ok) {
      var error = new Error((data && data.error) || ("request failed with HTTP " + response.status));
      error.status = response.status;
      throw error;
    }
    return data;
  }

  async function refreshCounts() {
    var stats = await api("GET", "/api/stats");
    byId("count-pending").textContent = String(stats.byStatus.pending);
    byId("count-labelled").textContent = String(stats.byStatus.labelled);
  }

  async function loadClasses() {
    var data = await api("GET", "/api/classes");
    state.classes = data.classes;
    renderClassButtons();
  }

  function renderClassButtons() {
    var box = byId("classes");
    box.replaceChildren();
    state.classes.forEach(function (name, index) {
      var button = document.createElement("button");
      button.type = "button";
      button.dataset.label = name;
      button.textContent = name;
      if (index < 9) {
        var key = document.createElement("kbd");
        key.textContent = String(index + 1);
        button.append(key);
      }
      if (state.current && state.current.predicted === name) {
        button.classList.add("predicted");
      }
      button.addEventListener("click", function () { labelCurrent(name); });
      box.append(button);
    });
  }

  async function fillQueue() {
    var limit = Math.min(500, PAGE_SIZE + state.skipped.size);
    var data = await api("GET", "/api/examples?status=pending&order=typical&limit=" + limit);
    state.queue = data.examples.filter(function (example) { return !state.skipped.has(example.sha256); });
    if (state.queue.length === 0 && state.skipped.size > 0) {
      state.skipped.clear();
      state.queue = data.examples;
    }
  }

  function addDetail(list, term, value) {
    var dt = document.createElement("dt");
    dt.textContent = term;
    var dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }

  function render() {
    var example = state.current;
    byId("empty").hidden = example !== null;
    byId("example").hidden = example === null;
    byId("actions").hidden = example === null;
    if (example === null) {
      return;
    }
    var image = byId("image");
    image.src = example.imageUrl;
    image.dataset.sha256 = example.sha256;

    var guesses = byId("guesses");
    guesses.replaceChildren();
    example.top.forEach(function (score) {
      var item = document.createElement("li");
      var name = document.createElement("span");
      name.textContent = score.label;
      var bar = document.createElement("div");
      bar.className = "bar";
      var fill = document.createElement("div");
      fill.style.width = (score.p * 100).toFixed(1) + "%";
      bar.append(fill);
      var percent = document.createElement("span");
      percent.className = "percent";
      percent.textContent = (score.p * 100).toFixed(1) + "%";
      item.append(name, bar, percent);
      guesses.append(item);
    });

    var reasons = byId("reasons");
    reasons.replaceChildren();
    example.reasons.forEach(function (reason) {
      var item = document.createElement("li");
      item.textContent = REASONS[reason] || reason;
      reasons.append(item);
    });

    var details = byId("details");
    details.replaceChildren();
    addDetail(details, "Device", example.device + " (" + example.site + ")");
    addDetail(details, "Captured", new Date(example.capturedAt).toLocaleString());
    addDetail(details, "Model", example.modelName + " " + example.modelVersion);
    addDetail(details, "Predicted", example.predicted === null ? "none" : example.predicted);
    addDetail(details, "Priority", String(example.priority));
    addDetail(details, "Seen", example.seen + (example.seen === 1 ? " time" : " times"));
    renderClassButtons();
  }

  async function showNext() {
    if (state.queue.length === 0) {
      await fillQueue();
    }
    state.current = state.queue.shift() || null;
    render();
  }

  function setBusy(busy) {
    state.busy = busy;
    document.querySelectorAll("#actions button").forEach(function (button) { button.disabled = busy; });
  }

  async function run(action) {
    if (state.busy) {
      return;
    }
    setBusy(true);
    try {
      await action();
      clearError();
    } catch (error) {
      showError(error.message);
      if (error.status === 404 && state.current !== null) {
        await showNext().catch(function (nextError) { showError(nextError.message); });
      }
    } finally {
      setBusy(false);
    }
  }

  async function afterReview() {
    await refreshCounts();
    await showNext();
  }

  function body(extra) {
    var name = reviewer();
    if (name !== "") {
      extra.by = name;
    }
    return extra;
  }

  function labelCurrent(label) {
    var example = state.current;
    if (example === null) {
      return;
    }
    return run(async function () {
      await api("POST", "/api/examples/" + example.sha256 + "/label", body({ label: label }));
      await afterReview();
    });
  }

  function discardCurrent() {
    var example = state.current;
    if (example === null) {
      return;
    }
    return run(async function () {
      await api("POST", "/api/examples/" + example.sha256 + "/discard", body({}));
      await afterReview();
    });
  }

  function skipCurrent() {
    var example = state.current;
    if (example === null) {
      return;
    }
    return run(async function () {
      state.skipped.add(example.sha256);
      await showNext();
    });
  }

  function addClassAndLabel(event) {
    event.preventDefault();
    var input = byId("new-class");
    var name = input.value.trim().toLowerCase();
    var example = state.current;
    if (name === "" || example === null) {
      return;
    }
    return run(async function () {
      await api("POST", "/api/classes", { name: name });
      await loadClasses();
      await api("POST", "/api/examples/" + example.sha256 + "/label", body({ label: name }));
      input.value = "";
      input.blur();
      await afterReview();
    });
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    var target = event.target;
    if (target instanceof HTMLInputElement) {
      if (event.key === "Escape") {
        target.blur();
      }
      return;
    }
    if (state.current === null) {
      return;
    }
    if (event.key >= "1" && event.key <= "9") {
      var label = state.classes[Number(event.key) - 1];
      if (label !== undefined) {
        event.preventDefault();
        labelCurrent(label);
      }
    } else if (event.key === "x" || event.key === "X") {
      event.preventDefault();
      discardCurrent();
    } else if (event.key === "s" || event.key === "S") {
      event.preventDefault();
      skipCurrent();
    } else if (event.key === "n" || event.key === "N") {
      event.preventDefault();
      byId("new-class").focus();
    }
  }

  async function start() {
    var input = byId("reviewer");
    try {
      input.value = localStorage.getItem("sortline-reviewer") || "";
    } catch (storageError) {
      input.value = "";
    }
    input.addEventListener("change", function () {
      try {
        localStorage.setItem("sortline-reviewer", reviewer());
      } catch (storageError) {
        // The name then lasts until the page is reloaded.
      }
    });
    byId("discard").addEventListener("click", discardCurrent);
    byId("skip").addEventListener("click", skipCurrent);
    byId("reload").addEventListener("click", function () {
      run(async function () {
        state.skipped.clear();
        state.queue = [];
        await refreshCounts();
        await showNext();
      });
    });
    byId("new-class-form").addEventListener("submit", addClassAndLabel);
    byId("image").addEventListener("error", function () {
      showError("the image of example " + (state.current ? state.current.sha256 : "") + " failed to load");
    });
    document.addEventListener("keydown", onKey);
    await run(async function () {
      await loadClasses();
      await refreshCounts();
      await showNext();
    });
    document.body.dataset.ready = "true";
  }

  start();
})();
`;
