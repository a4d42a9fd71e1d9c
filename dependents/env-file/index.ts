import { stat } from 'node:fs/promises';
import path from 'node:path';
import { UnprocessableError } from '../../core/errors';
import { isUuid } from '../../core/ids';
import type { Dependent, DependentTarget } from '../types';
import { decodeValue, describeStyle, encodeValue, findKeyLine, isCanonical, joinLine, splitLines, stylesThatFit } from './dotenv';
import { EnvFileAbsent, readNoFollow, rewriteFile, withEnvFile } from './files';
import { envFileSettings, type EnvFileSettings } from './schema';

/**
 * "Update the staging environment": one KEY=value line of a dotenv file under the worker's env
 * files root. The line must already exist exactly once; only its value changes, in its own quoting
 * style, so apply then restore gives back the original bytes. Errors name the file and key only.
 *
 * Each identity has its own directory under the root, named by its id: a path in one identity's
 * settings can never name another's file (the root is shared by every identity of the deployment).
 */
export function createEnvFileDependent(opts: { root: string }): Dependent<EnvFileSettings> {
  const rootOf = async (identityId: string) => {
    const dir = path.join(opts.root, identityId);
    if (!isUuid(identityId) || !(await stat(dir).then((s) => s.isDirectory(), () => false))) {
      throw new EnvFileAbsent(`this identity has no env files directory: create ENV_FILES_ROOT/${identityId} and put its files there`);
    }
    return dir;
  };
  return {
    type: 'env-file',
    settings: envFileSettings,
    async apply({ settings, target, identityId }) {
      await writeValue(await rootOf(identityId), settings, target, true);
    },
    async verify({ settings, target, identityId }) {
      const { content } = await withEnvFile(await rootOf(identityId), settings.file, (f) => readNoFollow(f.path));
      const line = findKeyLine(splitLines(content), settings.key, settings.file);
      if (decodeValue(line.raw, line.quote) !== target.value) {
        throw new Error(`${settings.key} in ${settings.file} does not hold version ${target.version}`);
      }
    },
    /**
     * After an apply that was refused, a file, directory or line that is not there holds no
     * version, so there is nothing to put back: an apply refused for that reason (a directory
     * missing) left nothing behind, and its attempt's undo is done. Before, the restore was refused
     * the same way, and the run reported a failed undo (the credential marked half-undone, no further
     * attempt) for an apply that changed nothing. After any other apply (a rollback's, one lost
     * with its worker), it is a failure as before: the file may be away for a moment (a volume unmounted) and come back
     * holding the abandoned version.
     */
    async restore({ settings, target, identityId, unapplied }) {
      try {
        await writeValue(await rootOf(identityId), settings, target, false);
      } catch (err) {
        if (!(unapplied && err instanceof EnvFileAbsent)) throw err;
      }
    },
  };
}

async function writeValue(root: string, s: EnvFileSettings, target: DependentTarget, mustBeRestorable: boolean): Promise<void> {
  await withEnvFile(root, s.file, (f) => rewriteFile(f, (content) => {
    const lines = splitLines(content);
    const line = findKeyLine(lines, s.key, s.file);
    // Already there (a restore after an apply that changed nothing, a retry): the line's bytes stay as they are.
    if (decodeValue(line.raw, line.quote) === target.value) return content;
    const raw = encodeValue(target.value, line.quote);
    if (raw === null) {
      const fits = stylesThatFit(target.value, line.quote);
      throw new UnprocessableError(
        `version ${target.version} cannot be written to ${s.key} in ${s.file} as ${describeStyle(line.quote)}` +
          (fits.length ? `; it would fit a ${fits.join(' or ')} line` : ''),
      );
    }
    if (raw === line.raw) return content;
    // A value this line could not hold again would make a later restore fail: refuse before changing anything.
    if (mustBeRestorable && !isCanonical(line)) {
      throw new UnprocessableError(
        `${s.key} in ${s.file} holds a value that could not be written back exactly as ${describeStyle(line.quote)}; fix the line's quoting first`,
      );
    }
    lines[line.index] = joinLine(line, raw);
    return Buffer.concat(lines);
  }));
}
