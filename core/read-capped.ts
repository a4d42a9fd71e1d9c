/**
 * A response body as text, or null when it is larger than `max` bytes: reading stops there (leaving
 * the loop cancels the stream), so an answer from a server someone else configured cannot fill the
 * process's memory.
 */
export async function readCapped(res: Response, max: number): Promise<string | null> {
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of res.body ?? []) {
    size += chunk.length;
    if (size > max) return null;
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}
