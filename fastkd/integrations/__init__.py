"""Integrations with the training libraries fastkd's users already run.

Each submodule imports its library on import and is optional: `import fastkd` never
imports them. `fastkd.integrations.trl` needs `trl`; `fastkd.integrations.transformers`
needs `transformers`. `fastkd.integrations.heads` (which imports neither) reads the
transform a model applies to its logits after the LM head (softcap, scale) from its
config; the fused-linear paths of both trainers apply it.
"""
