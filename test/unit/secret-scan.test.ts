import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { UnprocessableError } from '../../core/errors';
import { findStoredValue, findStoredValueIn } from '../../mail/secret-scan';

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

  it('finds the value in a subject of RFC 2047 Q-encoded words, in either case of the Q, its charset and its hex', () => {
    // Before, each of these went out, and the recipient's mail client showed sk_live_51HxYz.
    const subjects = ['=?UTF-8?Q?sk=5Flive=5F51HxYz?=', '=?utf-8?q?sk=5flive=5f51HxYz?=', 'Re: =?iso-8859-1?Q?key_sk=5Flive?==?US-ASCII?q?=5F51HxYz?= done'];
    for (const subject of subjects) expect(findStoredValue({ subject, text: 'hi' }, stored), subject).toBe('stripe');
  });

  it('finds the value split across several B-encoded words, joined across the whitespace between them', () => {
    const words = 'sk_live_51HxYz'.match(/.{1,3}/g)!.map((bytes) => `=?UTF-8?B?${Buffer.from(bytes).toString('base64')}?=`);
    // Each word's base64 is too short to match as an encoding of the value, and the words are not one run of base64.
    for (const subject of [words.join(' '), `Re: ${words.join('\r\n ')}`, words.join('')]) {
      expect(findStoredValue({ subject, text: 'hi' }, stored), subject).toBe('stripe');
    }
  });

  it('refuses a subject with an encoded word in a charset it cannot read as a mail client does, naming the charset', async () => {
    const utf7 = '=?utf-7?Q?+AHMAawBfAGwAaQB2AGUAXwA1ADEASAB4AFkAegBBAGIAQwBkAEUAZg-?=';
    // Before, each of these went out, and a client shows sk_live_51HxYzAbCdEf or sk_live_51HxYz: UTF-7,
    // which TextDecoder does not know, was read as UTF-8; UTF-16 with no byte order TextDecoder reads
    // little-endian, RFC 2781 big-endian. Any charset it does not read faithfully is refused.
    const bigEndian = Buffer.from('sk_live_51HxYz', 'utf16le').swap16().toString('base64');
    for (const [subject, charset] of [
      [utf7, 'utf-7'],
      [`Re: =?UTF-7?B?${Buffer.from('+AHMAawBfAGwAaQB2AGUAXwA1ADEASAB4AFkAegBBAGIAQwBkAEUAZg-').toString('base64')}?= done`, 'utf-7'],
      ['=?gb2312?Q?=81=A1hello?=', 'gb2312'],
      ['=?Shift_JIS?Q?=82=A0?=', 'shift_jis'],
      ['=?iso-2022-jp?B?GyRCJCIbKEI=?=', 'iso-2022-jp'],
      [`=?utf-16?B?${bigEndian}?=`, 'utf-16'],
      [`=?unicode?B?${bigEndian}?=`, 'unicode'],
      ['=?x-no-such-charset?Q?hello?=', 'x-no-such-charset'],
    ]) {
      expect(() => findStoredValue({ subject: subject!, text: 'hi' }, [...stored, { name: 'long', value: 'sk_live_51HxYzAbCdEf' }]), subject).toThrow(UnprocessableError);
      expect(() => findStoredValue({ subject: subject!, text: 'hi' }, stored), subject).toThrow(`charset '${charset}' in the subject is not accepted`);
    }
    // With nothing stored, and a page at a time, as mail.send scans.
    expect(() => findStoredValue({ subject: utf7, text: 'hi' }, [])).toThrow(/^charset 'utf-7' in the subject is not accepted .*: send the subject as UTF-8 text$/);
    const pages = async function* () {
      yield stored;
      yield [{ name: 'other', value: 'nothing-like-it' }];
    };
    await expect(findStoredValueIn({ subject: `hi ${utf7}`, text: 'hi' }, pages())).rejects.toMatchObject({ status: 422, message: expect.stringContaining("charset 'utf-7'") });
  });

  it('finds a value before it refuses an unreadable charset, and then does not quote one back', () => {
    // The value in the word's bytes as ASCII, or as the charset label itself: a refusal for the value, not the charset.
    expect(findStoredValue({ subject: '=?utf-7?Q?sk=5Flive=5F51HxYz?=', text: 'hi' }, stored)).toBe('stripe');
    // Before, this went out: TextDecoder reads gb2312 as GBK, whose table takes 0x81 and the `s` as one
    // character, where a GB2312 decoder shows a byte it cannot read, then sk_live_51HxYz.
    expect(findStoredValue({ subject: '=?gb2312?Q?=81sk=5Flive=5F51HxYz?=', text: 'hi' }, stored)).toBe('stripe');
    expect(findStoredValue({ subject: '=?sk_live_51HxYz?Q?x?=', text: 'hi' }, stored)).toBe('stripe');
    expect(findStoredValue({ subject: '=?utf-7?Q?x?=', text: 'sk_live_51HxYz' }, stored)).toBe('stripe');
    expect(() => findStoredValue({ subject: `=?${'x'.repeat(60)}?Q?x?=`, text: 'hi' }, stored)).toThrow(`charset '${'x'.repeat(40)}…' in`);
  });

  it('reads encoded words in UTF-8, the single-byte charsets and UTF-16 in a stated byte order', () => {
    const v = 'sk_live_51HxYz';
    const q = (bytes: Buffer) => [...bytes].map((b) => `=${b.toString(16).padStart(2, '0').toUpperCase()}`).join('');
    const found = [
      ...['utf8', 'us-ascii', 'ascii', 'latin1', 'iso-8859-1', 'ISO-8859-2', 'iso-8859-5', 'iso-8859-9', 'iso-8859-15', 'windows-1250', 'cp1252', 'windows-1251', 'windows-874', 'koi8-r', 'koi8-u', 'macintosh'].map(
        (charset) => `=?${charset}?Q?${q(Buffer.from(v))}?=`,
      ),
      `=?UTF-16BE?B?${Buffer.from(v, 'utf16le').swap16().toString('base64')}?=`,
      `=?utf-16le?B?${Buffer.from(v, 'utf16le').toString('base64')}?=`,
    ];
    for (const subject of found) expect(findStoredValue({ subject, text: 'hi' }, stored), subject).toBe('stripe');
    // Ordinary subjects in them pass.
    for (const subject of ['=?iso-8859-1?Q?Caf=E9_cr=E8me?=', '=?koi8-r?B?8NLJ18XU?=', '=?windows-1251?Q?=CF=F0=E8=E2=E5=F2?=', '=?utf-16be?B?AEMAYQBmAOk=?=', '=?UTF-8*en?Q?Caf=C3=A9?=']) {
      expect(findStoredValue({ subject, text: 'hi' }, stored), subject).toBeUndefined();
    }
  });

  it('finds the value written with any HTML5 character reference, the legacy forms without `;` too', () => {
    // Before, only &amp; &lt; &gt; &quot; &apos; &nbsp; and numeric references ended by `;` were decoded.
    for (const html of ['sk&lowbar;live_51HxYz', 'sk&UnderBar;live&UnderBar;51HxYz', '&#115k_live_51HxYz', '&#x73k_live_51HxYz', 'sk_live&shy;_51HxYz']) {
      expect(findStoredValue({ subject: 's', text: 'hi', html: `<p>${html}</p>` }, stored), html).toBe('stripe');
    }
    const punctuated = { name: 'punctuated', value: 'Tr0ub4dor/3+x:y.z' };
    expect(findStoredValue({ subject: 's', text: 'hi', html: 'Tr0ub4dor&sol;3&plus;x&colon;y&period;z' }, [punctuated])).toBe('punctuated');
  });

  it('finds the value with tags or a comment between its characters', () => {
    for (const html of ['sk_live_<b></b>51HxYz', 'sk_li<!-- -->ve_51HxYz', '<p>sk_<span class="a>b">live</span>_<!-->51HxYz</p>', '<i title="<!--">sk_live_</i>51HxYz<i title="-->">']) {
      expect(findStoredValue({ subject: 's', text: 'hi', html }, stored), html).toBe('stripe');
    }
  });

  it('finds the value in html in any case: CSS may render it in another than it is written in', () => {
    const code = { name: 'recovery', value: 'ABCD-EFGH-2345' };
    expect(findStoredValue({ subject: 's', text: 'hi', html: '<span style="text-transform:uppercase">abcd-efgh-2345</span>' }, [code])).toBe('recovery');
    expect(findStoredValue({ subject: 's', text: 'hi', html: '<span style="text-transform:lowercase">SK_LIVE_51HXYZ</span>' }, stored)).toBe('stripe');
    // The text part is no html: there the value still matches only as written.
    expect(findStoredValue({ subject: 's', text: 'abcd-efgh-2345' }, [code])).toBeUndefined();
  });

  it('passes ordinary html and a subject with an encoded word of other text', () => {
    const html = '<html><head><style>p { color: #333 }</style></head><body><!-- header --><p>Hello <b>Ada</b>, version&nbsp;2 of <a href="https://x.example/?a=1&amp;b=2">stripe</a> is current &amp; live.</p></body></html>';
    expect(findStoredValue({ subject: 'Rotation done', text: 'hi', html }, stored)).toBeUndefined();
    expect(findStoredValue({ subject: '=?UTF-8?Q?Caf=C3=A9_menu?= and =?utf-8?B?c2tfbGl2ZQ==?= news', text: 'hi' }, stored)).toBeUndefined();
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

  it('finds a TOTP seed or hex written in groups, in either case, as authenticator apps show a setup key', () => {
    // Before, each of these went out: the seed and hex matched caselessly only when written whole.
    for (const text of ['JBSW Y3DP EHPK 3PXP', 'jbsw y3dp ehpk 3pxp', 'Jbsw Y3dp\nEHPK 3pxp', 'jbswy3dp ehpk3pxp']) {
      expect(findStoredValue({ subject: 's', text: `setup key ${text}` }, stored), text).toBe('gh-2fa');
    }
    expect(findStoredValue({ subject: 'seed JBSW Y3DP EHPK 3PXP', text: 'hi' }, stored)).toBe('gh-2fa');
    const hex = Buffer.from('sk_live_51HxYz').toString('hex').toUpperCase().replace(/(.{4})/g, '$1 ');
    expect(findStoredValue({ subject: 's', text: `xxd: ${hex}` }, stored), hex).toBe('stripe');
    // The value itself is not joined across spaces: a short one would match unrelated words and numbers.
    const code = { name: 'code', value: '482913' };
    expect(findStoredValue({ subject: 's', text: 'call 482 913 or sk_live _51HxYz' }, [code, ...stored])).toBeUndefined();
    expect(findStoredValue({ subject: 's', text: 'seed JBSW Y3DP EHPK 3PX' }, stored)).toBeUndefined();
  });

  it('finds a TOTP seed or hex in groups set apart with `-`, `.`, `_` or `:`, as the vault takes a seed', () => {
    // Before, each of these went out: vault/totp.ts stores `JBSW-Y3DP-…` as the same seed, and only whitespace was dropped.
    for (const text of ['JBSW-Y3DP-EHPK-3PXP', 'jbsw-y3dp-ehpk-3pxp', 'JBSW.Y3DP.EHPK.3PXP', 'JBSW_Y3DP_EHPK_3PXP', 'jbsw:y3dp:ehpk:3pxp', 'JBSW - Y3DP - EHPK - 3PXP', 'https://x.test/?key=JBSW-Y3DP-EHPK-3PXP']) {
      expect(findStoredValue({ subject: 's', text: `setup key ${text}` }, stored), text).toBe('gh-2fa');
    }
    expect(findStoredValue({ subject: 'seed JBSW-Y3DP-EHPK-3PXP', text: 'hi' }, stored)).toBe('gh-2fa');
    const long = { name: 'long-seed', value: 'JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP' };
    expect(findStoredValue({ subject: 's', text: 'key JBSW-Y3DP-EHPK-3PXP-JBSW-Y3DP-EHPK-3PXP' }, [long])).toBe('long-seed');
    // The hex of the seed's bytes and of a value, as openssl and xxd-style dumps write it.
    for (const text of ['48:65:6c:6c:6f:21:de:ad:be:ef', '48-65-6C-6C-6F-21-DE-AD-BE-EF', '4865.6c6c.6f21.dead.beef']) {
      expect(findStoredValue({ subject: 's', text: `hex ${text}` }, stored), text).toBe('gh-2fa');
    }
    const hex = Buffer.from('sk_live_51HxYz').toString('hex').replace(/(..)(?!$)/g, '$1:');
    expect(findStoredValue({ subject: 's', text: `key ${hex}` }, stored), hex).toBe('stripe');
    // The value itself is not joined across punctuation, and a seed short of a character still passes.
    const code = { name: 'code', value: '482913' };
    expect(findStoredValue({ subject: 's', text: 'call 482-913 or 48.29.13, ref sk-live-51HxYz and sk_live:51HxYz' }, [code, ...stored])).toBeUndefined();
    expect(findStoredValue({ subject: 's', text: 'seed JBSW-Y3DP-EHPK-3PX' }, stored)).toBeUndefined();
  });

  it('finds base64url with `-` or `_` in it wrapped across lines (its alphabet keeps them)', () => {
    const value = { name: 'b64url', value: '\u00fb\u00ef\u00bf-secret-\u00fe\u00ff-value-\u00fb\u00ff' };
    const encoded = Buffer.from(value.value).toString('base64url');
    expect(encoded).toMatch(/[-_]/);
    const wrapped = encoded.replace(/(.{8})/g, '$1\n');
    expect(findStoredValue({ subject: 's', text: wrapped }, [value])).toBe('b64url');
  });

  it('finds the value with invisible format characters in the subject or the text, as in the html', () => {
    // Before, each of these went out: a client shows the text part and the subject without them, as the value whole.
    for (const [subject, text, name] of [
      ['s', 'key sk_live_\u200b51HxYz', 'stripe'],
      ['s', 'key sk_\u00adlive_51Hx\u2060Yz', 'stripe'],
      ['key sk_live_\u200b51HxYz', 'hi', 'stripe'],
      ['=?UTF-8?Q?key_sk=5Flive=5F=E2=80=8B51HxYz?=', 'hi', 'stripe'],
      ['s', `b64 ${Buffer.from('sk_live_51HxYz').toString('base64').replace('bGl2', '\u200bbGl2')}`, 'stripe'],
      ['s', 'seed JBSW\u200bY3DP\u200bEHPK\u200b3PXP', 'gh-2fa'],
    ]) {
      expect(findStoredValue({ subject: subject!, text: text! }, stored), JSON.stringify([subject, text])).toBe(name);
    }
    // Decoded forms still read the rest of the message.
    expect(findStoredValue({ subject: 's\u200b', text: 'x=%73k_live_51HxYz' }, stored)).toBe('stripe');
  });

  it('finds the value with invisible marks between its characters, or in another Unicode form of the same text', () => {
    // Before, each of these went out: variation selectors and the combining grapheme joiner are no
    // format characters, but show as nothing; the other normal form and fullwidth letters read the same.
    const accented = { name: 'accented', value: 'Pässwörd-2024!' };
    for (const [message, name] of [
      [{ subject: 's', text: 'key sk_live_\ufe0051HxYz' }, 'stripe'],
      [{ subject: 's', text: 'key sk_live_\u034f51HxYz' }, 'stripe'],
      [{ subject: 'sk_live_\ufe0f51HxYz', text: 'hi' }, 'stripe'],
      [{ subject: 's', text: 'hi', html: '<p>sk_live_&#xFE00;51HxYz</p>' }, 'stripe'],
      [{ subject: 's', text: 'key \uff53\uff4b\uff3f\uff4c\uff49\uff56\uff45\uff3f51HxYz' }, 'stripe'],
      [{ subject: 's', text: `pw ${accented.value.normalize('NFD')}` }, 'accented'],
    ] as const) {
      expect(findStoredValue(message, [...stored, accented]), JSON.stringify(message)).toBe(name);
    }
    const decomposed = { name: 'decomposed', value: accented.value.normalize('NFD') };
    expect(findStoredValue({ subject: 's', text: `pw ${accented.value}` }, [decomposed])).toBe('decomposed');
  });

  it('finds the value reversed, as a right-to-left override shows it in order', () => {
    const reversed = [...'sk_live_51HxYz'].reverse().join('');
    // Before, each of these went out: the override was dropped as invisible, and the reversed text searched.
    for (const message of [
      { subject: 's', text: `key \u202e${reversed}` },
      { subject: `\u202e${reversed}`, text: 'hi' },
      { subject: 's', text: 'hi', html: `<bdo dir="rtl">${reversed}</bdo>` },
    ]) {
      expect(findStoredValue(message, stored), JSON.stringify(message)).toBe('stripe');
    }
  });

  it('finds the value shown by an override of part of it: RLO … PDF, to the end of the line, `<bdo dir="rtl">`', () => {
    const long = [{ name: 'long', value: 'sk_live_51HxYzAbCdEf' }];
    // Before, each of these went out: only the value reversed whole was searched, and the text with the controls dropped.
    for (const message of [
      { subject: 's', text: 'key sk_live_51HxYz\u202efEdCbA\u202c, keep it' },
      { subject: 's', text: 'first line\r\nkey sk_live_51HxYz\u202efEdCbA\nnext line' }, // unterminated: to the end of its line
      { subject: 'sk_live_51HxYz\u202efEdCbA', text: 'hi' },
      { subject: '=?UTF-8?Q?sk=5Flive=5F51HxYz=E2=80=AEfEdCbA?=', text: 'hi' },
      { subject: 's', text: 'hi', html: '<p>sk_live_51HxYz<bdo dir="rtl">fEdCbA</bdo></p>' },
      { subject: 's', text: 'hi', html: "sk_live_51HxYz<BDO class=k DIR='Rtl'>fEdCbA</BDO>" },
      { subject: 's', text: 'hi', html: 'sk_live_51HxYz<bdo dir=rtl>f<b>Ed</b>CbA</bdo>' },
      { subject: 's', text: 'hi', html: 'sk_live_51HxYz<bdo dir=rtl>fEdCbA' }, // unclosed: to the end
      { subject: 's', text: 'hi', html: 'sk_live_51HxYz&#x202E;fEdCbA&#x202C;' },
      // Nested: an inner span stands as a unit in the outer's reversed order, laid out by its own direction.
      { subject: 's', text: 'sk_live_51HxYz\u202efE\u202dCd\u202cbA\u202c' }, // RLO fE LRO Cd PDF bA PDF
      { subject: 's', text: 'sk_live_51HxYz\u202ef\u202eEdCb\u202cA' }, // RLO f RLO EdCb PDF A
      { subject: 's', text: 'sk_live_51HxYz\u202efE\u2066C\u202cd\u2069bA\u202c' }, // RLO fE LRI C PDF d PDI bA PDF: a PDF in an isolate ends nothing
      { subject: 's', text: 'hi', html: 'sk_live_51HxYz<bdo dir=rtl>fE<bdo dir=ltr>Cd</bdo>bA</bdo>' },
      // A `<bdo>` goes on after a `<br>` (its line is laid out by itself), and ends with the block it is in.
      { subject: 's', text: 'hi', html: '<bdo dir="rtl">junk<br>zYxH15_evil_ks</bdo>AbCdEf' },
      { subject: 's', text: 'hi', html: '<p><bdo dir="rtl">junk</p>sk_live_51HxYz<bdo dir="rtl">fEdCbA</bdo>' },
    ]) {
      expect(findStoredValue(message, long), JSON.stringify(message)).toBe('long');
    }
  });

  it('passes right-to-left text with overrides that show no value', () => {
    const long = [{ name: 'long', value: 'sk_live_51HxYzAbCdEf' }];
    for (const message of [
      { subject: '\u202eשלום עולם\u202c', text: 'מספר ההזמנה \u202e12345\u202c נשלח. مرحبا \u202eبالعالم\u202c sk_live_51HxYz' },
      { subject: 's', text: 'hi', html: '<p dir="rtl">שלום <bdo dir="rtl">עולם</bdo> <bdi>sk_live</bdi></p>' },
      // An override ends at the end of its line: the next line is not reversed with it.
      { subject: 's', text: 'sk_live_51HxYz\u202ejunk\nfEdCbA' },
      // A PDF ends only the override, and an embedding (RLE) keeps Latin text in its order.
      { subject: 's', text: 'sk_live_51HxYz\u202eknuj\u202cfEdCbA \u202bfEdCbA\u202c' },
      // A block opened inside a `<bdo>` is a line of its own, which the override does not reach.
      { subject: 's', text: 'hi', html: '<bdo dir="rtl">x<div>sk_live_51HxYzfEdCbA</div></bdo>' },
    ]) {
      expect(findStoredValue(message, long), JSON.stringify(message)).toBeUndefined();
    }
  });

  it("reads noscript's content as markup, as a mail client (scripting off) renders it; and still as text", () => {
    const long = [{ name: 'long', value: 'sk_live_51HxYzAbCdEf' }];
    // Before, these went out: noscript's content was kept as text, tags and all.
    for (const html of ['sk_live_51<noscript><b>Hx</b></noscript>YzAbCdEf', '<p>sk_live_<NOSCRIPT><span class="x">51HxYz</span><!-- --></NOSCRIPT>AbCdEf</p>']) {
      expect(findStoredValue({ subject: 's', text: 'hi', html }, long), html).toBe('long');
    }
    // As a browser with scripting on reads it, a comment in it does not hide what follows its end tag.
    expect(findStoredValue({ subject: 's', text: 'hi', html: '<noscript><!--</noscript>sk_live_<b></b>51HxYzAbCdEf-->' }, long)).toBe('long');
    expect(findStoredValue({ subject: 's', text: 'hi', html: '<noscript><p>Turn on images to see the <b>chart</b>.</p></noscript><p>Rotated.</p>' }, long)).toBeUndefined();
  });

  it('finds the value in an attribute a client shows, without invisible characters, and an alt text in its image\'s place', () => {
    const long = [{ name: 'long', value: 'sk_live_51HxYzAbCdEf' }];
    // Before, each of these went out: attributes were searched only as written, invisible characters and all.
    for (const html of [
      '<img src="cid:none" alt="sk_live_&#8203;51HxYzAbCdEf">',
      '<img src=cid:none alt=sk_live_&#8203;51HxYzAbCdEf>',
      "<abbr title='sk_live_&shy;51HxYzAbCdEf'>key</abbr>",
      '<input placeholder="sk_live_\u200b51HxYzAbCdEf">',
      '<input value="sk_live_&#x2060;51HxYz&#xFE0F;AbCdEf" readonly>',
      '<button ARIA-LABEL="sk_live_&ZeroWidthSpace;51HxYzAbCdEf">copy</button>',
      '<select><option label="sk_live_&#173;51HxYzAbCdEf">1</option></select>',
      // An override in an attribute is laid out as the client shows it.
      '<abbr title="sk_live_51HxYz&#x202E;fEdCbA&#x202C;">key</abbr>',
      '<input placeholder="sk_live_51HxYz&#8238;fEdCbA">',
      '<input value="sk_live_51HxYz\u202efEdCbA" readonly>',
      // With images blocked, an alt text shows where its image stands.
      'sk_live_<img src="cid:none" alt="51HxYz">AbCdEf',
      'sk_live_<input type=IMAGE src="cid:none" alt="51HxYz&#8203;">AbCdEf',
    ]) {
      expect(findStoredValue({ subject: 's', text: 'hi', html }, long), html).toBe('long');
    }
    // Any case, as CSS may show it.
    expect(findStoredValue({ subject: 's', text: 'hi', html: '<img alt="SK_LIVE_&#8203;51HXYZABCDEF" style="text-transform:lowercase">' }, [{ name: 'lower', value: 'sk_live_51hxyzabcdef' }])).toBe('lower');
  });

  it('passes ordinary html with alt texts and titles, and does not join an attribute to the text beside it', () => {
    const long = [{ name: 'long', value: 'sk_live_51HxYzAbCdEf' }];
    const html =
      '<html><body><img src="cid:logo" alt="Acme logo" width="120"><p title="Rotation report">Hello <b>Ada</b>,</p><p><img src="cid:chart" alt="Chart: 3 keys rotated">' +
      '<input type="text" value="Ada" placeholder="Your name" aria-label="Name"> <a href="https://x.example/r?id=1" title="Open the report">report</a></p></body></html>';
    expect(findStoredValue({ subject: 'Rotation done', text: 'hi', html }, [...stored, ...long])).toBeUndefined();
    // Shown apart (a tooltip, a field), an attribute's value does not run into the text around its element.
    for (const html of ['<span title="sk_live_&#8203;">51HxYzAbCdEf</span>', '<input value="sk_live_51HxYz">AbCdEf', '<a href="x" title="sk_live_51Hx\u200b">YzAbCdEf</a>']) {
      expect(findStoredValue({ subject: 's', text: 'hi', html }, long), html).toBeUndefined();
    }
  });

  it('finds a multi-line value sent with the other kind of line break: SMTP sends every one as CRLF', () => {
    const pem = `-----BEGIN PRIVATE KEY-----\n${randomBytes(48).toString('base64')}\n${randomBytes(48).toString('base64')}\n-----END PRIVATE KEY-----\n`;
    const crlf = pem.replaceAll('\n', '\r\n');
    // Before, each passed: the texts were compared with their line breaks as written.
    expect(findStoredValue({ subject: 's', text: `key:\r\n${crlf}` }, [{ name: 'lf-key', value: pem }])).toBe('lf-key');
    expect(findStoredValue({ subject: 's', text: `key:\n${pem}` }, [{ name: 'crlf-key', value: crlf }])).toBe('crlf-key');
    expect(findStoredValue({ subject: 's', text: 'k', html: `<pre>${crlf}</pre>` }, [{ name: 'lf-key', value: pem }])).toBe('lf-key');
    expect(findStoredValue({ subject: 's', text: Buffer.from(crlf).toString('base64') }, [{ name: 'lf-key', value: pem }])).toBe('lf-key');
  });

  it("finds the secret inside a value: a URL's password (as postgres-role's url format stores it), a PEM block's body without its BEGIN and END lines", () => {
    const password = `Pw${randomBytes(16).toString('hex')}`;
    const url = [{ name: 'db-url', value: `postgresql://app:${password}@db.example.com:5432/app` }];
    // Before, each passed: only the whole URL was looked for.
    for (const text of [`db password: ${password}`, Buffer.from(password).toString('base64'), Buffer.from(password).toString('hex')]) {
      expect(findStoredValue({ subject: 's', text }, url), text).toBe('db-url');
    }
    // Escaped in the URL as stored: the password as it decodes.
    expect(findStoredValue({ subject: 's', text: 'pw: p@ss/w0rd!-long' }, [{ name: 'escaped', value: 'https://u:p%40ss%2Fw0rd!-long@h.example/' }])).toBe('escaped');
    // A short password is a word: not looked for alone (the whole URL still is).
    const dev = [{ name: 'dev-db', value: 'postgresql://app:postgres@localhost:5432/app' }];
    expect(findStoredValue({ subject: 's', text: 'We now run postgres 16 in staging.' }, dev)).toBeUndefined();
    expect(findStoredValue({ subject: 's', text: 'x', html: '<p>We now run PostgreSQL 16.</p>' }, dev)).toBeUndefined();
    const body = randomBytes(96).toString('base64');
    const pem = [{ name: 'tls-key', value: `-----BEGIN PRIVATE KEY-----\n${body.slice(0, 64)}\n${body.slice(64)}\n-----END PRIVATE KEY-----\n` }];
    expect(findStoredValue({ subject: 's', text: `the key body:\n${body.slice(0, 40)}\n${body.slice(40)}` }, pem)).toBe('tls-key');
    // A bundle's certificate is public: mailing it is not refused (its key's body is).
    const cert = randomBytes(96).toString('base64');
    const bundle = [{ name: 'bundle', value: `-----BEGIN CERTIFICATE-----\n${cert}\n-----END CERTIFICATE-----\n${pem[0]!.value}` }];
    expect(findStoredValue({ subject: 's', text: `our certificate:\n-----BEGIN CERTIFICATE-----\n${cert}\n-----END CERTIFICATE-----\n` }, bundle)).toBeUndefined();
    expect(findStoredValue({ subject: 's', text: body }, bundle)).toBe('bundle');
    // A URL without a password, and ordinary text about a database, pass.
    expect(findStoredValue({ subject: 's', text: 'connect to db.example.com:5432 as app' }, [...url, { name: 'plain-url', value: 'https://app@db.example.com/app' }])).toBeUndefined();
  });

  it('finds a value with spaces in html whose source wraps or pads it: a client shows each run of white space as one space', () => {
    const passphrase = [{ name: 'phrase', value: 'correct horse XXXX staple' }];
    // Before, each passed, and the recipient read the passphrase whole.
    for (const html of ['<p>correct\nhorse XXXX staple</p>', '<p>correct   horse\tXXXX\r\n  staple</p>', '<p>correct <b>horse</b>\n XXXX staple</p>']) {
      expect(findStoredValue({ subject: 's', text: 'see html', html }, passphrase), html).toBe('phrase');
    }
    // A value with a run of spaces, shown by html as one.
    expect(findStoredValue({ subject: 's', text: 'x', html: '<p>two spaces here</p>' }, [{ name: 'runs', value: 'two  spaces  here' }])).toBe('runs');
    // The plain text part shows white space as written: the words apart there are not the value.
    expect(findStoredValue({ subject: 's', text: 'correct\nhorse XXXX staple' }, passphrase)).toBeUndefined();
    expect(findStoredValue({ subject: 's', text: 'two spaces here' }, [{ name: 'runs', value: 'two  spaces  here' }])).toBeUndefined();
  });

  it('finds base64 and the value in a URL whose query string escapes them', () => {
    const tricky = { name: 'tricky', value: 'Tr0ub4dor&3?>?>zz~~' };
    const base64 = Buffer.from(tricky.value).toString('base64');
    expect(base64).toMatch(/[+/=]/);
    // Before, base64 was searched for only as written: a URL builder escapes its `+`, `/` and `=`.
    const url = `https://x.test/?k=${encodeURIComponent(base64)}`;
    expect(findStoredValue({ subject: 's', text: url }, [tricky])).toBe('tricky');
    // Nor as written with one of its characters a character reference, in an html attribute.
    const referenced = `&#${base64.charCodeAt(4)};`;
    expect(findStoredValue({ subject: 's', text: 'hi', html: `<input value="${base64.slice(0, 4)}${referenced}${base64.slice(5)}">` }, [tricky])).toBe('tricky');
  });

  it("finds the bytes a TOTP seed stands for, in hex, as oathtool takes them; and a bare seed's", () => {
    const bytes = Buffer.from('48656c6c6f21deadbeef', 'hex'); // JBSWY3DPEHPK3PXP
    // Before, only the hex of the otpauth URI's text was a form, not of the seed's bytes.
    for (const text of [bytes.toString('hex'), bytes.toString('hex').toUpperCase(), '4865 6c6c 6f21 dead beef']) {
      expect(findStoredValue({ subject: 's', text: `oathtool --totp ${text}` }, stored), text).toBe('gh-2fa');
    }
    const bare = { name: 'bare-seed', value: 'JBSWY3DPEHPK3PXP' };
    expect(findStoredValue({ subject: 's', text: 'hex 48656C6C6F21DEADBEEF' }, [bare])).toBe('bare-seed');
    expect(findStoredValue({ subject: 's', text: 'seed jbsw y3dp ehpk 3pxp' }, [bare])).toBe('bare-seed');
    expect(findStoredValue({ subject: 's', text: 'hex 48656c6c6f21deadbeee' }, stored)).toBeUndefined();
    // Grouped and escaped, as a setup key put in a query string is.
    for (const text of ['https://x.test/?key=JBSW+Y3DP+EHPK+3PXP', 'https://x.test/?key=JBSW%20Y3DP%20EHPK%203PXP']) {
      expect(findStoredValue({ subject: 's', text }, stored), text).toBe('gh-2fa');
    }
  });

  it('finds each of many values wherever it stands in a long message (the per-message index passes nothing over)', () => {
    const values = Array.from({ length: 300 }, (_, i) => ({ name: `v${i}`, value: randomBytes(6 + (i % 30)).toString('base64url') }));
    const filler = randomBytes(60_000).toString('base64');
    for (const [i, { name, value }] of values.entries()) {
      if (i % 10 !== 0) continue;
      const at = (i * 997) % filler.length;
      const text = `${filler.slice(0, at)} ${value} ${filler.slice(at)}`;
      expect(findStoredValue({ subject: 's', text }, values.slice(i)), name).toBe(name);
      expect(findStoredValue({ subject: 's', text: 'hi', html: `<p>${text.toUpperCase()}</p>`.replace(value.toUpperCase(), value) }, [values[i]!])).toBe(name);
    }
    expect(findStoredValue({ subject: 's', text: filler }, [{ name: 'absent', value: 'not-in-base64-text!' }])).toBeUndefined();
  });

  it('matches a plain value only as written: case carries meaning in it', () => {
    expect(findStoredValue({ subject: 's', text: 'key SK_LIVE_51HXYZ' }, stored)).toBeUndefined();
  });

  it('passes ordinary mail, and does not match values too short to tell apart from words', () => {
    expect(findStoredValue({ subject: 'Rotation done', text: 'version 2 of stripe is current; call 1234' }, stored)).toBeUndefined();
  });
});
