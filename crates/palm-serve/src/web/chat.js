// Chat page (`/`): talk to the model through the OpenAI-compatible API (streamed), store the
// conversation, and give thumbs up/down on the replies.
'use strict';

(() => {
  const { $, el, replace, api, showError, clearError, notify } = Palm;

  const chat = {
    model: null,          // id from GET /v1/models
    conversationId: null, // from POST /api/conversations, on the first message
    history: [],          // [{role, content}] sent to the model (without the system message)
    controller: null,     // AbortController of the stream in progress
  };

  // ---- view ------------------------------------------------------------------------------------

  function addMessage(role, text) {
    $('chat-empty').hidden = true;
    const content = el('div', { class: 'content text' }, text);
    const node = el('article', { class: `msg msg-${role}` },
      el('div', { class: 'msg-role' }, role === 'user' ? 'You' : 'Assistant'), content);
    $('conversation').appendChild(node);
    scrollDown(true);
    return { node, content };
  }

  function scrollDown(force) {
    const box = $('conversation');
    const near = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    if (force || near) box.scrollTop = box.scrollHeight;
  }

  function setStreaming(on) {
    $('send').disabled = on;
    $('stop').hidden = !on;
    $('new-conversation').disabled = on;
    if (on) $('retry').hidden = true;
  }

  function thumbsBar(messageId) {
    const up = el('button', {
      type: 'button', class: 'thumb thumb-up', title: 'Good reply', 'aria-label': 'Good reply',
      'aria-pressed': 'false',
    }, '▲ Good');
    const down = el('button', {
      type: 'button', class: 'thumb thumb-down', title: 'Bad reply', 'aria-label': 'Bad reply',
      'aria-pressed': 'false',
    }, '▼ Bad');
    const bar = el('div', { class: 'thumbs', 'data-message-id': messageId, 'data-thumbs': '0' }, up, down);
    up.addEventListener('click', () => setThumbs(bar, 1));
    down.addEventListener('click', () => setThumbs(bar, -1));
    return bar;
  }

  async function setThumbs(bar, value) {
    const current = Number(bar.dataset.thumbs);
    const next = current === value ? 0 : value;
    clearError();
    try {
      await api('POST', `/api/messages/${encodeURIComponent(bar.dataset.messageId)}/thumbs`, { thumbs: next });
    } catch (err) {
      showError(err);
      return;
    }
    bar.dataset.thumbs = String(next);
    for (const [cls, v] of [['thumb-up', 1], ['thumb-down', -1]]) {
      const button = bar.querySelector(`.${cls}`);
      button.classList.toggle('active', next === v);
      button.setAttribute('aria-pressed', String(next === v));
    }
  }

  // ---- settings --------------------------------------------------------------------------------

  function numberField(id, fallback) {
    const value = Number($(id).value);
    return $(id).value.trim() !== '' && Number.isFinite(value) ? value : fallback;
  }

  function requestMessages() {
    const system = $('system').value.trim();
    const messages = system ? [{ role: 'system', content: system }] : [];
    return messages.concat(chat.history);
  }

  async function ensureModel() {
    if (chat.model) return chat.model;
    const list = await api('GET', '/v1/models');
    const first = list && Array.isArray(list.data) ? list.data[0] : null;
    if (!first) throw new Error('The server has no model to chat with.');
    chat.model = first.id;
    replace($('model'), 'Model: ', el('span', { class: 'mono' }, chat.model));
    return chat.model;
  }

  // ---- streaming -------------------------------------------------------------------------------

  // Reads an SSE response, calling onDelta(text) for each content piece; returns {text, usage}.
  async function readStream(res, onDelta) {
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    const result = { text: '', usage: null, done: false };
    let buffer = '';
    while (!result.done) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while (!result.done && (end = buffer.indexOf('\n')) >= 0) {
        handleLine(buffer.slice(0, end).replace(/\r$/, ''), result, onDelta);
        buffer = buffer.slice(end + 1);
      }
    }
    if (!result.done && buffer) handleLine(buffer, result, onDelta);
    return result;
  }

  function handleLine(line, result, onDelta) {
    if (!line.startsWith('data:')) return;
    const data = line.slice(5).trim();
    if (data === '[DONE]') { result.done = true; return; }
    if (!data) return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message || 'The model failed.');
    if (chunk.usage) result.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    const delta = choice && choice.delta && choice.delta.content;
    if (delta) {
      result.text += delta;
      onDelta(delta);
    }
  }

  async function openStream(signal) {
    const body = {
      model: await ensureModel(),
      messages: requestMessages(),
      stream: true,
      temperature: numberField('temperature', 0.7),
      max_tokens: Math.round(numberField('max-tokens', 256)),
    };
    const res = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      credentials: 'same-origin',
      body: JSON.stringify(body),
      signal,
    });
    if (!res.ok) {
      let message = `${res.status} ${res.statusText}`;
      try { message = (await res.json()).error.message || message; } catch { /* keep status */ }
      throw Object.assign(new Error(message), { status: res.status });
    }
    return res;
  }

  function showUsage(usage) {
    if (!usage) { replace($('usage')); return; }
    const parts = [];
    if (usage.prompt_tokens !== undefined) parts.push(`prompt ${usage.prompt_tokens}`);
    if (usage.completion_tokens !== undefined) parts.push(`completion ${usage.completion_tokens}`);
    replace($('usage'), parts.length ? `Tokens: ${parts.join(', ')}` : '');
  }

  // Streams one assistant reply for the current history, then stores it and adds thumbs.
  async function reply() {
    const view = addMessage('assistant', '');
    view.node.classList.add('streaming');
    chat.controller = new AbortController();
    setStreaming(true);
    let text = '';
    let stopped = false;
    try {
      const res = await openStream(chat.controller.signal);
      const result = await readStream(res, (delta) => {
        text += delta;
        view.content.textContent = text;
        scrollDown(false);
      });
      showUsage(result.usage);
    } catch (err) {
      stopped = err.name === 'AbortError';
      if (!stopped) { failReply(view, text, err); return; }
    } finally {
      chat.controller = null;
      setStreaming(false);
      view.node.classList.remove('streaming');
    }
    await keepReply(view, text, stopped);
  }

  function failReply(view, text, err) {
    if (!text) view.node.remove();
    else view.node.classList.add('failed');
    showError(err);
    $('retry').hidden = false;
  }

  async function keepReply(view, text, stopped) {
    if (stopped) view.node.appendChild(el('div', { class: 'muted small' }, '(stopped)'));
    if (!text) { view.node.remove(); $('retry').hidden = false; return; }
    chat.history.push({ role: 'assistant', content: text });
    try {
      const saved = await api('POST', `/api/conversations/${chat.conversationId}/messages`,
        { role: 'assistant', content: text });
      view.node.appendChild(thumbsBar(saved.id));
    } catch (err) {
      showError(err);
    }
  }

  // ---- actions ---------------------------------------------------------------------------------

  async function send() {
    const input = $('message');
    const text = input.value.trim();
    if (!text || chat.controller || $('send').disabled) return;
    clearError();
    $('send').disabled = true;
    try {
      await ensureModel();
      if (!chat.conversationId) chat.conversationId = (await api('POST', '/api/conversations', {})).id;
      await api('POST', `/api/conversations/${chat.conversationId}/messages`, { role: 'user', content: text });
    } catch (err) {
      $('send').disabled = false;
      showError(err);
      return;
    }
    input.value = '';
    chat.history.push({ role: 'user', content: text });
    addMessage('user', text);
    await reply();
    input.focus();
  }

  function retry() {
    const last = chat.history[chat.history.length - 1];
    if (chat.controller || !last || last.role !== 'user') { $('retry').hidden = true; return; }
    clearError();
    reply();
  }

  function stop() {
    if (chat.controller) chat.controller.abort();
  }

  function newConversation() {
    stop();
    chat.conversationId = null;
    chat.history = [];
    replace($('conversation'), $('chat-empty'));
    $('chat-empty').hidden = false;
    $('retry').hidden = true;
    replace($('usage'));
    clearError();
    notify('New conversation started.');
    $('message').focus();
  }

  function onMessageKey(event) {
    if (event.key !== 'Enter' || event.shiftKey || event.isComposing) return;
    event.preventDefault();
    send();
  }

  function init() {
    $('composer').addEventListener('submit', (event) => { event.preventDefault(); send(); });
    $('message').addEventListener('keydown', onMessageKey);
    $('stop').addEventListener('click', stop);
    $('retry').addEventListener('click', retry);
    $('new-conversation').addEventListener('click', newConversation);
  }

  async function load() {
    try {
      await ensureModel();
    } catch (err) {
      showError(err);
    }
    $('message').focus();
  }

  Palm.start({ init, load });
})();
