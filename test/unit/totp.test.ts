import { describe, expect, it } from 'vitest';
import { normalizeTotp, parseStoredTotp, toOtpauthUri, totpCode } from '../../vault/totp';
import { base32 } from '../support/base32';


describe('TOTP parameters', () => {
  it('normalises a secret with spaces and lower case, and round-trips through the stored URI', () => {
    const p = normalizeTotp({ secret: 'jbsw y3dp ehpk 3pxp', algorithm: 'SHA256', digits: 8, period: 45 }, 'acme');
    expect(p.secret).toBe('JBSWY3DPEHPK3PXP');
    expect(parseStoredTotp(toOtpauthUri(p))).toMatchObject({ secret: 'JBSWY3DPEHPK3PXP', algorithm: 'SHA256', digits: 8, period: 45 });
  });

  it('keeps an issuer and a label with spaces, & and + as they were through the stored URI', () => {
    const p = normalizeTotp({ otpauthUri: 'otpauth://totp/Acme%20%26%20Co%2B1:alice?secret=JBSWY3DPEHPK3PXP&issuer=Acme%20%26%20Co%2B1' }, 'x');
    expect(p).toMatchObject({ issuer: 'Acme & Co+1', label: 'Acme & Co+1:alice' });
    const stored = toOtpauthUri(p);
    // Before, the issuer was stored as Acme+%26+Co%2B1 and read back as `Acme+&+Co+1`.
    expect(stored).toContain('issuer=Acme%20%26%20Co%2B1');
    expect(parseStoredTotp(stored)).toMatchObject({ issuer: 'Acme & Co+1', label: 'Acme & Co+1:alice', secret: 'JBSWY3DPEHPK3PXP' });
  });

  it('imports an otpauth URI with its issuer, algorithm, digits and period', () => {
    const p = normalizeTotp({ otpauthUri: 'otpauth://totp/ACME:alice?secret=JBSWY3DPEHPK3PXP&issuer=ACME&algorithm=SHA512&digits=8&period=60' }, 'x');
    expect(p).toMatchObject({ issuer: 'ACME', algorithm: 'SHA512', digits: 8, period: 60, label: 'ACME:alice' });
  });

  it('takes a secret whose last character carries bits past its last whole byte, as authenticator apps do, and makes their codes', () => {
    // Before, otplib's strict decoder refused both: a 20-character secret (100 bits: 12 bytes and 4
    // bits over) and one whose last character is not the canonical one (its spare bits set).
    const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
    const withSpareBits = (secret: string) => `${secret.slice(0, -1)}${alphabet[alphabet.indexOf(secret.at(-1)!) + 1]}`;
    const at = 1_111_111_109_000;
    for (const canonical of [base32('twelve bytes'), base32('eleven byte')]) {
      expect(canonical.length % 8).not.toBe(0);
      const expected = totpCode(normalizeTotp({ secret: canonical }, 'x'), at).code;
      for (const input of [{ secret: withSpareBits(canonical) }, { otpauthUri: `otpauth://totp/x?secret=${withSpareBits(canonical)}` }]) {
        const p = normalizeTotp(input, 'x');
        expect(p.secret).toBe(withSpareBits(canonical));
        expect(parseStoredTotp(toOtpauthUri(p)).secret).toBe(p.secret);
        expect(totpCode(p, at).code).toBe(expected);
      }
    }
    expect(base32('twelve bytes')).toHaveLength(20);
  });

  it('rejects bad seeds, HOTP and impossible parameters without echoing the secret', () => {
    expect(() => normalizeTotp({ secret: 'AAAA' }, 'x')).toThrow(/must decode to 10–64 bytes/);
    expect(() => normalizeTotp({ secret: 'not!base32!at!all!!' }, 'x')).toThrow(/not valid base32/);
    expect(() => normalizeTotp({ otpauthUri: 'otpauth://hotp/x?secret=JBSWY3DPEHPK3PXP&counter=1' }, 'x')).toThrow(/HOTP is not supported/);
    expect(() => normalizeTotp({ secret: 'JBSWY3DPEHPK3PXP', period: 0 }, 'x')).toThrow(/period/);
    // Refused outside the try: an expect.unreachable() inside it was caught by its own catch, and a
    // seed with 7 digits accepted would have passed.
    let refused: unknown;
    try {
      normalizeTotp({ otpauthUri: 'otpauth://totp/x?secret=SECRETSEED234567&digits=7' }, 'x');
    } catch (err) {
      refused = err;
    }
    expect(refused).toBeInstanceOf(Error);
    expect((refused as Error).message).toMatch(/digits/);
    expect((refused as Error).message).not.toContain('SECRETSEED234567');
  });

  it('says what is wrong with a URI in its own words, never quoting the URI (which holds the seed)', () => {
    const cases: [string, RegExp][] = [
      // No "/label": the parser's message quotes the whole URI; an encoded key name or a spaced seed gets past any redaction.
      ['otpauth://totp?secre%74=JBSWY3DPEHPK3PXQ', /could not be parsed/],
      ['otpauth://totp?secret=JBSW Y3DP EHPK 3PXR', /could not be parsed/],
      ['otpauth://totp/x?issuer=JBSWY3DPEHPK3PXS', /has no secret parameter/],
      ['otpauth://totp/x?secret=JBSWY3DPEHPK3PXT&period=JBSWY3DPEHPK3PXU', /its period parameter is not valid/],
      ['otpauth://JBSWY3DPEHPK3PXV/x?secret=JBSWY3DPEHPK3PXW', /its type parameter is not valid/],
    ];
    for (const [otpauthUri, expected] of cases) {
      let message = '';
      try {
        normalizeTotp({ otpauthUri }, 'x');
      } catch (err) {
        message = (err as Error).message;
      }
      expect(message, otpauthUri).toMatch(expected);
      expect(message, otpauthUri).not.toMatch(/JBSW|Y3DP|EHPK|3PX/);
    }
  });

  it('reports when the code expires', () => {
    const p = normalizeTotp({ secret: base32('12345678901234567890') }, 'x');
    expect(totpCode(p, 59_000)).toEqual({ code: '287082', period: 30, digits: 6, expiresInSeconds: 1 });
    expect(totpCode(p, 60_000).expiresInSeconds).toBe(30);
  });
});
