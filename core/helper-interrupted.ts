/**
 * A helper program that start-up runs in the service's own process group (the workflows' bundler,
 * initdb) was ended by a signal: Ctrl-C, or a supervisor signalling the whole group, reaches it as
 * it reaches the service. When the service took that signal too, this is start-up interrupted, not
 * a start that failed (cli/serve.ts); without one, it is a failure like any other.
 */
export class HelperInterrupted extends Error {
  constructor(
    readonly helper: string,
    /** The signal, when the helper died of it; undefined when it caught one and exited (initdb). */
    readonly signal: NodeJS.Signals | undefined,
    options?: ErrorOptions,
  ) {
    super(`${helper} was ended by ${signal ?? 'a signal'}`, options);
    this.name = 'HelperInterrupted';
  }
}

/** The signals that stop the service (and, sent to its process group, its helpers). */
export function isStopSignal(signal: unknown): signal is 'SIGINT' | 'SIGTERM' {
  return signal === 'SIGINT' || signal === 'SIGTERM';
}
