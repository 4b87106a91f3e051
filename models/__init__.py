"""The zoo's models: `create_model`, `list_models`, `model_info`, `count_params`, `load_pretrained`,
and `generate` for the language models."""
from models.registry import (count_params, create_model, list_models, model_info, model_keywords,
                             register_model)
from models.pretrained import load_pretrained, save_params
from models.generation import generate

__all__ = ["count_params", "create_model", "list_models", "model_info", "model_keywords", "register_model",
           "load_pretrained", "save_params", "generate"]
