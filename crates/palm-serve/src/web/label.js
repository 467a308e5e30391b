// Label page (`/label`): rank 2-4 replies to a prompt best-first (Open Assistant style).
// Keyboard: 1-4 picks the reply at that position, Backspace undoes the last pick, Enter submits
// once every reply is ranked. Keys are ignored while typing in a text field.
'use strict';

(() => {
  const { $, el, replace, api, showError, clearError, guard, renderProgress } = Palm;
  const PROGRESS_KEYS = ['ranked', 'skipped', 'pending'];
  const ORDINALS = ['1st', '2nd', '3rd', '4th', '5th', '6th'];

  const label = {
    task: null,   // {task_id, prompt, replies: [{id, text}]}
    ranking: [],  // reply ids, best first
    busy: false,  // a request is in flight
  };

  // ---- loading a task --------------------------------------------------------------------------

  async function loadNext() {
    label.busy = true;
    clearError();
    try {
      showTask(await api('POST', '/api/tasks/next', {}));
    } catch (err) {
      if (err.status === 404) showEmpty(err.message);
      else showError(err);
    } finally {
      label.busy = false;
    }
  }

  function showTask(task) {
    label.task = task;
    label.ranking = [];
    renderProgress('progress', task.progress, PROGRESS_KEYS);
    replace($('prompt'), task.prompt);
    replace($('replies'), task.replies.map(replyCard));
    closeSkip();
    $('empty').hidden = true;
    $('task').hidden = false;
    updateRanking();
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
    window.scrollTo(0, 0);
  }

  function showEmpty(message) {
    label.task = null;
    label.ranking = [];
    $('task').hidden = true;
    replace($('empty-message'), message || 'There is nothing to rank right now.');
    $('empty').hidden = false;
  }

  function replyCard(reply, index) {
    const card = el('article', {
      class: 'card reply', 'data-id': reply.id, tabindex: '0', role: 'button', 'aria-pressed': 'false',
    },
    el('div', { class: 'reply-head' },
      el('kbd', { class: 'reply-key', title: `Press ${index + 1}` }, String(index + 1)),
      el('span', { class: 'rank-badge' }, 'unranked')),
    el('div', { class: 'reply-text text' }, reply.text));
    card.addEventListener('click', () => pick(index));
    card.addEventListener('keydown', (event) => {
      if (event.key === ' ') { event.preventDefault(); pick(index); }
    });
    return card;
  }

  // ---- ranking ---------------------------------------------------------------------------------

  // Appends the reply at `index` to the ranking, or, if it is ranked already, takes it and the
  // ones after it back.
  function pick(index) {
    if (!label.task || label.busy) return;
    const reply = label.task.replies[index];
    if (!reply) return;
    const at = label.ranking.indexOf(reply.id);
    if (at >= 0) label.ranking = label.ranking.slice(0, at);
    else label.ranking.push(reply.id);
    updateRanking();
  }

  function undo() {
    if (!label.task || label.busy || !label.ranking.length) return;
    label.ranking.pop();
    updateRanking();
  }

  function complete() {
    return Boolean(label.task) && label.ranking.length === label.task.replies.length;
  }

  function updateRanking() {
    for (const card of $('replies').querySelectorAll('.reply')) {
      const rank = label.ranking.indexOf(idOf(card));
      card.classList.toggle('ranked', rank >= 0);
      card.classList.toggle('best', rank === 0);
      card.setAttribute('aria-pressed', String(rank >= 0));
      card.dataset.rank = rank >= 0 ? String(rank + 1) : '';
      replace(card.querySelector('.rank-badge'), rank >= 0 ? ORDINALS[rank] || `#${rank + 1}` : 'unranked');
    }
    $('submit').disabled = !complete();
    $('undo').disabled = label.ranking.length === 0;
  }

  // The reply id of a card, with the type the server sent (number or string).
  function idOf(card) {
    const reply = label.task.replies.find((r) => String(r.id) === card.dataset.id);
    return reply ? reply.id : card.dataset.id;
  }

  // ---- sending ---------------------------------------------------------------------------------

  async function send(body, button) {
    if (!label.task || label.busy) return;
    label.busy = true;
    const path = `/api/tasks/${encodeURIComponent(label.task.task_id)}/ranking`;
    const result = await guard(button, () => api('POST', path, body));
    label.busy = false;
    if (!result) return;
    renderProgress('progress', result.progress, PROGRESS_KEYS);
    await loadNext();
  }

  function submit() {
    if (!complete()) { showError('Rank every reply first (best first).'); return; }
    send({ ranking: label.ranking.slice() }, $('submit'));
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
      showError('Please say why you skip this task.');
      $('skip-reason').focus();
      return;
    }
    send({ skip: reason, draft: $('note').value }, $('skip-confirm'));
  }

  // ---- keyboard --------------------------------------------------------------------------------

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || Palm.isTyping(event)) return;
    if (!label.task || $('task').hidden) return;
    if (/^[1-9]$/.test(event.key)) {
      event.preventDefault();
      pick(Number(event.key) - 1);
    } else if (event.key === 'Backspace') {
      event.preventDefault();
      undo();
    } else if (event.key === 'Enter' && !isOtherControl(event.target)) {
      event.preventDefault();
      if (complete()) submit();
    }
  }

  // Buttons and links keep their own Enter behaviour.
  function isOtherControl(target) {
    return Boolean(target && target.closest && target.closest('button, a'));
  }

  function init() {
    $('submit').addEventListener('click', submit);
    $('undo').addEventListener('click', undo);
    $('tie').addEventListener('click', () => send({ ranking: [], tie: true }, $('tie')));
    $('all-bad').addEventListener('click',
      () => send({ ranking: label.ranking.slice(), all_bad: true }, $('all-bad')));
    $('skip').addEventListener('click', openSkip);
    $('skip-cancel').addEventListener('click', closeSkip);
    $('skip-confirm').addEventListener('click', confirmSkip);
    $('reload').addEventListener('click', loadNext);
    document.addEventListener('keydown', onKey);
  }

  async function load(me) {
    renderProgress('progress', me.progress, PROGRESS_KEYS);
    await loadNext();
  }

  Palm.start({ init, load });
})();
