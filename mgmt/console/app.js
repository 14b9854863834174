// Warren's web console: a single page over the management API. Every request carries the
// logged-in user's Basic credentials; the server decides what the user may see and change,
// and the page hides the controls a monitoring-only user cannot use. All text from the broker
// is put on the page as text (never as HTML).
'use strict';

// ---------- small helpers ----------

const $ = (sel, el = document) => el.querySelector(sel);
const enc = encodeURIComponent;

/** Builds an element: h('td', {class: 'num'}, 'text', child, ...). Strings become text nodes. */
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'style') Object.assign(el.style, v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function fmtNum(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return '–';
  return Number(n).toLocaleString('en-US');
}
function fmtRate(n) {
  if (n === undefined || n === null) return '–';
  return (Math.round(n * 10) / 10).toLocaleString('en-US') + '/s';
}
function fmtBytes(n) {
  if (n === undefined || n === null) return '–';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + u[i];
}
function fmtTime(ms) {
  if (!ms) return '–';
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}
function ago(ms) {
  if (!ms) return '–';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.round(s / 60) + ' min ago';
  return Math.round(s / 3600) + ' h ago';
}
function rate(o, key) { return o && o[key + '_details'] ? o[key + '_details'].rate : 0; }

function flash(text, err) {
  const d = h('div', { class: err ? 'err' : '' }, text);
  $('#flash').append(d);
  setTimeout(() => d.remove(), err ? 8000 : 4000);
}

function bar(value, max, cls) {
  const pct = max > 0 ? Math.min(100, (100 * value) / max) : 0;
  return h('div', { class: 'bar ' + (cls || ''), title: fmtNum(value) }, h('span', { style: { width: pct + '%' } }));
}

// ---------- session and API ----------

const session = {
  auth: sessionStorage.getItem('warren-auth'),
  user: null,
  tags: [],
  get canChange() {
    const t = this.tags;
    return t.includes('administrator') || t.includes('policymaker') || t.includes('management');
  },
  get isAdmin() { return this.tags.includes('administrator'); },
};

class ApiError extends Error {
  constructor(status, reason) { super(reason || ('HTTP ' + status)); this.status = status; }
}

async function api(method, path, body) {
  // X-Requested-With: a 401 comes without WWW-Authenticate, so no browser login prompt.
  const opts = { method, headers: { Authorization: 'Basic ' + session.auth, 'X-Requested-With': 'XMLHttpRequest' } };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 401 && path === '/api/whoami') {
    // A session whose login stopped working (password changed, user deleted) goes back to
    // the login page; a login attempt just fails.
    if (session.user) logout();
    throw new ApiError(401, 'wrong username or password');
  }
  const text = await r.text();
  let data = null;
  if (text) { try { data = JSON.parse(text); } catch (_) { data = text; } }
  if (!r.ok) {
    const reason = data && typeof data === 'object' ? (data.reason || data.error) : data;
    throw new ApiError(r.status, typeof reason === 'string' ? reason : JSON.stringify(reason));
  }
  return data;
}
const GET = (p) => api('GET', p);

/** Runs an action from a button: shows its error, refreshes the page after. */
async function act(what, fn, after) {
  try {
    const r = await fn();
    flash(what + ': done');
    if (after) after(r); else render();
    return r;
  } catch (e) {
    flash(what + ' failed: ' + e.message, true);
    return null;
  }
}

function logout() {
  sessionStorage.removeItem('warren-auth');
  session.auth = null;
  session.user = null;
  location.hash = '#/login';
  render();
}

// ---------- pages and timers ----------

let timers = [];
let pageToken = 0;
function every(ms, fn) { timers.push(setInterval(fn, ms)); }
function stopTimers() { timers.forEach(clearInterval); timers = []; }
let aborters = [];
function stopStreams() { aborters.forEach((a) => a.abort()); aborters = []; }

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  const parts = path.split('/').filter((x) => x !== '').map(decodeURIComponent);
  const params = new URLSearchParams(query || '');
  return { parts, params };
}
function link(parts, params) {
  const p = '#/' + parts.map(enc).join('/');
  const q = params ? new URLSearchParams(params).toString() : '';
  return q ? p + '?' + q : p;
}

async function render() {
  stopTimers();
  stopStreams();
  const token = ++pageToken;
  const main = $('#main');
  const { parts, params } = parseHash();
  if (!session.auth || parts[0] === 'login') {
    $('#who').replaceChildren();
    $('#nav').style.visibility = 'hidden';
    main.replaceChildren(loginPage());
    return;
  }
  if (!session.user) {
    try {
      const me = await GET('/api/whoami');
      session.user = me.name;
      session.tags = Array.isArray(me.tags) ? me.tags : String(me.tags || '').split(',').filter(Boolean);
    } catch (e) {
      if (e.status === 401) { logout(); return; }
      main.replaceChildren(h('p', {}, 'Cannot reach the broker: ' + e.message));
      return;
    }
  }
  $('#nav').style.visibility = 'visible';
  $('#who').replaceChildren(
    session.user, ' ', h('span', { class: 'tag' }, session.tags.join(', ') || 'no tags'),
    h('button', { onclick: logout, id: 'logout' }, 'Log out'));
  const page = parts[0] || '';
  for (const a of document.querySelectorAll('#nav a')) {
    const target = a.getAttribute('href').replace('#/', '');
    a.classList.toggle('active', target === page || (target === 'queues' && page === 'queue') ||
      (target === 'exchanges' && page === 'exchange'));
  }
  const pages = {
    '': overviewPage, queues: queuesPage, queue: queuePage, exchanges: exchangesPage,
    exchange: exchangePage, connections: connectionsPage, channels: channelsPage,
    vhosts: vhostsPage, users: usersPage, policies: policiesPage, definitions: definitionsPage,
  };
  const fn = pages[page];
  if (!fn) { main.replaceChildren(h('p', {}, 'No such page.')); return; }
  try {
    const el = await fn(parts.slice(1), params, () => token === pageToken);
    if (token === pageToken && el) main.replaceChildren(el);
  } catch (e) {
    if (token === pageToken) main.replaceChildren(h('div', { class: 'panel' }, h('h1', {}, 'Error'), h('p', {}, e.message)));
  }
}

// ---------- login ----------

function loginPage() {
  const user = h('input', { name: 'username', id: 'username', autocomplete: 'username', required: true });
  const pass = h('input', { name: 'password', id: 'password', type: 'password', autocomplete: 'current-password' });
  const msg = h('p', { class: 'muted' }, 'Log in with a user of this broker (the same users and tags as its management API).');
  const form = h('form', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      session.auth = btoa(unescape(enc(user.value + ':' + pass.value)));
      session.user = null;
      try {
        await GET('/api/whoami');
        sessionStorage.setItem('warren-auth', session.auth);
        location.hash = '#/';
        render();
      } catch (e) {
        session.auth = null;
        msg.textContent = 'Login failed: ' + e.message;
        msg.className = 'tag bad';
      }
    },
  }, h('label', {}, 'Username', user), h('label', {}, 'Password', pass),
  h('button', { class: 'primary', type: 'submit', id: 'login' }, 'Log in'));
  return h('div', { class: 'panel login' }, h('h1', {}, 'Warren'), msg, form);
}

// ---------- charts ----------

/** A live line chart fed one point per poll: series is [{label, stroke}]. */
function liveChart(title, series, fmt) {
  const el = h('div', { class: 'chart' });
  const data = [[], ...series.map(() => [])];
  let plot = null;
  const opts = {
    title, width: 600, height: 200,
    scales: { x: { time: true } },
    series: [{}, ...series.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, value: (u, v) => (v === null || v === undefined ? '–' : fmt(v)) }))],
    axes: [{}, { values: (u, vals) => vals.map(fmt), size: 70 }],
  };
  function size() { return Math.max(300, el.clientWidth || 600); }
  return {
    el,
    push(values) {
      data[0].push(Date.now() / 1000);
      values.forEach((v, i) => data[i + 1].push(v));
      if (data[0].length > 120) data.forEach((a) => a.shift());
      if (!plot) {
        if (!el.isConnected) return;
        opts.width = size();
        plot = new uPlot(opts, data, el);
      } else {
        plot.setData(data);
      }
    },
  };
}

// ---------- overview ----------

async function overviewPage(_parts, _params, live) {
  const root = h('div', {});
  const cards = h('div', { class: 'cards' });
  const nodeBox = h('div', { class: 'panel' });
  const rates = liveChart('Message rates', [
    { label: 'publish', stroke: '#2f6fdf' }, { label: 'deliver / get', stroke: '#1f8a4c' },
    { label: 'ack', stroke: '#b7791f' }, { label: 'redeliver', stroke: '#c53030' },
  ], fmtRate);
  const depth = liveChart('Queued messages', [
    { label: 'ready', stroke: '#2f6fdf' }, { label: 'unacked', stroke: '#8a63d2' },
  ], fmtNum);
  root.append(h('h1', {}, 'Overview'), cards,
    h('div', { class: 'grid2' }, h('div', { class: 'panel' }, rates.el), h('div', { class: 'panel' }, depth.el)),
    nodeBox);
  async function refresh() {
    const o = await GET('/api/overview');
    let nodes = [];
    try { nodes = await GET('/api/nodes'); } catch (_) { /* not a monitoring user */ }
    if (!live()) return;
    const q = o.queue_totals || {}, t = o.object_totals || {}, m = o.message_stats || {};
    cards.replaceChildren(
      card('Ready', fmtNum(q.messages_ready)), card('Unacked', fmtNum(q.messages_unacknowledged)),
      card('Total', fmtNum(q.messages)), card('Queues', fmtNum(t.queues)),
      card('Exchanges', fmtNum(t.exchanges)), card('Connections', fmtNum(t.connections)),
      card('Channels', fmtNum(t.channels)), card('Consumers', fmtNum(t.consumers)),
      card('Publish', fmtRate(rate(m, 'publish'))), card('Deliver', fmtRate(rate(m, 'deliver_get'))));
    rates.push([rate(m, 'publish'), rate(m, 'deliver_get'), rate(m, 'ack'), rate(m, 'redeliver')]);
    depth.push([q.messages_ready || 0, q.messages_unacknowledged || 0]);
    const n = nodes[0];
    if (n) nodeBox.replaceChildren(nodePanel(n, o));
    else nodeBox.replaceChildren(h('p', { class: 'muted' }, 'Node details need the monitoring tag.'));
  }
  await refresh();
  every(5000, () => refresh().catch(() => {}));
  return root;
}

function card(k, v) { return h('div', { class: 'card' }, h('div', { class: 'k' }, k), h('div', { class: 'v' }, v)); }

function nodePanel(n, o) {
  const st = n.warren_store || {};
  const alarms = [];
  if (n.mem_alarm) alarms.push(h('span', { class: 'tag bad' }, 'memory alarm'));
  if (n.disk_free_alarm) alarms.push(h('span', { class: 'tag bad' }, 'disk alarm'));
  if (!alarms.length) alarms.push(h('span', { class: 'tag ok' }, 'no alarms'));
  const members = (n.cluster_members || []).map((m) => h('tr', {},
    h('td', {}, m.name), h('td', {}, m.state), h('td', {}, m.active ? 'active' : 'standby'),
    h('td', { class: 'num' }, fmtNum(m.lease_left_ms) + ' ms'), h('td', {}, m.advertised || '')));
  return h('div', {},
    h('h2', {}, 'Node ', n.name, ' ', ...alarms),
    h('table', { class: 'kv' },
      h('tr', {}, h('td', {}, 'Version'), h('td', {}, 'RabbitMQ ' + (o.rabbitmq_version || '') + ' compatible, uptime ' + Math.round((n.uptime || 0) / 1000) + ' s')),
      h('tr', {}, h('td', {}, 'Memory (RSS)'), h('td', {}, fmtBytes(n.mem_used) + ' of ' + fmtBytes(n.mem_limit) + ' watermark', bar(n.mem_used, n.mem_limit, 'mem'))),
      h('tr', {}, h('td', {}, 'Messages in memory'), h('td', {}, fmtBytes(n.warren_messages_memory) + ' of ' + fmtBytes(n.warren_cache_budget) + ' cache budget', bar(n.warren_messages_memory, n.warren_cache_budget))),
      h('tr', {}, h('td', {}, 'Disk free'), h('td', {}, fmtBytes(n.disk_free) + ' (limit ' + fmtBytes(n.disk_free_limit) + ')')),
      h('tr', {}, h('td', {}, 'Store'), h('td', {}, h('span', { class: 'tag' }, st.backend || '?'), ' ',
        st.fenced ? h('span', { class: 'tag bad' }, 'fenced') : h('span', { class: 'tag ok' }, 'writing'), ' ',
        st.over_limit ? h('span', { class: 'tag warn' }, 'holding publishers') : '', ' ',
        'committed ' + fmtNum(st.committed) + ' of ' + fmtNum(st.submitted) + ' writes, ' + fmtBytes(st.pending_bytes) + ' pending')),
      h('tr', {}, h('td', {}, 'File descriptors'), h('td', {}, fmtNum(n.fd_used) + ' of ' + fmtNum(n.fd_total)))),
    members.length ? h('div', {}, h('h3', {}, 'Cluster members'),
      h('table', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'State'), h('th', {}, 'Role'), h('th', { class: 'num' }, 'Lease left'), h('th', {}, 'Address')), members)) : '');
}

// ---------- lists with server-side paging ----------

/** A paged, sorted, filtered list from a RabbitMQ-style list endpoint. */
async function pagedList(opts, params, live) {
  const page = Number(params.get('page') || 1);
  const size = Number(params.get('page_size') || 100);
  const name = params.get('name') || '';
  const regex = params.get('use_regex') === 'true';
  const sort = params.get('sort') || 'name';
  const rev = params.get('sort_reverse') === 'true';
  const vhost = params.get('vhost') || '';
  const base = vhost ? opts.endpoint + '/' + enc(vhost) : opts.endpoint;
  const qs = new URLSearchParams({ page, page_size: size, name, use_regex: regex, sort, sort_reverse: rev, pagination: true });
  const data = await GET(base + '?' + qs);
  const go = (changes) => {
    const p = new URLSearchParams(params);
    for (const [k, v] of Object.entries(changes)) p.set(k, v);
    location.hash = link([opts.page], p);
  };
  const vhosts = await GET('/api/vhosts').catch(() => []);
  const filter = h('input', { value: name, placeholder: 'Filter by name', id: 'filter' });
  const re = h('input', { type: 'checkbox', checked: regex });
  const vsel = h('select', { id: 'vhost-filter' }, h('option', { value: '' }, 'All vhosts'),
    vhosts.map((v) => h('option', { value: v.name, selected: v.name === vhost }, v.name)));
  const tools = h('form', {
    class: 'toolbar', onsubmit: (ev) => { ev.preventDefault(); go({ name: filter.value, use_regex: re.checked, vhost: vsel.value, page: 1 }); },
  }, vsel, filter, h('label', { class: 'check' }, re, 'regex'), h('button', { type: 'submit' }, 'Filter'),
  h('span', { class: 'muted' }, fmtNum(data.filtered_count) + ' of ' + fmtNum(data.total_count)));
  const head = h('tr', {}, opts.columns.map((c) => {
    const sorted = c.sort && c.sort === sort;
    return h('th', {
      class: [c.num ? 'num' : '', c.sort ? 'sortable' : '', sorted ? 'sorted' : ''].join(' '),
      onclick: c.sort ? () => go({ sort: c.sort, sort_reverse: sorted ? !rev : c.num === true, page: 1 }) : null,
    }, c.title, sorted ? (rev ? ' ▼' : ' ▲') : '');
  }));
  const ctx = opts.prepare ? opts.prepare(data.items) : {};
  const rows = data.items.map((item) => h('tr', opts.href ? { class: 'clickable', onclick: (ev) => { if (ev.target.tagName !== 'BUTTON') location.hash = opts.href(item); } } : {},
    opts.columns.map((c) => h('td', { class: c.num ? 'num' : '' }, c.cell(item, ctx)))));
  const pages = Math.max(1, data.page_count || 1);
  const pager = h('div', { class: 'pager' },
    h('button', { disabled: page <= 1, onclick: () => go({ page: page - 1 }) }, '‹ Prev'),
    h('span', {}, 'Page ' + page + ' of ' + pages),
    h('button', { disabled: page >= pages, onclick: () => go({ page: page + 1 }), id: 'next-page' }, 'Next ›'),
    h('select', { onchange: (ev) => go({ page_size: ev.target.value, page: 1 }) },
      [20, 50, 100, 500].map((n) => h('option', { value: n, selected: n === size }, n + ' per page'))));
  return h('div', {}, h('h1', {}, opts.title), opts.extra || '', tools, h('table', { id: opts.page + '-table' }, head, rows), pager);
}

// ---------- queues ----------

async function queuesPage(_parts, params, live) {
  const list = await pagedList({
    title: 'Queues', page: 'queues', endpoint: '/api/queues',
    href: (q) => link(['queue', q.vhost, q.name]),
    prepare: (items) => ({ max: Math.max(1, ...items.map((q) => q.messages || 0)) }),
    columns: [
      { title: 'Virtual host', sort: 'vhost', cell: (q) => q.vhost },
      { title: 'Name', sort: 'name', cell: (q) => h('a', { href: link(['queue', q.vhost, q.name]) }, q.name) },
      { title: 'Type', cell: (q) => q.type },
      { title: 'Features', cell: (q) => [q.durable ? h('span', { class: 'tag' }, 'D') : '', q.auto_delete ? h('span', { class: 'tag' }, 'AD') : '', q.exclusive ? h('span', { class: 'tag' }, 'Excl') : '', q.policy ? h('span', { class: 'tag' }, q.policy) : ''] },
      { title: 'State', cell: (q) => h('span', { class: 'tag ' + (q.state === 'running' ? 'ok' : 'warn') }, q.state || '') },
      { title: 'Ready', sort: 'messages_ready', num: true, cell: (q) => fmtNum(q.messages_ready) },
      { title: 'Unacked', sort: 'messages_unacknowledged', num: true, cell: (q) => fmtNum(q.messages_unacknowledged) },
      { title: 'Total', sort: 'messages', num: true, cell: (q, c) => [fmtNum(q.messages), bar(q.messages || 0, c.max)] },
      { title: 'Incoming', num: true, cell: (q) => fmtRate(rate(q.message_stats, 'publish')) },
      { title: 'Deliver / get', num: true, cell: (q) => fmtRate(rate(q.message_stats, 'deliver_get')) },
      { title: 'Consumers', sort: 'consumers', num: true, cell: (q) => fmtNum(q.consumers) },
    ],
  }, params, live);
  if (session.canChange) list.insertBefore(addQueueForm(), list.children[1]);
  return list;
}

function addQueueForm() {
  const vhost = h('input', { value: '/', size: 8 });
  const name = h('input', { placeholder: 'name', required: true });
  const durable = h('input', { type: 'checkbox', checked: true });
  const args = h('input', { placeholder: '{"x-max-length": 1000}', size: 28 });
  return h('details', { class: 'panel' }, h('summary', {}, 'Add a queue'),
    h('form', {
      class: 'inline', onsubmit: (ev) => {
        ev.preventDefault();
        let a = {};
        try { a = args.value ? JSON.parse(args.value) : {}; } catch (e) { flash('Arguments are not JSON: ' + e.message, true); return; }
        act('Add queue', () => api('PUT', '/api/queues/' + enc(vhost.value) + '/' + enc(name.value), { durable: durable.checked, arguments: a }));
      },
    }, h('label', {}, 'Virtual host', vhost), h('label', {}, 'Name', name), h('label', {}, 'Arguments (JSON)', args),
    h('label', { class: 'check' }, durable, 'durable'), h('button', { class: 'primary', type: 'submit' }, 'Add queue')));
}

async function queuePage(parts, params, live) {
  const [vhost, name] = parts;
  const qpath = '/api/queues/' + enc(vhost) + '/' + enc(name);
  let q = await GET(qpath);
  const root = h('div', {});
  const stats = h('div', { class: 'cards' });
  const depth = liveChart('Depth', [{ label: 'ready', stroke: '#2f6fdf' }, { label: 'unacked', stroke: '#8a63d2' }], fmtNum);
  const rates = liveChart('Rates', [{ label: 'publish', stroke: '#2f6fdf' }, { label: 'deliver / get', stroke: '#1f8a4c' }, { label: 'ack', stroke: '#b7791f' }], fmtRate);
  const consumers = h('div', {});
  const fill = (q) => {
    stats.replaceChildren(card('Ready', fmtNum(q.messages_ready)), card('Unacked', fmtNum(q.messages_unacknowledged)),
      card('Total', fmtNum(q.messages)), card('Paged to store', fmtNum(q.messages_paged_out)),
      card('Consumers', fmtNum(q.consumers)), card('Bytes ready', fmtBytes(q.message_bytes_ready)),
      card('Publish', fmtRate(rate(q.message_stats, 'publish'))), card('Deliver', fmtRate(rate(q.message_stats, 'deliver_get'))));
    depth.push([q.messages_ready || 0, q.messages_unacknowledged || 0]);
    const m = q.message_stats || {};
    rates.push([rate(m, 'publish'), rate(m, 'deliver_get'), rate(m, 'ack')]);
    consumers.replaceChildren(h('table', {}, h('tr', {}, h('th', {}, 'Consumer tag'), h('th', {}, 'Channel'), h('th', {}, 'Ack'), h('th', {}, 'Prefetch'), h('th', {}, 'Active')),
      (q.consumer_details || []).map((c) => h('tr', {}, h('td', {}, c.consumer_tag), h('td', {}, (c.channel_details || {}).name || ''),
        h('td', {}, c.ack_required ? 'manual' : 'auto'), h('td', { class: 'num' }, fmtNum(c.prefetch_count)), h('td', {}, String(c.active))))));
    if (!(q.consumer_details || []).length) consumers.replaceChildren(h('p', { class: 'muted' }, 'No consumers.'));
  };
  const bindings = await GET(qpath + '/bindings');
  const args = Object.entries(q.arguments || {});
  const effective = Object.entries(q.effective_policy_definition || {});
  const controls = session.canChange ? h('div', { class: 'toolbar' },
    h('button', { onclick: () => { if (confirm('Purge every ready message of ' + name + '?')) act('Purge', () => api('DELETE', qpath + '/contents')); } }, 'Purge'),
    h('button', { class: 'danger', onclick: () => { if (confirm('Delete queue ' + name + '?')) act('Delete queue', () => api('DELETE', qpath), () => { location.hash = '#/queues'; }); } }, 'Delete queue'))
    : h('p', { class: 'ro-note' }, 'Read-only: your tags do not allow changes.');
  root.append(
    h('h1', {}, 'Queue ', h('span', { class: 'mono' }, name), ' ', h('span', { class: 'muted' }, 'in ' + vhost)),
    h('div', { class: 'toolbar' }, h('span', { class: 'tag' }, q.type), q.durable ? h('span', { class: 'tag' }, 'durable') : '',
      q.auto_delete ? h('span', { class: 'tag' }, 'auto-delete') : '', q.exclusive ? h('span', { class: 'tag' }, 'exclusive') : '',
      h('span', { class: 'tag ' + (q.state === 'running' ? 'ok' : 'warn') }, q.state)),
    stats,
    h('div', { class: 'grid2' }, h('div', { class: 'panel' }, depth.el), h('div', { class: 'panel' }, rates.el)),
    controls,
    await messageBrowser(vhost, name, qpath, live),
    h('h2', {}, 'Unacknowledged deliveries'), await unackedTable(qpath),
    h('h2', {}, 'Consumers'), consumers,
    h('div', { class: 'grid2' },
      h('div', {}, h('h2', {}, 'Bindings'), h('table', {}, h('tr', {}, h('th', {}, 'From'), h('th', {}, 'Routing key'), h('th', {}, 'Arguments')),
        bindings.map((b) => h('tr', {}, h('td', {}, b.source === '' ? '(default exchange)' : h('a', { href: link(['exchange', vhost, b.source]) }, b.source)),
          h('td', { class: 'mono' }, b.routing_key), h('td', { class: 'mono' }, JSON.stringify(b.arguments || {})))))),
      h('div', {}, h('h2', {}, 'Policy and arguments'), h('table', { class: 'kv' },
        h('tr', {}, h('td', {}, 'Policy'), h('td', {}, q.policy || '–')),
        h('tr', {}, h('td', {}, 'Operator policy'), h('td', {}, q.operator_policy || '–')),
        effective.map(([k, v]) => h('tr', {}, h('td', {}, 'effective ' + k), h('td', { class: 'mono' }, JSON.stringify(v)))),
        args.map(([k, v]) => h('tr', {}, h('td', {}, k), h('td', { class: 'mono' }, JSON.stringify(v))))))));
  setTimeout(() => fill(q), 0);
  every(5000, async () => {
    try { q = await GET(qpath); if (live()) fill(q); } catch (_) { /* gone */ }
  });
  return root;
}

async function unackedTable(qpath) {
  const held = await GET(qpath + '/unacked');
  if (!held.length) return h('p', { class: 'muted' }, 'None.');
  return h('table', { id: 'unacked-table' }, h('tr', {}, h('th', {}, 'Channel'), h('th', {}, 'Consumer'), h('th', { class: 'num' }, 'Delivery tag'),
    h('th', { class: 'num' }, 'Position'), h('th', {}, 'Redelivered'), h('th', {}, 'Held since')),
  held.slice(0, 500).map((u) => h('tr', {}, h('td', {}, u.channel_details.name), h('td', {}, u.consumer_tag || '(basic.get)'),
    h('td', { class: 'num' }, u.delivery_tag), h('td', { class: 'num' }, u.position), h('td', {}, String(u.redelivered)),
    h('td', { title: fmtTime(u.delivered_at) }, ago(u.delivered_at)))));
}

// ---------- the message browser ----------

async function messageBrowser(vhost, name, qpath, live) {
  const box = h('div', { class: 'panel', id: 'browser' });
  const state = { from: 0, stack: [], q: '', field: 'any', selected: new Set(), items: [] };
  const table = h('div', {});
  const info = h('span', { class: 'muted' });
  const search = h('input', { placeholder: 'Search text', id: 'search' });
  const field = h('select', {}, ['any', 'routing_key', 'message_id', 'correlation_id', 'header', 'body'].map((f) => h('option', { value: f }, f.replace('_', ' '))));
  const prev = h('button', { onclick: () => { state.from = state.stack.pop() || 0; load(); } }, '‹ Previous');
  const next = h('button', { id: 'browse-next', onclick: () => { if (state.next !== null) { state.stack.push(state.from); state.from = state.next; load(); } } }, 'Next ›');
  const actions = session.canChange ? [
    h('button', { id: 'move-selected', onclick: () => moveDialog(vhost, name, qpath, [...state.selected], false, load) }, 'Move…'),
    h('button', { onclick: () => moveDialog(vhost, name, qpath, [...state.selected], true, load) }, 'Copy…'),
    h('button', { onclick: () => act('Return to origin', () => api('POST', qpath + '/messages/return', { positions: [...state.selected] }), report(load)) }, 'Return to origin'),
    h('button', { class: 'danger', onclick: () => { if (confirm('Delete ' + state.selected.size + ' message(s)?')) act('Delete', () => api('POST', qpath + '/messages/delete', { positions: [...state.selected] }), report(load)); } }, 'Delete'),
  ] : [];
  async function load() {
    const qs = new URLSearchParams({ from: state.from, count: 50, truncate: 4096 });
    if (state.q) { qs.set('q', state.q); qs.set('field', state.field); qs.set('scan', 100000); }
    const page = await GET(qpath + '/messages?' + qs);
    if (!live()) return;
    state.next = page.next;
    state.items = page.items;
    state.selected.clear();
    next.disabled = page.next === null;
    prev.disabled = state.stack.length === 0;
    info.textContent = (state.q ? 'Scanned ' + fmtNum(page.scanned) + ' messages, ' + page.items.length + ' match' + (page.next === null ? ' (end of queue)' : ' (more after position ' + page.next + ')') : page.items.length + ' messages from position ' + state.from) + '.';
    table.replaceChildren(messagesTable(page.items, state));
  }
  box.append(h('h2', {}, 'Messages (browsing does not consume, reorder or mark them redelivered)'),
    h('form', { class: 'toolbar', onsubmit: (ev) => { ev.preventDefault(); state.q = search.value; state.field = field.value; state.from = 0; state.stack = []; load(); } },
      field, search, h('button', { type: 'submit' }, 'Search'), info),
    h('div', { class: 'toolbar' }, prev, next, ...actions), table);
  await load();
  return box;
}

const report = (reload) => (r) => {
  flash('Done: ' + r.done + (r.gone ? ', gone: ' + r.gone : '') + (r.unroutable ? ', unroutable: ' + r.unroutable : ''));
  reload();
};

function messagesTable(items, state) {
  if (!items.length) return h('p', { class: 'muted' }, 'No messages here.');
  const rows = [];
  for (const m of items) {
    const check = h('input', {
      type: 'checkbox', class: 'pick', 'data-position': m.position,
      onclick: (ev) => { ev.stopPropagation(); if (ev.target.checked) state.selected.add(m.position); else state.selected.delete(m.position); row.classList.toggle('sel', ev.target.checked); },
    });
    const detail = h('tr', { class: 'details', style: { display: 'none' } }, h('td', { colspan: 8 }, messageDetail(m)));
    const p = m.properties || {};
    const row = h('tr', { class: 'clickable message-row', 'data-position': m.position, onclick: () => { detail.style.display = detail.style.display === 'none' ? '' : 'none'; } },
      h('td', {}, session.canChange ? check : ''), h('td', { class: 'num' }, m.position),
      h('td', { class: 'mono' }, m.routing_key), h('td', {}, m.exchange || '(default)'),
      h('td', {}, m.redelivered ? h('span', { class: 'tag warn' }, 'redelivered') : '', m.paged ? h('span', { class: 'tag' }, 'paged') : '', p.headers && p.headers['x-death'] ? h('span', { class: 'tag bad' }, 'dead-lettered') : ''),
      h('td', { class: 'mono' }, p.message_id || ''), h('td', { class: 'num' }, fmtBytes(m.payload_bytes)),
      h('td', { class: 'mono' }, preview(m)));
    rows.push(row, detail);
  }
  return h('table', { id: 'messages-table' }, h('tr', {}, h('th', {}, ''), h('th', { class: 'num' }, 'Position'), h('th', {}, 'Routing key'), h('th', {}, 'Exchange'), h('th', {}, 'Flags'), h('th', {}, 'Message id'), h('th', { class: 'num' }, 'Size'), h('th', {}, 'Body')), rows);
}

function bodyBytes(m) {
  if (m.payload_encoding === 'base64') return Uint8Array.from(atob(m.payload), (c) => c.charCodeAt(0));
  return new TextEncoder().encode(m.payload);
}
function preview(m) {
  const text = m.payload_encoding === 'string' ? m.payload : '(binary, ' + fmtBytes(m.payload_bytes) + ')';
  return text.length > 80 ? text.slice(0, 80) + '…' : text;
}
function hexdump(bytes) {
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const chunk = bytes.slice(i, i + 16);
    const hex = Array.from(chunk, (b) => b.toString(16).padStart(2, '0')).join(' ');
    const asc = Array.from(chunk, (b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : '.')).join('');
    lines.push(i.toString(16).padStart(8, '0') + '  ' + hex.padEnd(48) + '  ' + asc);
  }
  return lines.join('\n');
}

function messageDetail(m) {
  const p = m.properties || {};
  const headers = p.headers || {};
  const props = Object.entries(p).filter(([k]) => k !== 'headers');
  const deaths = Array.isArray(headers['x-death']) ? headers['x-death'] : null;
  const otherHeaders = Object.entries(headers).filter(([k]) => k !== 'x-death');
  const pre = h('pre', { class: 'body' });
  const bytes = bodyBytes(m);
  let json = null;
  if (m.payload_encoding === 'string') { try { json = JSON.parse(m.payload); } catch (_) { json = null; } }
  const show = (mode) => {
    if (mode === 'json' && json !== null) pre.textContent = JSON.stringify(json, null, 2);
    else if (mode === 'hex') pre.textContent = hexdump(bytes);
    else pre.textContent = m.payload_encoding === 'string' ? m.payload : new TextDecoder('utf-8', { fatal: false }).decode(bytes);
  };
  show(json !== null ? 'json' : (m.payload_encoding === 'string' ? 'text' : 'hex'));
  return h('div', {},
    h('div', { class: 'grid2' },
      h('div', {}, h('h3', {}, 'Properties'), h('table', { class: 'kv' },
        props.map(([k, v]) => h('tr', {}, h('td', {}, k), h('td', { class: 'mono' }, String(v)))),
        h('tr', {}, h('td', {}, 'delivery count'), h('td', {}, String(m.delivery_count))))),
      h('div', {}, h('h3', {}, 'Headers'), otherHeaders.length ? h('table', { class: 'kv' },
        otherHeaders.map(([k, v]) => h('tr', {}, h('td', {}, k), h('td', { class: 'mono' }, typeof v === 'string' ? v : JSON.stringify(v))))) : h('p', { class: 'muted' }, 'None.'))),
    deaths ? h('div', {}, h('h3', {}, 'x-death'), h('table', { class: 'x-death' },
      h('tr', {}, ['queue', 'reason', 'count', 'exchange', 'routing-keys', 'time', 'original-expiration'].map((k) => h('th', {}, k))),
      deaths.map((d) => h('tr', {}, h('td', {}, d.queue), h('td', {}, d.reason), h('td', { class: 'num' }, d.count), h('td', {}, d.exchange),
        h('td', { class: 'mono' }, (d['routing-keys'] || []).join(', ')), h('td', {}, d.time ? fmtTime(d.time * 1000) : ''), h('td', {}, d['original-expiration'] || ''))))) : '',
    h('h3', {}, 'Body ', h('span', { class: 'muted' }, fmtBytes(m.payload_bytes) + (m.payload_truncated ? ', first ' + fmtBytes(bytes.length) + ' shown' : ''))),
    h('div', { class: 'toolbar' }, h('button', { onclick: () => show('text') }, 'Text'),
      json !== null ? h('button', { onclick: () => show('json') }, 'JSON') : '', h('button', { onclick: () => show('hex') }, 'Hex')),
    pre);
}

async function moveDialog(vhost, name, qpath, positions, copy, reload) {
  if (!positions.length) { flash('Select messages first (the checkboxes).', true); return; }
  const dlg = $('#dialog');
  const queues = await GET('/api/queues/' + enc(vhost) + '?page=1&page_size=500&pagination=true&sort=name').catch(() => ({ items: [] }));
  const kind = h('select', { id: 'move-kind' }, h('option', { value: 'queue' }, 'a queue'), h('option', { value: 'exchange' }, 'an exchange'));
  const target = h('input', { id: 'move-target', list: 'move-queues', required: true, placeholder: 'queue name' });
  const rk = h('input', { id: 'move-rk', placeholder: "message's own routing key" });
  const rkLabel = h('label', { style: { display: 'none' } }, 'Routing key', rk);
  kind.onchange = () => { rkLabel.style.display = kind.value === 'exchange' ? '' : 'none'; target.placeholder = kind.value + ' name'; };
  const dl = h('datalist', { id: 'move-queues' }, (queues.items || []).filter((q) => q.name !== name).map((q) => h('option', { value: q.name })));
  const verb = copy ? 'Copy' : 'Move';
  dlg.replaceChildren(h('form', {
    method: 'dialog',
    onsubmit: async (ev) => {
      ev.preventDefault();
      const body = { positions };
      if (kind.value === 'queue') body.queue = target.value; else { body.exchange = target.value; if (rk.value) body.routing_key = rk.value; }
      dlg.close();
      await act(verb, () => api('POST', qpath + '/messages/' + (copy ? 'copy' : 'move'), body), report(reload));
    },
  }, h('h2', {}, verb + ' ' + positions.length + ' message(s) from ' + name),
  h('p', { class: 'muted' }, 'Each message is ' + (copy ? 'copied' : 'moved') + ' in one store transaction, in order' + (copy ? '.' : ': never lost, never doubled, even across a crash.')),
  h('label', {}, 'To', kind), h('label', {}, 'Name', target, dl), rkLabel,
  h('div', { class: 'buttons' }, h('button', { type: 'button', onclick: () => dlg.close() }, 'Cancel'), h('button', { class: 'primary', type: 'submit', id: 'move-confirm' }, verb))));
  dlg.showModal();
  target.focus();
}

// ---------- exchanges ----------

async function exchangesPage(_parts, params, live) {
  return pagedList({
    title: 'Exchanges', page: 'exchanges', endpoint: '/api/exchanges',
    href: (x) => link(['exchange', x.vhost, x.name || 'amq.default']),
    columns: [
      { title: 'Virtual host', sort: 'vhost', cell: (x) => x.vhost },
      { title: 'Name', sort: 'name', cell: (x) => x.name || '(AMQP default)' },
      { title: 'Type', sort: 'type', cell: (x) => x.type },
      { title: 'Features', cell: (x) => [x.durable ? h('span', { class: 'tag' }, 'D') : '', x.internal ? h('span', { class: 'tag' }, 'I') : '', x.auto_delete ? h('span', { class: 'tag' }, 'AD') : ''] },
      { title: 'In', num: true, cell: (x) => fmtRate(rate(x.message_stats, 'publish_in')) },
      { title: 'Out', num: true, cell: (x) => fmtRate(rate(x.message_stats, 'publish_out')) },
    ],
  }, params, live);
}

async function exchangePage(parts, _params, live) {
  const [vhost, name] = parts;
  const xpath = '/api/exchanges/' + enc(vhost) + '/' + enc(name);
  const x = await GET(xpath);
  const shown = x.name || '(AMQP default)';
  const out = await GET(xpath + '/bindings/source').catch(() => []);
  const root = h('div', {}, h('h1', {}, 'Exchange ', h('span', { class: 'mono' }, shown), ' ', h('span', { class: 'muted' }, 'in ' + vhost)),
    h('div', { class: 'toolbar' }, h('span', { class: 'tag' }, x.type), x.durable ? h('span', { class: 'tag' }, 'durable') : '', x.internal ? h('span', { class: 'tag' }, 'internal') : ''),
    h('h2', {}, 'Bindings from this exchange'),
    out.length ? h('table', {}, h('tr', {}, h('th', {}, 'To'), h('th', {}, 'Routing key'), h('th', {}, 'Arguments'), h('th', {}, '')),
      out.map((b) => h('tr', {}, h('td', {}, b.destination_type === 'queue' ? h('a', { href: link(['queue', vhost, b.destination]) }, b.destination) : h('a', { href: link(['exchange', vhost, b.destination]) }, b.destination)),
        h('td', { class: 'mono' }, b.routing_key), h('td', { class: 'mono' }, JSON.stringify(b.arguments || {})),
        h('td', {}, session.canChange ? h('button', { onclick: () => act('Unbind', () => api('DELETE', '/api/bindings/' + enc(vhost) + '/e/' + enc(x.name) + '/' + (b.destination_type === 'queue' ? 'q' : 'e') + '/' + enc(b.destination) + '/' + enc(b.properties_key))) }, 'Unbind') : '')))) : h('p', { class: 'muted' }, 'None.'));
  if (session.canChange && x.name) {
    const dest = h('input', { placeholder: 'queue name', required: true });
    const rk = h('input', { placeholder: 'routing key' });
    root.append(h('form', { class: 'inline panel', onsubmit: (ev) => { ev.preventDefault(); act('Bind', () => api('POST', '/api/bindings/' + enc(vhost) + '/e/' + enc(x.name) + '/q/' + enc(dest.value), { routing_key: rk.value, arguments: {} })); } },
      h('label', {}, 'Bind to queue', dest), h('label', {}, 'Routing key', rk), h('button', { type: 'submit' }, 'Bind')));
  }
  if (session.canChange) root.append(publishForm(vhost, x.name));
  root.append(tailPanel(vhost, x.name));
  if (session.canChange && x.name && !x.name.startsWith('amq.')) {
    root.append(h('div', { class: 'toolbar' }, h('button', { class: 'danger', onclick: () => { if (confirm('Delete exchange ' + x.name + '?')) act('Delete exchange', () => api('DELETE', xpath), () => { location.hash = '#/exchanges'; }); } }, 'Delete exchange')));
  }
  return root;
}

function publishForm(vhost, exchange) {
  const rk = h('input', { placeholder: 'routing key', id: 'publish-rk' });
  const persistent = h('input', { type: 'checkbox', checked: true });
  const headers = h('input', { placeholder: '{"k": "v"}', size: 24 });
  const props = h('input', { placeholder: '{"message_id": "m1"}', size: 24 });
  const payload = h('textarea', { rows: 4, cols: 60, id: 'publish-payload' });
  return h('div', { class: 'panel' }, h('h2', {}, 'Publish a message'),
    h('form', {
      class: 'inline', onsubmit: (ev) => {
        ev.preventDefault();
        let p = {};
        try {
          p = props.value ? JSON.parse(props.value) : {};
          if (headers.value) p.headers = JSON.parse(headers.value);
        } catch (e) { flash('Not JSON: ' + e.message, true); return; }
        if (persistent.checked) p.delivery_mode = 2;
        act('Publish', () => api('POST', '/api/exchanges/' + enc(vhost) + '/' + enc(exchange || 'amq.default') + '/publish',
          { routing_key: rk.value, payload: payload.value, payload_encoding: 'string', properties: p }), (r) => flash(r.routed ? 'Routed.' : 'Not routed: no queue bound for that key.', !r.routed));
      },
    }, h('label', {}, 'Routing key', rk), h('label', {}, 'Headers (JSON)', headers), h('label', {}, 'Properties (JSON)', props),
    h('label', { class: 'check' }, persistent, 'persistent'), h('label', {}, 'Payload', payload), h('button', { class: 'primary', type: 'submit' }, 'Publish')));
}

/** Live tail: messages routed through the exchange, sampled by the server, streamed. */
function tailPanel(vhost, exchange) {
  const list = h('tbody', {});
  const status = h('span', { class: 'muted' }, 'Not watching.');
  let ctl = null;
  const start = async () => {
    if (ctl) return;
    ctl = new AbortController();
    aborters.push(ctl);
    status.textContent = 'Watching…';
    try {
      const r = await fetch('/api/exchanges/' + enc(vhost) + '/' + enc(exchange || 'amq.default') + '/tail', { headers: { Authorization: 'Basic ' + session.auth }, signal: ctl.signal });
      if (!r.ok) { status.textContent = 'Tail refused: HTTP ' + r.status; ctl = null; return; }
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const ev = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = ev.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
          if (!data) continue;
          const m = JSON.parse(data);
          if (m.dropped) { status.textContent = 'Watching (' + m.dropped + ' not shown: sampled).'; continue; }
          list.prepend(h('tr', {}, h('td', {}, new Date(m.at).toLocaleTimeString()), h('td', { class: 'mono' }, m.routing_key),
            h('td', {}, (m.queues || []).join(', ') || h('span', { class: 'tag warn' }, 'unroutable')), h('td', { class: 'num' }, fmtBytes(m.payload_bytes)), h('td', { class: 'mono' }, preview(m))));
          while (list.children.length > 200) list.lastChild.remove();
        }
      }
    } catch (e) {
      if (e.name !== 'AbortError') status.textContent = 'Tail ended: ' + e.message;
    }
    ctl = null;
  };
  const stop = () => { if (ctl) { ctl.abort(); ctl = null; status.textContent = 'Stopped.'; } };
  return h('div', { class: 'panel' }, h('h2', {}, 'Live tail'),
    h('p', { class: 'muted' }, 'Messages routed through this exchange as they pass, without a queue of your own. Sampled: at most 20 per second are shown.'),
    h('div', { class: 'toolbar' }, h('button', { onclick: start, id: 'tail-start' }, 'Watch'), h('button', { onclick: stop }, 'Stop'), status),
    h('div', { class: 'tail' }, h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'Time'), h('th', {}, 'Routing key'), h('th', {}, 'Queues'), h('th', { class: 'num' }, 'Size'), h('th', {}, 'Body'))), list)));
}

// ---------- connections and channels ----------

async function connectionsPage(_parts, params, live) {
  return pagedList({
    title: 'Connections', page: 'connections', endpoint: '/api/connections',
    columns: [
      { title: 'Name', sort: 'name', cell: (c) => c.name },
      { title: 'Virtual host', sort: 'vhost', cell: (c) => c.vhost },
      { title: 'User', sort: 'user', cell: (c) => c.user },
      { title: 'State', cell: (c) => h('span', { class: 'tag ' + (c.state === 'running' ? 'ok' : 'warn') }, c.state) },
      { title: 'Client', cell: (c) => ((c.client_properties || {}).product || '') + ' ' + ((c.client_properties || {}).version || '') },
      { title: 'TLS', cell: (c) => (c.ssl ? 'yes' : 'no') },
      { title: 'Channels', sort: 'channels', num: true, cell: (c) => fmtNum(c.channels) },
      { title: 'In', num: true, cell: (c) => fmtBytes(rate(c, 'recv_oct')) + '/s' },
      { title: 'Out', num: true, cell: (c) => fmtBytes(rate(c, 'send_oct')) + '/s' },
      { title: '', cell: (c) => (session.canChange ? h('button', { class: 'danger close-conn', onclick: () => { if (confirm('Close ' + c.name + '?')) act('Close connection', () => api('DELETE', '/api/connections/' + enc(c.name))); } }, 'Close') : '') },
    ],
  }, params, live);
}

async function channelsPage(_parts, params, live) {
  return pagedList({
    title: 'Channels', page: 'channels', endpoint: '/api/channels',
    columns: [
      { title: 'Channel', sort: 'name', cell: (c) => c.name },
      { title: 'Virtual host', cell: (c) => c.vhost },
      { title: 'User', cell: (c) => c.user },
      { title: 'Mode', cell: (c) => [c.confirm ? h('span', { class: 'tag' }, 'confirm') : '', c.transactional ? h('span', { class: 'tag' }, 'tx') : ''] },
      { title: 'Prefetch', num: true, cell: (c) => fmtNum(c.prefetch_count) },
      { title: 'Unacked', sort: 'messages_unacknowledged', num: true, cell: (c) => fmtNum(c.messages_unacknowledged) },
      { title: 'Consumers', num: true, cell: (c) => fmtNum(c.consumer_count) },
      { title: 'Publish', num: true, cell: (c) => fmtRate(rate(c.message_stats, 'publish')) },
      { title: 'Deliver', num: true, cell: (c) => fmtRate(rate(c.message_stats, 'deliver_get')) },
    ],
  }, params, live);
}

// ---------- vhosts, users, permissions, policies ----------

async function vhostsPage() {
  const vhosts = await GET('/api/vhosts');
  const name = h('input', { placeholder: 'name', required: true, id: 'vhost-name' });
  const desc = h('input', { placeholder: 'description' });
  return h('div', {}, h('h1', {}, 'Virtual hosts'),
    session.isAdmin ? h('form', { class: 'inline panel', onsubmit: (ev) => { ev.preventDefault(); act('Add vhost', () => api('PUT', '/api/vhosts/' + enc(name.value), { description: desc.value })); } },
      h('label', {}, 'Name', name), h('label', {}, 'Description', desc), h('button', { class: 'primary', type: 'submit' }, 'Add virtual host')) : '',
    h('table', { id: 'vhosts-table' }, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Description'), h('th', { class: 'num' }, 'Messages'), h('th', { class: 'num' }, 'Ready'), h('th', { class: 'num' }, 'Unacked'), h('th', {}, '')),
      vhosts.map((v) => h('tr', {}, h('td', {}, h('a', { href: link(['queues'], { vhost: v.name }) }, v.name)), h('td', {}, v.description || ''),
        h('td', { class: 'num' }, fmtNum(v.messages)), h('td', { class: 'num' }, fmtNum(v.messages_ready)), h('td', { class: 'num' }, fmtNum(v.messages_unacknowledged)),
        h('td', {}, session.isAdmin ? h('button', { class: 'danger', onclick: () => { if (confirm('Delete vhost ' + v.name + ' and everything in it?')) act('Delete vhost', () => api('DELETE', '/api/vhosts/' + enc(v.name))); } }, 'Delete') : '')))));
}

async function usersPage() {
  if (!session.isAdmin) return h('div', {}, h('h1', {}, 'Users'), h('p', { class: 'muted' }, 'Only administrators see users and permissions.'));
  const [users, perms, vhosts] = await Promise.all([GET('/api/users'), GET('/api/permissions'), GET('/api/vhosts')]);
  const name = h('input', { placeholder: 'name', required: true, id: 'user-name' });
  const pass = h('input', { type: 'password', placeholder: 'password', id: 'user-pass' });
  const tags = h('input', { placeholder: 'administrator, monitoring…', id: 'user-tags' });
  const pUser = h('select', {}, users.map((u) => h('option', { value: u.name }, u.name)));
  const pVhost = h('select', {}, vhosts.map((v) => h('option', { value: v.name }, v.name)));
  const conf = h('input', { value: '.*', size: 6 }), write = h('input', { value: '.*', size: 6 }), read = h('input', { value: '.*', size: 6 });
  const tagList = (t) => (Array.isArray(t) ? t : String(t || '').split(',').filter(Boolean));
  return h('div', {}, h('h1', {}, 'Users'),
    h('form', { class: 'inline panel', onsubmit: (ev) => { ev.preventDefault(); const body = { tags: tags.value }; if (pass.value) body.password = pass.value; else body.password_hash = ''; act('Save user', () => api('PUT', '/api/users/' + enc(name.value), body)); } },
      h('label', {}, 'Name', name), h('label', {}, 'Password (empty: no password login)', pass), h('label', {}, 'Tags', tags), h('button', { class: 'primary', type: 'submit' }, 'Add or update user')),
    h('table', { id: 'users-table' }, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Tags'), h('th', {}, 'Can access'), h('th', {}, '')),
      users.map((u) => h('tr', {}, h('td', {}, u.name), h('td', {}, tagList(u.tags).map((t) => h('span', { class: 'tag' }, t))),
        h('td', {}, perms.filter((p) => p.user === u.name).map((p) => p.vhost).join(', ') || '–'),
        h('td', {}, h('button', { onclick: () => { name.value = u.name; tags.value = tagList(u.tags).join(','); name.focus(); } }, 'Edit'), ' ',
          h('button', { class: 'danger', onclick: () => { if (confirm('Delete user ' + u.name + '?')) act('Delete user', () => api('DELETE', '/api/users/' + enc(u.name))); } }, 'Delete'))))),
    h('h2', {}, 'Permissions'),
    h('form', { class: 'inline panel', onsubmit: (ev) => { ev.preventDefault(); act('Set permission', () => api('PUT', '/api/permissions/' + enc(pVhost.value) + '/' + enc(pUser.value), { configure: conf.value, write: write.value, read: read.value })); } },
      h('label', {}, 'User', pUser), h('label', {}, 'Virtual host', pVhost), h('label', {}, 'Configure', conf), h('label', {}, 'Write', write), h('label', {}, 'Read', read), h('button', { type: 'submit' }, 'Set permission')),
    h('table', {}, h('tr', {}, h('th', {}, 'User'), h('th', {}, 'Virtual host'), h('th', {}, 'Configure'), h('th', {}, 'Write'), h('th', {}, 'Read'), h('th', {}, '')),
      perms.map((p) => h('tr', {}, h('td', {}, p.user), h('td', {}, p.vhost), h('td', { class: 'mono' }, p.configure), h('td', { class: 'mono' }, p.write), h('td', { class: 'mono' }, p.read),
        h('td', {}, h('button', { class: 'danger', onclick: () => act('Clear permission', () => api('DELETE', '/api/permissions/' + enc(p.vhost) + '/' + enc(p.user))) }, 'Clear'))))));
}

async function policiesPage() {
  const policies = await GET('/api/policies');
  const can = session.isAdmin || session.tags.includes('policymaker');
  const vhost = h('input', { value: '/', size: 8 });
  const name = h('input', { placeholder: 'name', required: true });
  const pattern = h('input', { placeholder: '^orders\\.', required: true });
  const applyTo = h('select', {}, ['queues', 'exchanges', 'all'].map((a) => h('option', { value: a }, a)));
  const prio = h('input', { type: 'number', value: 0, size: 4 });
  const def = h('textarea', { rows: 2, cols: 40, placeholder: '{"max-length": 10000}' });
  return h('div', {}, h('h1', {}, 'Policies'),
    can ? h('form', {
      class: 'inline panel', onsubmit: (ev) => {
        ev.preventDefault();
        let d;
        try { d = JSON.parse(def.value || '{}'); } catch (e) { flash('Definition is not JSON: ' + e.message, true); return; }
        act('Save policy', () => api('PUT', '/api/policies/' + enc(vhost.value) + '/' + enc(name.value), { pattern: pattern.value, definition: d, priority: Number(prio.value), 'apply-to': applyTo.value }));
      },
    }, h('label', {}, 'Virtual host', vhost), h('label', {}, 'Name', name), h('label', {}, 'Pattern', pattern), h('label', {}, 'Apply to', applyTo),
    h('label', {}, 'Priority', prio), h('label', {}, 'Definition (JSON)', def), h('button', { class: 'primary', type: 'submit' }, 'Add or update policy')) : '',
    h('table', {}, h('tr', {}, h('th', {}, 'Virtual host'), h('th', {}, 'Name'), h('th', {}, 'Pattern'), h('th', {}, 'Apply to'), h('th', {}, 'Definition'), h('th', { class: 'num' }, 'Priority'), h('th', {}, '')),
      policies.map((p) => h('tr', {}, h('td', {}, p.vhost), h('td', {}, p.name), h('td', { class: 'mono' }, p.pattern), h('td', {}, p['apply-to']),
        h('td', { class: 'mono' }, JSON.stringify(p.definition)), h('td', { class: 'num' }, p.priority),
        h('td', {}, can ? [h('button', { onclick: () => { vhost.value = p.vhost; name.value = p.name; pattern.value = p.pattern; applyTo.value = p['apply-to']; prio.value = p.priority; def.value = JSON.stringify(p.definition); } }, 'Edit'), ' ',
          h('button', { class: 'danger', onclick: () => act('Delete policy', () => api('DELETE', '/api/policies/' + enc(p.vhost) + '/' + enc(p.name))) }, 'Delete')] : '')))));
}

// ---------- definitions ----------

async function definitionsPage() {
  const file = h('input', { type: 'file', accept: '.json,application/json', id: 'defs-file' });
  const exportBtn = h('button', {
    class: 'primary', onclick: async () => {
      try {
        const d = await GET('/api/definitions');
        const url = URL.createObjectURL(new Blob([JSON.stringify(d, null, 2)], { type: 'application/json' }));
        const a = h('a', { href: url, download: 'warren-definitions.json' });
        document.body.append(a); a.click(); a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 1000);
      } catch (e) { flash('Export failed: ' + e.message, true); }
    },
  }, 'Download definitions');
  return h('div', {}, h('h1', {}, 'Definitions'),
    h('div', { class: 'panel' }, h('h2', {}, 'Export'), h('p', { class: 'muted' }, 'Users, vhosts, permissions, policies, parameters, queues, exchanges and bindings, in RabbitMQ\'s format.'), exportBtn),
    session.isAdmin ? h('div', { class: 'panel' }, h('h2', {}, 'Import'), h('p', { class: 'muted' }, 'A definitions file from Warren or RabbitMQ; what exists is updated, nothing is deleted.'),
      h('form', {
        class: 'inline', onsubmit: async (ev) => {
          ev.preventDefault();
          const f = file.files[0];
          if (!f) { flash('Choose a file.', true); return; }
          let d;
          try { d = JSON.parse(await f.text()); } catch (e) { flash('Not JSON: ' + e.message, true); return; }
          act('Import', () => api('POST', '/api/definitions', d));
        },
      }, file, h('button', { type: 'submit' }, 'Import'))) : '');
}

window.addEventListener('hashchange', render);
render();
