"""`cfbd-fast embed` as a library: image-caption inputs -> open_clip embeddings in an EmbeddingStore.

sources.py reads the inputs, models.py loads open_clip models, decode.py decodes images, runner.py embeds.
"""
from .models import TINY_MODEL, LoadedModel, load_model, model_identity, register_tiny_model
from .runner import BATCH_SIZE, COMMIT_ROWS, EmbedSummary, default_workers, embed
from .sources import Sample, Source, Unit, open_source

__all__ = ["embed", "EmbedSummary", "open_source", "Source", "Unit", "Sample", "load_model", "LoadedModel",
           "model_identity", "register_tiny_model", "TINY_MODEL", "default_workers", "BATCH_SIZE", "COMMIT_ROWS"]
