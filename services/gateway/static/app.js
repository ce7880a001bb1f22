// klines gateway page: subscribe to one <symbol>@kline_<interval> on /ws and draw it live with Lightweight Charts.
// The chart's data is exposed on window.klinesChart for tests and the browser console.
"use strict";

(function () {
  const LWC = window.LightweightCharts;
  const $ = (id) => document.getElementById(id);
  const els = {
    symbol: $("symbol"), interval: $("interval"), state: $("state"), price: $("price"),
    updated: $("updated"), ago: $("ago"), candleState: $("candle-state"), error: $("error"), chart: $("chart"),
  };
  const UP = "#26a69a", DOWN = "#ef5350";
  const params = new URLSearchParams(location.search);

  const chart = LWC.createChart(els.chart, {
    autoSize: true,
    layout: { background: { color: "#0f1419" }, textColor: "#c9d1d9" },
    grid: { vertLines: { color: "#1f2630" }, horzLines: { color: "#1f2630" } },
    timeScale: { timeVisible: true, secondsVisible: true, borderColor: "#30363d" },
    rightPriceScale: { borderColor: "#30363d" },
    crosshair: { mode: LWC.CrosshairMode.Normal },
  });
  const candles = chart.addSeries(LWC.CandlestickSeries, {
    upColor: UP, downColor: DOWN, borderVisible: false, wickUpColor: UP, wickDownColor: DOWN,
  });
  candles.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.28 } });
  const volume = chart.addSeries(LWC.HistogramSeries, {
    priceFormat: { type: "volume" }, priceScaleId: "", lastValueVisible: false, priceLineVisible: false,
  });
  volume.priceScale().applyOptions({ scaleMargins: { top: 0.78, bottom: 0 } });

  let ws = null;
  let stream = null; // the subscribed stream name, e.g. "btcusdt@kline_1m"
  let requestId = 0;
  let historyLimit = 0;
  let reconnectDelay = 500;
  let bars = new Map(); // open time (s) -> [candle, volume bar]
  let lastTime = null;
  let updates = 0;
  let lastUpdateMs = null;
  let lastKline = null;
  let connState = "connecting";

  function setState(state, detail) {
    connState = state;
    els.state.dataset.state = state;
    els.state.textContent = detail ? `${state} (${detail})` : state;
  }

  function decimals(text) {
    const [, frac = ""] = String(text).split(".");
    return Math.min(8, Math.max(2, frac.replace(/0+$/, "").length));
  }

  function resetSeries() {
    bars = new Map();
    lastTime = null;
    lastKline = null;
    candles.setData([]);
    volume.setData([]);
    els.price.textContent = "–";
    els.candleState.textContent = "";
  }

  function applyKline(k, eventTime) {
    const time = Math.floor(k.t / 1000);
    const candle = { time, open: +k.o, high: +k.h, low: +k.l, close: +k.c };
    const vol = { time, value: +k.v, color: +k.c >= +k.o ? "rgba(38,166,154,0.5)" : "rgba(239,83,80,0.5)" };
    if (bars.size === 0) {
      const p = decimals(k.c);
      candles.applyOptions({ priceFormat: { type: "price", precision: p, minMove: Math.pow(10, -p) } });
      setTimeout(() => chart.timeScale().fitContent(), 300); // once the history burst is in
    }
    const known = bars.has(time);
    bars.set(time, [candle, vol]);
    if (lastTime === null || time >= lastTime) {
      candles.update(candle);
      volume.update(vol);
      lastTime = time;
    } else if (known) {
      candles.update(candle, true); // a late final or correction of an earlier candle
      volume.update(vol, true);
    } else {
      const ordered = [...bars.keys()].sort((a, b) => a - b);
      candles.setData(ordered.map((t) => bars.get(t)[0]));
      volume.setData(ordered.map((t) => bars.get(t)[1]));
    }
    if (time >= lastTime) {
      lastKline = k;
      els.price.textContent = k.c;
      els.candleState.textContent = k.x ? "candle closed" : "candle in progress";
    }
    updates += 1;
    lastUpdateMs = Date.now();
    els.updated.textContent = new Date(eventTime || lastUpdateMs).toISOString().slice(11, 23) + " UTC";
    refreshAgo();
  }

  function refreshAgo() {
    if (lastUpdateMs === null) return;
    els.ago.textContent = `(${Math.max(0, Math.round((Date.now() - lastUpdateMs) / 1000))} s ago)`;
  }

  function send(message) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
  }

  function selectedStream() {
    return `${els.symbol.value.toLowerCase()}@kline_${els.interval.value}`;
  }

  function subscribe() {
    const next = selectedStream();
    if (stream && stream !== next) send({ method: "UNSUBSCRIBE", params: [stream], id: ++requestId });
    resetSeries();
    stream = next;
    const message = { method: "SUBSCRIBE", params: [stream], id: ++requestId };
    if (historyLimit > 0) message.history = Math.min(300, historyLimit);
    send(message);
    const url = new URL(location.href);
    url.searchParams.set("symbol", els.symbol.value);
    url.searchParams.set("interval", els.interval.value);
    history.replaceState(null, "", url);
  }

  function onMessage(event) {
    let msg;
    try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.error) { els.error.textContent = `error ${msg.error.code}: ${msg.error.msg}`; return; }
    if ("result" in msg) { els.error.textContent = ""; return; }
    const data = msg.data || msg; // bare (/ws) or combined (/stream) events
    if (data.e !== "kline") return;
    const k = data.k;
    if (`${k.s.toLowerCase()}@kline_${k.i}` !== stream) return; // late event of the previous stream
    applyKline(k, data.E);
  }

  function connect() {
    setState(connState === "connecting" ? "connecting" : "reconnecting");
    const proto = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${proto}://${location.host}/ws`);
    ws.onopen = () => {
      setState("live");
      reconnectDelay = 500;
      stream = null;
      subscribe();
    };
    ws.onmessage = onMessage;
    ws.onclose = (event) => {
      setState("reconnecting", event.reason || `code ${event.code}`);
      setTimeout(connect, reconnectDelay);
      reconnectDelay = Math.min(10000, reconnectDelay * 2);
    };
    ws.onerror = () => {}; // onclose follows and reconnects
  }

  function fill(select, values, wanted) {
    select.replaceChildren(...values.map((v) => new Option(v, v)));
    if (wanted && values.includes(wanted)) select.value = wanted;
  }

  async function start() {
    let catalog;
    try {
      catalog = await (await fetch("/api/streams")).json();
    } catch (e) {
      setState("error", "cannot load /api/streams");
      setTimeout(start, 2000);
      return;
    }
    historyLimit = catalog.history_limit || 0;
    fill(els.symbol, catalog.symbols, (params.get("symbol") || "").toUpperCase());
    fill(els.interval, catalog.intervals, params.get("interval"));
    els.symbol.onchange = subscribe;
    els.interval.onchange = subscribe;
    connect();
  }

  setInterval(refreshAgo, 1000);

  window.klinesChart = {
    chart,
    candles: () => candles.data(),
    volumes: () => volume.data(),
    state: () => connState,
    stream: () => stream,
    updates: () => updates,
    lastUpdateMs: () => lastUpdateMs,
    lastKline: () => lastKline,
  };

  start();
})();
