// The incident card (details + full timeline), the operator action dialogs, and toasts.

import { t, catName, STATUS, LEVEL_LONG, REASON, SOURCE, PRIORITY, KIND, DEPARTMENTS, deptName, distText, fullTime, hms, sentence, lang, errorText } from './i18n.js';
import { el, clear, haversine, ms } from './util.js';

const $ = (id) => document.getElementById(id);

// --- toasts ------------------------------------------------------------------------------------

export function toast(text, kind = 'info', timeout = kind === 'error' ? 9000 : 4000) {
  const box = $('toasts');
  const e = el('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
  box.prepend(e);
  while (box.children.length > 5) box.lastChild.remove();
  setTimeout(() => { e.classList.add('gone'); setTimeout(() => e.remove(), 400); }, timeout);
  return e;
}

// --- card --------------------------------------------------------------------------------------

export class IncidentCard {
  /**
   * @param {object} o {store, grids, api(path) → Promise<Response>, conn, canAct, onSelect(id|null)}
   */
  constructor(o) {
    Object.assign(this, o);
    this.id = null;
    this.timeline = [];
    this.timelineState = 'idle';
    this.box = $('card');
    this.dialog = $('dialog');
    this.box.addEventListener('click', (e) => {
      if (e.target.closest('.close-card')) this.close();
      const a = e.target.closest('[data-action]');
      if (a && !a.disabled) this.action(a.dataset.action);
    });
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && !this.dialog.open) this.close(); });
  }

  ctx() {
    return { incident: (id) => this.store.incident(id), responder: (id) => this.store.responder(id), grid: (id) => this.grids.get(id) };
  }

  async open(id) {
    this.id = id;
    this.timeline = [];
    this.timelineState = 'loading';
    this.onSelect(id);
    this.render();
    this.box.hidden = false;
    try {
      const res = await this.api(`/api/incidents/${encodeURIComponent(id)}`);
      if (this.id !== id) return;
      if (!res.ok) throw new Error(await problem(res));
      const obj = await res.json();
      if (this.id !== id) return;
      this.timeline = Array.isArray(obj.timeline) ? obj.timeline : [];
      this.store.mergeIncident(obj);
      this.timelineState = 'ok';
    } catch (e) {
      if (this.id !== id) return;
      this.timelineState = 'error';
      this.timelineError = e.message;
    }
    this.render();
  }

  close() {
    if (!this.id) return;
    this.id = null;
    this.box.hidden = true;
    this.onSelect(null);
  }

  /** A live event: append it to the open card's timeline. */
  event(ev) {
    if (!this.id || ev.incident !== this.id) return;
    if (this.timelineState === 'ok' && !this.timeline.some((x) => x.seq === ev.seq)) this.timeline.push(ev);
    this.render();
  }

  refresh() { if (this.id) this.render(); }

  render() {
    const inc = this.store.incident(this.id);
    const box = clear(this.box);
    if (!inc) { box.append(el('div', { class: 'card-head' }, el('b', { text: this.id }), closeBtn())); return; }
    const g = (lvl) => this.grids.get(inc.grids?.[String(lvl)])?.name || inc.grids?.[String(lvl)] || '—';
    const resp = inc.responder ? this.store.responder(inc.responder) : null;
    const isOpen = inc.status !== 'closed';
    box.append(
      el('div', { class: 'card-head' },
        el('span', { class: `pbadge p${inc.priority}`, text: PRIORITY[inc.priority] || `P${inc.priority}` }),
        el('span', { class: 'title' }, el('b', { text: catName(inc.category) }), el('small', { text: inc.id })),
        closeBtn()),
      el('div', { class: 'card-status' },
        el('span', { class: `status st-${inc.status}`, text: STATUS[inc.status] || inc.status }),
        el('span', { class: `lvlbadge lvl${inc.level}`, text: LEVEL_LONG[inc.level] }),
        inc.overdue ? el('span', { class: 'status st-overdue', text: t('overdue') }) : null,
        isOpen && inc.deadline ? el('span', { class: 'cd', dataset: { deadline: inc.deadline, overdue: inc.overdue ? '1' : '' } }) : null),
      el('dl', { class: 'facts' },
        ...fact(t('card_grid'), `${g(2)} · ${g(3)}`),
        ...fact(t('card_reported'), `${fullTime(ms(inc.reported_at))} · ${SOURCE[inc.source] || inc.source || ''}`),
        ...fact(t('card_deadline'), inc.deadline ? fullTime(ms(inc.deadline)) : '—'),
        ...fact(t('card_responder'), resp ? `${KIND[resp.kind] || ''} ${resp.name}${resp.phone ? ' · ' + resp.phone : ''}` : (inc.responder || t('none'))),
        ...(inc.department ? fact(t('card_department'), deptName(inc.department)) : []),
        ...(inc.description ? fact(t('card_desc'), inc.description) : []),
        ...(inc.escalations?.length ? fact(t('card_escalations'), inc.escalations.map((e) => `${e.from_level}→${e.to_level} ${REASON[e.reason] || e.reason}`).join('，')) : [])),
      this.canAct() ? el('div', { class: 'actions' },
        actBtn('assign', t('act_assign'), !isOpen || inc.status === 'resolved'),
        actBtn('transfer', t('act_transfer'), !isOpen || inc.status === 'resolved'),
        actBtn('escalate', t('act_escalate'), !isOpen || inc.level <= 1 || inc.status === 'resolved'),
        actBtn('close', t('act_close'), !isOpen),
        actBtn('reopen', t('act_reopen'), isOpen)) : null,
      el('h3', { text: t('card_timeline') }),
      this.renderTimeline(),
    );
  }

  renderTimeline() {
    const ol = el('ol', { class: 'timeline' });
    if (this.timelineState === 'loading') ol.append(el('li', { class: 'muted', text: t('card_loading') }));
    if (this.timelineState === 'error') ol.append(el('li', { class: 'muted err', text: t('card_timeline_fail', { msg: this.timelineError }) }));
    const ctx = this.ctx();
    const evs = [...this.timeline].sort((a, b) => (a.seq ?? 0) - (b.seq ?? 0));
    for (const ev of evs) {
      const s = sentence(ev, ctx);
      ol.append(el('li', { class: ev.type.replace('.', '-') }, el('time', { text: hms(ms(ev.at)) }), el('span', { text: s.text })));
    }
    return ol;
  }

  // --- actions ----------------------------------------------------------------------------------

  action(kind) {
    const inc = this.store.incident(this.id);
    if (!inc) return;
    if (kind === 'assign') this.assignDialog(inc);
    else if (kind === 'transfer') this.transferDialog(inc);
    else if (kind === 'escalate') this.confirmDialog(inc, 'escalate', t('dlg_escalate'), false);
    else if (kind === 'close') this.confirmDialog(inc, 'close', t('dlg_close'), true);
    else if (kind === 'reopen') this.confirmDialog(inc, 'reopen', t('dlg_reopen'), true);
  }

  showDialog(title, body, footer) {
    const d = clear(this.dialog);
    d.append(el('h2', { text: title }), body, el('div', { class: 'dlg-foot' }, ...footer,
      el('button', { type: 'button', class: 'btn ghost', onclick: () => d.close(), text: t('dlg_cancel') })));
    if (!d.open) d.showModal();
  }

  async assignDialog(inc) {
    const body = el('div', { class: 'cands' }, el('div', { class: 'muted', text: t('card_loading') }));
    this.showDialog(`${t('dlg_assign')} · ${catName(inc.category)}`, body, []);
    let list = null, source = 'server';
    try {
      const res = await this.api(`/api/incidents/${encodeURIComponent(inc.id)}/candidates`);
      if (res.status === 200) {
        const data = await res.json();
        const arr = Array.isArray(data) ? data : data.candidates;
        if (Array.isArray(arr)) list = arr.map((c) => ({ r: c.responder, d: c.distance_m }));
      }
    } catch { /* fall back */ }
    if (!list) { list = this.localCandidates(inc); source = 'local'; }
    clear(body);
    body.append(el('div', { class: 'muted small', text: source === 'server' ? t('dlg_assign_server') : t('dlg_assign_local') }));
    if (!list.length) body.append(el('div', { class: 'empty', text: t('dlg_assign_none') }));
    for (const { r, d } of list.slice(0, 12)) {
      const full = this.store.responder(r.id) || r;
      const home = this.grids.get(full.home_grid)?.name || full.home_grid || '';
      body.append(el('button', {
        type: 'button', class: 'cand', dataset: { responder: r.id },
        onclick: () => { this.dialog.close(); this.send(inc, 'assign', { responder: r.id }, `${t('act_assign')} ${full.name || r.id}`); },
      }, el('span', { class: 'name', text: `${full.kind === 'department' && full.department ? deptName(full.department) : (KIND[full.kind] || '')} ${full.name || r.id}` }),
      el('span', { class: 'home', text: home }),
      el('span', { class: 'dist', text: distText(d) })));
    }
  }

  /** Nearest available responders with the skill, from the incident's pool outward (approximation). */
  localCandidates(inc) {
    const poolRoot = inc.grids?.[String(inc.level)] || null;
    const inPool = (r) => {
      if (!poolRoot) return true;
      let g = r.home_grid;
      for (let i = 0; i < 5 && g; i++) { if (g === poolRoot) return true; g = this.grids.get(g)?.parent; }
      return false;
    };
    const skilled = (r) => !r.skills || r.skills.includes('*') || r.skills.includes(inc.category);
    const out = [], outside = [];
    for (const r of this.store.responders.values()) {
      if (r.status !== 'available' || r.lon == null || r.lat == null || !skilled(r)) continue;
      const d = inc.lon != null ? haversine(inc.lon, inc.lat, r.lon, r.lat) : null;
      (inPool(r) ? out : outside).push({ r, d });
    }
    const by = (a, b) => (a.d ?? Infinity) - (b.d ?? Infinity) || String(a.r.id).localeCompare(String(b.r.id));
    out.sort(by); outside.sort(by);
    return out.length >= 5 ? out : [...out, ...outside.slice(0, 12 - out.length)];
  }

  transferDialog(inc) {
    const body = el('div', { class: 'depts' });
    // Only the departments the town's roster has (a transfer to any other is refused).
    const known = this.store.departments;
    const depts = known == null ? DEPARTMENTS : known.map(
      (code) => DEPARTMENTS.find((d) => d[0] === code) || [code, code, code],
    );
    for (const [code, zh, en] of depts) {
      body.append(el('button', {
        type: 'button', class: `dept${inc.department === code ? ' current' : ''}`, dataset: { department: code },
        onclick: () => { this.dialog.close(); this.send(inc, 'transfer', { department: code }, `${t('act_transfer')} ${lang === 'en' ? en : zh}`); },
      }, el('b', { text: lang === 'en' ? en : zh }), el('small', { text: lang === 'en' ? zh : en })));
    }
    this.showDialog(`${t('dlg_transfer')} · ${catName(inc.category)}`, body, []);
  }

  confirmDialog(inc, type, title, withNote) {
    const note = withNote ? el('textarea', { rows: '3', placeholder: t('dlg_note_ph'), maxlength: '500' }) : null;
    const body = el('div', { class: 'confirm' }, el('p', { text: `${catName(inc.category)} · ${inc.id}` }), note);
    const ok = el('button', {
      type: 'button', class: `btn ${type === 'escalate' ? 'warn' : 'primary'}`, text: t('dlg_confirm'),
      onclick: () => {
        this.dialog.close();
        const f = {};
        if (note && note.value.trim()) f.note = note.value.trim();
        this.send(inc, type, f, t(`act_${type}`));
      },
    });
    this.showDialog(title, body, [ok]);
    (note || ok).focus();
  }

  async send(inc, type, fields, what) {
    const pending = toast(`${what} · ${t('toast_sent')}`, 'pending', 12000);
    try {
      await this.conn.command(type, { incident: inc.id, ...fields });
      pending.remove();
      toast(t('toast_ok', { what }), 'ok');
    } catch (e) {
      pending.remove();
      const msg = e.server ? e.message : e.code === 'timeout' ? t('toast_timeout') : e.code === 'offline' ? t('toast_offline') : t('toast_lost');
      toast(t('toast_err', { msg: e.server && e.code ? errorText(e.code, msg) : msg }), 'error');
    }
  }
}

function fact(k, v) { return [el('dt', { text: k }), el('dd', { text: v })]; }
function closeBtn() { return el('button', { type: 'button', class: 'close-card', 'aria-label': 'close', text: '×' }); }
function actBtn(action, label, disabled) { return el('button', { type: 'button', class: `btn act-${action}`, dataset: { action }, disabled, text: label }); }

async function problem(res) {
  try {
    const j = await res.json();
    if (j.code) return errorText(j.code, j.detail || j.title);
    return j.detail || j.title || j.message || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}
