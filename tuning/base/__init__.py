"""The embedded default base model: a tiny LLaVA-architecture VLM the project builds itself."""
