/**
 * A self-contained SVG of latency percentiles per operation: one row per operation, a bar for p50
 * and one for p99, on a common millisecond scale with the p99 target drawn as a line.
 */
export interface ChartRow {
  label: string;
  p50: number;
  p90: number;
  p99: number;
}

export function latencyChart(title: string, rows: ChartRow[], targetP99Ms: number): string {
  const width = 900;
  const left = 230;
  const right = 80;
  const rowHeight = 34;
  const top = 60;
  const height = top + rows.length * rowHeight + 60;
  const max = niceMax(Math.max(targetP99Ms, ...rows.map((r) => r.p99)) * 1.05);
  const x = (ms: number) => left + (ms / max) * (width - left - right);
  const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${width / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">${esc(title)}</text>`,
    `<rect x="${left}" y="34" width="12" height="12" fill="#4e79a7"/><text x="${left + 16}" y="44">p50</text>`,
    `<rect x="${left + 60}" y="34" width="12" height="12" fill="#a0cbe8"/><text x="${left + 76}" y="44">p90</text>`,
    `<rect x="${left + 120}" y="34" width="12" height="12" fill="#f28e2b"/><text x="${left + 136}" y="44">p99</text>`,
  ];
  for (let t = 0; t <= 5; t++) {
    const ms = (max / 5) * t;
    out.push(`<line x1="${x(ms)}" y1="${top - 4}" x2="${x(ms)}" y2="${height - 40}" stroke="#ddd"/>`);
    out.push(`<text x="${x(ms)}" y="${height - 26}" text-anchor="middle">${fmt(ms)} ms</text>`);
  }
  rows.forEach((r, i) => {
    const y = top + i * rowHeight;
    out.push(`<text x="${left - 8}" y="${y + 18}" text-anchor="end">${esc(r.label)}</text>`);
    out.push(`<rect x="${left}" y="${y + 2}" width="${Math.max(1, x(r.p50) - left)}" height="9" fill="#4e79a7"/>`);
    out.push(`<rect x="${left}" y="${y + 11}" width="${Math.max(1, x(r.p90) - left)}" height="9" fill="#a0cbe8"/>`);
    out.push(`<rect x="${left}" y="${y + 20}" width="${Math.max(1, x(r.p99) - left)}" height="9" fill="#f28e2b"/>`);
    out.push(`<text x="${Math.max(x(r.p99), x(r.p50)) + 6}" y="${y + 19}" fill="#333">${fmt(r.p50)} / ${fmt(r.p90)} / ${fmt(r.p99)}</text>`);
  });
  out.push(`<line x1="${x(targetP99Ms)}" y1="${top - 4}" x2="${x(targetP99Ms)}" y2="${height - 40}" stroke="#e15759" stroke-dasharray="4 3"/>`);
  out.push(`<text x="${x(targetP99Ms) + 4}" y="${top - 8}" fill="#e15759">p99 target ${targetP99Ms} ms</text>`);
  out.push(`<text x="${left}" y="${height - 8}" fill="#666">milliseconds, p50 / p90 / p99</text>`);
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

function niceMax(v: number): number {
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((c) => c >= v) ?? v;
}

function fmt(ms: number): string {
  return ms >= 10 ? ms.toFixed(0) : ms.toFixed(1);
}
