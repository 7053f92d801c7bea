"""Measuring an SAE: metric definitions (`metrics`, each tested against hand-computed
values) and the evaluation on held-out rows every run ends with (`held_out`)."""
