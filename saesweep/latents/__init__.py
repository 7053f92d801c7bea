"""What a run's latents respond to: the feature browser behind `python -m saesweep.features`.

`collect` (choosing latents, their top contexts and activation values from a pass over
held-out rows), `logit_lens` (the tokens a decoder direction promotes and suppresses),
`page` (features.html), `browser` (the run's model, SAE and rows put together).
"""
