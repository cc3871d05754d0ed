// The live page of `spillway serve` (producer/ops/dashboard.py says what a sample holds).
// Every 2 s it fetches /v1/dashboard, keeps the last 15 minutes of samples in this tab, and
// draws eight uPlot charts. Counters become rates here, over samples RATE_SPAN polls apart, as
// Prometheus's rate() does: serve keeps no history. window.spillwayDashboard is the state the
// charts are drawn from (tests/test_dashboard.py reads it).
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEEP_S = 15 * 60;
  const RATE_SPAN = 5; // samples: a rate spans ~10 s, smooth enough to read, quick to react
  const TOKEN_KEY = "spillway.apiToken";
  const PLOT_HEIGHT = 220;
  const PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#17becf", "#e377c2", "#bcbd22", "#8c564b", "#4e79a7",
  ];

  // {"<provider> <name>": sample.ledger[provider][field]} for each [name, field] of `fields`
  const perProvider = (sample, fields) =>
    Object.fromEntries(
      Object.entries(sample.ledger).flatMap(([provider, p]) =>
        fields.map(([name, field]) => [name ? `${provider} ${name}` : provider, p[field]]),
      ),
    );

  // kind "rate": the values are counters, drawn as their rate times `scale`; "gauge": as read.
  // `paired`: two series per provider ("<provider> <first>", "<provider> <second>"), drawn in
  // the provider's colour, the second dashed.
  const CHARTS = [
    {
      id: "jobs-provider", title: "Jobs done per second, per provider", kind: "rate", scale: 1,
      unit: "jobs/s", values: (s) => s.jobs_done_by_provider,
    },
    {
      id: "jobs-task", title: "Jobs done per second, per task type", kind: "rate", scale: 1,
      unit: "jobs/s", values: (s) => s.jobs_done_by_task,
    },
    {
      id: "tokens", title: "Tokens per second, per provider (input, output dashed)", kind: "rate",
      scale: 1, unit: "tokens/s", paired: ["input", "output"],
      values: (s) => perProvider(s, [["input", "input_tokens"], ["output", "output_tokens"]]),
    },
    {
      id: "errors", title: "429s and re-routes per minute, per provider (re-routes dashed)",
      kind: "rate", scale: 60, unit: "/min", paired: ["429s", "re-routes"],
      values: (s) => perProvider(s, [["429s", "rate_limited"], ["re-routes", "reroutes"]]),
    },
    {
      id: "queues", title: "Queue length per provider queue", kind: "gauge", unit: "messages",
      values: (s) => s.queues,
    },
    {
      id: "budget", title: "Budget left per account (its scarcest limit, % left)", kind: "gauge",
      unit: "%", range: [0, 100],
      values: (s) => Object.fromEntries(s.budgets.map((b) => [b.name, b.percent_left])),
    },
    {
      id: "latency", title: "Call latency p50 and p95 (dashed), per provider, over the last minute",
      kind: "gauge", unit: "ms", paired: ["p50", "p95"],
      values: (s) => Object.fromEntries(
        Object.entries(s.latency.by_provider).flatMap(([provider, l]) => [
          [`${provider} p50`, l.p50_ms],
          [`${provider} p95`, l.p95_ms],
        ]),
      ),
    },
    {
      id: "cost", title: "Cost per hour per provider (USD)", kind: "rate", scale: 3600, unit: "$/h",
      values: (s) => perProvider(s, [["", "cost_usd"]]),
    },
  ];

  const state = { polls: 0, ok: 0, error: null, samples: [], latest: null, charts: {} };
  window.spillwayDashboard = state;

  const number = new Intl.NumberFormat(undefined, { notation: "compact", maximumSignificantDigits: 3 });
  const fmt = (v) => (v == null || Number.isNaN(v) ? "–" : number.format(v));
  const $ = (id) => document.getElementById(id);

  // -- the token: from this page's fragment or the form, kept in this tab, sent as a header ----

  function takeTokenFromFragment() {
    const found = location.hash.slice(1).match(/(?:^|&)token=([^&]*)/);
    if (found && found[1]) sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(found[1]));
    // out of the address bar and the history, where a screenshot or a bookmark would keep it
    if (location.hash) history.replaceState(null, "", location.pathname);
  }

  function askForToken(message) {
    state.error = { status: 401, message };
    $("auth-message").textContent = message;
    $("auth").hidden = false;
    showStatus("not signed in", true);
  }

  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("auth").hidden = true;
    poll();
  });

  // -- polling ----------------------------------------------------------------------------

  async function poll() {
    state.polls += 1;
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    try {
      const answer = await fetch("/v1/dashboard", { headers, cache: "no-store", credentials: "omit" });
      if (answer.status === 401) {
        // no further polls until a token is given: the same request would only fail again
        askForToken(token ? "This server refused the token." : "This server needs its API token.");
        return;
      }
      if (!answer.ok) throw new Error(await reasonOf(answer));
      take(await answer.json());
      state.ok += 1;
      state.error = null;
    } catch (err) {
      state.error = { status: 0, message: String(err && err.message ? err.message : err) };
      showStatus(`no new data: ${state.error.message}`, true);
    }
    setTimeout(poll, POLL_MS);
  }

  async function reasonOf(answer) {
    try {
      return `${answer.status}: ${(await answer.json()).error.message}`;
    } catch {
      return `${answer.status} ${answer.statusText}`;
    }
  }

  function take(sample) {
    const last = state.samples[state.samples.length - 1];
    if (last && sample.now_s <= last.now_s) return; // the same sample again (another tab's)
    const values = Object.fromEntries(CHARTS.map((c) => [c.id, c.values(sample)]));
    state.samples.push({ now_s: sample.now_s, values });
    while (sample.now_s - state.samples[0].now_s > KEEP_S) state.samples.shift();
    state.latest = sample;
    CHARTS.forEach(draw);
    noteUnavailable(sample.budgets);
    const done = Object.values(sample.jobs_done_by_provider).reduce((a, b) => a + b, 0);
    const at = new Date(sample.now_s * 1000).toLocaleTimeString();
    showStatus(`updated ${at} · ${fmt(done)} jobs done so far · every ${POLL_MS / 1000} s`, false);
  }

  function showStatus(text, bad) {
    $("status").textContent = text;
    $("status").className = bad ? "error" : "dim";
  }

  // -- charts -----------------------------------------------------------------------------

  function series(chart) {
    const rows = state.samples.map((s) => s.values[chart.id]);
    const xs = state.samples.map((s) => s.now_s);
    const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))].sort();
    const ys = keys.map((key) =>
      rows.map((row, i) => (chart.kind === "rate" ? rate(chart, rows, xs, key, i) : row[key] ?? null)),
    );
    return { keys, data: [xs, ...ys] };
  }

  function rate(chart, rows, xs, key, i) {
    const j = Math.max(0, i - RATE_SPAN);
    const seconds = xs[i] - xs[j];
    if (j === i || seconds <= 0) return null;
    // a key absent from an older sample had not counted anything yet; a counter that went
    // down (jobs deleted, a failed job retried) is no negative throughput
    const delta = (rows[i][key] ?? 0) - (rows[j][key] ?? 0);
    return (Math.max(0, delta) / seconds) * chart.scale;
  }

  function styleOf(chart, key, keys) {
    if (!chart.paired) return { stroke: PALETTE[keys.indexOf(key) % PALETTE.length] };
    const providerOf = (k) => k.slice(0, k.lastIndexOf(" "));
    const providers = [...new Set(keys.map(providerOf))];
    const colour = PALETTE[providers.indexOf(providerOf(key)) % PALETTE.length];
    return { stroke: colour, dash: key.endsWith(` ${chart.paired[1]}`) ? [6, 4] : undefined };
  }

  function makeCard(chart) {
    const card = document.createElement("section");
    card.className = "chart";
    card.id = `chart-${chart.id}`;
    const title = document.createElement("h2");
    title.textContent = chart.title;
    const plot = document.createElement("div");
    plot.className = "plot";
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "no data yet";
    plot.append(empty);
    const note = document.createElement("p");
    note.className = "note";
    card.append(title, plot, note);
    $("charts").append(card);
    chart.el = { card, plot, empty, note };
    new ResizeObserver(() => {
      if (chart.plot) chart.plot.setSize({ width: plotWidth(chart), height: PLOT_HEIGHT });
    }).observe(card);
  }

  const plotWidth = (chart) => Math.max(200, chart.el.plot.clientWidth);
  const newest = (ys) => ys.findLast((y) => y != null) ?? null;

  function options(chart, keys) {
    const range = chart.range
      ? () => chart.range
      : (u, min, max) => [0, max > 0 ? max * 1.1 : 1];
    return {
      width: plotWidth(chart),
      height: PLOT_HEIGHT,
      scales: { x: { time: true }, y: { range } },
      axes: [{}, { size: 56, values: (u, splits) => splits.map(fmt) }],
      legend: { live: true },
      series: [
        { value: (u, v, si, idx) => (idx == null ? "now" : new Date(v * 1000).toLocaleTimeString()) },
        ...keys.map((key) => ({
          label: key,
          width: 2,
          points: { show: false },
          // the point under the cursor, or the newest one when the cursor is elsewhere
          value: (u, v, si, idx) => {
            const shown = idx == null ? newest(u.data[si]) : v;
            return shown == null ? "–" : `${fmt(shown)} ${chart.unit}`;
          },
          ...styleOf(chart, key, keys),
        })),
      ],
    };
  }

  function draw(chart) {
    const { keys, data } = series(chart);
    state.charts[chart.id] = { title: chart.title, unit: chart.unit, keys, data };
    chart.el.empty.hidden = keys.length > 0;
    if (!keys.length) return;
    const signature = keys.join("\n");
    if (chart.plot && chart.signature === signature) {
      chart.plot.setData(data);
      return;
    }
    // a provider, queue or account came or went: a new chart with the new series
    if (chart.plot) chart.plot.destroy();
    chart.plot = new uPlot(options(chart, keys), data, chart.el.plot);
    chart.signature = signature;
  }

  function noteUnavailable(budgets) {
    const chart = CHARTS.find((c) => c.id === "budget");
    const down = budgets.filter((b) => b.state !== "available" && b.state !== "probing");
    chart.el.note.textContent = down
      .map((b) => `${b.name}: ${b.state.replace("_", " ")}${b.until ? ` until ${b.until}` : ""}`)
      .join(" · ");
  }

  CHARTS.forEach(makeCard);
  takeTokenFromFragment();
  poll();
})();
