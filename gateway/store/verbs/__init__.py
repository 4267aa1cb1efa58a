"""The store's verbs, shared by every backend: plain synchronous functions of a `Tx` (or, for
reads, of a `Connection`) that speak a portable subset of SQL. SQLite runs them on its
connection thread; PostgreSQL in a greenlet on the event loop through a blocking bridge
(`store.postgres.bridge`)."""
