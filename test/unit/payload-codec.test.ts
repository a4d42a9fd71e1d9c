import { createCipheriv, hkdfSync, randomBytes } from 'node:crypto';
import type { Payload } from '@temporalio/common';
import { describe, expect, it } from 'vitest';
import { IntegrityError } from '../../core/errors';
import { ENCODING, EncryptionCodec, KEY_ID_HEADER, OPENED_SUBKEYS, PAYLOADS_PER_SUBKEY } from '../../vault/payload-codec';

const AAD = 'mailgent/temporal-payload/v1';
const key = randomBytes(32);
const id = 'payload-codec:1111111111111111';
const codec = () => new EncryptionCodec(async () => ({ id, key }));
const plain = (i: number): Payload => ({ metadata: { encoding: Buffer.from('json/plain') }, data: Buffer.from(JSON.stringify({ i })) });
const text = (p: Payload) => Buffer.from(p.data!).toString();
const saltOf = (p: Payload) => Buffer.from(p.data!).subarray(0, 16).toString('hex');
const nonceOf = (p: Payload) => Buffer.from(p.data!).subarray(16, 28).toString('hex');

/** A payload sealed as every payload was before subkeys were reused: its own salt, written here independently. */
function sealedAlone(payload: Payload): Payload {
  const salt = randomBytes(16);
  const subkey = Buffer.from(hkdfSync('sha256', key, salt, AAD, 32));
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', subkey, nonce).setAAD(Buffer.from(AAD));
  const json = JSON.stringify({
    metadata: Object.fromEntries(Object.entries(payload.metadata!).map(([k, v]) => [k, Buffer.from(v).toString('base64')])),
    data: Buffer.from(payload.data!).toString('base64'),
  });
  const body = Buffer.concat([cipher.update(json), cipher.final()]);
  return { metadata: { encoding: Buffer.from(ENCODING), [KEY_ID_HEADER]: Buffer.from(id) }, data: Buffer.concat([salt, nonce, body, cipher.getAuthTag()]) };
}

describe('the payload codec’s subkeys', () => {
  it('seals a run of payloads under one salt, each with its own nonce, and draws a new salt after PAYLOADS_PER_SUBKEY', { timeout: 30_000 }, async () => {
    const c = codec();
    const first = await c.encode(Array.from({ length: 100 }, (_, i) => plain(i)));
    expect(new Set(first.map(saltOf)).size).toBe(1);
    expect(new Set(first.map(nonceOf)).size).toBe(100);
    // Up to the bound, then a new salt for the rest.
    const rest = await c.encode(Array.from({ length: PAYLOADS_PER_SUBKEY }, (_, i) => plain(i)));
    const salts = [...first, ...rest].map(saltOf);
    expect(salts.lastIndexOf(salts[0]!)).toBe(PAYLOADS_PER_SUBKEY - 1);
    expect(new Set(salts.slice(PAYLOADS_PER_SUBKEY)).size).toBe(1);
    expect(salts[PAYLOADS_PER_SUBKEY]).not.toBe(salts[0]);
    // Another process (another codec on the same key) draws salts of its own, and opens both runs.
    const other = codec();
    const theirs = await other.encode([plain(7)]);
    expect(saltOf(theirs[0]!)).not.toBe(salts[0]);
    const opened = await other.decode([first[3]!, rest[rest.length - 1]!, ...theirs]);
    expect(opened.map(text)).toEqual(['{"i":3}', `{"i":${PAYLOADS_PER_SUBKEY - 1}}`, '{"i":7}']);
  });

  it('opens payloads sealed one salt each (histories written before), past its memory of subkeys', async () => {
    const c = codec();
    const old = Array.from({ length: 200 }, (_, i) => sealedAlone(plain(i)));
    expect((await c.decode(old)).map(text)).toEqual(old.map((_, i) => `{"i":${i}}`));
    // It remembers the last few salts, no more; the first ones, forgotten, still open (derived again).
    expect(c.heldSubkeys).toBe(OPENED_SUBKEYS);
    expect((await c.decode([old[0]!, old[199]!])).map(text)).toEqual(['{"i":0}', '{"i":199}']);
    expect(c.heldSubkeys).toBe(OPENED_SUBKEYS);
  });

  it('refuses a payload whose salt or body was altered, and still opens the untouched ones of the same run', async () => {
    const c = codec();
    const [a, b] = await c.encode([plain(1), plain(2)]);
    const fresh = codec();
    for (const at of [0, 20, b!.data!.length - 1]) {
      const altered = Buffer.from(b!.data!);
      altered[at]! ^= 1;
      await expect(c.decode([{ ...b!, data: altered }])).rejects.toBeInstanceOf(IntegrityError);
      await expect(fresh.decode([{ ...b!, data: altered }])).rejects.toBeInstanceOf(IntegrityError);
    }
    // What failed to open is not remembered (an altered salt would take a place from a real one).
    expect(fresh.heldSubkeys).toBe(0);
    expect((await c.decode([a!, b!])).map(text)).toEqual(['{"i":1}', '{"i":2}']);
  });
});
