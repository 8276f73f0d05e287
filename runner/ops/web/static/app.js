// The status page: polls /api/jobs and /api/hosts, and follows one job's log over
// server-sent events. Every string that comes from a job or from Redis (argv, labels,
// messages, log text, host and worker names) reaches the page through textContent or a text
// node, never as markup; the server's Content-Security-Policy forbids inline script anyway.
"use strict";

const REFRESH_MS = 2000;
const LIVE = new Set(["queued", "running"]);
const STREAMS = new Set(["stdout", "stderr", "kata-ci"]);
// Terminal control sequences (colours, cursor moves) mean nothing in a <pre>: dropped.
// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;

let picked = null; // the job whose log is shown
let source = null; // its EventSource

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function word(value) {
  // A state as part of a class name: only the characters our states use.
  return String(value).replace(/[^a-z_]/g, "");
}

function duration(seconds) {
  const s = Math.max(0, seconds);
  if (s < 10) return s.toFixed(1) + "s";
  if (s < 60) return Math.floor(s) + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
}

// queued → VM ready → first output → done: each cell is the time from the milestone before
// it that the job reached; the first one not reached yet counts on (on the server's clock)
// while the job is live. A job that never reached one (no output at all) shows a dash.
function timings(job, now) {
  const marks = [job.created_at, job.started_at, job.vm_ready_at, job.first_output_at,
                 job.finished_at];
  const cells = [];
  let last = marks[0];
  let counting = LIVE.has(job.state);
  for (let i = 1; i < marks.length; i++) {
    if (marks[i] !== null && marks[i] !== undefined) {
      cells.push({ text: duration(marks[i] - last) });
      last = marks[i];
    } else if (counting) {
      cells.push({ text: duration(now - last) + "…", ongoing: true });
      counting = false;
    } else {
      cells.push({ text: "–" });
    }
  }
  if (job.vm_start && job.vm_ready_at) cells[1].text += " " + job.vm_start;
  if (job.finished_at) {
    cells.push({ text: duration(job.finished_at - job.created_at) });
  } else if (LIVE.has(job.state)) {
    cells.push({ text: duration(now - job.created_at) + "…", ongoing: true });
  } else {
    cells.push({ text: "–" });
  }
  return cells;
}

function stateCell(job) {
  const code = job.exit_code !== null && job.exit_code !== 0 ? " (" + job.exit_code + ")" : "";
  const cell = el("td", null, "state state-" + word(job.state));
  cell.append(el("span", job.state + code));
  if (job.message) cell.append(el("div", job.message, "dim"));
  return cell;
}

function jobButton(id) {
  const button = el("button", id, "job-id");
  button.type = "button";
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    pick(id);
  });
  return button;
}

function renderJobs(jobs, now) {
  const rows = jobs.map((job) => {
    const row = el("tr");
    row.dataset.id = job.id;
    row.classList.toggle("picked", job.id === picked);
    const idCell = el("td");
    idCell.append(jobButton(job.id));
    row.append(idCell, el("td", job.source), el("td", job.label), stateCell(job),
               el("td", job.argv.join(" "), "cmd"), el("td", job.host));
    for (const t of timings(job, now)) {
      row.append(el("td", t.text, t.ongoing ? "num ongoing" : "num"));
    }
    row.addEventListener("click", () => pick(job.id));
    return row;
  });
  document.querySelector("#jobs tbody").replaceChildren(...rows);
}

function renderHosts(data) {
  const box = document.getElementById("hosts");
  if (data.hosts.length === 0) {
    box.replaceChildren(el("p", "none", "dim"));
  } else {
    box.replaceChildren(...data.hosts.map((host) => {
      const part = el("div", null, "host");
      const count = host.jobs.length + (host.jobs.length === 1 ? " VM" : " VMs");
      part.append(el("h3", (host.host || "(host not known)") + " — " + count));
      const list = el("ul");
      for (const job of host.jobs) {
        const item = el("li");
        const how = job.vm_start ? " · " + job.vm_start : "";
        item.append(jobButton(job.id),
                    document.createTextNode(" " + job.label + " · " + job.argv.join(" ") + how));
        list.append(item);
      }
      part.append(list);
      return part;
    }));
  }
  const rows = data.workers.map((worker) => {
    const row = el("tr");
    row.append(el("td", worker.name), el("td", worker.labels.join(", ")),
               el("td", worker.busy + "/" + worker.concurrency, "num"));
    return row;
  });
  if (rows.length === 0) {
    const none = el("tr");
    none.append(el("td", "none announced", "dim"), el("td"), el("td"));
    rows.push(none);
  }
  document.querySelector("#workers tbody").replaceChildren(...rows);
}

function problem(text) {
  const banner = document.getElementById("problem");
  banner.textContent = text || "";
  banner.hidden = !text;
}

async function getJSON(path) {
  const answer = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (answer.status === 401) throw new Error("not authorised: open this page as /?token=…");
  if (!answer.ok) throw new Error(path + ": HTTP " + answer.status);
  return answer.json();
}

async function refresh() {
  try {
    const [jobs, hosts] = await Promise.all([getJSON("/api/jobs"), getJSON("/api/hosts")]);
    renderJobs(jobs.jobs, jobs.now);
    renderHosts(hosts);
    problem(null);
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    problem(String(error && error.message ? error.message : error));
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

function setLogState(text, state) {
  const node = document.getElementById("log-state");
  node.textContent = text;
  node.className = "state state-" + word(state);
}

// One job's log, following it live: each `chunk` is appended as text; `end` closes the
// stream (else EventSource would reconnect, resuming after the last chunk it got).
function pick(id) {
  if (picked === id && source !== null) return;
  picked = id;
  history.replaceState(null, "", "#job=" + encodeURIComponent(id));
  for (const row of document.querySelectorAll("#jobs tbody tr")) {
    row.classList.toggle("picked", row.dataset.id === id);
  }
  if (source !== null) source.close();
  const log = document.getElementById("log");
  log.replaceChildren();
  document.getElementById("log-section").hidden = false;
  document.getElementById("log-job").textContent = id;
  document.getElementById("log-end").textContent = "";
  setLogState("following", "running");
  const mine = new EventSource("/api/jobs/" + encodeURIComponent(id) + "/log");
  source = mine;
  mine.addEventListener("chunk", (event) => {
    if (source !== mine) return;
    const chunk = JSON.parse(event.data);
    const stream = STREAMS.has(chunk.s) ? chunk.s : "other";
    log.append(el("span", String(chunk.d).replace(ANSI, ""), "stream-" + stream));
    if (document.getElementById("follow").checked) log.scrollTop = log.scrollHeight;
  });
  mine.addEventListener("end", (event) => {
    mine.close();
    if (source !== mine) return;
    const end = JSON.parse(event.data);
    const code = end.exit_code !== null && end.exit_code !== 0 ? " (" + end.exit_code + ")" : "";
    setLogState(end.state + code, end.state);
    document.getElementById("log-end").textContent = end.message || "";
  });
  mine.addEventListener("busy", () => {
    if (source === mine) setLogState("server busy, retrying", "queued");
  });
  mine.addEventListener("error", () => {
    if (source !== mine) return;
    if (mine.readyState === EventSource.CLOSED) setLogState("log not available", "failed");
    else setLogState("reconnecting", "queued");
  });
  mine.addEventListener("open", () => {
    if (source === mine) setLogState("following", "running");
  });
}

refresh();
if (location.hash.startsWith("#job=")) pick(decodeURIComponent(location.hash.slice(5)));
