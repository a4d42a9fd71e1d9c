// The vault read thread's entry point (see read-thread.ts). A thread does not inherit the loader the
// main thread runs TypeScript with, so it registers tsx itself, in its CommonJS form: tsx's ESM
// loader would run its hooks on one more thread of their own (~10 MB of RSS for this one thread).
require('tsx/cjs/api').register();
require('./read-thread-worker.ts');
