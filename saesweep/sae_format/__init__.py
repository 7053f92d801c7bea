"""SAELens's on-disk SAE format: `write` exports a trained SAE, `read` loads any
SAELens-format directory (ours or another tool's) without sae_lens."""
