// The screen's picture of its scope: a snapshot folded with every event in seq order, exactly as
// docs/protocol.md describes. No DOM here.

import { ms } from './util.js';

const CLOSED_KEEP = 400; // closed incidents kept (for the ticker, cards and reopen)
const TICKER_KEEP = 200;

export class Store {
  constructor() {
    this.listeners = new Set();
    this.ticker = [];          // newest last: {seq, type, at, incident, ev}
    this.snapshots = 0;
    this.eventsApplied = 0;
    this.duplicates = 0;
    this.reset();
  }

  reset() {
    this.scope = null;
    this.lastSeq = null;
    this.incidents = new Map();   // open incidents (status != closed)
    this.closed = new Map();      // recently closed (insertion order = LRU)
    this.responders = new Map();
    this.stats = null;
    this.lastEscalation = new Map(); // incident id → {reason, from_level, to_level, at}
    this.departments = null;      // codes the town's roster has (snapshot), null: not told
  }

  on(fn) { this.listeners.add(fn); return () => this.listeners.delete(fn); }
  emit(what) { for (const fn of this.listeners) fn(what); }

  incident(id) { return this.incidents.get(id) || this.closed.get(id) || null; }
  responder(id) { return this.responders.get(id) || null; }

  loadSnapshot(msg) {
    this.reset();
    this.snapshots++;
    this.scope = msg.scope ?? null;
    this.lastSeq = typeof msg.seq === 'number' ? msg.seq : null;
    this.departments = Array.isArray(msg.departments) ? msg.departments : null;
    for (const inc of msg.incidents || []) {
      const x = normaliseIncident(inc);
      if (x.status === 'closed') this.rememberClosed(x); else this.incidents.set(x.id, x);
      const last = x.escalations?.[x.escalations.length - 1];
      if (last) this.lastEscalation.set(x.id, last);
    }
    for (const r of msg.responders || []) this.responders.set(r.id, { ...r });
    if (msg.stats) this.stats = msg.stats;
    this.emit({ kind: 'snapshot' });
  }

  rememberClosed(inc) {
    this.incidents.delete(inc.id);
    this.closed.delete(inc.id);
    this.closed.set(inc.id, inc);
    if (this.closed.size > CLOSED_KEEP) this.closed.delete(this.closed.keys().next().value);
  }

  /**
   * Seq bookkeeping for one `event` message. Returns 'apply', 'duplicate' or 'gap'.
   * A fresh store (no snapshot yet) accepts nothing: the caller must wait for a snapshot.
   * `prev` is the seq of the scope's previous event: a village screen sees the town's seqs
   * with holes (other villages' events), so a gap is prev > last, not seq > last + 1.
   */
  check(seq, prev) {
    if (this.lastSeq == null) return 'gap';
    if (seq <= this.lastSeq) return 'duplicate';
    if (prev != null ? prev > this.lastSeq : seq !== this.lastSeq + 1) return 'gap';
    return 'apply';
  }

  /** Apply one event (the caller has checked its seq). Returns the incident it touched, if any. */
  applyEvent(ev) {
    this.lastSeq = ev.seq;
    this.eventsApplied++;
    const at = ms(ev.at) ?? Date.now();
    let inc = ev.incident ? this.incident(ev.incident) : null;
    const releaseResponder = (rid) => {
      const r = rid && this.responders.get(rid);
      if (r && r.incident === ev.incident) r.incident = null;
    };
    switch (ev.type) {
      case 'incident.reported': {
        inc = normaliseIncident({
          id: ev.incident, ref: ev.ref, category: ev.category, priority: ev.priority, lon: ev.lon, lat: ev.lat,
          description: ev.description || '', grids: ev.grids || {}, level: ev.level ?? 3,
          status: ev.handled ? 'closed' : 'new', responder: null, department: null, source: ev.source,
          reported_at: ev.at, closed_at: ev.handled ? ev.at : null, deadline: ev.deadline ?? null,
          reporter: ev.reporter ?? null, handled: !!ev.handled, photos: ev.photos || [],
          escalations: [], overdue: false, on_time: true, reopened: 0,
        });
        if (inc.status === 'closed') this.rememberClosed(inc); else this.incidents.set(inc.id, inc);
        break;
      }
      case 'incident.offered':
        if (!inc) break;
        inc.status = 'offered'; inc.responder = ev.responder;
        inc.offer_expires_at = ev.expires_at ?? null; inc.offered_at ??= ev.at;
        if (this.responders.get(ev.responder)) this.responders.get(ev.responder).incident = inc.id;
        break;
      case 'incident.offer_expired':
      case 'incident.declined':
        if (!inc) break;
        if (inc.responder === ev.responder && inc.status === 'offered') {
          inc.responder = null; inc.status = 'new'; inc.offer_expires_at = null;
        }
        releaseResponder(ev.responder);
        break;
      case 'incident.assigned':
        if (!inc) break;
        inc.status = 'assigned'; inc.responder = ev.responder; inc.offer_expires_at = null;
        inc.assigned_at ??= ev.at;
        if (this.responders.get(ev.responder)) this.responders.get(ev.responder).incident = inc.id;
        break;
      case 'incident.arrived':
        if (!inc) break;
        inc.status = 'on_scene'; if (ev.responder) inc.responder = ev.responder; inc.arrived_at ??= ev.at;
        break;
      case 'incident.resolved':
        if (!inc) break;
        if (inc.status !== 'closed') inc.status = 'resolved'; // on-the-spot cases are closed already
        inc.resolved_at ??= ev.at;
        break;
      case 'incident.closed':
        if (!inc) break;
        inc.status = 'closed'; inc.closed_at = ev.at; if (ev.on_time === false) inc.on_time = false;
        releaseResponder(inc.responder);
        this.rememberClosed(inc);
        break;
      case 'incident.escalated': {
        const esc = { from_level: ev.from_level, to_level: ev.to_level, reason: ev.reason, at: ev.at, by: ev.by, note: ev.note };
        this.lastEscalation.set(ev.incident, esc);
        if (!inc) break;
        releaseResponder(inc.responder);
        inc.level = ev.to_level; if ('deadline' in ev) inc.deadline = ev.deadline;
        inc.escalations = [...(inc.escalations || []), esc];
        inc.responder = null; inc.offer_expires_at = null;
        if (inc.status !== 'resolved' && inc.status !== 'closed') inc.status = 'new';
        break;
      }
      case 'incident.transferred':
        if (!inc) break;
        releaseResponder(inc.responder);
        inc.department = ev.department; inc.responder = null; inc.offer_expires_at = null;
        if (inc.status !== 'resolved' && inc.status !== 'closed') inc.status = 'new';
        break;
      case 'incident.reopened':
        if (!inc) {
          // Reopened case we never saw: keep a stub; the app fetches the full object over REST.
          inc = normaliseIncident({ id: ev.incident, status: 'new', level: ev.level ?? 3, grids: {}, stub: true });
        }
        this.closed.delete(inc.id);
        inc.status = 'new'; inc.closed_at = null; inc.responder = null; inc.overdue = false;
        if (ev.level != null) inc.level = ev.level;
        if ('deadline' in ev) inc.deadline = ev.deadline;
        inc.reopened = (inc.reopened || 0) + 1;
        this.incidents.set(inc.id, inc);
        break;
      case 'incident.overdue':
        if (!inc) break;
        inc.overdue = true; if (ev.level != null) inc.level = ev.level;
        break;
      case 'responder.status': {
        const r = this.responders.get(ev.responder);
        if (r) { r.status = ev.status; if (ev.status === 'available' || ev.status === 'off_duty' || ev.status === 'offline') r.incident = null; }
        break;
      }
      case 'responder.presence': {
        const r = this.responders.get(ev.responder);
        if (r) { r.online = !!ev.online; if (ev.duty) r.duty = ev.duty; }
        break;
      }
      default:
        break; // unknown (newer) event types are tolerated
    }
    if (inc) inc._touched = at;
    // The ticker skips the automatic resolve/close that follows an on-the-spot report (the
    // "reported and fixed on the spot" line says it); the card's timeline still has them.
    const echo = inc?.handled && (ev.type === 'incident.resolved' || ev.type === 'incident.closed') && !inc.reopened;
    if (ev.type.startsWith('incident.') && !echo) {
      this.ticker.push({ seq: ev.seq, at, ev });
      if (this.ticker.length > TICKER_KEEP) this.ticker.splice(0, this.ticker.length - TICKER_KEEP);
    }
    return inc;
  }

  /** positions items: [responder_id, lon, lat, status]. Returns the responders that moved. */
  applyPositions(items) {
    const moved = [];
    for (const it of items || []) {
      const r = this.responders.get(it[0]);
      if (!r) continue;
      r.lon = it[1]; r.lat = it[2];
      if (it[3]) r.status = it[3];
      moved.push(r);
    }
    return moved;
  }

  /** Replace one incident by the full object from REST (keeps the local fold for fields REST lacks). */
  mergeIncident(obj) {
    const cur = this.incident(obj.id);
    const x = normaliseIncident({ ...(cur || {}), ...obj, stub: false });
    delete x.timeline;
    if (x.status === 'closed') this.rememberClosed(x);
    else { this.closed.delete(x.id); this.incidents.set(x.id, x); }
    return x;
  }
}

function normaliseIncident(inc) {
  const x = { ...inc };
  x.grids = x.grids || {};
  x.level = Number(x.level ?? 3);
  x.priority = Number(x.priority ?? 3);
  x.escalations = x.escalations || [];
  x.status = x.status || 'new';
  return x;
}

/** Open incidents that came up from lower levels (level < 3), oldest first. */
/**
 * What the command centre must act on, most pressing first: overdue cases, then the town's own
 * (level 1) before the villages', then by priority, the nearest deadline, the oldest report. The
 * wall shows as many rows as fit, so a level-1 case is never hidden behind level-2 ones.
 */
export function escalationQueue(store) {
  const out = [];
  for (const inc of store.incidents.values()) if (inc.level < 3) out.push(inc);
  const key = (i) => [i.overdue ? 0 : 1, i.level, i.priority ?? 4, ms(i.deadline) ?? Infinity, ms(i.reported_at) ?? 0];
  out.sort((a, b) => {
    const ka = key(a); const kb = key(b);
    for (let n = 0; n < ka.length; n++) if (ka[n] !== kb[n]) return ka[n] < kb[n] ? -1 : 1;
    return String(a.id).localeCompare(String(b.id));
  });
  return out;
}
