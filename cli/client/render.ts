/** Text rendering for people: aligned tables and a progress bar drawn on stderr. */

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

/**
 * Progress of a batch on stderr. On a terminal one line is redrawn in place; otherwise (a pipe, a
 * CI log) each finished item is printed once as a plain line, so logs stay readable.
 */
export class Progress {
  private readonly tty = Boolean(process.stderr.isTTY);
  private readonly announced = new Set<string>();
  private drawn = false;

  constructor(private readonly total: number) {}

  update(done: { key: string; line: string }[], failed: number): void {
    if (this.tty) {
      const width = 30;
      const filled = this.total ? Math.round((done.length / this.total) * width) : width;
      const bar = `[${'#'.repeat(filled)}${'-'.repeat(width - filled)}]`;
      const text = `${bar} ${done.length}/${this.total} done${failed ? `, ${failed} failed` : ''}`;
      process.stderr.write(`\r\x1b[2K${text}`);
      this.drawn = true;
      return;
    }
    for (const item of done) {
      if (this.announced.has(item.key)) continue;
      this.announced.add(item.key);
      process.stderr.write(`[${this.announced.size}/${this.total}] ${item.line}\n`);
    }
  }

  /** Ends the bar's line; once only, as both a Ctrl-C and the follow's own end may call it. */
  end(): void {
    if (this.tty && this.drawn) process.stderr.write('\n');
    this.drawn = false;
  }
}
