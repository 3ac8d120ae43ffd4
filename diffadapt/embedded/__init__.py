"""The embedded toy world: a small SD pipeline shipped inside the package (``assets/base_model``),
the procedural shape world it was trained on (``world``: images, captions, the held-out
DreamBooth subject) and the offline CLIP tokenizer whose words are that world's (``tokenizer``).
``train_scripts/pretrain_base.py`` builds the model from the other two.
"""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "base_model"


def default_model_path() -> str:
    """Folder of the shipped base pipeline (``StableDiffusionPipeline.from_pretrained`` layout)."""
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The embedded default model is missing from {DEFAULT_MODEL}; pass a model path or hub id instead."
        )
    return str(DEFAULT_MODEL)
