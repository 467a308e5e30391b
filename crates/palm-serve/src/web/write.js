// Write page (`/write`): write the reply you would want for a prompt (a demonstration for SFT).
// Skipping keeps what was typed as a draft on the server.
'use strict';

(() => {
  const { $, replace, api, showError, clearError, guard, renderProgress, notify } = Palm;
  const PROGRESS_KEYS = ['written', 'skipped'];

  const write = { promptId: null, busy: false };

  async function loadNext() {
    write.busy = true;
    clearError();
    try {
      showPrompt(await api('POST', '/api/write/next', {}));
    } catch (err) {
      if (err.status === 404) showEmpty(err.message);
      else showError(err);
    } finally {
      write.busy = false;
    }
  }

  function showPrompt(next) {
    write.promptId = next.prompt_id;
    if (next.progress) renderProgress('progress', next.progress, PROGRESS_KEYS);
    replace($('prompt'), next.prompt);
    $('demo').value = next.draft == null ? '' : String(next.draft);
    closeSkip();
    $('empty').hidden = true;
    $('task').hidden = false;
    window.scrollTo(0, 0);
    $('demo').focus();
  }

  function showEmpty(message) {
    write.promptId = null;
    $('task').hidden = true;
    replace($('empty-message'), message || 'There is no prompt left to write for.');
    $('empty').hidden = false;
  }

  // POSTs `body` to `path`; on success shows the progress and loads the next prompt.
  async function send(path, body, button, done) {
    if (write.promptId === null || write.busy) return;
    write.busy = true;
    const result = await guard(button, () => api('POST', path, body));
    write.busy = false;
    if (!result) return;
    renderProgress('progress', result.progress, PROGRESS_KEYS);
    notify(done);
    await loadNext();
  }

  function submit() {
    const text = $('demo').value;
    if (!text.trim()) {
      showError('Write a reply first (or skip this prompt).');
      $('demo').focus();
      return;
    }
    send('/api/write', { prompt_id: write.promptId, text }, $('write-submit'), 'Saved. Thank you!');
  }

  function openSkip() {
    $('skip-form').hidden = false;
    $('skip-reason').focus();
  }

  function closeSkip() {
    $('skip-form').hidden = true;
    $('skip-reason').value = '';
  }

  function confirmSkip() {
    const reason = $('skip-reason').value.trim();
    if (!reason) {
      showError('Please say why you skip this prompt.');
      $('skip-reason').focus();
      return;
    }
    const body = { prompt_id: write.promptId, reason, draft: $('demo').value };
    send('/api/write/skip', body, $('skip-confirm'), 'Skipped; your text is kept as a draft.');
  }

  function onDemoKey(event) {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit();
    }
  }

  function init() {
    $('write-submit').addEventListener('click', submit);
    $('demo').addEventListener('keydown', onDemoKey);
    $('skip').addEventListener('click', openSkip);
    $('skip-cancel').addEventListener('click', closeSkip);
    $('skip-confirm').addEventListener('click', confirmSkip);
    $('reload').addEventListener('click', loadNext);
  }

  async function load(me) {
    renderProgress('progress', me.progress, PROGRESS_KEYS);
    await loadNext();
  }

  Palm.start({ init, load });
})();
