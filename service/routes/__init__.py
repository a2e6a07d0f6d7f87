"""HTTP routes, one router per resource; each only decodes, calls the data plane, encodes."""
