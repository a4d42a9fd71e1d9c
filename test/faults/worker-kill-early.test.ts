import { workerKillSuite } from './worker-kill';

/** SIGKILL before the new value is live: create, apply, verify, and the compensation of a refused key. */
workerKillSuite(['create_pending', 'apply_dependents', 'verify', 'compensate']);
