// Admin page (`/admin`): users and their progress, adding users (the token is shown once),
// importing prompts, labeller agreement, and JSONL exports. The API answers 403 to non-admins;
// its message is shown.
'use strict';

(() => {
  const { $, el, replace, api, showError, clearError, guard, notify } = Palm;

  // ---- users -----------------------------------------------------------------------------------

  async function loadUsers() {
    const data = await api('GET', '/api/admin/users');
    const rows = (data.users || []).map((u) => el('tr', {},
      el('td', {}, u.name),
      el('td', {}, u.admin ? 'yes' : ''),
      numCell(u.ranked), numCell(u.skipped), numCell(u.written), numCell(u.thumbs)));
    replace($('users-body'), rows.length ? rows : emptyRow(6, 'No users yet.'));
  }

  function numCell(value) {
    return el('td', { class: 'num' }, value === undefined || value === null ? '' : String(value));
  }

  function emptyRow(columns, text) {
    return el('tr', {}, el('td', { colspan: String(columns), class: 'muted' }, text));
  }

  async function addUser(event) {
    event.preventDefault();
    const name = $('new-user-name').value.trim();
    if (!name) { showError('Enter a name for the new user.'); return; }
    const body = { name, admin: $('new-user-admin').checked };
    const created = await guard($('add-user'), () => api('POST', '/api/admin/users', body));
    if (!created) return;
    $('new-user-name').value = '';
    $('new-user-admin').checked = false;
    showToken(created);
    await guard(null, loadUsers);
  }

  function showToken(created) {
    replace($('new-token-name'), created.name);
    $('new-token').value = created.token;
    $('new-token-box').hidden = false;
    $('new-token').focus();
    $('new-token').select();
  }

  async function copyToken() {
    const input = $('new-token');
    input.focus();
    input.select();
    try {
      await navigator.clipboard.writeText(input.value);
      notify('Token copied.');
    } catch {
      notify('Press Ctrl+C to copy the selected token.');
    }
  }

  // ---- prompts ---------------------------------------------------------------------------------

  async function importPrompts() {
    const prompts = $('prompts').value.split(/\r?\n/).map((p) => p.trim()).filter(Boolean);
    if (!prompts.length) { showError('Paste at least one prompt (one per line).'); return; }
    const result = await guard($('import-prompts'), () => api('POST', '/api/admin/prompts', { prompts }));
    if (!result) return;
    $('prompts').value = '';
    const added = Number(result.added) || 0;
    replace($('import-result'), `Added ${added} prompt${added === 1 ? '' : 's'}` +
      (added < prompts.length ? ` (${prompts.length - added} already there or refused).` : '.'));
  }

  // ---- agreement -------------------------------------------------------------------------------

  function formatMean(mean) {
    return typeof mean === 'number' && Number.isFinite(mean) ? mean.toFixed(3) : 'n/a';
  }

  async function loadAgreement() {
    const data = await api('GET', '/api/admin/agreement');
    replace($('agreement-summary'),
      'Tasks ranked by more than one labeller: ', el('strong', {}, String(data.shared_tasks ?? 0)),
      ' · mean agreement: ', el('strong', {}, formatMean(data.mean)));
    const rows = (data.per_labeller || []).map(([name, mean, tasks]) => el('tr', {},
      el('td', {}, name), el('td', { class: 'num' }, formatMean(mean)), numCell(tasks)));
    replace($('agreement-body'), rows.length ? rows : emptyRow(3, 'No shared tasks yet.'));
  }

  // ---- exports ---------------------------------------------------------------------------------

  function updateExportLink() {
    const value = $('min-agreement').value.trim();
    let href = '/api/admin/export?kind=pairs';
    if (value !== '' && Number.isFinite(Number(value))) href += `&min_agreement=${encodeURIComponent(value)}`;
    $('export-pairs').setAttribute('href', href);
  }

  // ---- page ------------------------------------------------------------------------------------

  function init() {
    $('users-refresh').addEventListener('click', () => guard($('users-refresh'), loadUsers));
    $('add-user-form').addEventListener('submit', addUser);
    $('copy-token').addEventListener('click', copyToken);
    $('import-prompts').addEventListener('click', importPrompts);
    $('agreement-refresh').addEventListener('click', () => guard($('agreement-refresh'), loadAgreement));
    $('min-agreement').addEventListener('input', updateExportLink);
    updateExportLink();
  }

  async function load() {
    clearError();
    try {
      await loadUsers();
    } catch (err) {
      $('admin-content').hidden = true;
      showError(err);
      return;
    }
    $('admin-content').hidden = false;
    await guard(null, loadAgreement);
  }

  Palm.start({ init, load });
})();
