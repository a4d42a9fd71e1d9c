/**
 * Exit codes are a contract with scripts (README, "CLI"): they never change meaning.
 *   0 ok · 1 the operation failed · 2 usage or configuration error · 3 not authorised or not found
 *   4 the service is unreachable or busy (try again later)
 */
export const EXIT = { ok: 0, failed: 1, usage: 2, denied: 3, unavailable: 4 } as const;
export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** RFC 9457 problem details, as the API sends them (or as the CLI builds them for local errors). */
export interface Problem {
  type: string;
  title: string;
  status?: number;
  detail: string;
  errors?: { path: string; message: string }[];
  [extra: string]: unknown;
}

const LOCAL = 'https://mailgent.dev/problems/cli-';
/** The problem type of a change sent whose answer never came (answerLost). */
export const ANSWER_LOST = `${LOCAL}answer-lost`;

/** A failure the CLI reports and exits with. Its message never carries a secret value. */
export class CliError extends Error {
  constructor(
    readonly exitCode: ExitCode,
    readonly problem: Problem,
    /** Usage text to print after the message (usage errors). */
    readonly usage?: string,
  ) {
    super(problem.detail);
  }
}

/**
 * `--help` or `-h` given as an option (not as an option's value, `--details -h`): the command prints
 * its usage on stdout and exits 0 (cli/main.ts).
 */
export class HelpRequested extends Error {
  constructor() {
    super('help requested');
    this.name = 'HelpRequested';
  }
}

export function usageError(detail: string, usage?: string): CliError {
  return new CliError(EXIT.usage, { type: `${LOCAL}usage`, title: 'Usage error', detail }, usage);
}

/**
 * An extra argument, by its place among the arguments that are not options (1 is the first after
 * the command), never by its text: it is often the secret itself (`mailgent store stripe sk_live_…`).
 */
export function unexpectedArgument(position: number, usage?: string, why = ''): CliError {
  return usageError(`unexpected argument ${position} (not repeated here: it may be a secret)${why}`, usage);
}

export function unreachable(detail: string): CliError {
  return new CliError(EXIT.unavailable, { type: `${LOCAL}unreachable`, title: 'Service unreachable', detail });
}

/**
 * A 2xx that is not the API's JSON answer (not JSON, or JSON without the fields asked for). Exit 1,
 * not 4: a request that got this far may have been carried out (a credential stored, a rotation
 * started), so a script must not simply repeat it.
 */
export function unexpectedAnswer(detail: string): CliError {
  return new CliError(EXIT.failed, { type: `${LOCAL}unexpected-answer`, title: 'Unexpected answer', detail });
}

/**
 * A request that changes something was sent but its answer never came (a timeout, a dropped
 * connection): exit 1, not 4, since it may have been carried out and repeating it could do it twice.
 */
export function answerLost(detail: string): CliError {
  return new CliError(EXIT.failed, { type: ANSWER_LOST, title: 'Answer lost', detail });
}

/**
 * What an API refusal means for a script: the exit code of each HTTP status. A 503 whose change may
 * have been committed (`unconfirmed`: a store whose COMMIT went unanswered) is 1, not 4: repeating
 * it could store twice, so a script checks first. A proxy's 502 or 504 (the API itself never sends
 * them) is busy or unavailable, like the API's 503; but a change answered so never gets here:
 * Api.call reports it as an answer lost.
 */
export function exitCodeOf(status: number, problem?: Problem): ExitCode {
  if (status === 400 || status === 413 || status === 415 || status === 431) return EXIT.usage;
  if (status === 401 || status === 403 || status === 404) return EXIT.denied;
  if (status === 503 && problem?.unconfirmed === true) return EXIT.failed;
  if (status === 429 || status === 502 || status === 503 || status === 504) return EXIT.unavailable;
  return EXIT.failed;
}
