"""The only package that imports google.*: one module per service, each imported when a command needs it."""
