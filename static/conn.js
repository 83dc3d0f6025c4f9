// The screen channel: one websocket to /ws/screen, reconnected with exponential backoff (max 5 s)
// and resumed with `since`. Operator commands are promises settled by the matching ack/error.

import { uuid } from './util.js';

const BACKOFF_MIN = 250, BACKOFF_MAX = 5000, COMMAND_TIMEOUT = 10000;

export class ScreenConnection {
  /**
   * @param {object} o
   * @param {() => object} o.hello       builds the hello message (token, scope, since)
   * @param {(msg) => void} o.onMessage  every server message except ack/error of commands
   * @param {(state) => void} o.onState  {connected, attempt, nextInMs, reason, fatal}
   */
  constructor({ hello, onMessage, onState }) {
    this.hello = hello;
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.stopped = true;
    this.connected = false;
    this.reconnects = 0;
    this.pending = new Map(); // command id → {resolve, reject, timer}
    this.url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws/screen`;
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) { const ws = this.ws; this.ws = null; ws.onclose = null; try { ws.close(1000); } catch { /* ignore */ } }
    this.setConnected(false, { reason: 'stopped' });
  }

  /** Drop the socket and resume at once with `since` (a gap in the event stream). */
  resync() {
    if (this.stopped) return;
    this.resyncing = true;
    if (this.ws) {
      const ws = this.ws; this.ws = null; ws.onclose = null; ws.onmessage = null;
      try { ws.close(4000, 'resync'); } catch { /* ignore */ }
    }
    this.failPending('lost');
    this.setConnected(false, { reason: 'resync', attempt: 0, nextInMs: 0 });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), 0);
  }

  open() {
    clearTimeout(this.timer);
    if (this.stopped) return;
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.scheduleReconnect('error');
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      ws.send(JSON.stringify(this.hello()));
      this.setConnected(true, {});
    };
    ws.onmessage = (e) => {
      if (this.ws !== ws) return;
      let msg;
      try { msg = JSON.parse(e.data); } catch { return; }
      this.attempt = 0;
      this.resyncing = false;
      if ((msg.type === 'ack' || msg.type === 'error') && msg.id && this.pending.has(msg.id)) {
        const p = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.type === 'ack') p.resolve(msg); else p.reject(Object.assign(new Error(msg.message || msg.code), { code: msg.code, server: true }));
        return;
      }
      this.onMessage(msg);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.failPending('lost');
      if (e.code === 4401 || e.code === 4403) {
        this.stopped = true;
        this.setConnected(false, { reason: e.code === 4401 ? 'unauthorized' : 'forbidden', fatal: true, code: e.code });
        return;
      }
      this.scheduleReconnect(`close ${e.code}`);
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  scheduleReconnect(reason) {
    if (this.stopped) return;
    const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** this.attempt);
    const delay = Math.round(base * (0.8 + Math.random() * 0.4));
    this.attempt++;
    this.reconnects++;
    this.setConnected(false, { reason: this.resyncing ? 'resync' : reason, attempt: this.attempt, nextInMs: Math.min(delay, BACKOFF_MAX) });
    this.timer = setTimeout(() => this.open(), Math.min(delay, BACKOFF_MAX));
  }

  setConnected(v, info) {
    this.connected = v;
    this.onState({ connected: v, ...info });
  }

  failPending(why) {
    for (const [, p] of this.pending) { clearTimeout(p.timer); p.reject(Object.assign(new Error(why), { code: why })); }
    this.pending.clear();
  }

  /** Send an operator command; resolves with the ack, rejects with the error (err.code, err.message). */
  command(type, fields) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(Object.assign(new Error('offline'), { code: 'offline' }));
        return;
      }
      const id = uuid();
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(Object.assign(new Error('timeout'), { code: 'timeout' }));
      }, COMMAND_TIMEOUT);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ type, id, ...fields }));
    });
  }
}
