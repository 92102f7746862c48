"""The engine core: request state, paged KV blocks with prefix caching, the scheduler and the step loop."""
