"""Token rows: datasets tokenized and windowed into rows of `context_size`, with the
held-out split evaluation reads (`rows`)."""
