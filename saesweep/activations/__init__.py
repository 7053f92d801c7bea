"""Where training activations come from, and how they reach the SAE.

- `source`: token rows -> activations at the hooks (the LM run only as far as needed),
  and `LiveFeed`, the training feed that runs it over the training rows;
- `cache`: the shared, content-addressed on-disk cache, and the feed that reads it;
- `buffer`: the shuffling buffer both feeds fill, which knows nothing about SAEs.
"""
