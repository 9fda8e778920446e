// Live trace page for the ensemble coordinator.
//
// Flow: load the members and strategies (GET /ui/api/members), POST the request to
// /ui/api/generate, read the Server-Sent Events stream with fetch(), and render each trace
// event as it arrives: answer spans coloured by member, a details panel for the span under the
// pointer/focus, per-member stats and the totals of the `done` event.
// Everything is built with DOM calls and textContent: server text is never parsed as HTML.
'use strict';

(() => {
  // ---- Constants -----------------------------------------------------------------------------

  // Light colours: dark text (#1a1a1a) on each has a contrast ratio above 7:1 (WCAG AA and AAA).
  const PALETTE = ['#a6cee3', '#b2df8a', '#fdbf6f', '#cab2d6', '#fb9a99',
    '#ffff99', '#8dd3c7', '#fccde5', '#d9d9d9', '#bebada'];
  const KEY_STORE = 'coordinator-ui.api-key';
  const FALLBACK = { members: [], strategies: ['ensemble', 'specfuse', 'chared', 'colm', 'pipeline'], default_max_chars: 200 };
  const WIN_UNIT = { round: 'rounds won', char: 'chars led', span: 'spans written', stage: 'stages' };

  const $ = (sel) => document.querySelector(sel);
  const ui = {
    form: $('#ask'), prompt: $('#prompt'), strategy: $('#strategy'), maxChars: $('#max-chars'),
    segTokens: $('#segment-tokens'), draftChars: $('#draft-chars'), apiKey: $('#api-key'),
    run: $('#run'), stop: $('#stop'), runStatus: $('#run-status'), error: $('#error'),
    answer: $('#answer'), stages: $('#stages'), finalText: $('#final-text'), legend: $('#legend'),
    details: $('#details'), detailsBody: $('#details-body'), members: $('#members'),
    totals: $('#totals'), copy: $('#copy-json'), copyStatus: $('#copy-status'),
  };

  // ---- Small helpers -------------------------------------------------------------------------

  /** el('li', {class: 'x', 'data-node': n}, child, 'text', ...) → element. Null/false attrs are skipped. */
  function el(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat(Infinity)) if (kid != null) node.append(kid instanceof Node ? kid : String(kid));
    return node;
  }

  /** A number with at most `digits` decimals and no trailing zeros ("0.6", "-1.25"); '—' if absent. */
  function fmt(x, digits = 4) {
    if (typeof x !== 'number' || !Number.isFinite(x)) return x == null ? '—' : String(x);
    return String(Number(x.toFixed(digits)));
  }

  /** Visible rendering of a piece of text whose whitespace matters (shown inside quotes by CSS). */
  const quoted = (text, cls = 'quoted') => el('span', { class: cls, text: text ?? '' });

  // ---- State ---------------------------------------------------------------------------------

  const state = {
    members: [],          // [{name, weight, up, error}] from the API, plus names first seen in events
    colour: new Map(),    // member name → palette index (stable: API order, then order of appearance)
    run: null,            // the current run (see newRun)
    defaultMaxChars: 200, // from /ui/api/members
  };
  window.__trace = { request: null, events: [] };

  const colourOf = (name) => {
    if (!state.colour.has(name)) ensureMember(name);
    return PALETTE[(state.colour.get(name) ?? 0) % PALETTE.length];
  };

  /** Registers a member name seen in an event but not in the members list. */
  function ensureMember(name) {
    if (!name || state.colour.has(name)) return;
    state.colour.set(name, state.colour.size);
    if (!state.members.some((m) => m.name === name)) state.members.push({ name, weight: null, up: null, error: '' });
    renderLegend();
  }

  function newRun(request) {
    return {
      request, controller: new AbortController(), started: performance.now(),
      counts: { round: 0, char: 0, span: 0, stage: 0 }, // events of each kind so far (= next data-step)
      byKey: new Map(),   // "kind:step" → event, for the details panel
      stats: new Map(),   // member → {wins, exit, failed}
      unit: '',           // what a win means for this strategy
      eos: false, finished: false, deltaText: '', stageSpan: null,
    };
  }

  const statOf = (run, name) => {
    if (!run.stats.has(name)) run.stats.set(name, { wins: 0, exit: '', failed: false });
    return run.stats.get(name);
  };

  /** Stores an event under its kind's next step number (its data-step) and returns that number. */
  function record(run, kind, ev) {
    const step = run.counts[kind]++;
    run.byKey.set(`${kind}:${step}`, ev);
    return step;
  }

  function addWin(run, name, kind) {
    if (!name) return;
    ensureMember(name);
    statOf(run, name).wins += 1;
    run.unit = WIN_UNIT[kind];
  }

  // ---- Members, legend, strategies -----------------------------------------------------------

  function authHeaders() {
    const key = ui.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function loadMembers() {
    let data = FALLBACK;
    try {
      const res = await fetch('/ui/api/members', { headers: authHeaders() });
      if (res.ok) data = await res.json();
      else showError(await httpErrorMessage(res));
    } catch (err) {
      showError(`Could not load the members: ${err.message}`);
    }
    state.members = [];
    state.colour.clear();
    for (const m of data.members || []) {
      state.members.push({ name: m.name, weight: m.weight, up: m.up, error: m.error || '' });
      state.colour.set(m.name, state.colour.size);
    }
    if (data.default_max_chars) state.defaultMaxChars = data.default_max_chars;
    if (data.default_max_chars && !ui.maxChars.dataset.fromQuery) ui.maxChars.value = data.default_max_chars;
    fillStrategies(data.strategies && data.strategies.length ? data.strategies : FALLBACK.strategies);
    renderLegend();
    renderMembers();
  }

  /** Fills the strategy select, keeping the current choice (or ?strategy=, else "specfuse"). */
  function fillStrategies(list) {
    const wanted = ui.strategy.dataset.wanted || ui.strategy.value || 'specfuse';
    const names = new Set(state.members.map((m) => m.name));
    const groups = [el('optgroup', { label: 'Strategies' }), el('optgroup', { label: 'One member alone' })];
    const values = [...list];
    if (wanted && !values.includes(wanted)) values.push(wanted);
    for (const v of values) {
      const alone = names.has(v) || v.startsWith('single:');
      groups[alone ? 1 : 0].append(el('option', { value: v, text: alone ? `${v} (alone)` : v }));
    }
    ui.strategy.replaceChildren(...groups.filter((g) => g.children.length));
    ui.strategy.value = values.includes(wanted) ? wanted : (values.includes('specfuse') ? 'specfuse' : values[0]);
    delete ui.strategy.dataset.wanted;
    updateOptionFields();
  }

  /** Shows the option inputs that apply to the chosen strategy. */
  function updateOptionFields() {
    const s = ui.strategy.value;
    for (const field of document.querySelectorAll('[data-for]')) {
      field.hidden = !(s === field.dataset.for || s === 'ensemble');
    }
  }

  function renderLegend() {
    ui.legend.replaceChildren(...[...state.colour.keys()].map((name) =>
      el('li', { 'data-node': name }, swatch(name), name)));
  }

  const swatch = (name) => el('span', { class: 'swatch', 'aria-hidden': 'true', style: `--c:${colourOf(name)}` });

  function renderMembers() {
    const run = state.run;
    ui.members.replaceChildren(...state.members.map((m) => {
      const st = run ? run.stats.get(m.name) : null;
      const up = m.up == null ? 'unknown' : (m.up ? 'up' : 'down');
      const health = el('span', { class: `health health-${up}` }, up === 'up' ? '✓ up' : up === 'down' ? '✗ down' : '? unknown');
      if (m.error) health.append(el('span', { class: 'health-error', text: ` — ${m.error}` }));
      if (st && st.failed) health.append(el('span', { class: 'health-error', text: ' — failed in this answer' }));
      return el('li', { 'data-node': m.name, style: `--c:${colourOf(m.name)}` },
        el('div', { class: 'member-name' }, swatch(m.name), el('strong', { text: m.name })),
        health,
        el('div', { class: 'member-stats' },
          el('span', {}, 'Weight ', el('span', { class: 'weight', text: fmt(m.weight, 3) })),
          el('span', {}, 'Wins ', el('span', { class: 'wins', 'data-wins': st ? st.wins : 0, text: String(st ? st.wins : 0) }),
            run && run.unit ? el('span', { class: 'unit', text: ` ${run.unit}` }) : null),
          el('span', {}, 'Exit ', el('span', { class: 'exits', text: st && st.exit ? st.exit : '—' }))));
    }));
  }

  // ---- Answer rendering (one function per trace event kind) ----------------------------------

  /** Appends one answer span to #answer and returns it. */
  function appendSeg(kind, step, node, text) {
    if (node) ensureMember(node);
    const span = el('span', {
      class: 'seg', 'data-kind': kind, 'data-node': node || '', 'data-step': step, tabindex: '0',
      title: `${kind} ${step}${node ? ` · ${node}` : ''}`, style: node ? `--c:${colourOf(node)}` : null,
    }, text);
    ui.answer.append(span);
    return span;
  }

  function onRound(run, ev) {
    const step = record(run, 'round', ev);
    const win = winnerIndex(ev);
    const node = ev.winner_node || (ev.candidates?.[win]?.proposers || [])[0] || '';
    appendSeg('round', step, node, ev.winner_text ?? '');
    addWin(run, node, 'round');
    for (const name of ev.exited || []) {
      ensureMember(name);
      statOf(run, name).exit = `round ${ev.round ?? step}`;
    }
  }

  function onChar(run, ev) {
    const step = record(run, 'char', ev);
    if (run.eos) return;                       // nothing is added after the end of the answer
    if (ev.eos) { run.eos = true; return; }
    const shares = (ev.shares || []).filter((s) => s && s.node);
    const top = shares.reduce((best, s) => (!best || (s.share ?? 0) > (best.share ?? 0) ? s : best), null);
    const span = appendSeg('char', step, top ? top.node : '', ev.char ?? '');
    const bg = shareGradient(shares);
    if (bg) span.style.backgroundImage = bg;
    addWin(run, top && top.node, 'char');
  }

  /** A vertical stack of bands, one per member, each as tall as that member's share. */
  function shareGradient(shares) {
    const total = shares.reduce((t, s) => t + Math.max(0, s.share || 0), 0);
    if (!(total > 0)) return '';
    let at = 0;
    const bands = [...shares]
      .sort((a, b) => colourIndex(a.node) - colourIndex(b.node))
      .filter((s) => s.share > 0)
      .map((s) => {
        const from = at; at += (s.share / total) * 100;
        return `${colourOf(s.node)} ${from.toFixed(2)}% ${at.toFixed(2)}%`;
      });
    return `linear-gradient(to bottom, ${bands.join(', ')})`;
  }
  const colourIndex = (name) => { ensureMember(name); return state.colour.get(name); };

  function onSpan(run, ev) {
    const step = record(run, 'span', ev);
    const span = appendSeg('span', step, ev.node, ev.text ?? '');
    if (ev.deferred) {
      span.classList.add('deferred');
      span.title += ` · deferred (p=${fmt(ev.defer_prob, 3)})`;
    }
    addWin(run, ev.node, 'span');
  }

  /** Pipeline: the newest stage is the answer; the one it replaces moves up into #stages. */
  function onStage(run, ev) {
    const step = record(run, 'stage', ev);
    if (run.stageSpan) {
      const prev = run.byKey.get(`stage:${run.stageSpan.dataset.step}`);
      ui.stages.append(stageBlock(prev, run.stageSpan.dataset.step));
      run.stageSpan.remove();
    }
    run.stageSpan = appendSeg('stage', step, ev.node, ev.text ?? '');
    addWin(run, ev.node, 'stage');
  }

  function stageBlock(ev, step) {
    return el('div', {
      class: 'stage-block', 'data-step': step, 'data-node': ev.node || '',
      tabindex: '0', style: `--c:${colourOf(ev.node)}`,
    },
    el('div', { class: 'stage-head' }, `Stage ${ev.stage ?? step} · ${ev.name || 'unnamed'} · ${ev.node || '?'}`,
      ev.fallback ? el('span', { class: 'badge', text: 'fallback' }) : null),
    el('div', { class: 'stage-text', text: ev.text ?? '' }));
  }

  function onDone(run, ev) {
    run.finished = true;
    ui.finalText.textContent = ev.text ?? '';
    // A strategy that sent no trace events: show the text it streamed (not a member's span).
    if (!ui.answer.querySelector('.seg') && (ev.text || run.deltaText)) {
      ui.answer.append(el('span', { class: 'plain', text: ev.text || run.deltaText }));
    }
    for (const name of ev.exited_nodes || []) { ensureMember(name); const s = statOf(run, name); s.exit ||= 'yes'; }
    for (const name of ev.failed_nodes || []) { ensureMember(name); statOf(run, name).failed = true; }
    setTotal('strategy', ev.strategy); setTotal('finish', ev.finish); setTotal('steps', ev.steps);
    setTotal('node_calls', ev.node_calls); setTotal('round_trips', ev.round_trips);
    setTotal('mean_active_nodes', fmt(ev.mean_active_nodes, 2)); setTotal('deferrals', ev.deferrals);
    setTotal('elapsed_ms', fmt(ev.elapsed_ms, 1));
    setTotal('client_ms', fmt(performance.now() - run.started, 1));
    finishRun(run, 'done', `Done in ${fmt(performance.now() - run.started, 0)} ms.`);
  }

  function onError(run, ev) {
    run.finished = true;
    const where = [ev.code, ev.status ? `HTTP ${ev.status}` : ''].filter(Boolean).join(', ');
    showError(`${ev.message || 'The generation failed.'}${where ? ` (${where})` : ''}`);
    finishRun(run, 'error', 'Failed.');
  }

  const HANDLERS = { round: onRound, char: onChar, span: onSpan, stage: onStage, done: onDone, error: onError,
    delta: (run, ev) => { run.deltaText += ev.text || ''; } };

  function handleEvent(run, ev) {
    if (run !== state.run || run.finished) return;  // a stale stream, or events after the last one
    window.__trace.events.push(ev);
    setTotal('events', window.__trace.events.length);
    const handler = HANDLERS[ev.event];
    if (handler) handler(run, ev);
    renderMembers();
  }

  const setTotal = (name, value) => {
    const dd = ui.totals.querySelector(`[data-total="${name}"]`);
    if (dd) dd.textContent = value == null || value === '' ? '—' : String(value);
  };

  // ---- Details panel -------------------------------------------------------------------------

  function showDetails(target) {
    const run = state.run;
    const kind = target.dataset.kind || 'stage';   // .stage-block has no data-kind
    const { step } = target.dataset;
    const ev = run && run.byKey.get(`${kind}:${step}`);
    if (!ev) return;
    if (target.classList.contains('selected') && ui.details.dataset.kind === kind && ui.details.dataset.step === step) return;
    for (const s of document.querySelectorAll('.seg.selected, .stage-block.selected')) s.classList.remove('selected');
    target.classList.add('selected');
    ui.details.dataset.kind = kind;
    ui.details.dataset.step = step;
    ui.details.dataset.node = target.dataset.node || '';
    const render = { round: roundDetails, char: charDetails, span: spanDetails, stage: stageDetails }[kind];
    ui.detailsBody.replaceChildren(...render(ev, Number(step)));
  }

  /** Index of the winning candidate: same text as winner_text, preferably proposed by winner_node. */
  function winnerIndex(ev) {
    const c = ev.candidates || [];
    let i = c.findIndex((x) => x.text === ev.winner_text && (x.proposers || []).includes(ev.winner_node));
    if (i < 0) i = c.findIndex((x) => x.text === ev.winner_text);
    return i;
  }

  const nodeList = (names) => (names && names.length
    ? names.map((n, i) => [i ? ', ' : '', el('span', { class: 'node-name', 'data-node': n, style: `--c:${colourOf(n)}`, text: n })])
    : ['none']);

  function roundDetails(ev, step) {
    const cands = ev.candidates || [];
    const win = winnerIndex(ev);
    const list = el('ol', { class: 'candidates' }, cands.map((c, j) =>
      el('li', { class: j === win ? 'candidate winner' : 'candidate', 'data-node': (c.proposers || [])[0] || '' },
        quoted(c.text, 'quoted candidate-text'),
        j === win ? el('span', { class: 'badge', text: 'winner' }) : null,
        el('div', { class: 'meta' }, 'by ', nodeList(c.proposers), ` · score ${fmt(c.score)}`))));
    const head = el('tr', {}, el('th', { scope: 'col', text: 'Verifier' }),
      cands.map((c, j) => el('th', { scope: 'col', title: c.text }, `#${j + 1}`, j === win ? ' ★' : '')));
    const rows = (ev.verifiers || []).map((v) => el('tr', { class: 'verifier', 'data-node': v.node },
      el('th', { scope: 'row' }, nodeList([v.node])),
      cands.map((_, j) => el('td', {}, `lp ${fmt(v.mean_logprobs?.[j], 3)}`, el('br'), `q ${fmt(v.q?.[j], 3)}`))));
    return [
      el('h3', { text: `Round ${ev.round ?? step} (step ${step})` }),
      el('p', {}, 'Active: ', nodeList(ev.active)),
      el('h4', { text: 'Candidates' }), list,
      el('h4', { text: 'Verifier scores (mean log-prob, q)' }),
      el('div', { class: 'table-wrap' }, el('table', {}, el('thead', {}, head), el('tbody', {}, rows))),
      el('p', { class: 'exited' }, 'Exited after this round: ',
        (ev.exited || []).length ? ev.exited.map((n, i) => [i ? ', ' : '', el('span', { class: 'exited-node', 'data-node': n, text: n })]) : 'none'),
    ];
  }

  function charDetails(ev, step) {
    const alts = ev.alternatives || [];
    const shares = ev.shares || [];
    const rows = shares.map((s) => el('tr', {},
      el('th', { scope: 'row' }, nodeList([s.node])),
      el('td', { text: fmt(s.prob) }),
      el('td', { class: 'share', 'data-node': s.node, 'data-share': s.share, text: fmt(s.share) }),
      el('td', {}, el('span', { class: 'bar', style: `--c:${colourOf(s.node)};--w:${Math.max(0, Math.min(1, s.share || 0)) * 100}%` }))));
    return [
      el('h3', {}, `Character ${step}: `, ev.eos ? el('em', { text: 'end of answer' }) : quoted(ev.char)),
      el('p', {}, `Probability ${fmt(ev.prob)} · CharED round ${ev.round ?? '—'} · ${ev.drafted ? 'drafted' : 'not drafted'}`),
      el('h4', { text: 'Alternatives' }),
      alts.length ? el('ul', { class: 'alternatives' }, alts.map((a) =>
        el('li', {}, a.eos ? el('em', { text: 'end' }) : quoted(a.char), ` ${fmt(a.prob)}`))) : el('p', { text: 'none' }),
      el('h4', { text: 'Members' }),
      el('div', { class: 'table-wrap' }, el('table', {},
        el('thead', {}, el('tr', {}, ['Member', 'Prob', 'Share', ''].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, rows))),
    ];
  }

  /** A <dl> from [label, value] pairs. */
  const kv = (pairs) => el('dl', { class: 'kv' }, pairs.map(([k, v]) => [el('dt', { text: k }), el('dd', {}, v)]));

  const spanDetails = (ev, step) => [
    el('h3', { text: `Span ${step}` }),
    kv([['Member', nodeList([ev.node])], ['Text', quoted(ev.text)], ['Deferred', ev.deferred ? 'yes' : 'no'],
      ['Defer probability', fmt(ev.defer_prob)],
      ['Defer probabilities', (ev.defer_probs || []).map((p) => fmt(p, 3)).join(', ') || '—']]),
  ];

  const stageDetails = (ev, step) => [
    el('h3', { text: `Stage ${ev.stage ?? step}: ${ev.name || 'unnamed'}` }),
    kv([['Member', nodeList([ev.node])], ['Fallback', ev.fallback ? 'yes' : 'no'],
      ['Prompt', el('pre', { text: ev.prompt ?? '' })], ['Text', el('pre', { text: ev.text ?? '' })]]),
  ];

  // ---- Running a request ---------------------------------------------------------------------

  /** An input's integer value, or null when it is empty or not a number. */
  const intOf = (input) => {
    const n = Number.parseInt(input.value.trim(), 10);
    return Number.isFinite(n) ? n : null;
  };

  function buildRequest() {
    const model = ui.strategy.value;
    const req = {
      model, messages: [{ role: 'user', content: ui.prompt.value }],
      max_tokens: intOf(ui.maxChars) ?? state.defaultMaxChars, temperature: 0,
    };
    const seg = intOf(ui.segTokens), draft = intOf(ui.draftChars);
    const ensemble = {};
    if (seg != null && !$('#segment-tokens-field').hidden) ensemble.specfuse = { segment_tokens: seg };
    if (draft != null && !$('#draft-chars-field').hidden) ensemble.chared = { draft_chars: draft };
    if (Object.keys(ensemble).length) req.ensemble = ensemble;
    return req;
  }

  /** Clears the answer, details, stats and totals for a new run. */
  function resetView() {
    showError();
    ui.answer.replaceChildren();
    ui.stages.replaceChildren();
    ui.finalText.textContent = '';
    ui.detailsBody.replaceChildren(el('p', { class: 'hint', text: 'Nothing selected yet.' }));
    for (const a of ['kind', 'step', 'node']) delete ui.details.dataset[a];
    for (const dd of ui.totals.querySelectorAll('[data-total]')) dd.textContent = dd.dataset.total === 'events' ? '0' : '—';
  }

  async function start() {
    if (!ui.prompt.value.trim()) { showError('Enter a prompt first.'); ui.prompt.focus(); return; }
    if (state.run && !state.run.finished) state.run.controller.abort();
    const request = buildRequest();
    const run = state.run = newRun(request);
    window.__trace = { request, events: [] };
    resetView();
    finishRun(run, 'running', 'Running…');
    try {
      const res = await fetch('/ui/api/generate', {
        method: 'POST', signal: run.controller.signal,
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', ...authHeaders() },
        body: JSON.stringify(request),
      });
      if (!res.ok) { showError(await httpErrorMessage(res)); return finishRun(run, 'error', 'Failed.'); }
      await readEvents(res.body, (ev) => handleEvent(run, ev));
      if (run === state.run && !run.finished) {
        run.finished = true;
        showError('The stream ended before the answer was done.');
        finishRun(run, 'error', 'Stream ended early.');
      }
    } catch (err) {
      if (run !== state.run) return;            // superseded by a newer run
      run.finished = true;
      if (err.name === 'AbortError') return finishRun(run, 'error', 'Stopped.');
      showError(`The connection to the server failed: ${err.message}`);
      finishRun(run, 'error', 'Failed.');
    }
  }

  /** Sets #answer's data-state ("running", "done" or "error") and the status line. */
  function finishRun(run, status, message) {
    if (run !== state.run) return;
    ui.answer.dataset.state = status;
    ui.stop.disabled = status !== 'running';
    ui.runStatus.textContent = message;
    renderMembers();
  }

  /**
   * Reads a text/event-stream body and calls onEvent with each parsed `data:` JSON object.
   * Each data line is normally one whole object; lines that do not parse yet are joined with the
   * following data lines of the same event (the SSE rule), and dropped at the blank line if still invalid.
   */
  async function readEvents(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let pending = '';
    const line = (raw) => {
      const text = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (text === '') { pending = ''; return; }             // end of one SSE event
      if (!text.startsWith('data:')) return;                  // comments (keep-alives), event:, id:
      const data = text.slice(5).replace(/^ /, '');
      pending = pending ? `${pending}\n${data}` : data;
      if (pending === '[DONE]') { pending = ''; return; }
      try { const ev = JSON.parse(pending); pending = ''; if (ev && typeof ev === 'object') onEvent(ev); } catch { /* wait for more */ }
    };
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) { line(buffer.slice(0, nl)); buffer = buffer.slice(nl + 1); }
      if (done) { if (buffer) line(buffer); return; }
    }
  }

  /** The message to show for a non-200 answer ({"error":{"message"...}} or plain text). */
  async function httpErrorMessage(res) {
    let message = '';
    try {
      const text = await res.text();
      try { const j = JSON.parse(text); message = j?.error?.message || j?.message || text; } catch { message = text; }
    } catch { /* no body */ }
    if (res.status === 401) {
      return `This server needs an API key: enter it in the “API key” field and run again.${message ? ` (${message})` : ''}`;
    }
    return `${message || res.statusText || 'Request failed'} (HTTP ${res.status})`;
  }

  /** Shows a message in the #error alert (an empty message hides it). */
  const showError = (message = '') => { ui.error.textContent = message; };

  // ---- Copy as JSON --------------------------------------------------------------------------

  async function copyJson() {
    const { request, events } = window.__trace;
    const text = JSON.stringify({ request, events }, null, 2);
    let ok = false;
    try { if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(text); ok = true; } } catch { /* fall back */ }
    if (!ok) { // execCommand fallback (plain http on another host is not a secure context)
      const area = el('textarea', { class: 'offscreen', readonly: true, 'aria-hidden': 'true' });
      area.value = text;
      document.body.append(area);
      area.select();
      try { ok = document.execCommand('copy'); } catch { ok = false; }
      area.remove();
      ui.copy.focus();
    }
    ui.copyStatus.textContent = ok ? `Copied the request and ${events.length} events as JSON.` : 'Copying failed: the browser refused the clipboard.';
    clearTimeout(copyJson.timer);
    copyJson.timer = setTimeout(() => { ui.copyStatus.textContent = ''; }, 4000);
  }

  // ---- Wiring --------------------------------------------------------------------------------

  function applyQuery() {
    const q = new URLSearchParams(location.search);
    if (q.has('prompt')) ui.prompt.value = q.get('prompt');
    if (q.has('strategy')) { ui.strategy.dataset.wanted = q.get('strategy'); }
    if (q.has('max_chars')) { ui.maxChars.value = q.get('max_chars'); ui.maxChars.dataset.fromQuery = '1'; }
    if (q.has('segment_tokens')) ui.segTokens.value = q.get('segment_tokens');
    if (q.has('draft_chars')) ui.draftChars.value = q.get('draft_chars');
    return q.get('run') === '1';
  }

  function wire() {
    ui.form.addEventListener('submit', (e) => { e.preventDefault(); start(); });
    ui.form.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); start(); }
    });
    ui.stop.addEventListener('click', () => { if (state.run && !state.run.finished) state.run.controller.abort(); });
    ui.strategy.addEventListener('change', updateOptionFields);
    ui.apiKey.addEventListener('input', () => { try { sessionStorage.setItem(KEY_STORE, ui.apiKey.value); } catch { /* no storage */ } });
    ui.apiKey.addEventListener('change', () => { showError(); loadMembers(); });
    ui.copy.addEventListener('click', copyJson);
    // Details on hover, keyboard focus and tap/click, for answer spans and earlier pipeline stages.
    const pick = (e) => {
      const t = e.target instanceof Element && e.target.closest('#answer .seg, #stages .stage-block');
      if (t) showDetails(t);
    };
    for (const type of ['mouseover', 'focusin', 'click']) document.addEventListener(type, pick);
  }

  async function init() {
    try { ui.apiKey.value = sessionStorage.getItem(KEY_STORE) || ''; } catch { /* storage disabled */ }
    const autorun = applyQuery();
    if (ui.strategy.dataset.wanted) fillStrategies([...ui.strategy.options].map((o) => o.value));
    updateOptionFields();
    wire();
    await loadMembers();
    if (autorun) ui.form.requestSubmit();
  }

  init();
})();
