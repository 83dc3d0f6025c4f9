// The map: vendored Leaflet with the canvas renderer for the grids (no tile layer unless a local
// one is configured), and one custom canvas layer that draws every responder and incident itself
// (2,000 moving dots are far too many for Leaflet markers).

import { lonLatToUV } from './util.js';

const L = window.L;

export const R_COLOURS = {
  available: '#34d27b', offered: '#ffb020', assigned: '#4d8dff', on_scene: '#22d3ee',
  off_duty: '#8a94a6', offline: '#4b5563',
};
export const R_ORDER = ['offline', 'off_duty', 'available', 'assigned', 'on_scene', 'offered'];
export const P_COLOURS = { 1: '#ff3b3b', 2: '#ff8a1f', 3: '#ffd23f', 4: '#9aa4b2' };
export const SAFETY_HEX = { blue: '#2f80ed', yellow: '#f2c94c', orange: '#f2994a', red: '#eb5757' };
const SAFETY_FILL = { blue: 0.16, yellow: 0.3, orange: 0.36, red: 0.45 };
const LEVEL_RING = { 2: '#ffb020', 1: '#ff4d4f' };
const FONT = '"Noto Sans CJK SC", "Source Han Sans SC", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "WenQuanYi Micro Hei", system-ui, sans-serif';
const MOVE_MS = 1000;   // positions are interpolated over ~1 s
const PULSE_MS = 1600;
const PULSE_STEPS = 32;

export function safetyColour(c) {
  if (!c) return null;
  const k = String(c).toLowerCase();
  return SAFETY_HEX[k] || (k.startsWith('#') ? k : null);
}

/** The UI scale: 1 at 1920×1080, 2 at 3840×2160 (dots and labels grow with the wall). */
export function uiScale() {
  return Math.max(0.75, Math.min(innerHeight / 1080, innerWidth / 1920, 3));
}

// ---------------------------------------------------------------------------------------------
// Responder dots in flat typed arrays: from/to in Mercator u,v, start time, status code.

class Dots {
  constructor() { this.clear(); }
  clear() {
    this.n = 0; this.ids = []; this.index = new Map();
    this.alloc(256);
  }
  alloc(cap) {
    const grow = (A, old) => { const a = new A(cap); if (old) a.set(old.subarray(0, Math.min(old.length, cap))); return a; };
    this.fu = grow(Float64Array, this.fu); this.fv = grow(Float64Array, this.fv);
    this.tu = grow(Float64Array, this.tu); this.tv = grow(Float64Array, this.tv);
    this.t0 = grow(Float64Array, this.t0);
    this.st = grow(Uint8Array, this.st); this.has = grow(Uint8Array, this.has);
    this.xs = new Float32Array(cap); this.ys = new Float32Array(cap);
    this.cap = cap;
  }
  slot(id) {
    let i = this.index.get(id);
    if (i !== undefined) return i;
    if (this.n === this.cap) this.alloc(this.cap * 2);
    i = this.n++;
    this.ids[i] = id; this.index.set(id, i); this.has[i] = 0; this.st[i] = 0;
    return i;
  }
  /** Move toward (lon, lat) starting from wherever the dot is now. */
  target(i, lon, lat, now, jump) {
    if (lon == null || lat == null) { this.has[i] = 0; return; }
    const [u, v] = lonLatToUV(lon, lat);
    if (!this.has[i] || jump) {
      this.fu[i] = this.tu[i] = u; this.fv[i] = this.tv[i] = v; this.t0[i] = 0; this.has[i] = 1;
      return;
    }
    if (u === this.tu[i] && v === this.tv[i]) return;
    const f = Math.min(1, Math.max(0, (now - this.t0[i]) / MOVE_MS));
    this.fu[i] += (this.tu[i] - this.fu[i]) * f;
    this.fv[i] += (this.tv[i] - this.fv[i]) * f;
    this.tu[i] = u; this.tv[i] = v; this.t0[i] = now;
  }
}

const STATUS_CODE = Object.fromEntries(R_ORDER.map((s, i) => [s, i]));

// ---------------------------------------------------------------------------------------------

/**
 * A custom Leaflet layer holding our two canvases. They sit over the map panes (not inside the
 * moving map pane), sized to the viewport; MapView redraws them in container coordinates.
 */
const OverlayLayer = L.Layer.extend({
  initialize(el) { this._el = el; },
  onAdd(map) { map.getContainer().appendChild(this._el); return this; },
  onRemove() { this._el.remove(); return this; },
});

export class MapView {
  /**
   * @param {HTMLElement} container
   * @param {object} o  {store, onIncidentClick(id), onResponderClick(responder, latlng)}
   */
  constructor(container, o) {
    this.store = o.store;
    this.onIncidentClick = o.onIncidentClick;
    this.onResponderClick = o.onResponderClick;
    this.S = uiScale();
    this.renderer = L.canvas({ padding: 0.4, tolerance: 0 });
    this.map = L.map(container, {
      preferCanvas: true, renderer: this.renderer, zoomControl: false, attributionControl: false,
      zoomSnap: 0.25, zoomDelta: 0.5, wheelPxPerZoomLevel: 120, minZoom: 3, maxZoom: 19,
      fadeAnimation: false, boxZoom: false, keyboard: false,
    });
    this.map.setView([22.61, 113.19], 13);
    const tiles = document.querySelector('meta[name="dispatch-tiles"]')?.content?.trim();
    if (tiles) {
      L.tileLayer(tiles, { maxZoom: 19, className: 'local-tiles' }).addTo(this.map);
      container.classList.add('has-tiles');
    }
    this.grids = new Map();
    this.layers = {};
    this.safety = {};
    this.scope = null;
    this.scopeSet = null;
    this.selected = null;
    this.hidden = new Set();
    this.userMoved = false;
    this.dots = new Dots();
    this.animUntil = 0;
    this.dirty = true;
    this.labelsDirty = true;
    this.pulsing = 0;

    // Overlay canvases (dynamic below, labels above); pointer events go to the map.
    this.overlay = document.createElement('div');
    this.overlay.className = 'dispatch-overlay';
    this.cDyn = document.createElement('canvas');     // dots, pulses, selection: every frame
    this.cInc = document.createElement('canvas');     // incident markers: when they change
    this.cLabels = document.createElement('canvas');  // grid names: when the view changes
    this.overlay.append(this.cDyn, this.cInc, this.cLabels);
    this.overlayLayer = new OverlayLayer(this.overlay).addTo(this.map);
    this.ctxL = this.cLabels.getContext('2d');
    this.ctxI = this.cInc.getContext('2d');
    this.ctx = this.cDyn.getContext('2d');
    this.pulses = { 1: [], 2: [] };
    this.incOx = 0; this.incOy = 0; this.incAt = 0; this.incUrgent = true;

    const m = this.map;
    const onView = () => { this.computeTransform(); this.dirty = true; this.incDirty = this.incUrgent = true; this.labelsDirty = true; };
    m.on('move zoomend viewreset', onView);
    m.on('resize', () => { this.S = uiScale(); this.resize(); this.buildSprites(); this.restyle(); if (!this.userMoved) this.fit(false); });
    m.on('zoomstart', () => { this.overlay.style.visibility = 'hidden'; });
    m.on('zoomend', () => { this.overlay.style.visibility = ''; });
    m.on('dragstart', () => { this.userMoved = true; });
    m.getContainer().addEventListener('wheel', () => { this.userMoved = true; }, { passive: true });
    m.on('click', (e) => this.click(e));
    let hoverT = 0;
    m.on('mousemove', (e) => {
      const now = performance.now();
      if (now - hoverT < 60) return;
      hoverT = now;
      m.getContainer().style.cursor = this.hitIncident(e.containerPoint) ? 'pointer' : '';
    });
    this.resize();
    this.buildSprites();
    this.computeTransform();
  }

  // --- grids -----------------------------------------------------------------------------------

  setGrids(fc) {
    for (const k of Object.keys(this.layers)) this.layers[k].remove();
    this.grids.clear();
    const byLevel = { 1: [], 2: [], 3: [] };
    for (const f of fc.features || []) {
      const p = f.properties || {};
      if (!p.id) continue;
      const lvl = Number(p.level);
      const g = { id: String(p.id), level: lvl, parent: p.parent ?? null, name: p.name || p.id, population: p.population ?? null, feature: f, children: [] };
      g.bounds = L.geoJSON(f).getBounds();
      const c = labelPoint(f.geometry);
      g.lon = c[0]; g.lat = c[1];
      [g.u, g.v] = lonLatToUV(c[0], c[1]);
      this.grids.set(g.id, g);
      (byLevel[lvl] || byLevel[3]).push(f);
    }
    for (const g of this.grids.values()) if (g.parent && this.grids.has(g.parent)) this.grids.get(g.parent).children.push(g.id);
    const mk = (lvl, extra = {}) => L.geoJSON({ type: 'FeatureCollection', features: byLevel[lvl] }, {
      renderer: this.renderer, interactive: false, style: (f) => this.style(f, lvl, extra),
    }).addTo(this.map);
    this.layers = { l3: mk(3), l2: mk(2), glow: mk(1, { glow: true }), l1: mk(1) };
    this.labelsDirty = true;
  }

  style(f, lvl, extra) {
    const S = this.S;
    const id = String(f.properties.id);
    const inScope = !this.scopeSet || this.scopeSet.has(id);
    if (lvl === 1) {
      if (extra.glow) return { color: '#38bdf8', weight: 12 * S, opacity: inScope ? 0.14 : 0.05, fill: false };
      return { color: '#7dd3fc', weight: 3.5 * S, opacity: inScope ? 0.95 : 0.35, fill: false };
    }
    if (lvl === 2) {
      return { color: '#4fb3e8', weight: 2 * S, opacity: inScope ? 0.85 : 0.25, fill: !inScope, fillColor: '#020812', fillOpacity: inScope ? 0 : 0.45 };
    }
    const s = this.safety[id];
    const col = safetyColour(s?.colour);
    return {
      color: '#2f6f96', weight: 0.9 * S, opacity: inScope ? 0.9 : 0.3,
      fill: true, fillColor: col || '#15324b',
      fillOpacity: inScope ? (col ? SAFETY_FILL[String(s.colour).toLowerCase()] ?? 0.25 : 0.12) : 0.03,
    };
  }

  restyle() {
    for (const [k, layer] of Object.entries(this.layers)) {
      const lvl = k === 'l3' ? 3 : k === 'l2' ? 2 : 1;
      layer.setStyle((f) => this.style(f, lvl, { glow: k === 'glow' }));
    }
    this.labelsDirty = true; this.dirty = true;
  }

  setSafety(safety) {
    const next = safety || {};
    const sig = (o) => Object.entries(o).map(([k, v]) => k + ':' + (v?.colour || '')).sort().join(',');
    if (sig(next) === sig(this.safety)) { this.safety = next; return; }
    this.safety = next;
    if (this.layers.l3) this.layers.l3.setStyle((f) => this.style(f, 3, {}));
  }

  setScope(scope) {
    this.scope = scope;
    this.scopeSet = scope && this.grids.has(scope) ? this.subtree(scope) : null;
    this.restyle();
    this.userMoved = false;
    this.fit(false);
  }

  subtree(root) {
    const out = new Set([root]);
    const stack = [root];
    while (stack.length) for (const c of this.grids.get(stack.pop())?.children || []) { out.add(c); stack.push(c); }
    return out;
  }

  fit(animate = true) {
    let b = null;
    if (this.scope && this.grids.has(this.scope)) b = this.grids.get(this.scope).bounds;
    else for (const g of this.grids.values()) if (g.level === 1) b = b ? b.extend(g.bounds) : L.latLngBounds(g.bounds.getSouthWest(), g.bounds.getNorthEast());
    if (!b) return;
    const pad = Math.round(18 * this.S);
    this.map.fitBounds(b, { padding: [pad, pad], animate });
    this.userMoved = false;
  }

  // --- responders and incidents -----------------------------------------------------------------

  /** Rebuild the dots from the store (after a snapshot). */
  resetResponders() {
    this.dots.clear();
    const now = performance.now();
    for (const r of this.store.responders.values()) {
      const i = this.dots.slot(r.id);
      this.dots.st[i] = STATUS_CODE[r.status] ?? 0;
      this.dots.target(i, r.lon, r.lat, now, true);
    }
    this.dirty = true;
  }

  moveResponders(list) {
    const now = performance.now();
    for (const r of list) {
      const i = this.dots.slot(r.id);
      this.dots.st[i] = STATUS_CODE[r.status] ?? 0;
      this.dots.target(i, r.lon, r.lat, now, false);
    }
    this.animUntil = now + MOVE_MS + 50;
    this.dirty = true;
  }

  responderStatus(r) {
    if (!r) return;
    const i = this.dots.index.get(r.id);
    if (i !== undefined) { this.dots.st[i] = STATUS_CODE[r.status] ?? 0; this.dirty = true; }
  }

  incidentsChanged() { this.incDirty = true; this.dirty = true; }

  select(id) { this.selected = id; this.dirty = true; }

  toggleStatus(status) {
    if (this.hidden.has(status)) this.hidden.delete(status); else this.hidden.add(status);
    this.dirty = true;
    return !this.hidden.has(status);
  }

  /** Bring an incident into view, in the part of the map the open card does not cover. */
  panTo(inc) {
    if (inc?.lat == null) return;
    const p = this.map.latLngToContainerPoint([inc.lat, inc.lon]);
    const s = this.map.getSize();
    let right = s.x;
    const card = document.getElementById('card');
    if (card && !card.hidden) {
      const c = card.getBoundingClientRect();
      const m = this.map.getContainer().getBoundingClientRect();
      if (c.width && c.left > m.left) right = Math.min(right, c.left - m.left);
    }
    const edge = 40;
    if (p.x < edge || p.y < edge || p.x > right - edge || p.y > s.y - edge) {
      this.map.panBy([p.x - right / 2, p.y - s.y / 2]);
    }
  }

  // --- drawing ----------------------------------------------------------------------------------

  resize() {
    const s = this.map.getSize();
    const dpr = window.devicePixelRatio || 1;
    this.dpr = dpr;
    for (const c of [this.cLabels, this.cInc, this.cDyn]) {
      c.width = Math.round(s.x * dpr); c.height = Math.round(s.y * dpr);
      c.style.width = s.x + 'px'; c.style.height = s.y + 'px';
    }
    this.w = s.x; this.h = s.y;
    this.computeTransform();
    this.dirty = true; this.incDirty = this.incUrgent = true; this.labelsDirty = true;
  }

  computeTransform() {
    const m = this.map;
    const scale = m.options.crs.scale(m.getZoom());
    const o = m.getPixelOrigin();
    const lp = m.containerPointToLayerPoint([0, 0]);
    this.k = scale; this.ox = -o.x - lp.x; this.oy = -o.y - lp.y;
  }

  xy(u, v) { return [u * this.k + this.ox, v * this.k + this.oy]; }

  incXY(inc) {
    if (inc._lon !== inc.lon || inc._lat !== inc.lat) {
      inc._lon = inc.lon; inc._lat = inc.lat;
      if (inc.lon == null || inc.lat == null) { inc._u = null; return null; }
      [inc._u, inc._v] = lonLatToUV(inc.lon, inc.lat);
    }
    if (inc._u == null) return null;
    return [inc._u * this.k + this.ox, inc._v * this.k + this.oy];
  }

  needsDraw(now) {
    return this.dirty || this.incDirty || this.labelsDirty || now < this.animUntil || this.pulsing > 0;
  }

  /** Pre-rendered dot and marker images: blitting 2,000 sprites is far cheaper than 2,000 AA paths. */
  buildSprites() {
    const S = this.S, dpr = this.dpr;
    const mk = (sizeCss, paint) => {
      const c = document.createElement('canvas');
      const px = Math.ceil(sizeCss * dpr);
      c.width = c.height = px;
      const g = c.getContext('2d');
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      paint(g, sizeCss / 2);
      return { c, half: px / 2 };
    };
    const lw = Math.max(1, 0.9 * S);
    this.dotSprites = R_ORDER.map((status, i) => {
      const r = (i <= 1 ? 0.8 : 1) * 3.1 * S;
      return mk(2 * (r + lw) + 2, (g, h) => {
        g.beginPath(); g.arc(h, h, r, 0, Math.PI * 2);
        g.fillStyle = R_COLOURS[status]; g.fill();
        g.lineWidth = lw; g.strokeStyle = 'rgba(3,8,16,0.9)'; g.stroke();
      });
    });
    const diamond = (g, h, a) => { g.beginPath(); g.moveTo(h, h - a); g.lineTo(h + a, h); g.lineTo(h, h + a); g.lineTo(h - a, h); g.closePath(); };
    this.incSprites = {};
    for (const pr of [1, 2, 3, 4]) {
      const a = (pr === 1 ? 7.5 : pr === 2 ? 6.5 : 5.8) * S;
      this.incSprites[pr] = mk(2 * a + 4 * S, (g, h) => {
        diamond(g, h, a); g.fillStyle = P_COLOURS[pr]; g.fill();
        g.lineWidth = 1.4 * S; g.strokeStyle = 'rgba(5,10,18,0.95)'; g.stroke();
      });
      this.incSprites['h' + pr] = mk(2 * a + 4 * S, (g, h) => {
        diamond(g, h, a * 0.85); g.fillStyle = 'rgba(5,10,18,0.8)'; g.fill();
        g.lineWidth = 2 * S; g.strokeStyle = P_COLOURS[pr]; g.stroke();
      });
    }
    // escalation pulse: PULSE_STEPS pre-rendered rings per level (radius grows, alpha fades)
    this.pulseSprites = {};
    for (const lvl of [1, 2]) {
      this.pulseSprites[lvl] = [];
      for (let k = 0; k < PULSE_STEPS; k++) {
        const ph = k / PULSE_STEPS, rad = (7 + 16 * ph) * S;
        this.pulseSprites[lvl].push(mk(2 * 23 * S + 6 * S, (g, h) => {
          g.globalAlpha = 1 - ph; g.lineWidth = 2.2 * S; g.strokeStyle = LEVEL_RING[lvl];
          g.beginPath(); g.arc(h, h, rad, 0, Math.PI * 2); g.stroke();
        }));
      }
    }
    this.incSprites.overdue = mk(26 * S, (g, h) => {
      g.beginPath(); g.arc(h, h, 11 * S, 0, Math.PI * 2);
      g.lineWidth = 2.5 * S; g.strokeStyle = '#ff2d2d'; g.setLineDash([3 * S, 2.5 * S]); g.stroke();
    });
    this.incDirty = this.incUrgent = true; this.dirty = true;
  }

  draw(now) {
    if (this.labelsDirty) { this.drawLabels(); this.labelsDirty = false; }
    // Incident markers follow events at most ~7 times a second; view changes redraw them at once.
    if (this.incDirty && (this.incUrgent || now - this.incAt >= 150)) {
      this.drawIncidents(); this.incDirty = false; this.incUrgent = false; this.incAt = now;
    }
    if (this.dirty || now < this.animUntil || this.pulsing > 0) this.drawDynamic(now);
  }

  /** Every frame while anything moves: responder dots, escalation pulses, the selection. */
  drawDynamic(now) {
    this.dirty = false;
    const ctx = this.ctx, S = this.S, d = this.dots, dpr = this.dpr;
    const W = this.w * dpr, H = this.h * dpr;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const k = this.k * dpr, ox = this.ox * dpr, oy = this.oy * dpr, n = d.n, TAU = Math.PI * 2;
    const m = 10 * dpr;
    const sprites = this.dotSprites;
    // Draw in R_ORDER so busier states end up on top.
    for (let i = 0; i < n; i++) {
      if (!d.has[i]) { d.xs[i] = -1e9; continue; }
      let f = (now - d.t0[i]) / MOVE_MS;
      f = f < 0 ? 0 : f > 1 ? 1 : f;
      d.xs[i] = ((d.fu[i] + (d.tu[i] - d.fu[i]) * f) * k + ox) / dpr;
      d.ys[i] = ((d.fv[i] + (d.tv[i] - d.fv[i]) * f) * k + oy) / dpr;
    }
    for (let s = 0; s < R_ORDER.length; s++) {
      if (this.hidden.has(R_ORDER[s])) continue;
      const sp = sprites[s], img = sp.c, hh = sp.half;
      for (let i = 0; i < n; i++) {
        if (d.st[i] !== s) continue;
        const x = d.xs[i] * dpr, y = d.ys[i] * dpr;
        if (x < -m || y < -m || x > W + m || y > H + m) continue;
        // Whole device pixels: an unfiltered blit is ~20× cheaper than a resampled one in software
        // raster, and at walking speed a 1-px step is invisible from across the room.
        ctx.drawImage(img, (x - hh + 0.5) | 0, (y - hh + 0.5) | 0);
      }
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    // escalated incidents pulse (level 2 amber, level 1 red), all in phase like an alarm light
    this.pulsing = this.pulses[1].length + this.pulses[2].length;
    if (this.pulsing) {
      const sp = (lvl) => this.pulseSprites[lvl][Math.floor(((now % PULSE_MS) / PULSE_MS) * PULSE_STEPS)];
      const dx = (this.ox - this.incOx) * dpr, dy = (this.oy - this.incOy) * dpr; // panned since the incident pass
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      for (const lvl of [2, 1]) {
        const pts = this.pulses[lvl], s1 = sp(lvl);
        for (let j = 0; j < pts.length; j += 2) {
          ctx.drawImage(s1.c, (pts[j] * dpr + dx - s1.half + 0.5) | 0, (pts[j + 1] * dpr + dy - s1.half + 0.5) | 0);
        }
      }
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    }
    // selection: a crosshair on the incident, a dashed line to its responder
    const sel = this.selected && this.store.incident(this.selected);
    const p = sel && this.incXY(sel);
    if (p) {
      const [x, y] = p, a = 14 * S;
      ctx.lineWidth = 2 * S; ctx.strokeStyle = '#ffffff';
      ctx.beginPath(); ctx.arc(x, y, a, 0, TAU);
      ctx.moveTo(x - a - 6 * S, y); ctx.lineTo(x - a + 4 * S, y); ctx.moveTo(x + a - 4 * S, y); ctx.lineTo(x + a + 6 * S, y);
      ctx.moveTo(x, y - a - 6 * S); ctx.lineTo(x, y - a + 4 * S); ctx.moveTo(x, y + a - 4 * S); ctx.lineTo(x, y + a + 6 * S);
      ctx.stroke();
      const i = sel.responder ? d.index.get(sel.responder) : undefined;
      if (i !== undefined && d.has[i]) {
        ctx.setLineDash([4 * S, 4 * S]); ctx.strokeStyle = 'rgba(255,255,255,0.75)';
        ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(d.xs[i], d.ys[i]); ctx.stroke(); ctx.setLineDash([]);
        ctx.beginPath(); ctx.arc(d.xs[i], d.ys[i], 6 * S, 0, TAU); ctx.stroke();
      }
    }
  }

  /** When incidents or the view change: the incident markers (their own canvas). */
  drawIncidents() {
    const ctx = this.ctxI, dpr = this.dpr, w = this.w, h = this.h;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, w * dpr, h * dpr);
    this.incOx = this.ox; this.incOy = this.oy;
    const pulses = { 1: [], 2: [] };
    const byP = { 1: [], 2: [], 3: [], 4: [] };
    const overdue = [];
    for (const inc of this.store.incidents.values()) {
      const p = this.incXY(inc);
      if (!p || p[0] < -40 || p[1] < -40 || p[0] > w + 40 || p[1] > h + 40) continue;
      const pr = inc.priority >= 1 && inc.priority <= 4 ? inc.priority : 3;
      byP[pr].push(p[0], p[1], inc.status === 'resolved' ? 1 : 0);
      if (inc.level < 3) pulses[inc.level === 1 ? 1 : 2].push(p[0], p[1]);
      if (inc.overdue) overdue.push(p[0], p[1]);
    }
    this.pulses = pulses;
    const blit = (sp, x, y) => ctx.drawImage(sp.c, Math.round(x * dpr - sp.half), Math.round(y * dpr - sp.half));
    for (let j = 0; j < overdue.length; j += 2) blit(this.incSprites.overdue, overdue[j], overdue[j + 1]);
    for (const pr of [4, 3, 2, 1]) {
      const a = byP[pr];
      for (let j = 0; j < a.length; j += 3) blit(a[j + 2] ? this.incSprites['h' + pr] : this.incSprites[pr], a[j], a[j + 1]);
    }
  }

  drawLabels() {
    const ctx = this.ctxL, S = this.S;
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.clearRect(0, 0, this.w, this.h);
    if (!this.grids.size) return;
    const inScope = (g) => !this.scopeSet || this.scopeSet.has(g.id);
    // Show basic-grid names once basic grids are big enough on screen, village names otherwise.
    let sum = 0, cnt = 0;
    for (const g of this.grids.values()) {
      if (g.level !== 3 || !inScope(g)) continue;
      const a = this.map.latLngToContainerPoint(g.bounds.getSouthWest());
      const b = this.map.latLngToContainerPoint(g.bounds.getNorthEast());
      g._pw = Math.abs(b.x - a.x); g._ph = Math.abs(b.y - a.y);
      sum += g._pw; cnt++;
    }
    const basic = cnt && sum / cnt > 120 * S;
    ctx.textAlign = 'center'; ctx.textBaseline = 'middle'; ctx.lineJoin = 'round';
    for (const g of this.grids.values()) {
      if (!inScope(g)) continue;
      if (basic ? g.level !== 3 : g.level !== 2) continue;
      const [x, y] = this.xy(g.u, g.v);
      if (x < -50 || y < -20 || x > this.w + 50 || y > this.h + 20) continue;
      const size = (g.level === 2 ? 15 : 12) * S;
      ctx.font = `${g.level === 2 ? 700 : 500} ${size}px ${FONT}`;
      if (g.level === 3 && ctx.measureText(g.name).width > g._pw * 0.95) continue;
      ctx.lineWidth = 3.5 * S; ctx.strokeStyle = 'rgba(3,9,18,0.92)';
      ctx.strokeText(g.name, x, y);
      ctx.fillStyle = g.level === 2 ? 'rgba(226,240,255,0.95)' : 'rgba(190,214,236,0.9)';
      ctx.fillText(g.name, x, y);
    }
  }

  // --- picking ----------------------------------------------------------------------------------

  hitIncident(pt) {
    let best = null, bd = (14 * this.S) ** 2;
    for (const inc of this.store.incidents.values()) {
      const p = this.incXY(inc);
      if (!p) continue;
      const dd = (p[0] - pt.x) ** 2 + (p[1] - pt.y) ** 2;
      if (dd < bd || (dd === bd && best && inc.priority < best.priority)) { bd = dd; best = inc; }
    }
    return best;
  }

  hitResponder(pt) {
    const d = this.dots;
    let best = -1, bd = (8 * this.S) ** 2;
    for (let i = 0; i < d.n; i++) {
      if (!d.has[i] || this.hidden.has(R_ORDER[d.st[i]])) continue;
      const dd = (d.xs[i] - pt.x) ** 2 + (d.ys[i] - pt.y) ** 2;
      if (dd < bd) { bd = dd; best = i; }
    }
    return best >= 0 ? this.store.responder(d.ids[best]) : null;
  }

  click(e) {
    const inc = this.hitIncident(e.containerPoint);
    if (inc) { this.onIncidentClick?.(inc.id); return; }
    const r = this.hitResponder(e.containerPoint);
    if (r) { this.onResponderClick?.(r, e.latlng); return; }
    this.onIncidentClick?.(null);
  }

  /** Where an incident is on screen (container pixels), for tests and tooling. */
  incidentPoint(id) {
    const inc = this.store.incident(id);
    const p = inc && this.incXY(inc);
    return p ? { x: p[0], y: p[1] } : null;
  }
}

/** A point to write a polygon's name at: area centroid of its largest outer ring. */
function labelPoint(geom) {
  const rings = geom.type === 'Polygon' ? [geom.coordinates[0]] : geom.type === 'MultiPolygon' ? geom.coordinates.map((p) => p[0]) : [];
  let best = null, bestA = -1;
  for (const ring of rings) {
    let a = 0, cx = 0, cy = 0;
    for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
      const f = ring[j][0] * ring[i][1] - ring[i][0] * ring[j][1];
      a += f; cx += (ring[j][0] + ring[i][0]) * f; cy += (ring[j][1] + ring[i][1]) * f;
    }
    if (Math.abs(a) > bestA) {
      bestA = Math.abs(a);
      best = a ? [cx / (3 * a), cy / (3 * a)] : ring[0];
    }
  }
  return best || [0, 0];
}
