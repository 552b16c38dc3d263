"""transformers: every model type, built tiny, checked against ``output_attentions`` under eager.

For one model type (a key of ``CONFIG_MAPPING_NAMES``) :func:`check`

1. makes a tiny configuration: the type's defaults with every width, depth,
   head count, vocabulary and position limit shrunk, nested configurations
   (``text_config``, ``vision_config``, ...) shrunk the same way, and special
   token ids moved inside the small vocabulary;
2. builds the model (``AutoModel``, else another auto class, else the
   modeling module's own class for that configuration) with a fixed seed, and an
   ``attn_implementation='eager'`` copy with the same weights (a deep copy switched
   with ``set_attn_implementation('eager')``; where that leaves any configuration
   on another implementation, as for modeling modules without AttentionInterface,
   a model built eager from the start, loaded with the same state dict);
3. makes inputs from the names ``forward`` accepts (token ids with a padded
   row, pixel values, decoder ids, audio features...), falling back to fewer
   inputs (text only, then the non-text input only) when the model refuses them;
4. runs the eager copy with ``output_attentions=True``: every tensor under an
   output field named like attentions (``attentions``, ``cross_attentions``,
   ``vision_model_output.attentions``, ...) is a reference map (one returned
   with its heads merged into the batch axis is compared in the layout of
   every other, ``(batch, heads, queries, keys)``: see :func:`in_layout`); where every one
   of them is all NaN (an eager path that is broken upstream: Nemotron ASR
   streaming turns its float mask into a boolean with ``logical_not()`` and so
   masks every score), the reference is instead the probabilities of the default
   model's ``scaled_dot_product_attention`` calls recomputed by hand from their
   arguments (``_reference.SoftmaxRecorder``, as for timm), and the row says so;
5. runs the default model without capture, then under ``watch_attention()`` and
   ``capture()``, and compares (see ``_compare``).
"""
import copy
import inspect

import numpy as np

from ._compare import captured_maps, match_maps, one_line, outputs_equal, tensors_in

__all__ = ["model_types", "tiny_config", "build", "make_inputs", "check", "in_layout", "versions"]

BATCH = 2
SEQ = 8
DEC_SEQ = 5
VOCAB = 99
SEED = 0

# attribute name -> tiny value; applied to integers larger than the tiny value.
_HIDDEN = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim", "model_dim",
           "embedding_size", "d_embed", "emb_dim", "embedding_dim", "projection_dim",
           "out_hidden_size", "vision_hidden_size", "text_hidden_size", "encoder_hidden_size",
           "decoder_hidden_size", "encoder_hidden_dim", "projector_hidden_size",
           "output_hidden_size", "pooler_output_size", "fusion_hidden_size", "hidden_size_global",
           "image_text_hidden_size", "classifier_proj_size", "audio_hidden_size",
           "d_latents", "proj_dim", "projection_size", "output_dim", "mm_hidden_size",
           "backbone_hidden_size", "attention_hidden_size", "pooler_hidden_size", "n_embed",
           "word_embed_proj_dim", "intermediate_hidden_size", "memory_attention_hidden_size",
           "memory_encoder_hidden_size", "fpn_hidden_size", "codevector_dim",
           "proj_codevector_dim", "xvector_output_dim", "iou_head_hidden_dim", "d_inner_model")
_FF = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
       "mlp_dim", "moe_intermediate_size", "shared_expert_intermediate_size",
       "decoder_intermediate_size", "ffn_hidden_size", "d_inner", "intermediate_dim",
       "expert_intermediate_size", "dense_intermediate_size", "mlp_hidden_size",
       "encoder_intermediate_size", "vision_intermediate_size", "text_intermediate_size")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
          "decoder_attention_heads", "attention_heads", "num_decoder_attention_heads",
          "num_encoder_attention_heads", "num_attention_heads_encoder", "num_attention_heads_decoder")
_KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
             "n_head_kv", "num_key_value_heads_encoder")
_HEAD_DIM = ("head_dim", "d_kv", "attention_head_size", "kv_channels", "dim_head", "v_head_dim",
             "attention_head_dim", "head_size", "d_head")
_LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
           "decoder_layers", "num_encoder_layers", "num_decoder_layers", "depth", "num_blocks",
           "n_layers_encoder", "num_text_layers", "num_vision_layers", "num_hidden_layers_encoder",
           "num_hidden_layers_decoder", "text_num_hidden_layers", "vision_num_hidden_layers",
           "num_cross_layers", "num_self_layers")
_POSITIONS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx",
              "max_sequence_length", "max_target_positions", "max_text_len")
_FIXED = {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
          "qk_head_dim": 16, "rotary_dim": 4, "rotary_emb_dim": 4,
          "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
          "num_experts_per_tok": 2, "moe_topk": 2, "n_shared_experts": 1, "n_group": 1,
          "topk_group": 1, "hidden_size_per_layer_input": 8, "index_head_dim": 8,
          "index_n_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
          "linear_num_key_heads": 2, "linear_num_value_heads": 4, "mamba_n_heads": 8,
          "mamba_d_head": 8, "mamba_d_state": 8, "mamba_expand": 2, "state_size": 8,
          "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4, "vocab_size": VOCAB,
          "image_size": 32, "patch_size": 8, "sliding_window": 4, "attention_window": 4,
          "num_queries": 10, "mm_tokens_per_image": 4, "image_seq_length": 4,
          "max_source_positions": 32, "num_mel_bins": 16, "feature_size": 16,
          "num_codebooks": 2, "codebook_size": 16, "local_window_size": 4, "num_frames": 2,
          "moe_k": 2, "top_k": 2, "n_activated_experts": 2, "num_activated_experts": 2,
          "num_kv_shared_layers": 0}
_RULES = {}
for _names, _value in ((_HIDDEN, 32), (_FF, 40), (_HEADS, 4), (_KV_HEADS, 2), (_HEAD_DIM, 8),
                       (_LAYERS, 2), (_POSITIONS, 64)):
    for _name in _names:
        _RULES[_name] = _value
_RULES.update(_FIXED)
# per-stage lists (hierarchical vision models): index -> value
_STAGE_LISTS = {"depths": lambda i, v: 1, "hidden_sizes": lambda i, v: 16 * 2 ** i,
                "num_heads": lambda i, v: min(2 ** i, 4), "num_attention_heads": lambda i, v: min(2 ** i, 4),
                "embed_dim": lambda i, v: 16 * 2 ** i, "conv_dim": lambda i, v: 32,
                "tdnn_dim": lambda i, v: 32, "neck_hidden_sizes": lambda i, v: 16 * 2 ** i,
                "embedding_dimension": lambda i, v: 16 * 2 ** i}
# hierarchical (multi-stage) vision configs: a 32 px image must survive every downsampling
_STAGED = {"patch_size": 2, "window_size": 2}
# a few types need one more setting to run at all at tiny sizes
_TYPE_FIXES = {
    "big_bird": {"attention_type": "original_full"},  # block sparse needs > 700 tokens
    "bigbird_pegasus": {"attention_type": "original_full"},
    "audio-spectrogram-transformer": {"max_length": 32},  # spectrogram frames, fixed at build
    "esm": {"pad_token_id": 1, "mask_token_id": 2},  # its default has no padding id, which it needs
}
_TOKEN_SUFFIXES = ("_token_id", "_token_index", "_token_ids")


def versions():
    """``{'transformers': ..., 'torch': ...}``."""
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def model_types():
    """Every model type the installed transformers knows, in its own order."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return list(CONFIG_MAPPING_NAMES)


def _shrink_value(name, value, layers):
    if isinstance(value, bool):
        return value
    if name in _RULES and isinstance(value, int):
        return min(value, _RULES[name]) if name not in ("image_size", "patch_size") else _RULES[name]
    if name in ("image_size", "patch_size") and isinstance(value, (list, tuple)) and len(value) == 2:
        return type(value)([_RULES[name]] * 2)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if name in _STAGE_LISTS:
            return type(value)(_STAGE_LISTS[name](i, v) for i, v in enumerate(value))
    if isinstance(value, (list, tuple)) and layers and len(value) == layers[0] and layers[0] > 2:
        return type(value)(value[:layers[1]])  # per-layer lists (layer_types, ...)
    return value


def tiny_config(model_type):
    """The tiny configuration of ``model_type`` (see the module docstring)."""
    from transformers import AutoConfig

    config = _shrink(AutoConfig.for_model(model_type), {})
    for name, value in _TYPE_FIXES.get(model_type, {}).items():
        setattr(config, name, value)
    return config


def _shrink(config, token_ids):
    """A new config of the same class with small sizes (recursing into nested configs)."""
    from transformers import PretrainedConfig

    values = config.to_dict()
    layer_counts = [values[name] for name in _LAYERS if isinstance(values.get(name), int)]
    layers = (max(layer_counts), 2) if layer_counts else None
    overrides = {}
    for name, value in vars(config).items():
        if name.startswith("_"):
            continue
        if isinstance(value, PretrainedConfig):
            overrides[name] = _shrink(value, token_ids)
            continue
        if name.endswith(_TOKEN_SUFFIXES) and isinstance(value, int) and not isinstance(value, bool):
            overrides[name] = _token_id(value, token_ids)
            continue
        if name.endswith(_TOKEN_SUFFIXES) and isinstance(value, list) and all(
                isinstance(v, int) for v in value):
            overrides[name] = [_token_id(v, token_ids) for v in value]
            continue
        new = _shrink_value(name, value, layers)
        if name in _KV_HEADS and isinstance(values.get("kv_lora_rank"), int):
            new = _RULES["num_attention_heads"]  # multi-head latent attention has no grouped keys
        if name == "vocab_size" and value is None:
            new = VOCAB
        if name == "rope_parameters" and isinstance(value, dict) and (
                "mrope_section" in value
                or "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ())):
            # multimodal rotary sections (t, h, w) must sum to head_dim / 2; the modeling code
            # falls back to sections for the full-size model when the config has none
            sections = value.get("mrope_section") or [1, 1, 1]
            new = dict(value, mrope_section=_split(_RULES["head_dim"] // 2, len(sections)))
        if name == "head_dim" and isinstance(values.get("qk_rope_head_dim"), int):
            new = _RULES["qk_rope_head_dim"]  # multi-head latent attention: rotary dims = head_dim
        if name in _STAGED and isinstance(values.get("depths"), (list, tuple)) and isinstance(value, int):
            new = _STAGED[name]
        if new is not value:
            overrides[name] = new
    attempts = (lambda: dict(_init_values(config), **overrides), lambda: overrides)
    for values in attempts:
        try:
            tiny = type(config)(**values())
        except Exception:
            continue
        # attributes a parent config set after building this one (not __init__ arguments)
        for name, value in vars(config).items():
            if name not in vars(tiny) and not name.startswith("__"):
                setattr(tiny, name, value)
        return tiny
    tiny = copy.deepcopy(config)
    for name, value in overrides.items():
        setattr(tiny, name, value)
    return tiny


def _split(total, parts):
    """``parts`` positive integers summing to ``total`` (the first takes the remainder)."""
    parts = max(1, min(parts, total))
    base = total // parts
    return [base + total - base * parts] + [base] * (parts - 1)


def _init_values(config):
    """Values the class's ``__init__`` accepts, taken from the instance (nested configs as objects)."""
    try:
        parameters = inspect.signature(type(config).__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: vars(config)[name] for name in parameters
            if name in vars(config) and name not in ("self", "kwargs") and not name.startswith("_")}


def _token_id(value, token_ids):
    """Move a special token id inside the tiny vocabulary (the same old id maps to the same new one)."""
    if value < 0:
        return value
    if value < 3:
        return value
    if value not in token_ids:
        token_ids[value] = VOCAB - 1 - len(token_ids)
    return token_ids[value]


def _model_class(config, model_type):
    import transformers
    from transformers.models.auto import modeling_auto

    names = []
    mappings = [modeling_auto.MODEL_MAPPING_NAMES] + [
        getattr(modeling_auto, n) for n in sorted(dir(modeling_auto))
        if n.endswith("_MAPPING_NAMES") and n not in ("MODEL_MAPPING_NAMES", "CONFIG_MAPPING_NAMES")]
    for mapping in mappings:
        found = mapping.get(model_type)
        if found:
            names.extend([found] if isinstance(found, str) else list(found))
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    module = inspect.getmodule(type(config))
    if module is not None:
        import importlib

        modeling = module.__name__.replace(".configuration_", ".modeling_")
        try:
            modeling = importlib.import_module(modeling)
        except ImportError:
            modeling = None
        if modeling is not None:
            candidates = [obj for name, obj in vars(modeling).items()
                          if inspect.isclass(obj) and getattr(obj, "config_class", None) is type(config)
                          and hasattr(obj, "from_config") or
                          inspect.isclass(obj) and getattr(obj, "config_class", None) is type(config)]
            candidates.sort(key=lambda c: (not c.__name__.endswith("Model"), len(c.__name__)))
            if candidates:
                return candidates[0]
    raise LookupError("no model class for {}".format(type(config).__name__))


def build(model_type):
    """``(model, eager_copy, config)``: the default model and an eager copy with the same weights."""
    import torch

    config = tiny_config(model_type)
    cls = _model_class(config, model_type)
    torch.manual_seed(SEED)
    if hasattr(cls, "_from_config"):
        model = cls._from_config(config)
    else:
        model = cls(config)
    model.eval()
    languages = getattr(config, "languages", None)
    if hasattr(model, "set_default_language") and languages:  # X-MOD: one adapter per language
        model.set_default_language(list(languages)[0])
    eager = copy.deepcopy(model)
    if hasattr(eager, "set_attn_implementation"):
        eager.set_attn_implementation("eager")
    if _not_eager(eager):
        # set_attn_implementation leaves the configuration alone where the modeling module does
        # not dispatch through AttentionInterface (Falcon: it only warns); such a model still
        # builds its masks for its default implementation (a boolean SDPA mask, which Falcon's
        # eager path then adds to its scores: no causal mask at all), so build the copy eager
        # from the start instead and give it the same weights.
        eager = _built_eager(cls, config, model) or eager
    eager.eval()
    return model, eager, config


def _not_eager(model):
    """The attention implementations other than eager that ``model`` or any submodel is configured with."""
    found = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if isinstance(implementation, str) and implementation != "eager":
            found.add(implementation)
    return found


def _built_eager(cls, config, model):
    """``cls`` built from ``config`` with ``attn_implementation='eager'`` and ``model``'s weights (``None`` if that fails)."""
    import torch

    config = copy.deepcopy(config)
    try:
        torch.manual_seed(SEED)
        if hasattr(cls, "_from_config"):
            eager = cls._from_config(config, attn_implementation="eager")
        else:
            config._attn_implementation = "eager"
            eager = cls(config)
        eager.load_state_dict(model.state_dict(), strict=True)
    except Exception:
        return None
    languages = getattr(config, "languages", None)
    if hasattr(eager, "set_default_language") and languages:
        eager.set_default_language(list(languages)[0])
    return eager


def _sub(config, *names):
    """The first nested config among ``names`` (or the config itself)."""
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def _find(config, name, default=None):
    """``name`` from the config or its nested configs (vision first)."""
    seen = [config]
    for sub in ("vision_config", "backbone_config", "encoder_config", "encoder", "image_config",
                "audio_config", "text_config", "decoder_config", "decoder"):
        value = getattr(config, sub, None)
        if value is not None and hasattr(value, "to_dict"):
            seen.append(value)
    for cfg in seen:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _image_token(config):
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and 0 <= value < VOCAB:
            return value
    return None


def _count_features(features, width):
    """The number of feature vectors in whatever ``get_image_features`` returned."""
    import torch

    if hasattr(features, "pooler_output") and features.pooler_output is not None:
        features = features.pooler_output
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, torch.Tensor):
        return features.numel() // width
    if isinstance(features, (list, tuple)):
        return sum(_count_features(f, width) for f in features)
    raise TypeError("cannot count image features of type {}".format(type(features).__name__))


def make_inputs(model, config):
    """A list of input dicts to try in order: everything ``forward`` accepts, then fewer."""
    import torch

    parameters = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(SEED)
    text = _sub(config, "text_config")
    vocab = getattr(text, "vocab_size", None) or VOCAB
    high = max(5, min(vocab, VOCAB) - 30)  # leave the ids of special tokens out
    ids = torch.randint(3, high, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    found = {}
    if "input_ids" in parameters:
        found["input_ids"] = ids
        if "attention_mask" in parameters:
            found["attention_mask"] = mask
        if "token_type_ids" in parameters:
            types = getattr(config, "type_vocab_sizes", None)  # TAPAS: several token type ids
            found["token_type_ids"] = (torch.zeros(BATCH, SEQ, len(types), dtype=torch.long)
                                       if isinstance(types, (list, tuple)) else torch.zeros_like(ids))
    for name in ("qformer_input_ids", "qformer_attention_mask"):  # InstructBLIP
        if name in parameters:
            found[name] = ids if name.endswith("ids") else mask
    if "decoder_input_ids" in parameters and (getattr(config, "is_encoder_decoder", False)
                                              or "input_ids" not in found):
        found["decoder_input_ids"] = torch.randint(3, high, (BATCH, DEC_SEQ), generator=g)
    if "bbox" in parameters:
        box = torch.randint(0, 500, (BATCH, SEQ, 2), generator=g)
        found["bbox"] = torch.cat([box, box + 10], dim=-1)
    if "visual_feats" in parameters:  # LXMERT: region features and boxes
        found["visual_feats"] = torch.randn(BATCH, 4, _find(config, "visual_feat_dim", 32), generator=g)
        found["visual_pos"] = torch.rand(BATCH, 4, _find(config, "visual_pos_dim", 4), generator=g)
    modal = {}
    size = _find(config, "image_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = _find(config, "num_channels", None) or _find(config, "in_channels", 3)
    patch = _find(config, "patch_size", 8)
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    grid_name = next((n for n in ("image_grid_thw", "grid_thw") if n in parameters), None)
    if grid_name is not None:  # Qwen2-VL and kin: flattened patches and a (t, h, w) grid per image
        temporal = _find(config, "temporal_patch_size", 1) or 1
        temporal = temporal[0] if isinstance(temporal, (list, tuple)) else temporal
        pixels = "pixel_values" if "pixel_values" in parameters else "hidden_states"
        modal[pixels] = torch.randn(BATCH * 16, channels * temporal * patch * patch, generator=g)
        modal[grid_name] = torch.tensor([[1, 4, 4]] * BATCH)
    elif "spatial_shapes" in parameters and "pixel_values" in parameters:  # SigLIP 2 (NaFlex)
        modal["pixel_values"] = torch.randn(BATCH, 16, channels * patch * patch, generator=g)
        modal["spatial_shapes"] = torch.tensor([[4, 4]] * BATCH)
        modal["pixel_attention_mask"] = torch.ones(BATCH, 16, dtype=torch.long)
    elif "pixel_values" in parameters or "pixel_values_videos" in parameters:
        shape = (BATCH, channels) + size[-2:]
        frames = _find(config, "num_frames", None)
        name = "pixel_values" if "pixel_values" in parameters else "pixel_values_videos"
        if name == "pixel_values_videos" or frames:
            shape = (BATCH, frames or 2) + shape[1:]
        modal[name] = torch.randn(*shape, generator=g)
    if "input_features" in parameters:
        mel = _find(config, "num_mel_bins", None)
        source = _find(config, "max_source_positions", None)
        if mel is not None and source is not None:  # whisper-like: (B, mels, 2 * positions)
            modal["input_features"] = torch.randn(BATCH, mel, 2 * source, generator=g)
        else:
            width = (_find(config, "input_feat_per_channel", None) or _find(config, "feature_size", 16)) * (
                _find(config, "input_channels", 1) or 1)
            modal["input_features"] = torch.randn(BATCH, 32, width, generator=g)
    if "input_values" in parameters:
        mel = _find(config, "num_mel_bins", None)
        frames = _find(config, "max_length", None)
        if mel is not None and frames is not None:  # spectrogram patches (AST): (B, frames, mels)
            modal["input_values"] = torch.randn(BATCH, frames, mel, generator=g)
        else:  # raw audio (wav2vec2 and kin)
            modal["input_values"] = torch.randn(BATCH, 3200, generator=g)
    tries = []
    image_token = _image_token(config)
    if "input_ids" in found and image_token is not None and (
            "pixel_values" in modal and hasattr(model, "get_image_features") or grid_name == "image_grid_thw"):
        try:
            with_images = _with_image_tokens(model, config, found, modal, image_token, grid_name)
        except Exception:
            with_images = None
        if with_images is not None:
            tries.append(with_images)
    tries.append(dict(found, **modal))
    if modal and "input_ids" in found:
        tries.append(dict(found))
    if modal:
        only = dict(modal)
        if "decoder_input_ids" in found:
            only["decoder_input_ids"] = found["decoder_input_ids"]
        tries.append(only)
        if len(modal) > 1 and grid_name is None:  # e.g. speech encoder-decoders: one audio input
            for name in modal:
                tries.append(dict(found, **{name: modal[name]}))
    if not found and not modal:
        width = getattr(text, "hidden_size", None) or _find(config, "hidden_size", 32)
        for name in ("inputs_embeds", "hidden_states", "inputs", "query_embeds"):
            if name in parameters:
                tries.append({name: torch.randn(BATCH, SEQ, width, generator=g)})
                break
    common = {"use_cache": False} if "use_cache" in parameters else {}
    return [dict(t, **common) for t in tries if t]


def _with_image_tokens(model, config, found, modal, image_token, grid_name):
    """Text inputs holding as many image tokens as the image features the model makes of ``modal``."""
    import torch

    if grid_name == "image_grid_thw":
        merge = _find(config, "spatial_merge_size", 2) or 1
        per_image = int(modal[grid_name][0].prod()) // (merge * merge)
    else:
        width = getattr(_sub(config, "text_config"), "hidden_size", None) or 32
        with torch.no_grad():
            features = model.get_image_features(pixel_values=modal["pixel_values"])
        per_image = _count_features(features, width) // BATCH
    if per_image <= 0 or per_image > 4096:
        return None
    ids = found["input_ids"]
    image = torch.full((BATCH, per_image), image_token, dtype=ids.dtype)
    inputs = dict(found, **modal)
    inputs["input_ids"] = torch.cat([ids[:, :1], image, ids[:, 1:]], dim=1)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # 5.x Qwen-VL: 1 marks images
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token).long()
    for name in ("attention_mask", "token_type_ids"):
        if name in found and found[name].dim() == 2:
            pad = torch.ones if name == "attention_mask" else torch.zeros
            inputs[name] = torch.cat([found[name][:, :1], pad(BATCH, per_image, dtype=found[name].dtype),
                                      found[name][:, 1:]], dim=1)
    return inputs


def _accepts_kwargs(parameters):
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _is_attention(path):
    return any("attention" in part and "mask" not in part for part in path.split("."))


def _forward(model, inputs, **extra):
    import torch

    torch.manual_seed(SEED)
    with torch.no_grad():
        return model(**dict(inputs, **extra))


def _diagnosis(model):
    """Why a miss may happen: the default implementation, and which modeling modules lack an eager function."""
    import sys

    modules = sorted({type(m).__module__ for m in model.modules()
                      if type(m).__module__.startswith("transformers.models.")})
    without = [m.rsplit(".", 1)[-1] for m in modules
               if "eager_attention_forward" not in vars(sys.modules[m]) and m.rsplit(".", 1)[-1].startswith("modeling_")]
    text = "default implementation {}".format(getattr(model.config, "_attn_implementation", None))
    if without:
        text += "; no eager_attention_forward in " + ", ".join(without)
    return text


def check(model_type):
    """Check one model type; returns a dict with ``status`` and ``reason`` (see the package docstring)."""
    import torch

    from visualizer import get_local

    torch.set_num_threads(1)
    try:
        model, eager, config = build(model_type)
    except Exception as error:
        return {"status": "not built", "reason": one_line(error)}
    result = {"model": type(model).__name__,
              "implementation": getattr(model.config, "_attn_implementation", None)}
    tries = make_inputs(model, config)
    if not tries:
        return dict(result, status="not built", reason="no known input among the forward's parameters")
    errors = []
    reference = None
    for inputs in tries:
        try:
            out = _forward(eager, inputs, output_attentions=True)
        except Exception as error:
            errors.append(one_line(error, 200))
            continue
        reference = [t for _, t in tensors_in(out, keep=_is_attention)]
        result["inputs"] = ",".join(k for k in inputs if k != "use_cache")
        break
    if reference is None:
        if "output_attentions" in errors[0] or "for timm models" in errors[0]:
            return dict(result, status="no attention", reason="forward takes no output_attentions: " + errors[0])
        return dict(result, status="not built", reason="eager forward failed: " + errors[0])
    # A map has a query and a key axis and a head (or batch) axis; some vision towers record
    # their (tokens, width) outputs as "attentions" (Qwen2-VL and kin): those are no maps.
    flat = sorted({tuple(t.shape) for t in reference if t.dim() < 3})
    reference = [t.detach().float().numpy() for t in reference if t.dim() >= 3]
    if flat:
        result["not_maps"] = flat
    if not reference:
        reason = "no attention maps under eager with output_attentions"
        if flat:
            reason = "output_attentions holds only 2-D tensors {}, not attention maps".format(
                ", ".join("({})".format(",".join(map(str, s))) for s in flat))
        return dict(result, status="no attention", reason=reason)
    try:
        plain = _forward(model, inputs)
    except Exception as error:
        result["maps"] = len(reference)
        return dict(result, status="missed", reason="default implementation failed: " + one_line(error))
    notes = []
    if all(r.size and np.isnan(r).all() for r in reference):
        recomputed = _recomputed(model, inputs)
        if recomputed:
            reference = recomputed
            result["reference"] = "sdpa recomputed"
            notes.append("the eager reference is all NaN (its eager path computes no probabilities), so the "
                         "reference is softmax(q kᵀ·scale + mask) recomputed from the arguments of the default "
                         "model's {} scaled_dot_product_attention calls".format(len(recomputed)))
    reference, merged = in_layout(reference)
    if merged:
        notes.append("the library returns {} of its maps with the heads merged into the batch axis "
                     "({}): compared as (batch, heads, queries, keys)".format(merged[0], merged[1]))
    result["maps"] = len(reference)
    try:
        with get_local.capture() as cache:
            captured = _forward(model, inputs)
    except Exception as error:
        return dict(result, status="missed", reason="forward under capture raised " + one_line(error))
    maps = captured_maps(cache)
    result["captured"] = len(maps)
    unmatched, why, note = match_maps(reference, maps)
    changed = outputs_equal(plain, captured)
    result["unmatched"] = unmatched
    notes += [note] if note else []
    if why or changed:
        reasons = [r for r in (why, changed) if r] + notes
        return dict(result, status="missed", reason="; ".join(reasons + [_diagnosis(model)]))
    return dict(result, status="covered", reason="; ".join(notes))


def in_layout(reference):
    """``(maps, merged)``: the reference maps in the layout every map is delivered in, ``(batch, heads,
    queries, keys)``, and ``(count, 'shapes')`` of those the library returned otherwise (else ``()``).

    A 3-D map whose first axis is ``BATCH`` x ``h`` heads (``h`` > 1) is one the library returns with
    its heads merged into the batch axis (SAM's vision encoder and the models built on it: GOT-OCR2,
    PP-FormulaNet, SLANeXt): it is compared as ``(BATCH, h, N, M)``.
    """
    laid_out, shapes = [], []
    for array in reference:
        if array.ndim == 3 and array.shape[0] > BATCH and array.shape[0] % BATCH == 0:
            shapes.append("({})".format(",".join(map(str, array.shape))))
            array = array.reshape((BATCH, array.shape[0] // BATCH) + array.shape[1:])
        laid_out.append(array)
    if not shapes:
        return laid_out, ()
    return laid_out, (len(shapes), ", ".join(sorted(set(shapes))))


def _recomputed(model, inputs):
    """The probabilities of every SDPA call of the default model, recomputed by hand (``[]`` if it calls none).

    For a model whose eager path is broken (every reference map NaN): the independent reference the
    timm sweep uses, :class:`~benchmarks.coverage._reference.SoftmaxRecorder`, on the default model.
    """
    from ._reference import SoftmaxRecorder

    recorder = SoftmaxRecorder()
    try:
        with recorder:
            _forward(model, inputs)
    except Exception:
        return []
    return [m.numpy() for m, kind in zip(recorder.maps, recorder.kinds) if kind == "sdpa"]
