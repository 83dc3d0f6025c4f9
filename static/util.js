// Small helpers shared by the wall-screen modules. No dependencies.

/** Web-Mercator world coordinates normalised to 0..1 (u to the east, v to the south). */
export function lonLatToUV(lon, lat) {
  const phi = Math.max(-85.05112878, Math.min(85.05112878, lat)) * Math.PI / 180;
  return [(lon + 180) / 360, 0.5 - Math.log(Math.tan(Math.PI / 4 + phi / 2)) / (2 * Math.PI)];
}

const R_EARTH = 6371008.8;
/** Great-circle distance in metres. */
export function haversine(lon1, lat1, lon2, lat2) {
  const rad = Math.PI / 180;
  const dLat = (lat2 - lat1) * rad, dLon = (lon2 - lon1) * rad;
  const a = Math.sin(dLat / 2) ** 2 + Math.cos(lat1 * rad) * Math.cos(lat2 * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * R_EARTH * Math.asin(Math.min(1, Math.sqrt(a)));
}

/** RFC 4122 v4 id. crypto.randomUUID only exists in secure contexts; a wall PC may use plain http. */
export function uuid() {
  if (globalThis.crypto?.randomUUID) {
    try { return crypto.randomUUID(); } catch { /* not a secure context */ }
  }
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The claims of a JWT, unverified (display and defaults only; the server checks it). */
export function jwtClaims(token) {
  try {
    const part = token.split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const json = decodeURIComponent([...atob(b64)].map((c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''));
    return JSON.parse(json);
  } catch {
    return null;
  }
}

export function looksLikeJwt(s) {
  return /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(s);
}

/** Parse an RFC 3339 string (or epoch seconds) to epoch milliseconds; null when absent. */
export function ms(t) {
  if (t == null || t === '') return null;
  if (typeof t === 'number') return t < 1e12 ? t * 1000 : t;
  const v = Date.parse(t);
  return Number.isNaN(v) ? null : v;
}

export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : v);
    }
  }
  for (const c of children) {
    if (c == null || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

/** Schedule fn at most once per animation frame (and no more often than minMs). */
export function throttleFrame(fn, minMs = 0) {
  let pending = false, last = 0;
  return () => {
    if (pending) return;
    pending = true;
    const run = (now) => {
      if (now - last < minMs) { requestAnimationFrame(run); return; }
      pending = false; last = now; fn();
    };
    requestAnimationFrame(run);
  };
}

export function pct(x, digits = 1) {
  if (x == null || Number.isNaN(x)) return '—';
  return (x * 100).toFixed(digits) + '%';
}

export function num(x) {
  if (x == null || Number.isNaN(x)) return '—';
  return Number(x).toLocaleString('en-US');
}
