import { describe, expect, it } from 'vitest';
import { AppError, AuditUnavailableError, IntegrityError, isRefWithheld, NotFoundError, refWithheld, TooManyRequestsError, ValidationError } from '../../core/errors';
import { isDatabaseUnavailable } from '../../db/pool';
import { isAudited, markAudited } from '../../vault/audit';
import { receiveError, sendError } from '../../vault/read-thread';

/** Errors cross from the read thread as data (vault/read-thread.ts) and must arrive as they left. */
const cross = (err: unknown) => receiveError(structuredClone(sendError(err)));

describe('errors crossing the read thread', () => {
  it('an AppError arrives as its own class, with its status, problem fields and message', () => {
    const got = cross(new NotFoundError("no credential with name 'x'"));
    expect(got).toBeInstanceOf(NotFoundError);
    expect(got).toBeInstanceOf(AppError);
    expect(got).toMatchObject({ status: 404, slug: 'not-found', title: 'Not found', message: "no credential with name 'x'", name: 'NotFoundError' });

    const invalid = cross(new ValidationError('bad', [{ path: 'name', message: 'required' }]));
    expect(invalid).toBeInstanceOf(ValidationError);
    expect(invalid).toMatchObject({ status: 400, errors: [{ path: 'name', message: 'required' }], extra: { errors: [{ path: 'name', message: 'required' }] } });

    const throttled = cross(new TooManyRequestsError(42));
    expect(throttled).toBeInstanceOf(TooManyRequestsError);
    expect((throttled as TooManyRequestsError).retryAfterSeconds).toBe(42);
  });

  it('keeps the audited mark, and only where it was set', () => {
    expect(isAudited(cross(markAudited(new IntegrityError('altered'))))).toBe(true);
    expect(isAudited(cross(new IntegrityError('altered')))).toBe(false);
  });

  it('keeps the mark of a reference withheld (a stored value given as a name), and only where it was set', () => {
    expect(isRefWithheld(cross(refWithheld(new NotFoundError('no credential with the name given'))))).toBe(true);
    expect(isRefWithheld(cross(new NotFoundError("no credential with name 'x'")))).toBe(false);
  });

  it('a database error keeps what marks it unavailable, and a cause crosses with its error', () => {
    const pgError = Object.assign(new Error('Connection terminated unexpectedly'), { code: '08006', severity: 'FATAL' });
    const got = cross(pgError);
    expect(got).not.toBeInstanceOf(AppError);
    expect(isDatabaseUnavailable(got)).toBe(true);
    expect(got).toMatchObject({ code: '08006', severity: 'FATAL' });

    const audit = cross(Object.assign(new AuditUnavailableError(), { cause: pgError }));
    expect(audit).toBeInstanceOf(AuditUnavailableError);
    expect(audit.cause).toMatchObject({ message: 'Connection terminated unexpectedly', code: '08006' });
  });

  it('fields that are not data stay behind; an unknown error name arrives as a plain Error or AppError', () => {
    const odd = Object.assign(new Error('odd'), { name: 'SomethingElse', handle: new (class Socket {})(), fn: () => 1, when: new Date(0) });
    const got = cross(odd);
    expect(got.name).toBe('SomethingElse');
    expect(Object.keys(got)).not.toContain('fn');
    expect(Object.keys(got)).not.toContain('when');
    expect(Object.keys(got)).not.toContain('handle');

    const custom = Object.assign(new AppError(418, 'internal', 'Teapot', 'short and stout'), { name: 'TeapotError' });
    const gotCustom = cross(custom);
    expect(gotCustom).toBeInstanceOf(AppError);
    expect(gotCustom).toMatchObject({ status: 418, name: 'TeapotError', message: 'short and stout' });

    expect(cross('a thrown string')).toMatchObject({ message: 'a thrown string' });
  });
});
