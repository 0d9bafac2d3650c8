// The page of sample_web.py: the exported denoiser and the update graphs in its metadata (the
// ones sample_ort.py runs) on onnxruntime-web, the grid of x_t and the predicted x_0 drawn at
// every step. window.ddpm is the test hook: tests/test_web.py injects x_T and the noise.
import { SAMPLERS, stepTable, distilledSampler, Normal, onnxMetadata } from './diffusion.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// WebGPU's build of onnxruntime-web (which also runs WebAssembly, slower) only where asked for
const ort = await import(params.get('backend') === 'webgpu' ? './ort/ort.webgpu.min.mjs' : './ort/ort.wasm.min.mjs');
const GUIDANCE = 3;  // sampling.GUIDANCE
const REQUIRED = ['ddpm.format', 'ddpm.betas', 'ddpm.image_size', 'ddpm.in_channels', 'ddpm.var_type',
  'ddpm.clip_x0', 'ddpm.precision', 'ddpm.step_graph'];

// WebAssembly: SIMD always; threads only where the page is cross-origin isolated (the COOP and
// COEP headers sample_web.py sends); set explicitly, as ORT's default on 2 cores is 1 thread
ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).pathname;  // a URL path, not a bare one
ort.env.wasm.numThreads = crossOriginIsolated ? Number(params.get('threads') || navigator.hardwareConcurrency || 1) : 1;
ort.env.logLevel = 'error';

function say(text, isError = false) {
  $('message').textContent = text;
  $('message').className = isError ? 'error' : '';
}

// The model's facts from its ddpm.* metadata, checked like sample_ort.read_metadata: an Error
// with a sentence for a file that is not a ddpm export or that lacks what the page needs
function readModel(bytes, name) {
  let meta;
  try { meta = onnxMetadata(bytes); } catch (e) { meta = {}; }
  if (!Object.keys(meta).some(k => k.startsWith('ddpm.'))) {
    throw new Error(`'${name}' is not a model written by export.py (no ddpm.* metadata); export a checkpoint with 'python export.py ckpt.pt'`);
  }
  const missing = REQUIRED.filter(k => !(k in meta));
  if (missing.length) throw new Error(`'${name}' lacks the metadata ${missing.join(', ')}, so it has no update graphs to run; export it again with export.py`);
  const format = Number(meta['ddpm.format']);
  if (!(format >= 1 && format <= 2)) throw new Error(`'${name}' has metadata format ${meta['ddpm.format']}; this page reads formats 1 and 2`);
  const graph = (key) => meta[key] ? Uint8Array.from(atob(meta[key]), c => c.charCodeAt(0)) : null;
  const m = {
    name, format, betas: JSON.parse(meta['ddpm.betas']), size: Number(meta['ddpm.image_size']),
    channels: Number(meta['ddpm.in_channels']), varType: meta['ddpm.var_type'],
    clip: meta['ddpm.clip_x0'] === 'true', precision: meta['ddpm.precision'], preset: meta['ddpm.preset'] || '?',
    numClasses: Number(meta['ddpm.num_classes'] || 0), classNames: JSON.parse(meta['ddpm.class_names'] || '[]'),
    distilledSteps: Number(meta['ddpm.distilled_steps'] || 0),
    distilledGuidance: Number(meta['ddpm.distilled_guidance'] || 1),
    graphs: { step: graph('ddpm.step_graph'), multistep: graph('ddpm.multistep_graph'),
      guided_step: graph('ddpm.guided_step_graph'), guided_multistep: graph('ddpm.guided_multistep_graph') },
  };
  if (!(m.betas.length >= 2 && m.size >= 1 && [1, 3].includes(m.channels))) throw new Error(`'${name}' has altered ddpm.* metadata; export it again with export.py`);
  return m;
}

// The sessions: the denoiser on the chosen backend, the update graphs (a few element-wise nodes)
// on WebAssembly, made when first needed
class Model {
  static async open(bytes, name, backend) {
    const model = new Model();
    model.m = readModel(bytes, name);
    model.backend = backend;
    try {
      model.denoiser = await ort.InferenceSession.create(bytes, { executionProviders: [backend], graphOptimizationLevel: 'all' });
    } catch (e) {
      throw new Error(`'${name}' cannot be loaded by onnxruntime-web on ${backend} (${String(e.message || e).split('\n')[0].slice(0, 160)})`);
    }
    const inputs = [...model.denoiser.inputNames].sort().join(',');
    const expected = model.m.numClasses ? 't,x_t,y' : 't,x_t';
    if (inputs !== expected) throw new Error(`'${name}' has the inputs ${inputs}, not ${expected}; export it again with export.py`);
    model.updates = {};
    return model;
  }

  async update(key) {
    if (!this.m.graphs[key]) {
      throw new Error(`'${this.m.name}' was exported before ${key.includes('multistep') ? 'DPM-Solver++' : 'this sampler'} existed (no ddpm.${key}_graph); export it again with export.py, or use ddim`);
    }
    if (!this.updates[key]) this.updates[key] = await ort.InferenceSession.create(this.m.graphs[key], { executionProviders: ['wasm'] });
    return this.updates[key];
  }

  async eps(x, t, y, N) {  // one denoiser call: x (N, C, H, W), t and y (N,)
    const { channels: C, size: S } = this.m;
    const feeds = { x_t: new ort.Tensor('float32', x, [N, C, S, S]), t: new ort.Tensor('int64', new BigInt64Array(N).fill(BigInt(t)), [N]) };
    if (this.m.numClasses) feeds.y = new ort.Tensor('int64', BigInt64Array.from(y, BigInt), [N]);
    return this.denoiser.run(feeds);
  }
}

// What sampling.distilled_sampler and distilled_guidance decide, and the labels of a class choice
export function settingsFor(m, asked) {
  const sampler = distilledSampler(m.distilledSteps, asked.sampler);
  let scale = asked.guidance, label = asked.classes;
  if (m.distilledGuidance !== 1 && label !== null) {  // guidance built in: that scale or none
    if (scale === m.distilledGuidance) scale = 1;
    else if (scale !== 0) throw new Error(`guidance ${scale}: this student was distilled with classifier-free guidance ${m.distilledGuidance} built in, so it samples at that scale or unconditionally (0)`);
  }
  let labels = null, nrow = Math.ceil(Math.sqrt(asked.n)), n = asked.n;
  if (label !== null) {
    const classes = label === 'all' ? m.classNames.map((_, i) => i) : [label];
    const per = classes.length === 1 ? n : Math.ceil(n / classes.length);
    labels = classes.flatMap(c => Array(per).fill(c));
    n = labels.length;
    if (classes.length > 1) nrow = per;
  }
  const guided = labels !== null && scale !== 0 && scale !== 1;
  if (labels !== null && scale === 0) labels = null;  // guidance 0: the unconditional model
  return { sampler, scale, guided, labels, n, nrow };
}

// The reverse process: x_T -> x_0 through the update graphs, as sample_ort.Runner.run.
// inject: {xT, noise(k)} from the test hook, else the seeded Normal. onStep(k, t, x_t, pred_x0, ms).
export async function reverse(model, s, seed, inject, onStep) {
  const m = model.m, chw = m.channels * m.size * m.size, B = s.n, N = s.guided ? 2 * B : B;
  const { timesteps, coefs } = stepTable(m.betas, s.sampler, m.varType);
  const multistep = s.sampler.name === 'dpm++';
  const update = await model.update((s.guided ? 'guided_' : '') + (multistep ? 'multistep' : 'step'));
  const rng = new Normal(seed);
  const xT = inject ? inject.xT : rng.fill(B * chw);
  let x = new Float32Array(N * chw);
  x.set(xT);
  if (s.guided) x.set(xT, B * chw);
  const nul = m.numClasses;  // 'no label'
  const y = s.labels ? (s.guided ? [...s.labels, ...Array(B).fill(nul)] : s.labels) : Array(N).fill(nul);
  let prevX0 = new Float32Array(B * chw);
  const dims = (rows) => [rows, m.channels, m.size, m.size];
  for (let k = 0; k < timesteps.length; k++) {
    const start = performance.now();
    const out = await model.eps(x, timesteps[k], y, N);
    const feeds = { x_t: new ort.Tensor('float32', x, dims(N)), eps: out.eps, coef: new ort.Tensor('float32', coefs[k], [coefs[k].length]) };
    if (multistep) feeds.prev_x0 = new ort.Tensor('float32', prevX0, dims(B));
    else feeds.noise = new ort.Tensor('float32', inject ? inject.noise(k) : rng.fill(B * chw), dims(B));
    if (out.var_values && !multistep) feeds.var_values = out.var_values;
    if (s.guided) feeds.guidance = new ort.Tensor('float32', [s.scale], [1]);
    const r = await update.run(feeds);
    const xt = x.subarray(0, B * chw);
    let predX0 = r.pred_x0 ? r.pred_x0.data : format1X0(m, xt, out.eps.data, coefs[k], s);
    x = r.x_prev.data;
    if (multistep) prevX0 = predX0;
    await onStep(k, timesteps[k], xt, predX0, performance.now() - start);
  }
  return x.subarray(0, B * chw);
}

// Format 1's step graph outputs x_prev alone: the x_0 it predicted, for the pictures
function format1X0(m, xt, eps, coef, s) {
  const n = xt.length, out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const e = s.guided ? eps[n + i] + s.scale * (eps[i] - eps[n + i]) : eps[i];
    const v = coef[0] * xt[i] - coef[1] * e;
    out[i] = m.clip ? Math.min(1, Math.max(-1, v)) : v;
  }
  return out;
}

// pictures.to_uint8 and grid_of: (B, C, H, W) in [-1, 1] -> a grid on white, 2 pixels apart
export function toUint8(x) {
  return Uint8ClampedArray.from(x, v => Math.round((v + 1) * 127.5));
}

function drawGrid(canvas, x, B, C, S, nrow, pad = 2) {
  const ncol = Math.ceil(B / nrow), w = nrow * (S + pad) + pad, h = ncol * (S + pad) + pad;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext('2d'), img = ctx.createImageData(w, h), px = toUint8(x);
  img.data.fill(255);
  for (let b = 0; b < B; b++) {
    const oy = pad + Math.floor(b / nrow) * (S + pad), ox = pad + (b % nrow) * (S + pad);
    for (let i = 0; i < S; i++) for (let j = 0; j < S; j++) {
      const o = 4 * ((oy + i) * w + ox + j);
      for (let c = 0; c < 3; c++) img.data[o + c] = px[((b * C + (C === 3 ? c : 0)) * S + i) * S + j];
    }
  }
  ctx.putImageData(img, 0, 0);
}

// ---------------------------------------------------------------------------------------------
// The page

let model = null, running = false;

function showFacts(m) {
  const facts = [`${m.name}: preset ${m.preset}`, `T = ${m.betas.length}`, `${m.size}x${m.size}x${m.channels}`,
    m.numClasses ? `conditional, ${m.numClasses} classes` : 'unconditional', `${m.varType}, ${m.precision}`,
    m.distilledSteps ? `distilled to ${m.distilledSteps} steps` + (m.distilledGuidance !== 1 ? `, guidance ${m.distilledGuidance} built in` : '') : null];
  $('facts').textContent = facts.filter(Boolean).join(' · ');
  $('class').innerHTML = '<option value="">none (unconditional)</option>' + (m.numClasses ? '<option value="all">all (a row each)</option>' : '') +
    m.classNames.map((c, i) => `<option value="${i}">${c}</option>`).join('');
  $('class').disabled = !m.numClasses;
  $('guidance').value = m.distilledGuidance !== 1 ? m.distilledGuidance : GUIDANCE;
  $('guidance').disabled = !m.numClasses;
  const d = m.distilledSteps;
  $('sampler').value = d ? 'ddim' : 'ddpm';
  $('steps').value = d || m.betas.length;
  $('steps').max = m.betas.length;
  for (const id of ['sampler', 'steps', 'eta']) $(id).disabled = !!d;
  $('eta').value = 0;
  $('sample').disabled = false;
}

function asked() {
  const sampler = { name: $('sampler').value, steps: Number($('steps').value), eta: Number($('eta').value), spacing: null };
  if (!model.m.distilledSteps && sampler.name === 'ddpm' && sampler.steps === model.m.betas.length) sampler.steps = null;
  if (sampler.name !== 'ddim' && sampler.eta !== 0) throw new Error(`eta sets DDIM's noise; ${sampler.name} has none to set`);
  const n = Number($('n').value), steps = sampler.steps;
  if (!(Number.isInteger(n) && n >= 1 && n <= 256)) throw new Error(`images: use 1 to 256, not ${$('n').value}`);
  if (steps !== null && !(Number.isInteger(steps) && steps >= 1 && steps <= model.m.betas.length)) throw new Error(`steps must be between 1 and T=${model.m.betas.length}, got ${$('steps').value}`);
  const c = $('class').value;
  return { sampler, n, classes: c === '' ? null : (c === 'all' ? 'all' : Number(c)), guidance: Number($('guidance').value) };
}

async function sampleClicked() {
  if (running) return;
  running = true; $('sample').disabled = true;
  try {
    const s = settingsFor(model.m, asked()), m = model.m, start = performance.now();
    let total = 0;
    const x0 = await reverse(model, s, Number($('seed').value), null, async (k, t, xt, px0, ms) => {
      total += ms;
      drawGrid($('xt'), xt, s.n, m.channels, m.size, s.nrow);
      drawGrid($('x0'), px0, s.n, m.channels, m.size, s.nrow);
      $('stats').textContent = `step ${k + 1}/${s.sampler.steps || m.betas.length} (t = ${t}): ${(total / (k + 1)).toFixed(1)} ms per step`;
      await new Promise(requestAnimationFrame);  // let the browser draw
    });
    drawGrid($('xt'), x0, s.n, m.channels, m.size, s.nrow);
    const seconds = (performance.now() - start) / 1000, steps = s.sampler.steps || m.betas.length;
    $('stats').textContent = `${s.n} images x ${steps} ${s.sampler.name} steps in ${seconds.toFixed(1)} s: ${(s.n / seconds).toFixed(2)} images/s, ${(total / steps).toFixed(1)} ms per step on ${backendName()}`;
    $('download').disabled = false;
    say('');
  } catch (e) {
    say(e.message, true);
  } finally {
    running = false; $('sample').disabled = false;
  }
}

function backendName() {
  return model.backend === 'webgpu' ? 'WebGPU' : `WebAssembly (SIMD, ${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? 's' : ''}${crossOriginIsolated ? '' : '; not cross-origin isolated, so no threads'})`;
}

async function load(bytes, name) {
  $('sample').disabled = true;
  say(`loading ${name} ...`);
  let backend = params.get('backend') === 'webgpu' ? 'webgpu' : 'wasm', note = '';
  if (backend === 'webgpu' && !(navigator.gpu && await navigator.gpu.requestAdapter())) {
    backend = 'wasm';
    note = 'This browser offers no WebGPU adapter, so the model runs on WebAssembly. ';
  }
  try {
    model = await Model.open(bytes, name, backend);
    showFacts(model.m);
    say(`${note}ready: ${backendName()}`, note !== '');
  } catch (e) {
    model = null;
    say(note + e.message, true);
  }
}

let loaded = null;
async function start() {
  $('sample').onclick = sampleClicked;
  $('download').onclick = () => $('xt').toBlob(b => Object.assign(document.createElement('a'), { href: URL.createObjectURL(b), download: 'samples.png' }).click());
  $('file').onchange = async () => { const f = $('file').files[0]; if (f) { loaded = [new Uint8Array(await f.arrayBuffer()), f.name]; await load(...loaded); } };
  $('backend').value = params.get('backend') === 'webgpu' ? 'webgpu' : 'wasm';
  $('backend').onchange = () => { params.set('backend', $('backend').value); location.search = params; };  // another build of onnxruntime-web
  const response = await fetch('model.onnx');
  if (!response.ok) { say(`no model.onnx next to this page (HTTP ${response.status}); open one with the file button`, true); return; }
  const named = /filename="([^"]+)"/.exec(response.headers.get('Content-Disposition') || '');
  loaded = [new Uint8Array(await response.arrayBuffer()), named ? named[1] : 'model.onnx'];
  await load(...loaded);
}

// The test hook: base64 float32 in and out, so selenium moves a few strings
const f32 = (b64) => new Float32Array(Uint8Array.from(atob(b64), c => c.charCodeAt(0)).buffer);
const b64 = (a) => { const u = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); let s = ''; for (let i = 0; i < u.length; i += 32768) s += String.fromCharCode(...u.subarray(i, i + 32768)); return btoa(s); };
window.ddpm = {
  ready: () => model !== null && !$('sample').disabled,
  message: () => $('message').textContent,
  table: (sampler, varType, betas) => { const r = stepTable(betas || model.m.betas, sampler, varType || model.m.varType); return { timesteps: r.timesteps, coefs: r.coefs.map(c => Array.from(c)) }; },
  timeCalls: async (N, reps) => {  // ms per denoiser call at batch N, after one warm-up call (bench/web.py)
    const x = new Normal(0).fill(N * model.m.channels * model.m.size ** 2), y = Array(N).fill(0);
    await model.eps(x, 500, y, N);
    const start = performance.now();
    for (let r = 0; r < reps; r++) await model.eps(x, 500, y, N);
    return { ms: (performance.now() - start) / reps, threads: ort.env.wasm.numThreads, isolated: crossOriginIsolated };
  },
  eps: async (x, t, y, N) => b64((await model.eps(f32(x), t, y, N)).eps.data),
  sample: async (request, xT, noise) => {
    const s = settingsFor(model.m, request), steps = [];
    const x0 = await reverse(model, s, 0, { xT: f32(xT), noise: (k) => f32(noise[k]) }, (k, t, xt) => { steps.push(b64(Float32Array.from(xt))); });
    return { steps, final: b64(Float32Array.from(x0)), sampler: s.sampler, n: s.n };
  },
};
start();
