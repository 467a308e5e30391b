// Shared helpers for the palm feedback pages: the JSON API client, safe DOM building, the
// error/notice areas, the login form and the header. Each page script calls Palm.start(page)
// with `init(me)` (bind events; runs once) and `load(me)` (fetch state; runs after each login).
//
// Security: every piece of data (model text, prompts, user names, server messages) reaches the
// page as text nodes or input values, never as HTML.
'use strict';

const Palm = (() => {
  const $ = (id) => document.getElementById(id);

  // ---- DOM -------------------------------------------------------------------------------------

  // el('button', {class: 'x', onclick: fn, 'data-id': 3}, 'text', otherNode, [more, nodes])
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) setAttr(node, key, value);
    append(node, children);
    return node;
  }

  function setAttr(node, key, value) {
    if (value === null || value === undefined || value === false) return;
    if (key.startsWith('on')) {
      if (typeof value === 'function') node.addEventListener(key.slice(2), value);
      return; // never an inline handler attribute
    }
    if (key === 'class') node.className = value;
    else if (key === 'value') node.value = value;
    else if (key === 'checked' || key === 'disabled' || key === 'hidden') node[key] = Boolean(value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }

  function append(node, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(String(child)));
    }
  }

  // Replaces all children of `node` with `children` (text or nodes).
  function replace(node, ...children) {
    node.replaceChildren();
    append(node, children);
    return node;
  }

  // ---- API -------------------------------------------------------------------------------------

  // api('POST', '/api/x', {..}) -> parsed JSON. Throws an Error whose message is the server's
  // `error.message`, with `.status`, `.type` and `.code` set.
  async function api(method, path, body) {
    const opts = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin' };
    if (method !== 'GET' && method !== 'HEAD') {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body === undefined ? {} : body);
    }
    let res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      throw Object.assign(new Error(`Cannot reach the server (${e.message}).`), { status: 0 });
    }
    const data = await readJson(res);
    if (!res.ok) throw apiError(res, data, path);
    return data;
  }

  async function readJson(res) {
    const text = await res.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch {
      return { text };
    }
  }

  function apiError(res, data, path) {
    const info = (data && data.error) || {};
    const message = info.message || (data && data.text) || `${res.status} ${res.statusText}`;
    const err = Object.assign(new Error(message), {
      status: res.status, type: info.type, code: info.code, param: info.param,
    });
    if (res.status === 401 && path !== '/login' && path !== '/api/me' && state.me) showLogin();
    return err;
  }

  // ---- messages --------------------------------------------------------------------------------

  function showError(err) {
    const box = $('error');
    if (!box) return;
    const message = err instanceof Error ? err.message : String(err);
    replace(box, message);
    box.hidden = false;
    box.scrollIntoView({ block: 'nearest' });
    if (err instanceof Error && !err.status) console.error(err);
  }

  function clearError() {
    const box = $('error');
    if (box) { box.hidden = true; box.replaceChildren(); }
  }

  let noticeTimer = 0;
  function notify(message) {
    const box = $('notice');
    if (!box) return;
    replace(box, message);
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  // Runs an async action with errors shown in the error area; disables `button` meanwhile.
  async function guard(button, action) {
    if (button) button.disabled = true;
    clearError();
    try {
      return await action();
    } catch (err) {
      showError(err);
      return undefined;
    } finally {
      if (button) button.disabled = false;
    }
  }

  // ---- progress --------------------------------------------------------------------------------

  const PROGRESS_LABELS = {
    ranked: 'Ranked', written: 'Written', skipped: 'Skipped', thumbs: 'Thumbs', pending: 'Pending',
  };

  // Renders `{ranked, skipped, ...}` into element `id` as "Ranked 3 · Skipped 1 · ...".
  function renderProgress(id, progress, keys) {
    const box = $(id);
    if (!box || !progress) return;
    const items = keys.filter((k) => progress[k] !== undefined && progress[k] !== null)
      .map((k) => el('span', { class: `stat stat-${k}` },
        el('span', { class: 'stat-label' }, PROGRESS_LABELS[k] || k), ' ',
        el('strong', { class: 'stat-value' }, String(progress[k]))));
    replace(box, items);
  }

  // ---- header, login, start --------------------------------------------------------------------

  const state = { me: null, page: null, inited: false };

  const NAV = [
    { href: '/', label: 'Chat', page: 'chat' },
    { href: '/label', label: 'Label', page: 'label' },
    { href: '/write', label: 'Write', page: 'write' },
    { href: '/admin', label: 'Admin', page: 'admin', admin: true },
  ];

  function renderHeader(me) {
    const current = document.body.dataset.page;
    const links = NAV.filter((item) => !item.admin || (me && me.admin)).map((item) => el('a', {
      href: item.href,
      class: item.page === current ? 'active' : null,
      'aria-current': item.page === current ? 'page' : null,
    }, item.label));
    replace($('nav'), me ? links : []);
    replace($('user'), me ? [
      el('span', { id: 'user-name', class: 'user-name' }, me.name),
      me.admin ? el('span', { class: 'badge' }, 'admin') : null,
      el('button', { type: 'button', id: 'logout', class: 'secondary small', onclick: logout }, 'Log out'),
    ] : []);
  }

  function loginForm() {
    const input = el('input', {
      id: 'token', type: 'password', name: 'token', autocomplete: 'current-password',
      placeholder: 'palm-…', required: true, spellcheck: 'false',
    });
    const button = el('button', { id: 'login', type: 'submit' }, 'Log in');
    const form = el('form', { id: 'login-form', class: 'card login-card', onsubmit: onLogin },
      el('h1', {}, 'Sign in'),
      el('p', { class: 'muted' }, 'Paste the access token you were given.'),
      el('label', { for: 'token' }, 'Access token'), input, button);
    return form;
  }

  async function onLogin(event) {
    event.preventDefault();
    const input = $('token');
    const token = input.value.trim();
    if (!token) { showError('Please enter your access token.'); input.focus(); return; }
    const done = await guard($('login'), async () => {
      await api('POST', '/login', { token });
      return true;
    });
    if (done) { input.value = ''; await boot(); } else input.select();
  }

  function showLogin() {
    state.me = null;
    renderHeader(null);
    $('app').hidden = true;
    setLoading(false);
    const view = $('login-view');
    if (!$('login-form')) replace(view, loginForm());
    view.hidden = false;
    $('token').focus();
  }

  async function logout() {
    await guard($('logout'), async () => {
      await api('POST', '/logout', {});
      location.reload();
    });
  }

  function setLoading(on) {
    const box = $('loading');
    if (box) box.hidden = !on;
  }

  async function boot() {
    setLoading(true);
    let me;
    try {
      me = await api('GET', '/api/me');
    } catch (err) {
      if (err.status === 401) { clearError(); showLogin(); return; }
      setLoading(false);
      showError(err);
      return;
    }
    await enter(me);
  }

  async function enter(me) {
    state.me = me;
    renderHeader(me);
    setLoading(false);
    $('login-view').hidden = true;
    $('app').hidden = false;
    clearError();
    if (!state.inited) { state.inited = true; state.page.init(me); }
    await state.page.load(me);
  }

  function start(page) {
    state.page = page;
    boot();
  }

  // True when a keyboard event comes from a place where the user types text.
  function isTyping(event) {
    const t = event.target;
    if (!t || !t.tagName) return false;
    return t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName);
  }

  return {
    $, el, replace, api, showError, clearError, notify, guard, renderProgress, start, isTyping,
    me: () => state.me,
  };
})();
