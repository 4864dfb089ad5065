"""The model names the local stack's scripted model serves (stack/scripted_model.py) and the
settings fall back to when no real model is configured. Standard library only (nothing at all),
so the scripted model, which any interpreter must be able to run, can import it too."""

SCRIPTED_MODEL_ID = "scripted-vtuber"
EMBEDDING_MODEL_ID = "text-embedding-3-small"
