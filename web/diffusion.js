// The numbers of the reverse process in the page, in float64 like schedules.py, which they port:
// the chain's tables, the t's a shorter chain keeps, the per-step coefficients of the exported
// update graphs (schedules.step_table), a distilled model's own chain, and a seeded N(0, 1).
// tests/test_web.py checks every table against Python's to float32.

export const SAMPLERS = ['ddpm', 'ddim', 'dpm++'];

// numpy's round: halves to the even neighbour (trailing spacing hits x.5 for many step counts)
function roundHalfEven(x) {
  const r = Math.round(x);
  return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

// schedules.spaced_timesteps: the t's a chain of n steps keeps (Lin et al. 2023, table 2)
export function spacedTimesteps(T, n, spacing) {
  if (!(Number.isInteger(n) && n >= 1 && n <= T)) throw new Error(`steps must be between 1 and T=${T}, got ${n}`);
  const out = [];
  if (spacing === 'leading') {
    for (let i = 0; i < n; i++) out.push(i * Math.floor(T / n));
  } else if (spacing === 'trailing') {
    for (let i = 0; i < n; i++) out.push(roundHalfEven(T + i * (-T / n)) - 1);
    out.sort((a, b) => a - b);
  } else if (spacing === 'linspace') {
    const step = (T - 1) / (n - 1);
    for (let i = 0; i < n; i++) out.push(roundHalfEven(i === n - 1 && n > 1 ? T - 1 : (n > 1 ? i * step : 0)));
    return [...new Set(out)].sort((a, b) => a - b);
  } else {
    throw new Error(`unknown spacing '${spacing}'`);
  }
  return out;
}

export function defaultSpacing(sampler) {
  return sampler === 'dpm++' ? 'trailing' : 'leading';
}

// The tables of a chain of betas (schedules.Schedule), only those the step tables read
function chain(betas, timesteps) {
  const N = betas.length, c = { N, betas, timesteps };
  const abar = new Array(N), abarPrev = new Array(N);
  let prod = 1;
  for (let i = 0; i < N; i++) { abarPrev[i] = prod; prod *= 1 - betas[i]; abar[i] = prod; }
  Object.assign(c, { abar, abarPrev });
  c.a = abar.map(x => Math.sqrt(1 / x));
  c.b = abar.map(x => Math.sqrt(1 / x - 1));
  c.posteriorVariance = betas.map((bt, i) => bt * (1 - abarPrev[i]) / (1 - abar[i]));
  c.coef1 = betas.map((bt, i) => bt * Math.sqrt(abarPrev[i]) / (1 - abar[i]));
  c.coef2 = betas.map((bt, i) => (1 - abarPrev[i]) * Math.sqrt(1 - bt) / (1 - abar[i]));
  const first = N > 1 ? c.posteriorVariance[1] : betas[0];
  c.posteriorLogVarianceClipped = c.posteriorVariance.map((v, i) => Math.log(i === 0 ? first : v));
  c.logBetas = betas.map(Math.log);
  const lam = abar.map(x => 0.5 * (Math.log(x) - Math.log1p(-x)));
  c.dpmSigmaRatio = abar.map((x, i) => Math.sqrt((1 - abarPrev[i]) / (1 - x)));
  c.dpmW = abar.map((x, i) => Math.sqrt(abarPrev[i]) - c.dpmSigmaRatio[i] * Math.sqrt(x));
  c.dpmHalfRatio = new Array(N).fill(0);
  for (let i = 1; i < N - 1; i++) c.dpmHalfRatio[i] = (lam[i - 1] - lam[i]) / (2 * (lam[i] - lam[i + 1]));
  return c;
}

// schedules.step_table: {timesteps, coefs} in sampling order; coefs[k] a Float32Array
export function stepTable(betas, { name, steps, eta = 0, spacing }, varType) {
  const T = betas.length, n = steps || T;
  const full = chain(betas, [...Array(T).keys()]);
  let c = full;
  if (!(name === 'ddpm' && n === T)) {  // respaced onto the kept t's: beta_i = 1 - abar(t_i) / abar(t_{i-1})
    const kept = spacedTimesteps(T, n, spacing || defaultSpacing(name));
    const abar = kept.map(t => full.abar[t]);
    c = chain(abar.map((x, i) => 1 - x / (i ? abar[i - 1] : 1)), kept);
  }
  const rows = [];
  for (let i = 0; i < c.N; i++) {
    let row;
    if (name === 'dpm++') {
      const w = c.dpmW[i], r = c.dpmHalfRatio[i];
      row = [c.a[i], c.b[i], w * (1 + r), c.dpmSigmaRatio[i], -w * r];
    } else if (name === 'ddpm') {
      const std = Math.sqrt(varType === 'fixed_large' ? c.betas[i] : c.posteriorVariance[i]);
      const s = varType === 'learned_range' || i === 0 ? 0 : std;
      row = [c.a[i], c.b[i], c.coef1[i], c.coef2[i], 0, s];
    } else if (name === 'ddim') {
      const sigma = eta * Math.sqrt((1 - c.abarPrev[i]) / (1 - c.abar[i]) * (1 - c.abar[i] / c.abarPrev[i]));
      row = [c.a[i], c.b[i], Math.sqrt(c.abarPrev[i]), 0, Math.sqrt(1 - c.abarPrev[i] - sigma ** 2), sigma];
    } else {
      throw new Error(`unknown sampler '${name}'; use ${SAMPLERS.join(', ')}`);
    }
    if (varType === 'learned_range' && name !== 'dpm++') {
      row.push(name === 'ddpm' && i > 0 ? 1 : 0, c.posteriorLogVarianceClipped[i], c.logBetas[i]);
    }
    rows.push(Float32Array.from(row));
  }
  return { timesteps: c.timesteps.slice().reverse(), coefs: rows.reverse() };
}

// sampling.distilled_sampler: a student samples the chain it was trained on, nothing else
export function distilledSampler(distilledSteps, sampler) {
  if (!distilledSteps) return { ...sampler, name: sampler.name || 'ddpm' };
  return { name: 'ddim', steps: distilledSteps, eta: 0, spacing: 'trailing' };
}

// A seeded N(0, 1): xoshiro128** (Blackman & Vigna) for uniforms, Box-Muller for the normals.
// Other numbers than numpy's for the same seed; the tests inject theirs.
export class Normal {
  constructor(seed) {
    let z = (Number(seed) >>> 0) ^ 0x9e3779b9;
    this.s = new Uint32Array(4);
    for (let i = 0; i < 4; i++) {  // splitmix32 spreads the seed over the state
      z = (z + 0x9e3779b9) >>> 0;
      let x = z;
      x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
      x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
      this.s[i] = (x ^ (x >>> 16)) >>> 0;
    }
  }
  uniform() {  // in (0, 1)
    const s = this.s, r = Math.imul(((Math.imul(s[1], 5) << 7) | (Math.imul(s[1], 5) >>> 25)), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t;
    s[3] = (s[3] << 11) | (s[3] >>> 21);
    return (r + 0.5) / 4294967296;
  }
  fill(n) {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i += 2) {
      const r = Math.sqrt(-2 * Math.log(this.uniform())), phi = 2 * Math.PI * this.uniform();
      out[i] = r * Math.cos(phi);
      if (i + 1 < n) out[i + 1] = r * Math.sin(phi);
    }
    return out;
  }
}

// The ddpm.* metadata of an ONNX file, read from its protobuf (ModelProto field 14,
// metadata_props: entries of key = 1, value = 2) without onnxruntime: {} for a file without.
export function onnxMetadata(bytes) {
  let pos = 0;
  const varint = (end) => {
    let value = 0, scale = 1, byte;
    do {
      if (pos >= end) throw new Error('truncated');
      byte = bytes[pos++];
      value += (byte & 0x7f) * scale;
      scale *= 128;
    } while (byte & 0x80);
    return value;
  };
  const text = (start, length) => new TextDecoder().decode(bytes.subarray(start, start + length));
  const skip = (wire, end) => {
    if (wire === 0) varint(end);
    else if (wire === 1) pos += 8;
    else if (wire === 2) { const n = varint(end); pos += n; }
    else if (wire === 5) pos += 4;
    else throw new Error(`wire type ${wire}`);
    if (pos > end) throw new Error('truncated');
  };
  const meta = {};
  while (pos < bytes.length) {
    const key = varint(bytes.length), field = Math.floor(key / 8), wire = key % 8;
    if (field === 14 && wire === 2) {
      const end = pos + varint(bytes.length);
      let k = null, v = '';
      while (pos < end) {
        const key2 = varint(end), f2 = Math.floor(key2 / 8);
        if ((f2 === 1 || f2 === 2) && key2 % 8 === 2) {
          const n = varint(end);
          if (f2 === 1) k = text(pos, n); else v = text(pos, n);
          pos += n;
        } else {
          skip(key2 % 8, end);
        }
      }
      if (k !== null) meta[k] = v;
    } else {
      skip(wire, bytes.length);
    }
  }
  return meta;
}
