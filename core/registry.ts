/**
 * A registry's entry by a name that came from outside (a request, a stored policy): its own entries
 * only. A plain lookup would take `constructor`, `toString` or `__proto__` from Object.prototype for
 * a provider or dependent, and fail on it as a 500 instead of answering the name unknown.
 */
export function registered<T>(registry: Record<string, T>, name: string): T | undefined {
  return Object.hasOwn(registry, name) ? registry[name] : undefined;
}
