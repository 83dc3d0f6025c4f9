// The side panels: KPIs, open cases by level, medians, top categories, hotspots, safety index,
// escalation queue (with live countdowns), event ticker, map legend.

import { t, catName, dur, countdown, hm, LEVEL_SHORT, LEVEL_LONG, REASON, STATUS, R_STATUS, PRIORITY, sentence, deptName } from './i18n.js';
import { el, clear, pct, num, ms } from './util.js';
import { escalationQueue } from './state.js';
import { R_COLOURS, R_ORDER, P_COLOURS, safetyColour } from './map.js';

const $ = (id) => document.getElementById(id);
const SEVERITY = { red: 4, orange: 3, yellow: 2, blue: 1 };
const TARGET_L32 = 0.99;
const TICKER_ROWS = 40;

export class Panels {
  constructor({ store, grids, onOpenIncident, onToggleStatus, clockSkew }) {
    this.store = store;
    this.grids = grids; // Map id → grid (from MapView)
    this.onOpenIncident = onOpenIncident;
    this.onToggleStatus = onToggleStatus;
    this.clockSkew = clockSkew; // () => ms to add to Date.now() for server time
    this.scopeSet = null;
    this.tickerSeq = -1;
    $('queue').addEventListener('click', (e) => this.clickRow(e));
    $('ticker').addEventListener('click', (e) => this.clickRow(e));
    $('legend').addEventListener('click', (e) => {
      const b = e.target.closest('[data-status]');
      if (b) b.classList.toggle('off', !this.onToggleStatus(b.dataset.status));
    });
  }

  clickRow(e) {
    const row = e.target.closest('[data-incident]');
    if (row) this.onOpenIncident(row.dataset.incident);
  }

  setScope(scopeSet) { this.scopeSet = scopeSet; }

  ctx() {
    return {
      incident: (id) => this.store.incident(id),
      responder: (id) => this.store.responder(id),
      grid: (id) => this.grids.get(id),
    };
  }

  gridName(id) { return this.grids.get(id)?.name || id || ''; }

  // --- KPIs ------------------------------------------------------------------------------------

  renderStats() {
    const st = this.store.stats || {};
    const k = st.kpi || {};
    const l32 = k.share_closed_l32;
    const box = $('kpi-l32');
    box.querySelector('.big').textContent = pct(l32, 2);
    const ok = l32 == null ? null : l32 >= TARGET_L32;
    box.classList.toggle('good', ok === true);
    box.classList.toggle('bad', ok === false);
    const delta = l32 == null ? '' : `${l32 >= TARGET_L32 ? '+' : ''}${((l32 - TARGET_L32) * 100).toFixed(2)} pt`;
    box.querySelector('.delta').textContent = delta;
    // bar on a 90–100 % scale, target tick at 99 %
    const pos = (x) => Math.max(0, Math.min(1, (x - 0.9) / 0.1)) * 100;
    box.querySelector('.bar i').style.width = (l32 == null ? 0 : pos(l32)) + '%';
    box.querySelector('.bar b').style.left = pos(TARGET_L32) + '%';

    const rates = [
      ['kpi_on_time', k.on_time_rate], ['kpi_closure', k.closure_rate],
      ['kpi_on_spot', k.share_handled_on_spot], ['kpi_rework', k.rework_rate],
    ];
    const r = clear($('kpi-rates'));
    for (const [key, v] of rates) {
      r.append(el('div', { class: 'tile' }, el('span', { class: 'lbl', text: t(key) }), el('span', { class: 'val', text: pct(v, 1) })));
    }
    const c = clear($('kpi-counts'));
    for (const [key, v] of [['kpi_reported', k.reported], ['kpi_due', k.due], ['kpi_closed', k.closed]]) {
      c.append(el('div', { class: 'tile small' }, el('span', { class: 'lbl', text: t(key) }), el('span', { class: 'val', text: num(v) })));
    }
    const med = k.median_s || {};
    const m = clear($('medians'));
    for (const [key, v] of [['m_offer', med.offer], ['m_accept', med.accept], ['m_arrive', med.arrive], ['m_resolve', med.resolve]]) {
      m.append(el('div', { class: 'tile' }, el('span', { class: 'lbl', text: t(key) }), el('span', { class: 'val', text: dur(v) })));
    }
    this.renderTop(st);
    this.renderHotspots(st);
    this.renderSafety(st);
  }

  renderOpenByLevel() {
    const by = { 3: 0, 2: 0, 1: 0 };
    for (const inc of this.store.incidents.values()) by[inc.level] = (by[inc.level] || 0) + 1;
    const box = clear($('open-levels'));
    for (const lvl of [3, 2, 1]) {
      box.append(el('div', { class: `tile lvl${lvl}${lvl === 1 && by[1] ? ' alert' : ''}` },
        el('span', { class: 'lbl', text: LEVEL_LONG[lvl] }), el('span', { class: 'val', text: num(by[lvl]) })));
    }
  }

  renderTop(st) {
    const list = (st.top_categories || []).slice(0, 6);
    const box = clear($('topcats'));
    if (!list.length) { box.append(el('div', { class: 'empty', text: t('topcats_none') })); return; }
    const max = Math.max(...list.map((x) => x.count || 0), 1);
    list.forEach((x, i) => {
      box.append(el('div', { class: 'barrow' },
        el('span', { class: 'rank', text: String(i + 1) }),
        el('span', { class: 'name', text: catName(x.category) || x.name }),
        el('span', { class: 'bar' }, el('i', { style: `width:${(100 * (x.count || 0)) / max}%` })),
        el('span', { class: 'count', text: num(x.count) })));
    });
  }

  renderHotspots(st) {
    const list = (st.hotspots || []).slice(0, 5);
    const box = clear($('hotspots'));
    if (!list.length) { box.append(el('div', { class: 'empty', text: t('hotspots_none') })); return; }
    for (const h of list) {
      box.append(el('div', { class: 'hotrow' },
        el('span', { class: 'name', text: h.name || this.gridName(h.grid) }),
        el('span', { class: 'count', text: num(h.count) }),
        el('span', { class: 'base', text: `${t('hotspot_base')} ${h.baseline == null ? '—' : Number(h.baseline).toFixed(1)}` }),
        el('span', { class: 'score', text: h.score == null ? '' : `×${Number(h.score).toFixed(1)}` })));
    }
  }

  renderSafety(st) {
    const safety = st.safety || {};
    const counts = { blue: 0, yellow: 0, orange: 0, red: 0, none: 0 };
    const rows = [];
    for (const [id, s] of Object.entries(safety)) {
      const g = this.grids.get(id);
      if (g && g.level !== 3) continue;
      if (this.scopeSet && !this.scopeSet.has(id)) continue;
      const c = String(s?.colour || '').toLowerCase();
      if (c in SEVERITY) { counts[c]++; rows.push({ id, s, c }); } else counts.none++;
    }
    const en = document.documentElement.lang === 'en';
    const lg = clear($('safety-legend'));
    const own = safety[st.scope || this.store.scope];
    if (own?.score != null) {
      lg.append(el('span', { class: `chip own s-${String(own.colour || 'none').toLowerCase()}` }, el('i'),
        `${this.gridName(st.scope || this.store.scope)} ${Number(own.score).toFixed(1)}`));
    }
    const names = { red: ['红', 'red'], orange: ['橙', 'orange'], yellow: ['黄', 'yellow'], blue: ['蓝', 'blue'] };
    for (const c of ['red', 'orange', 'yellow', 'blue']) {
      lg.append(el('span', { class: `chip s-${c}${counts[c] ? '' : ' zero'}` }, el('i'), `${names[c][en ? 1 : 0]} ${counts[c]}`));
    }
    lg.append(el('span', { class: 'chip s-none' }, el('i'), `${t('safety_ok')} ${counts.none}`));
    rows.sort((a, b) => (SEVERITY[b.c] || 0) - (SEVERITY[a.c] || 0)
      || (a.s?.score ?? 100) - (b.s?.score ?? 100) || String(a.id).localeCompare(String(b.id)));
    const box = clear($('safety-list'));
    for (const r of rows.slice(0, 8)) {
      box.append(el('span', { class: 'srow', style: `--c:${safetyColour(r.c) || '#445'}` },
        el('i'), el('span', { class: 'name', text: this.gridName(r.id) }),
        el('span', { class: 'score', text: r.s?.score == null ? '' : Number(r.s.score).toFixed(1) })));
    }
    if (!rows.length) box.append(el('span', { class: 'empty', text: t('safety_none') }));
  }

  // --- escalation queue ------------------------------------------------------------------------

  renderQueue() {
    const q = escalationQueue(this.store);
    $('queue-count').textContent = String(q.length);
    const box = clear($('queue'));
    if (!q.length) { box.append(el('div', { class: 'empty big', text: t('queue_empty') })); return; }
    const rowH = rem() * 3.5;
    let maxRows = Math.max(3, Math.floor(box.clientHeight / rowH) || 12);
    if (q.length > maxRows) maxRows = Math.max(2, Math.floor((box.clientHeight - rem() * 1.3) / rowH));
    for (const inc of q.slice(0, maxRows)) {
      const esc = this.store.lastEscalation.get(inc.id) || inc.escalations?.[inc.escalations.length - 1];
      const g3 = this.gridName(inc.grids?.['3']);
      const g2 = this.gridName(inc.grids?.['2']);
      box.append(el('div', { class: `qrow lvl${inc.level}${inc.overdue ? ' overdue' : ''}`, dataset: { incident: inc.id } },
        el('span', { class: 'lvl', text: LEVEL_SHORT[inc.level] }),
        el('span', { class: 'main' },
          el('span', { class: 'cat' }, el('i', { class: `p p${inc.priority}` }), catName(inc.category)),
          el('span', { class: 'where', text: g2 && g3 && !g3.startsWith(g2) ? `${g2} · ${g3}` : g3 })),
        el('span', { class: 'side' },
          el('span', { class: 'cd', dataset: { deadline: inc.deadline ?? '', overdue: inc.overdue ? '1' : '' } }),
          el('span', { class: 'why', text: [REASON[esc?.reason] || esc?.reason, inc.department ? deptName(inc.department) : STATUS[inc.status]].filter(Boolean).join(' · ') }))));
    }
    if (q.length > maxRows) box.append(el('div', { class: 'more', text: t('more', { n: q.length - maxRows }) }));
    this.tickCountdowns();
  }

  /** Once a second: every [data-deadline] element shows the time left (or overdue, in red). */
  tickCountdowns() {
    const now = Date.now() + this.clockSkew();
    for (const e of document.querySelectorAll('[data-deadline]')) {
      const d = ms(e.dataset.deadline);
      if (d == null) { e.textContent = '—'; continue; }
      const left = d - now;
      const over = left < 0 || e.dataset.overdue === '1';
      e.textContent = over ? `${t('overdue')} ${countdown(left)}` : `${t('remaining')} ${countdown(left)}`;
      e.classList.toggle('over', over);
      e.classList.toggle('soon', !over && left < 15 * 60 * 1000);
      e.closest('.qrow')?.classList.toggle('overdue', over);
    }
  }

  // --- ticker ----------------------------------------------------------------------------------

  /** Add ticker rows for events newer than the last rendered; `full` rebuilds the list. */
  renderTicker(full = false) {
    const box = $('ticker');
    const items = this.store.ticker;
    if (full) { clear(box); this.tickerSeq = -1; }
    const fresh = items.filter((x) => x.seq > this.tickerSeq).slice(-TICKER_ROWS);
    if (!fresh.length) {
      if (!box.firstChild) box.append(el('div', { class: 'empty', text: t('ticker_empty') }));
      return;
    }
    box.querySelector('.empty')?.remove();
    const ctx = this.ctx();
    const frag = document.createDocumentFragment();
    const animate = !full && fresh.length < 8;
    for (let i = fresh.length - 1; i >= 0; i--) {
      const { ev, at } = fresh[i];
      const s = sentence(ev, ctx);
      const inc = this.store.incident(ev.incident);
      frag.append(el('div', { class: `trow ${ev.type.replace('.', '-')}${animate ? ' fresh' : ''}`, dataset: { incident: ev.incident || '', seq: String(ev.seq) } },
        el('span', { class: 'time', text: hm(at) }),
        el('i', { class: `p p${inc?.priority ?? 3}` }),
        el('span', { class: 'text' }, s.text, s.tail ? el('span', { class: 'tail', text: ` · ${s.tail}` }) : null)));
    }
    box.prepend(frag);
    this.tickerSeq = items[items.length - 1].seq;
    while (box.children.length > TICKER_ROWS) box.lastChild.remove();
  }

  // --- legend ----------------------------------------------------------------------------------

  renderLegend(hidden) {
    const counts = Object.fromEntries(R_ORDER.map((s) => [s, 0]));
    for (const r of this.store.responders.values()) if (r.status in counts) counts[r.status]++;
    const pc = { 1: 0, 2: 0, 3: 0, 4: 0 };
    for (const inc of this.store.incidents.values()) pc[inc.priority] = (pc[inc.priority] || 0) + 1;
    const box = clear($('legend'));
    const rs = el('div', { class: 'lg-group' }, el('div', { class: 'lg-title', text: t('legend_responders') }));
    for (const s of ['available', 'offered', 'assigned', 'on_scene', 'off_duty', 'offline']) {
      rs.append(el('button', { class: `lg-item${hidden.has(s) ? ' off' : ''}`, dataset: { status: s }, type: 'button' },
        el('i', { class: 'dot', style: `background:${R_COLOURS[s]}` }), el('span', { text: R_STATUS[s] }), el('b', { text: num(counts[s]) })));
    }
    const is = el('div', { class: 'lg-group' }, el('div', { class: 'lg-title', text: t('legend_incidents') }));
    for (const p of [1, 2, 3, 4]) {
      is.append(el('span', { class: 'lg-item' }, el('i', { class: 'dia', style: `background:${P_COLOURS[p]}` }), el('span', { text: PRIORITY[p] }), el('b', { text: num(pc[p]) })));
    }
    is.append(el('span', { class: 'lg-item' }, el('i', { class: 'ring' }), el('span', { text: document.documentElement.lang === 'en' ? 'escalated' : '升级' })));
    box.append(rs, is);
  }
}

function rem() { return parseFloat(getComputedStyle(document.documentElement).fontSize) || 18; }
