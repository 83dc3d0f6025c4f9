// The command-centre wall screen: token handling, wiring of store ↔ connection ↔ map ↔ panels,
// the frame loop. See docs/screen.md.

import { t, lang, setCategories, dateLine, hms, KIND, R_STATUS, deptName } from './i18n.js';
import { jwtClaims, looksLikeJwt, el, clear, throttleFrame, ms } from './util.js';
import { Store } from './state.js';
import { ScreenConnection } from './conn.js';
import { MapView } from './map.js';
import { Panels } from './panels.js';
import { IncidentCard, toast } from './card.js';
import { Perf } from './perf.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'dispatch.token';
const SCOPE_KEY = 'dispatch.scope';
const query = new URLSearchParams(location.search);
const debug = query.get('debug') === '1';

// --- token: from the fragment (never a query), kept in sessionStorage, removed from the address bar

function takeFragment() {
  const h = location.hash.slice(1);
  if (!h) return;
  let token = null;
  let rest = new URLSearchParams();
  if (h.includes('=')) {
    rest = new URLSearchParams(h);
    token = rest.get('token');
    rest.delete('token');
  } else if (looksLikeJwt(h)) {
    token = h;
  }
  if (rest.get('scope')) sessionStorage.setItem(SCOPE_KEY, rest.get('scope'));
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  const frag = rest.toString();
  history.replaceState(history.state, '', location.pathname + location.search + (frag ? '#' + frag : ''));
}

function chosenScope() {
  return query.get('scope') || sessionStorage.getItem(SCOPE_KEY) || null;
}

function signIn(reason) {
  $('app').hidden = true;
  const form = $('signin');
  form.hidden = false;
  $('signin-title').textContent = t('signin_title');
  $('signin-hint').textContent = t('signin_hint');
  $('signin-token-label').textContent = t('signin_token');
  $('signin-scope-label').textContent = t('signin_scope');
  $('signin-go').textContent = t('signin_go');
  $('signin-error').textContent = reason ? t(reason) : '';
  $('signin-scope').value = chosenScope() || '';
  const retry = sessionStorage.getItem('dispatch.retry');
  sessionStorage.removeItem('dispatch.retry');
  if (retry) {
    $('signin-token').value = retry;
    $('signin-scope').value = jwtClaims(retry)?.scope || '';
  }
  form.onsubmit = (e) => {
    e.preventDefault();
    let tok = $('signin-token').value.trim();
    const m = tok.match(/(?:#|token=)([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)/);
    if (m) tok = m[1];
    if (!looksLikeJwt(tok)) { $('signin-error').textContent = t('signin_bad'); return; }
    sessionStorage.setItem(TOKEN_KEY, tok);
    const sc = $('signin-scope').value.trim();
    if (sc) sessionStorage.setItem(SCOPE_KEY, sc); else sessionStorage.removeItem(SCOPE_KEY);
    $('signin-token').value = '';
    location.reload();
  };
  $('signin-token').focus();
}

function signOut(reason) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  sessionStorage.removeItem(TOKEN_KEY);
  if (reason) sessionStorage.setItem('dispatch.reason', reason);
  let search = location.search;
  if (reason === 'signin_forbidden' && token) {
    // The token is good, the scope asked for is not in it: offer the token again with its own
    // scope instead of making the operator paste it anew.
    sessionStorage.setItem('dispatch.retry', token);
    sessionStorage.removeItem(SCOPE_KEY);
    const q = new URLSearchParams(search);
    q.delete('scope');
    search = q.toString() ? `?${q}` : '';
  }
  location.replace(location.pathname + search);
}

// --- the app -------------------------------------------------------------------------------------

function start(token) {
  const claims = jwtClaims(token) || {};
  const canAct = claims.role === 'operator' || claims.role === 'admin';
  const api = (path) => fetch(path, { headers: { Authorization: `Bearer ${token}` }, cache: 'no-store', credentials: 'omit' });
  let scope = chosenScope();
  let skew = 0; // server clock − local clock, ms
  let gaps = 0;
  let gapAt = null;          // lastSeq when the last gap was seen
  let forceSnapshot = false; // next hello without `since`

  $('signin').hidden = true;
  $('app').hidden = false;
  document.body.classList.toggle('debug', debug);
  for (const e of document.querySelectorAll('[data-t]')) e.textContent = t(e.dataset.t);
  $('user').textContent = [claims.sub, claims.role === 'monitor' ? t('readonly') : claims.role].filter(Boolean).join(' · ');
  $('signout').textContent = t('signout');
  $('signout').onclick = () => signOut();

  const store = new Store();
  const mapView = new MapView($('map'), {
    store,
    onIncidentClick: (id) => {
      if (!id) { card.close(); return; }
      card.open(id);
      mapView.panTo(store.incident(id));
    },
    onResponderClick: (r, latlng) => showResponderTip(r, latlng),
  });
  if (query.get('offline') === 'hide') mapView.hidden.add('offline');
  const panels = new Panels({
    store, grids: mapView.grids, clockSkew: () => skew,
    onOpenIncident: (id) => { card.open(id); mapView.panTo(store.incident(id)); },
    onToggleStatus: (s) => mapView.toggleStatus(s),
  });
  const card = new IncidentCard({
    store, grids: mapView.grids, api, canAct: () => canAct,
    onSelect: (id) => mapView.select(id),
  });

  // Panels re-render at most 4× a second, whatever the event rate.
  const dirty = new Set();
  const flush = throttleFrame(() => {
    if (dirty.has('stats')) panels.renderStats();
    if (dirty.has('queue')) panels.renderQueue();
    if (dirty.has('ticker-full')) panels.renderTicker(true);
    else if (dirty.has('ticker')) panels.renderTicker();
    if (dirty.has('open')) panels.renderOpenByLevel();
    if (dirty.has('legend')) panels.renderLegend(mapView.hidden);
    if (dirty.has('card')) card.refresh();
    dirty.clear();
  }, 250);
  const mark = (...parts) => { for (const p of parts) dirty.add(p); flush(); };

  function publishState() {
    window.__dispatchState = {
      connected: conn.connected, lastSeq: store.lastSeq, scope: store.scope,
      incidents: store.incidents.size, responders: store.responders.size,
      escalated: [...store.incidents.values()].filter((i) => i.level < 3).length,
      snapshots: store.snapshots, events: store.eventsApplied, duplicates: store.duplicates,
      gaps, reconnects: conn.reconnects, grids: mapView.grids.size,
    };
  }

  function onMessage(msg) {
    switch (msg.type) {
      case 'snapshot':
        store.loadSnapshot(msg);
        serverClock(msg.server_time);
        if (msg.stats) useStats(msg.stats);
        else api(`/api/stats${store.scope ? `?scope=${encodeURIComponent(store.scope)}` : ''}`)
          .then((r) => (r.ok ? r.json() : null)).then((s) => { if (s) { store.stats = s; useStats(s); } }).catch(() => {});
        mapView.resetResponders();
        mapView.incidentsChanged();
        applyScope();
        mark('queue', 'open', 'legend', 'card', 'stats', 'ticker');
        break;
      case 'event': {
        const ev = msg.event && typeof msg.event === 'object' ? { ...msg.event } : { ...msg };
        const seq = msg.seq ?? ev.seq;
        ev.seq = seq;
        if (store.lastSeq == null) break; // waiting for the snapshot
        const c = store.check(seq, typeof msg.prev === 'number' ? msg.prev : null);
        if (c === 'duplicate') { store.duplicates++; break; }
        if (c === 'gap') {
          // Resume with `since`; if the same gap comes straight back, ask for a fresh snapshot.
          gaps++;
          if (gapAt === store.lastSeq) forceSnapshot = true;
          gapAt = store.lastSeq;
          conn.resync();
          break;
        }
        const inc = store.applyEvent(ev);
        if (ev.type.startsWith('responder.')) {
          mapView.responderStatus(store.responder(ev.responder));
          mark('legend');
        } else {
          mapView.incidentsChanged();
          if (ev.responder) mapView.responderStatus(store.responder(ev.responder));
          mark('queue', 'open', 'ticker', 'legend');
          card.event(ev);
          if (inc?.stub) {
            inc.stub = false;
            api(`/api/incidents/${encodeURIComponent(inc.id)}`).then((r) => (r.ok ? r.json() : null))
              .then((o) => { if (o) { store.mergeIncident(o); mapView.incidentsChanged(); mark('queue', 'open', 'card'); } }).catch(() => {});
          }
        }
        break;
      }
      case 'positions':
        mapView.moveResponders(store.applyPositions(msg.items));
        mark('legend');
        break;
      case 'stats': {
        const s = msg.stats && typeof msg.stats === 'object' && !msg.kpi ? msg.stats : msg;
        store.stats = s;
        useStats(s);
        mark('stats');
        break;
      }
      case 'error':
        toast(t('toast_err', { msg: `${msg.message || ''} (${msg.code})` }), 'error');
        break;
      default:
        break;
    }
    publishState();
  }

  function useStats(s) {
    if (s.categories) setCategories(s.categories);
    serverClock(s.at);
    mapView.setSafety(s.safety);
  }

  /** Countdowns and the clock follow the server's clock when the browser's is off by > 2 s. */
  function serverClock(t) {
    const at = ms(t);
    if (!at) return;
    const d = at - Date.now();
    skew = Math.abs(d) > 2000 && Math.abs(d) < 6 * 3600e3 ? d : 0;
  }

  let appliedScope;
  function applyScope() {
    const sc = store.scope || scope;
    if (!mapView.grids.size || sc === appliedScope) return;
    appliedScope = sc;
    mapView.setScope(sc && mapView.grids.has(sc) ? sc : null);
    panels.setScope(mapView.scopeSet);
    const g = mapView.grids.get(sc);
    $('scope-name').textContent = g ? (g.level === 1 ? `${g.name} · ${t('town_scope')}` : g.name) : (sc || '');
    document.title = `${g?.name || ''} ${t('title')}`.trim();
    buildScopeSelect();
    mark('stats', 'queue');
  }

  function buildScopeSelect() {
    const sel = $('scope-select');
    clear(sel);
    const root = claims.scope && mapView.grids.has(claims.scope) ? claims.scope : [...mapView.grids.values()].find((g) => g.level === 1)?.id;
    const rootG = mapView.grids.get(root);
    if (!rootG || rootG.level !== 1) { sel.hidden = true; return; }
    sel.append(el('option', { value: root, text: `${rootG.name} · ${t('town_scope')}` }));
    for (const id of rootG.children) {
      const g = mapView.grids.get(id);
      if (g) sel.append(el('option', { value: id, text: g.name }));
    }
    sel.value = store.scope || scope || root;
    sel.hidden = false;
    sel.onchange = () => {
      scope = sel.value;
      sessionStorage.setItem(SCOPE_KEY, scope);
      const u = new URL(location.href);
      u.searchParams.set('scope', scope);
      history.replaceState(history.state, '', u.pathname + u.search + u.hash);
      store.reset();
      store.ticker = [];
      appliedScope = undefined;
      card.close();
      mark('ticker-full');
      conn.resync();
    };
  }

  // --- connection + banner
  let bannerTimer = null;
  function onState(s) {
    const hdr = $('conn');
    hdr.className = s.connected ? 'conn ok' : 'conn down';
    hdr.querySelector('span').textContent = s.connected ? t('connected') : t('disconnected');
    if (s.fatal) {
      signOut(s.reason === 'forbidden' ? 'signin_forbidden' : 'signin_bad');
      return;
    }
    const banner = $('banner');
    clearTimeout(bannerTimer);
    if (s.connected) { banner.hidden = true; document.body.classList.remove('disconnected'); }
    else if (s.reason !== 'stopped') {
      const show = () => {
        banner.hidden = false;
        document.body.classList.add('disconnected');
        $('banner-text').textContent = s.reason === 'resync' && !s.attempt ? t('banner_resync') : t('banner');
        $('banner-detail').textContent = s.attempt ? `${t('banner_retry', { n: s.attempt })} · ${t('seq')} ${store.lastSeq ?? '—'}` : '';
      };
      if (s.reason === 'resync' && !s.attempt) bannerTimer = setTimeout(show, 1000); else show();
    }
    publishState();
  }

  const conn = new ScreenConnection({
    hello: () => {
      const m = { type: 'hello', token };
      const sc = scope || undefined;
      if (sc) m.scope = sc;
      if (store.lastSeq != null && !forceSnapshot) m.since = store.lastSeq;
      forceSnapshot = false;
      return m;
    },
    onMessage, onState,
  });
  card.conn = conn;

  // --- grids (retried until the server answers)
  (async function loadGrids(delay = 500) {
    try {
      const res = await api('/api/grids');
      if (res.status === 401) { signOut('signin_bad'); return; }
      if (res.status === 403) { signOut('signin_forbidden'); return; }
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      mapView.setGrids(await res.json());
      appliedScope = undefined;
      applyScope();
      mark('queue', 'ticker-full', 'stats', 'card');
      publishState();
    } catch {
      setTimeout(() => loadGrids(Math.min(delay * 2, 5000)), delay);
    }
  })();

  // --- responder tooltip
  function showResponderTip(r, latlng) {
    const tip = $('rtip');
    const p = mapView.map.latLngToContainerPoint(latlng);
    const home = mapView.grids.get(r.home_grid)?.name || r.home_grid;
    clear(tip).append(
      el('b', { text: `${r.kind === 'department' && r.department ? deptName(r.department) : KIND[r.kind] || ''} ${r.name}` }),
      el('div', { text: `${R_STATUS[r.status] || r.status} · ${home}` }),
      r.incident ? el('div', { class: 'muted', text: r.incident }) : null);
    tip.style.left = `${p.x}px`; tip.style.top = `${p.y}px`;
    tip.hidden = false;
    clearTimeout(tip._t);
    tip._t = setTimeout(() => { tip.hidden = true; }, 5000);
  }
  mapView.map.on('movestart', () => { $('rtip').hidden = true; });
  $('fit').onclick = () => mapView.fit(true);
  $('fit').title = t('fit');

  // --- clock, countdowns
  const tick = () => {
    const now = Date.now() + skew;
    $('clock-time').textContent = hms(now);
    $('clock-date').textContent = dateLine(now);
    panels.tickCountdowns();
  };
  tick();
  setInterval(tick, 1000);

  // --- frame loop
  const perf = new Perf();
  let lastPub = 0;
  const fps = $('fps');
  // ?fps=N caps map redraws (e.g. 30 on a weak wall PC: half the compositing work).
  const minGap = Number(query.get('fps')) > 0 ? 1000 / Number(query.get('fps')) - 2 : 0;
  let lastDraw = 0;
  function frame(now) {
    const t0 = performance.now();
    if (now - lastDraw >= minGap && mapView.needsDraw(now)) { mapView.draw(now); lastDraw = now; }
    perf.frame(now, performance.now() - t0);
    if (now - lastPub > 500) {
      lastPub = now;
      const p = perf.publish();
      if (debug) fps.textContent = `${p.fps ?? '–'} fps · p95 ${p.p95_ms ?? '–'} ms · draw ${p.draw_p95_ms ?? '–'} ms · ${store.responders.size}/${store.incidents.size}`;
    }
    requestAnimationFrame(frame);
  }
  requestAnimationFrame(frame);
  addEventListener('keydown', (e) => {
    if (e.key === 'd' && !e.target.closest('input,textarea')) document.body.classList.toggle('debug');
  });

  window.__dispatch = {
    store, map: mapView, conn, card, perf,
    openIncident: (id) => card.open(id),
    incidentPoint: (id) => mapView.incidentPoint(id),
  };
  publishState();
  conn.start();
  mark('ticker-full', 'stats', 'legend', 'open', 'queue');
}

// --- boot ------------------------------------------------------------------------------------------

takeFragment();
const token = sessionStorage.getItem(TOKEN_KEY);
const reason = sessionStorage.getItem('dispatch.reason');
sessionStorage.removeItem('dispatch.reason');
const exp = token ? jwtClaims(token)?.exp : null;
if (!token) signIn(reason);
else if (exp && exp * 1000 < Date.now()) { sessionStorage.removeItem(TOKEN_KEY); signIn('signin_expired'); }
else start(token);
document.documentElement.dataset.lang = lang;
