"""The `hip` command: `main` (argument parsing, the one error handler) and one module per
subcommand group (train, sweep, quickstart). Nothing imports this package; it imports
sweeps/ and pipeline/ (dependencies point one way: hip_pipeline -> sweeps -> pipeline ->
models)."""
