// Leash console: the live propagation view. A table with data-live is fed
// by server-sent events: each acknowledgement appears as it is recorded;
// EventSource reconnects by itself (a control plane restarting). Text is
// inserted as text, never as markup.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector("table[data-live]");
  if (!table) return;
  const body = table.querySelector("tbody");
  const seen = new Set(Array.from(body.querySelectorAll("tr[data-session]")).map((tr) => tr.dataset.session));
  const cell = (text, cls) => {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    return td;
  };
  const onAck = (e) => {
    const a = JSON.parse(e.data);
    if (seen.has(a.session_id)) return;
    seen.add(a.session_id);
    const tr = document.createElement("tr");
    tr.dataset.session = a.session_id;
    tr.className = "new";
    tr.append(cell(a.spiffe_id, "id"), cell(a.session_id, "id"), cell(a.latency_ms + " ms"), cell("just now"));
    body.append(tr);
  };
  const onState = (e) => {
    const s = JSON.parse(e.data);
    for (const [id, value] of [["acked", s.acknowledged], ["pending-count", s.pending], ["connected", s.connected]]) {
      const el = document.getElementById(id);
      if (el) el.textContent = String(value);
    }
    if (s.pending === 0) {
      const pending = document.getElementById("pending");
      if (pending) pending.remove();
    }
  };
  // EventSource retries a dropped stream by itself, but gives up for good
  // on an answer that is not a stream (a control plane shutting down or
  // not yet up): then a new one is opened, every 2 s, until one holds.
  const connect = () => {
    const source = new EventSource(table.dataset.live);
    source.addEventListener("ack", onAck);
    source.addEventListener("state", onState);
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
    });
  };
  connect();
});
