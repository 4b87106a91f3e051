"""The zoo's models: `create_model`, `list_models`, `model_info`, `count_params`, pretrained weights
(`list_pretrained`, `pretrained_cfg`, `load_pretrained`, `save_pretrained`, `resolve_data_config`),
and `generate` for the language models."""
from models.registry import (IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg, count_params,
                             create_model, list_models, list_pretrained, model_info,
                             model_keywords, pretrained_cfg, register_model, register_pretrained)
from models.pretrained import load_pretrained, resolve_data_config, save_params, save_pretrained
from models.generation import generate

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PretrainedCfg", "count_params", "create_model",
           "list_models", "list_pretrained", "model_info", "model_keywords", "pretrained_cfg",
           "register_model", "register_pretrained", "load_pretrained", "resolve_data_config",
           "save_params", "save_pretrained", "generate"]
