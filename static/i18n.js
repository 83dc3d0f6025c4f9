// Labels in Chinese (zh-CN, the default) and English (?lang=en), and the human sentences of the
// event ticker and the incident timeline.

const params = new URLSearchParams(location.search);
const hashParams = new URLSearchParams(location.hash.slice(1).includes('=') ? location.hash.slice(1) : '');
const wanted = (params.get('lang') || hashParams.get('lang') || '').toLowerCase();
export const lang = wanted.startsWith('en') ? 'en' : 'zh';
document.documentElement.lang = lang === 'en' ? 'en' : 'zh-CN';

const S = {
  zh: {
    title: '网格化综合指挥中心',
    subtitle: '实时调度大屏',
    town_scope: '全镇',
    connected: '已连接',
    connecting: '正在连接…',
    disconnected: '连接中断',
    banner: '连接中断，正在重连…',
    banner_retry: '第 {n} 次重试',
    banner_resync: '数据不连续，正在补齐…',
    signin_title: '指挥中心大屏登录',
    signin_hint: '请粘贴值班令牌（dispatch token 生成，或 dispatch demo 打印的地址中 # 后的部分）。令牌只保存在本窗口会话中。',
    signin_token: '令牌',
    signin_scope: '范围（可选，如 V03）',
    signin_go: '进入大屏',
    signin_bad: '令牌无效或已过期，请重新输入。',
    signin_forbidden: '该令牌无权查看所选范围。',
    signin_expired: '令牌已过期。',
    signout: '退出',
    kpi_title: '核心指标 · 今日',
    kpi_l32: '三、二级结案占比',
    kpi_target: '目标',
    kpi_on_time: '按期结案率',
    kpi_closure: '结案率',
    kpi_rework: '返工率',
    kpi_on_spot: '当场处置率',
    kpi_reported: '今日受理',
    kpi_closed: '今日结案',
    kpi_due: '应结案',
    open_by_level: '在办案件（按层级）',
    medians: '今日中位时长',
    m_offer: '派单',
    m_accept: '接单',
    m_arrive: '到场',
    m_resolve: '处置',
    top_categories: '今日高发类别',
    hotspots: '今日热点网格',
    hotspot_base: '近日均值',
    hotspots_none: '今日没有网格明显高于近日水平',
    topcats_none: '今日暂无案件',

    safety: '平安指数',
    safety_worst: '风险较高网格',
    safety_none: '各网格均无预警',
    safety_ok: '无预警',
    queue: '升级案件队列',
    queue_empty: '暂无升级案件',
    ticker: '实时动态',
    ticker_empty: '等待事件…',
    remaining: '剩余',
    overdue: '超期',
    more: '另有 {n} 件',
    legend_responders: '处置力量',
    legend_incidents: '案件',
    responders_online: '在线',
    fit: '复位',
    card_reported: '上报时间',
    card_deadline: '本级时限',
    card_responder: '处置人',
    card_department: '责任部门',
    card_source: '来源',
    card_grid: '所属网格',
    card_level: '当前层级',
    card_status: '状态',
    card_desc: '描述',
    card_escalations: '升级记录',
    card_timeline: '处置时间线',
    card_loading: '正在加载时间线…',
    card_timeline_fail: '时间线加载失败：{msg}',
    act_assign: '指派',
    act_transfer: '转派部门',
    act_escalate: '升级',
    act_close: '结案',
    act_reopen: '重新打开',
    dlg_assign: '指派处置人员 — 最近的可用人员',
    dlg_assign_server: '由服务器计算',
    dlg_assign_local: '按本屏位置估算',
    dlg_assign_none: '范围内没有可用且具备该类别技能的人员。',
    dlg_transfer: '转派至职能部门',
    dlg_escalate: '确认将案件升级到上一级？',
    dlg_close: '结案说明',
    dlg_reopen: '重新打开原因（计入返工）',
    dlg_note_ph: '填写说明（可选）',
    dlg_confirm: '确定',
    dlg_cancel: '取消',
    toast_sent: '已发送，等待确认…',
    toast_ok: '操作成功：{what}',
    toast_err: '操作失败：{msg}',
    toast_timeout: '服务器未在 10 秒内确认，请核对案件状态。',
    toast_offline: '连接中断，操作未发送。',
    toast_lost: '连接中断，操作结果未确认，请核对案件状态。',
    distance: '距离',
    none: '无',
    yes: '是',
    no: '否',
    seq: '序号',
    readonly: '只读',
  },
  en: {
    title: 'Grid Governance Command Centre',
    subtitle: 'Live dispatch',
    town_scope: 'Whole town',
    connected: 'Connected',
    connecting: 'Connecting…',
    disconnected: 'Disconnected',
    banner: 'Disconnected — reconnecting…',
    banner_retry: 'attempt {n}',
    banner_resync: 'Gap in the event stream — catching up…',
    signin_title: 'Command-centre wall screen',
    signin_hint: 'Paste an operator token (from `dispatch token`, or the part after # in the address `dispatch demo` prints). It is kept only for this browser tab.',
    signin_token: 'Token',
    signin_scope: 'Scope (optional, e.g. V03)',
    signin_go: 'Open the screen',
    signin_bad: 'The token was refused or has expired. Please enter a new one.',
    signin_forbidden: 'This token may not view the chosen scope.',
    signin_expired: 'The token has expired.',
    signout: 'Sign out',
    kpi_title: 'Key figures · today',
    kpi_l32: 'Closed at levels 3–2',
    kpi_target: 'target',
    kpi_on_time: 'On-time closure',
    kpi_closure: 'Closure rate',
    kpi_rework: 'Rework rate',
    kpi_on_spot: 'Handled on the spot',
    kpi_reported: 'Reports',
    kpi_closed: 'Closed',
    kpi_due: 'Due',
    open_by_level: 'Open cases by level',
    medians: 'Median times today',
    m_offer: 'Offer',
    m_accept: 'Accept',
    m_arrive: 'Arrive',
    m_resolve: 'Resolve',
    top_categories: 'Top categories today',
    hotspots: 'Hotspot grids today',
    hotspot_base: 'usual',
    hotspots_none: 'No grid is well above its recent days',
    topcats_none: 'No reports today',

    safety: 'Safety index',
    safety_worst: 'Highest-risk grids',
    safety_none: 'No grid has a warning',
    safety_ok: 'no warning',
    queue: 'Escalation queue',
    queue_empty: 'No escalated cases',
    ticker: 'Live events',
    ticker_empty: 'Waiting for events…',
    remaining: 'left',
    overdue: 'overdue',
    more: '{n} more',
    legend_responders: 'Responders',
    legend_incidents: 'Incidents',
    responders_online: 'online',
    fit: 'Reset',
    card_reported: 'Reported',
    card_deadline: 'Level deadline',
    card_responder: 'Responder',
    card_department: 'Department',
    card_source: 'Source',
    card_grid: 'Grid',
    card_level: 'Level',
    card_status: 'Status',
    card_desc: 'Description',
    card_escalations: 'Escalations',
    card_timeline: 'Timeline',
    card_loading: 'Loading the timeline…',
    card_timeline_fail: 'Could not load the timeline: {msg}',
    act_assign: 'Assign',
    act_transfer: 'Transfer',
    act_escalate: 'Escalate',
    act_close: 'Close',
    act_reopen: 'Reopen',
    dlg_assign: 'Assign — nearest available responders',
    dlg_assign_server: 'computed by the server',
    dlg_assign_local: 'estimated from this screen’s positions',
    dlg_assign_none: 'No available responder with this skill in scope.',
    dlg_transfer: 'Transfer to a department',
    dlg_escalate: 'Escalate this case to the next level?',
    dlg_close: 'Closing note',
    dlg_reopen: 'Why reopen (counts as rework)',
    dlg_note_ph: 'Note (optional)',
    dlg_confirm: 'Confirm',
    dlg_cancel: 'Cancel',
    toast_sent: 'Sent, waiting for the server…',
    toast_ok: 'Done: {what}',
    toast_err: 'Failed: {msg}',
    toast_timeout: 'The server did not confirm within 10 s; check the case.',
    toast_offline: 'Disconnected: the command was not sent.',
    toast_lost: 'Disconnected before the server confirmed; check the case.',
    distance: 'Distance',
    none: 'none',
    yes: 'yes',
    no: 'no',
    seq: 'seq',
    readonly: 'read-only',
  },
};

export function t(key, vars) {
  let s = S[lang][key] ?? S.zh[key] ?? key;
  if (vars) for (const [k, v] of Object.entries(vars)) s = s.replaceAll(`{${k}}`, v);
  return s;
}

const L = (zh, en) => (lang === 'en' ? en : zh);

export const STATUS = {
  new: L('待派', 'new'), offered: L('已派单', 'offered'), assigned: L('处置中', 'assigned'),
  on_scene: L('已到场', 'on scene'), resolved: L('待核查', 'resolved'), closed: L('已结案', 'closed'),
};
export const R_STATUS = {
  available: L('空闲', 'available'), offered: L('待接单', 'offered'), assigned: L('出勤', 'assigned'),
  on_scene: L('现场', 'on scene'), off_duty: L('下班', 'off duty'), offline: L('离线', 'offline'),
};
export const LEVEL = { 3: L('网格', 'grid'), 2: L('村居', 'village'), 1: L('镇级', 'town') };
export const LEVEL_SHORT = { 3: L('网格', 'L3'), 2: L('村居', 'L2'), 1: L('镇级', 'L1') };
export const LEVEL_LONG = { 3: L('三级·网格', 'L3 grid'), 2: L('二级·村居', 'L2 village'), 1: L('一级·镇', 'L1 town') };
export const REASON = {
  no_responder: L('无人可派', 'no responder'), declined: L('拒单/超时', 'declined'), sla: L('超时限', 'time limit'),
  requested: L('申请升级', 'requested'), operator: L('人工升级', 'by operator'),
};
// What each error code of the contract means to an operator; the server's own sentence (English)
// follows in the English UI only, where it adds the specifics.
export const ERROR = {
  bad_json: L('消息格式错误', 'malformed message'), bad_message: L('请求内容有误', 'invalid request'),
  unknown_type: L('不支持的操作', 'unsupported action'), unauthorized: L('登录已失效，请重新登录', 'signed out: sign in again'),
  forbidden: L('无权执行此操作', 'not allowed for your role or area'), not_found: L('对象不存在', 'not found'),
  conflict: L('案件状态已变化，请刷新后重试', 'the case has changed meanwhile'), outside_area: L('不在辖区内', 'outside the area'),
  unknown_category: L('未知的事件类别', 'unknown category'), rate_limited: L('操作过于频繁，请稍后再试', 'too many actions: wait a moment'),
  too_large: L('内容过长', 'too large'), unavailable: L('服务暂不可用，请稍后重试', 'server busy or offline: retry shortly'),
  internal: L('服务器内部错误', 'server error'),
};
export function errorText(code, message) {
  const known = ERROR[code];
  if (!known) return message ? `${message} (${code})` : String(code);
  return lang === 'en' && message ? `${known}: ${message}` : known;
}

export const KIND = { grid_worker: L('网格员', 'Grid worker'), department: L('部门', 'Unit'), volunteer: L('志愿者', 'Volunteer') };
export const SOURCE = { field: L('网格上报', 'field'), hotline: L('12345热线', 'hotline'), citizen: L('群众举报', 'citizen'), operator: L('指挥中心', 'operator') };
export const PRIORITY = { 1: L('特急', 'P1 urgent'), 2: L('紧急', 'P2'), 3: L('一般', 'P3'), 4: L('较低', 'P4') };

export const DEPARTMENTS = [
  ['police', '公安', 'Police'],
  ['urban_management', '城管', 'Urban management'],
  ['fire', '消防', 'Fire'],
  ['market_supervision', '市场监管', 'Market supervision'],
  ['environment', '生态环境', 'Environment'],
  ['housing', '住建', 'Housing & construction'],
  ['traffic_police', '交警', 'Traffic police'],
  ['mediation', '人民调解', 'Mediation'],
  ['emergency', '应急管理', 'Emergency management'],
];
export function deptName(code) {
  const d = DEPARTMENTS.find((x) => x[0] === code);
  return d ? (lang === 'en' ? d[2] : d[1]) : code || '';
}

// Fallback names for common category codes when the server sends no category table.
const CATS = {
  public_order: ['治安隐患', 'Public-order hazard'], public_order_hazard: ['治安隐患', 'Public-order hazard'],
  dispute: ['矛盾纠纷', 'Dispute'], drug_lead: ['涉毒线索', 'Drug lead'],
  hospital_disturbance: ['医闹', 'Hospital disturbance'], special_population: ['特殊人群', 'Special populations'],
  fire_hazard: ['消防隐患', 'Fire hazard'], gas_leak: ['燃气泄漏', 'Gas leak'],
  blocked_fire_escape: ['消防通道堵塞', 'Blocked fire escape'], traffic_accident: ['交通事故', 'Traffic accident'],
  illegal_parking: ['违章停车', 'Illegal parking'], road_damage: ['道路设施损坏', 'Damaged road facility'],
  damaged_road: ['道路设施损坏', 'Damaged road facility'], rental_housing: ['出租屋管理', 'Rental housing'],
  food_drug: ['食品药品安全', 'Food & drug safety'], food_safety: ['食品药品安全', 'Food & drug safety'],
  sanitation: ['环境卫生', 'Sanitation'], illegal_construction: ['违法建设', 'Illegal construction'],
  public_facility: ['公共设施损坏', 'Damaged public facility'], damaged_facility: ['公共设施损坏', 'Damaged public facility'],
  street_vending: ['占道经营', 'Street vending'], illegal_ads: ['乱张贴小广告', 'Illegal small ads'],
  small_ads: ['乱张贴小广告', 'Illegal small ads'], workplace_safety: ['安全生产', 'Workplace safety'],
  illegal_small_ads: ['乱张贴小广告', 'Illegal small ads'], damaged_public_facility: ['公共设施损坏', 'Damaged public facility'],
  damaged_road_facility: ['道路设施损坏', 'Damaged road facility'], food_drug_safety: ['食品药品安全', 'Food & drug safety'],
  noise: ['噪音扰民', 'Noise'], pollution: ['环境污染', 'Pollution'],
};
let catTable = {};
export function setCategories(table) { if (table && typeof table === 'object') catTable = table; }
export function catName(code) {
  const c = catTable[code];
  if (c) {
    if (lang === 'zh' && (c.name_zh || c.zh)) return c.name_zh || c.zh;
    if (lang === 'en' && c.name) return c.name;
  }
  if (CATS[code]) return CATS[code][lang === 'en' ? 1 : 0];
  if (c?.name) return c.name;
  return code || '';
}

/** "45s", "3m 20s", "1h 05m" (zh: 45秒 / 3分20秒 / 1小时05分). */
export function dur(seconds) {
  if (seconds == null || Number.isNaN(seconds)) return '—';
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (lang === 'en') {
    if (h) return `${h}h ${String(m).padStart(2, '0')}m`;
    if (m) return `${m}m ${String(r).padStart(2, '0')}s`;
    return `${r}s`;
  }
  if (h) return `${h}小时${String(m).padStart(2, '0')}分`;
  if (m) return `${m}分${String(r).padStart(2, '0')}秒`;
  return `${r}秒`;
}

/** Countdown text hh:mm:ss (d+ when long). */
export function countdown(msLeft) {
  const s = Math.floor(Math.abs(msLeft) / 1000);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const hms = `${String(h).padStart(2, '0')}:${String(m).padStart(2, '0')}:${String(r).padStart(2, '0')}`;
  return d ? `${d}${lang === 'en' ? 'd' : '天'} ${hms}` : hms;
}

export function distText(m) {
  if (m == null) return '—';
  return m < 1000 ? `${Math.round(m)} m` : `${(m / 1000).toFixed(m < 10000 ? 1 : 0)} km`;
}

// Times are shown in the zone of the statistics' day (the server's [stats] UTC offset, China
// Standard Time by default), not the browser's: the clock's date and the "today" figures agree
// on a PC set to another zone. `?tz=Area/City` overrides it.
function serverZone() {
  const off = Number(document.querySelector('meta[name="dispatch-utc-offset"]')?.content);
  if (!document.querySelector('meta[name="dispatch-utc-offset"]')?.content || !Number.isInteger(off)) return undefined;
  return off === 0 ? 'UTC' : `Etc/GMT${off > 0 ? '-' : '+'}${Math.abs(off)}`;  // Etc/ signs are inverted
}
const tz = new URLSearchParams(location.search).get('tz') || serverZone();
const fmtHM = new Intl.DateTimeFormat(lang === 'en' ? 'en-GB' : 'zh-CN', { hour: '2-digit', minute: '2-digit', hour12: false, timeZone: tz });
const fmtHMS = new Intl.DateTimeFormat(lang === 'en' ? 'en-GB' : 'zh-CN', { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false, timeZone: tz });
const fmtDate = new Intl.DateTimeFormat(lang === 'en' ? 'en-GB' : 'zh-CN', { year: 'numeric', month: '2-digit', day: '2-digit', weekday: 'short', timeZone: tz });
const fmtFull = new Intl.DateTimeFormat(lang === 'en' ? 'en-GB' : 'zh-CN', { month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false, timeZone: tz });
export const hm = (t) => (t == null ? '—' : fmtHM.format(t));
export const hms = (t) => (t == null ? '—' : fmtHMS.format(t));
export const dateLine = (t) => fmtDate.format(t);
export const fullTime = (t) => (t == null ? '—' : fmtFull.format(t));

/**
 * One event as a human sentence. `ctx` resolves names: responder(id) → {name, kind, department},
 * incident(id) → incident object, grid(id) → {name}.
 * Returns {time, text, tail} — tail is "category · grid".
 */
export function sentence(ev, ctx) {
  const inc = ev.incident ? ctx.incident(ev.incident) : null;
  const who = (rid) => {
    if (!rid) return '';
    const r = ctx.responder(rid);
    if (!r) return rid;
    const k = r.kind === 'department' && r.department ? deptName(r.department) : (KIND[r.kind] || '');
    return `${k} ${r.name || rid}`.trim();
  };
  // `by` is an operator's name, or a responder id when a field device did it (e.g. on-the-spot close).
  const op = (by) => (!by ? '' : ctx.responder(by) ? who(by) : `${L('值班员', 'Operator')} ${by}`);
  let text;
  switch (ev.type) {
    case 'incident.reported': {
      const src = ev.source || inc?.source;
      const actor = ev.reporter && ctx.responder(ev.reporter) ? who(ev.reporter) : (SOURCE[src] || src || '');
      text = ev.handled ? L(`${actor} 上报并当场处置`, `${actor} reported and fixed on the spot`)
        : L(`${actor} 上报`, `${actor} reported`);
      if (ev.priority === 1) text += L('（特急）', ' (urgent)');
      break;
    }
    case 'incident.offered':
      text = L(`派单给 ${who(ev.responder)}`, `offered to ${who(ev.responder)}`);
      if (ev.distance_m != null) text += ` (${distText(ev.distance_m)})`;
      break;
    case 'incident.offer_expired':
      text = ev.reason === 'offline' ? L(`${who(ev.responder)} 离线，派单收回`, `${who(ev.responder)} went offline, offer withdrawn`)
        : L(`${who(ev.responder)} 超时未接单`, `${who(ev.responder)} did not answer the offer`);
      break;
    case 'incident.declined':
      text = L(`${who(ev.responder)} 拒单`, `${who(ev.responder)} declined`) + (ev.reason ? `（${ev.reason}）` : '');
      break;
    case 'incident.assigned':
      text = ev.by ? L(`${op(ev.by)} 指派 ${who(ev.responder)}`, `${op(ev.by)} assigned ${who(ev.responder)}`)
        : L(`${who(ev.responder)} 接单`, `${who(ev.responder)} accepted`);
      break;
    case 'incident.arrived':
      text = L(`${who(ev.responder)} 到场`, `${who(ev.responder)} arrived`);
      break;
    case 'incident.resolved':
      text = ev.responder ? L(`${who(ev.responder)} 处置完毕`, `${who(ev.responder)} resolved it`)
        : L(`${op(ev.by)} 标记处置完毕`, `${op(ev.by)} marked it resolved`);
      if (ev.note) text += ` “${ev.note}”`;
      break;
    case 'incident.closed':
      text = ev.by ? L(`${op(ev.by)} 结案`, `${op(ev.by)} closed it`) : L('结案', 'closed');
      if (ev.on_time === false) text += L('（超期）', ' (late)');
      if (ev.note) text += ` “${ev.note}”`;
      break;
    case 'incident.escalated': {
      const to = LEVEL[ev.to_level] || ev.to_level;
      const why = REASON[ev.reason] || ev.reason || '';
      text = ev.by ? L(`${op(ev.by)} 升级至${to}`, `${op(ev.by)} escalated to ${to}`)
        : L(`升级至${to}`, `escalated to ${to}`);
      if (why) text += L(`（${why}）`, ` (${why})`);
      break;
    }
    case 'incident.transferred':
      text = L(`${ev.by ? op(ev.by) + ' ' : ''}转派${deptName(ev.department)}`, `${ev.by ? op(ev.by) + ' ' : ''}transferred to ${deptName(ev.department)}`);
      break;
    case 'incident.reopened':
      text = L(`${ev.by ? op(ev.by) + ' ' : ''}重新打开（返工）`, `${ev.by ? op(ev.by) + ' ' : ''}reopened (rework)`);
      if (ev.note) text += ` “${ev.note}”`;
      break;
    case 'incident.overdue':
      text = L(`${LEVEL[ev.level] || '镇级'}超期`, `overdue at ${LEVEL[ev.level] || 'town'} level`);
      break;
    case 'responder.status':
      text = L(`${who(ev.responder)} ${R_STATUS[ev.status] || ev.status}`, `${who(ev.responder)} is ${R_STATUS[ev.status] || ev.status}`);
      break;
    case 'responder.presence':
      text = ev.online ? L(`${who(ev.responder)} 上线`, `${who(ev.responder)} online`) : L(`${who(ev.responder)} 离线`, `${who(ev.responder)} offline`);
      break;
    default:
      text = ev.type;
  }
  let tail = '';
  if (inc) {
    const g = inc.grids?.['3'] ? ctx.grid(inc.grids['3']) : null;
    tail = [catName(inc.category), g?.name || inc.grids?.['3']].filter(Boolean).join(' · ');
  } else if (ev.incident) {
    tail = ev.incident;
  }
  return { text, tail };
}
