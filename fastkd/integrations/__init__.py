"""Integrations with the training libraries fastkd's users already run.

Each submodule imports its library on import and is optional: `import fastkd` never
imports them. `fastkd.integrations.trl` needs `trl`; `fastkd.integrations.transformers`
needs `transformers`.
"""
