import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import type { Pool } from '../db/pool';
import { withTransaction } from '../db/pool';
import { ConflictError, NotFoundError } from '../core/errors';
import { appendAudit } from './audit';
import type { DataKeys } from './data-keys';

/**
 * Identities (agents or teams) and their bearer tokens. A token is 256 random bits, shown once
 * and stored only as its SHA-256 hash; lookups go by hash, and the final comparison is constant-time.
 */
export interface Identity {
  id: string;
  name: string;
  email: string | null;
}

/** How the identity's MCP calls treat values (see the mcp_settings migration). */
export interface McpSettings {
  /** vault_get over MCP answers a handle and metadata, not the value. */
  mcpMasking: boolean;
  /** vault_get over MCP may reveal the value when asked explicitly (reveal: true). */
  allowUnmaskedRead: boolean;
}

export const TOKEN_PREFIX = 'mgt_';

export function newToken(): string {
  return TOKEN_PREFIX + randomBytes(32).toString('base64url');
}

export function hashToken(token: string): Buffer {
  return createHash('sha256').update(token, 'utf8').digest();
}

export function tokensEqual(presented: string, expectedHash: Buffer): boolean {
  return timingSafeEqual(hashToken(presented), expectedHash);
}

/**
 * How long an API process remembers a token that authenticated. A token re-issued (reissueToken)
 * leaves the cache of the process that re-issued it at once, and the others' within this time.
 */
export const AUTH_CACHE_MS = 5_000;
const AUTH_CACHE_MAX = 10_000;

export class Identities {
  /** Token hash (base64) → identity, for AUTH_CACHE_MS: spares every request a database round trip. */
  private readonly authCache = new Map<string, { identity: Identity; expires: number }>();
  /** Tokens re-issued by this process: a lookup that began before one is not remembered (it may have read the old token). */
  private reissues = 0;

  constructor(
    private readonly pool: Pool,
    private readonly dataKeys: Pick<DataKeys, 'create'>,
  ) {}

  async create(input: { name: string; email?: string }, audit: { actor: string; requestId?: string }): Promise<Identity & { token: string }> {
    const id = randomUUID();
    const token = newToken();
    try {
      await withTransaction(this.pool, async (tx) => {
        await tx.query('INSERT INTO identities (id, name, email, token_hash) VALUES ($1, $2, $3, $4)', [
          id,
          input.name,
          input.email ?? null,
          hashToken(token),
        ]);
        await this.dataKeys.create(tx, id);
        await appendAudit(tx, { identityId: id, actor: audit.actor, action: 'identity.create', outcome: 'ok', requestId: audit.requestId, detail: { name: input.name } });
      });
    } catch (err) {
      if ((err as { code?: string }).code === '23505') throw new ConflictError(`an identity named '${input.name}' already exists`);
      throw err;
    }
    return { id, name: input.name, email: input.email ?? null, token };
  }

  /**
   * A new token for an identity (by id, or by name), in place of its old one, which stops working:
   * at once in this process, within AUTH_CACHE_MS in other API processes. For a token lost (its
   * identity's creation answered, the answer never read) or leaked. Audited as identity.token.
   */
  async reissueToken(ref: { id: string } | { name: string }, audit: { actor: string; requestId?: string }): Promise<Identity & { token: string }> {
    const token = newToken();
    const identity = await withTransaction(this.pool, async (tx) => {
      const found = await tx.query<{ id: string; token_hash: Buffer }>(
        `SELECT id, token_hash FROM identities WHERE ${'id' in ref ? 'id = $1::uuid' : 'name = $1'}`,
        ['id' in ref ? ref.id : ref.name],
      );
      if (!found.rows[0]) throw new NotFoundError(`no identity ${'id' in ref ? `with id ${ref.id}` : `named '${ref.name}'`}`);
      // In place of the token read: two re-issues at once both answered 201, each with a token "shown
      // once", and the one committed first no longer worked. The second is a 409 now.
      const { rows } = await tx.query<Identity>('UPDATE identities SET token_hash = $2 WHERE id = $1 AND token_hash = $3 RETURNING id, name, email', [
        found.rows[0].id,
        hashToken(token),
        found.rows[0].token_hash,
      ]);
      if (!rows[0]) {
        throw new ConflictError("another request re-issued this identity's token at the same moment: the token it was answered with is the one that works (re-issue again for another)");
      }
      await appendAudit(tx, { identityId: rows[0].id, actor: audit.actor, action: 'identity.token', outcome: 'ok', requestId: audit.requestId, detail: {} });
      return rows[0];
    });
    this.reissues += 1;
    for (const [key, cached] of this.authCache) if (cached.identity.id === identity.id) this.authCache.delete(key);
    return { id: identity.id, name: identity.name, email: identity.email, token };
  }

  /** The identity whose token hashes (hashToken) to `hash`, if any; the caller has hashed the token already. */
  async authenticate(hash: Buffer): Promise<Identity | undefined> {
    const key = hash.toString('base64');
    const cached = this.authCache.get(key);
    if (cached && cached.expires > Date.now()) return cached.identity;
    const reissues = this.reissues;
    const { rows } = await this.pool.query('SELECT id, name, email, token_hash FROM identities WHERE token_hash = $1', [hash]);
    const row = rows[0];
    if (!row || !timingSafeEqual(hash, row.token_hash)) return undefined;
    const identity: Identity = { id: row.id, name: row.name, email: row.email };
    // Only tokens that worked are remembered, so guesses always reach the database (and the guard);
    // and not one read before a re-issue here cleared the cache (the token it read may be the old one).
    if (this.reissues !== reissues) return identity;
    if (this.authCache.size >= AUTH_CACHE_MAX) this.authCache.clear();
    this.authCache.set(key, { identity, expires: Date.now() + AUTH_CACHE_MS });
    return identity;
  }

  /** Read at every MCP call, so a change by the admin applies at once, even to an open session. */
  async mcpSettings(id: string): Promise<McpSettings> {
    const { rows } = await this.pool.query('SELECT mcp_masking, allow_unmasked_read FROM identities WHERE id = $1', [id]);
    if (!rows[0]) throw new NotFoundError(`no identity with id ${id}`);
    return { mcpMasking: rows[0].mcp_masking, allowUnmaskedRead: rows[0].allow_unmasked_read };
  }

  /** The admin changes an identity's MCP settings; audited as identity.update in the same transaction. */
  async updateSettings(id: string, patch: Partial<McpSettings>, audit: { actor: string; requestId?: string }): Promise<Identity & McpSettings> {
    return withTransaction(this.pool, async (tx) => {
      const { rows } = await tx.query(
        `UPDATE identities SET mcp_masking = coalesce($2, mcp_masking), allow_unmasked_read = coalesce($3, allow_unmasked_read)
          WHERE id = $1 RETURNING id, name, email, mcp_masking, allow_unmasked_read`,
        [id, patch.mcpMasking ?? null, patch.allowUnmaskedRead ?? null],
      );
      if (!rows[0]) throw new NotFoundError(`no identity with id ${id}`);
      await appendAudit(tx, { identityId: id, actor: audit.actor, action: 'identity.update', outcome: 'ok', requestId: audit.requestId, detail: { ...patch } });
      const r = rows[0];
      return { id: r.id, name: r.name, email: r.email, mcpMasking: r.mcp_masking, allowUnmaskedRead: r.allow_unmasked_read };
    });
  }

  async get(id: string): Promise<Identity | undefined> {
    const { rows } = await this.pool.query('SELECT id, name, email FROM identities WHERE id = $1', [id]);
    return rows[0];
  }
}
