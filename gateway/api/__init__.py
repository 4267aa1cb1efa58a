"""HTTP routes, one module per resource. Handlers parse, call the store, and shape the answer."""
