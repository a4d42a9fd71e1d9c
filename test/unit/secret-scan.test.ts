import { describe, expect, it } from 'vitest';
import { findStoredValue } from '../../mail/secret-scan';

const stored = [
  { name: 'stripe', value: 'sk_live_51HxYz' },
  { name: 'pin', value: '1234' },
  { name: 'gh-2fa', value: 'otpauth://totp/gh?secret=JBSWY3DPEHPK3PXP&algorithm=SHA1&digits=6&period=30' },
];

describe('finding a stored secret in a message', () => {
  it('finds the value in the subject, the text or the html', () => {
    expect(findStoredValue({ subject: 'key sk_live_51HxYz', text: 'hi' }, stored)).toBe('stripe');
    expect(findStoredValue({ subject: 's', text: 'hi', html: '<b>sk_live_51HxYz</b>' }, stored)).toBe('stripe');
  });

  it('finds the value in a recipient address', () => {
    expect(findStoredValue({ to: ['sk_live_51HxYz@example.com'], subject: 's', text: 'hi' }, stored)).toBe('stripe');
  });

  it('finds base64, base64url, hex (any case) and URL-encoded forms', () => {
    const v = 'sk_live_51HxYz';
    for (const form of [Buffer.from(v).toString('base64'), Buffer.from(v).toString('hex').toUpperCase(), encodeURIComponent(v)]) {
      expect(findStoredValue({ subject: 's', text: `see ${form}` }, stored)).toBe('stripe');
    }
  });

  it('finds the URL-encoded value however it was spelled, and the value in HTML entities', () => {
    const tricky = { name: 'tricky', value: 'Tr0ub4dor&3!x y/z' };
    // Before, only encodeURIComponent's own spelling matched: each of these went out.
    const spellings = [
      new URLSearchParams({ p: tricky.value }).toString(), // p=Tr0ub4dor%263%21x+y%2Fz
      encodeURIComponent(tricky.value).replace(/%[0-9A-F]{2}/g, (escape) => escape.toLowerCase()), // lowercase escapes
      encodeURI(tricky.value), // '/' and '&' left as they are
      'Tr0ub4dor&amp;3!x y/z', // an HTML body
      'Tr0ub4dor&#38;3&#x21;x&#32;y&#x2F;z',
    ];
    for (const text of spellings) expect(findStoredValue({ subject: 's', text: `see ${text}` }, [tricky]), text).toBe('tricky');
    expect(findStoredValue({ subject: 's', text: 'hi', html: '<p>Tr0ub4dor&amp;3!x&nbsp;y/z</p>' }, [{ name: 'nb', value: 'Tr0ub4dor&3!x\u00a0y/z' }])).toBe('nb');
    // An escape that is no valid UTF-8 beside them does not hide the rest of its run.
    const accented = { name: 'accented', value: '/é-secret-x' };
    expect(encodeURIComponent(accented.value)).toBe('%2F%C3%A9-secret-x');
    expect(findStoredValue({ subject: 's', text: 'x=%ff%2f%c3%a9-secret-x' }, [accented])).toBe('accented');
    // A stray percent sign or an unknown entity does not stop the scan, nor invent a match.
    expect(findStoredValue({ subject: '100% sure', text: '%E0%A4%A and &bogus; sk_live_51HxYz' }, stored)).toBe('stripe');
    expect(findStoredValue({ subject: '100% sure', text: '%E0%A4%A and &bogus;' }, stored)).toBeUndefined();
  });

  it('finds base64 of the value with anything around it: a trailing newline, a Basic auth user, a wrapped line', () => {
    const v = 'sk_live_51HxYz';
    // Before, only the value encoded alone matched: each of these went out.
    const encodings = [
      Buffer.from(`${v}\n`).toString('base64'), // echo "$KEY" | base64
      Buffer.from(`deploy:${v}`).toString('base64'), // Authorization: Basic
      Buffer.from(`x${v}`).toString('base64url'),
      Buffer.from(`{"key":"${v}","note":"rotated"}`).toString('base64'),
    ];
    for (const form of encodings) expect(findStoredValue({ subject: 's', text: `see ${form}` }, stored), form).toBe('stripe');
    const pem = { name: 'pem', value: `-----BEGIN KEY-----${'A1b2C3d4'.repeat(12)}-----END KEY-----` };
    const wrapped = Buffer.from(pem.value).toString('base64').replace(/(.{76})/g, '$1\n');
    expect(wrapped).toContain('\n');
    expect(findStoredValue({ subject: 's', text: wrapped }, [pem])).toBe('pem');
    // Other bytes with the same neighbours do not match.
    expect(findStoredValue({ subject: 's', text: Buffer.from('deploy:sk_live_51HxYa').toString('base64') }, stored)).toBeUndefined();
  });

  it('finds the bare seed of a TOTP credential, in either case (base32 is caseless)', () => {
    expect(findStoredValue({ subject: 's', text: 'seed JBSWY3DPEHPK3PXP' }, stored)).toBe('gh-2fa');
    expect(findStoredValue({ subject: 's', text: 'seed jbswy3dpehpk3pxp' }, stored)).toBe('gh-2fa');
    expect(findStoredValue({ subject: 's', text: 'seed Jbswy3dpEHPK3pxp' }, stored)).toBe('gh-2fa');
  });

  it('matches a plain value only as written: case carries meaning in it', () => {
    expect(findStoredValue({ subject: 's', text: 'key SK_LIVE_51HXYZ' }, stored)).toBeUndefined();
  });

  it('passes ordinary mail, and does not match values too short to tell apart from words', () => {
    expect(findStoredValue({ subject: 'Rotation done', text: 'version 2 of stripe is current; call 1234' }, stored)).toBeUndefined();
  });
});
