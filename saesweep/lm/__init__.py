"""The language model behind one small interface (`model.LanguageModel`), loaded from
the embedded checkpoint, a local directory or the hub, and run by TransformerLens
(`tl_backend`) or by Hugging Face transformers (`hf_backend`)."""
