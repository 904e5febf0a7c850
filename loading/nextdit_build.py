"""Build a ComfyUI Lumina-2 / Z-Image model (+ ModelPatcher) of any size from ComfyUI-named weights.

ComfyUI's own loader (``comfy.sd.load_diffusion_model_state_dict``) detects NextDiT settings from two
hard-coded hidden sizes (2304, 3840) and loads non-strictly. Here the settings come from
``models.nextdit_config`` and the same ComfyUI pieces are used: ``supported_models.Lumina2`` /
``ZImage`` as the model config, its ``get_model``, ``model_management`` devices and dtypes, and
``ModelPatcher`` -- but the weights must match exactly.
"""

from . import fp8, nextdit_config, nextdit_keys
from .safetensors_io import majority_float_dtype


def _model_config(unet_config):
    import comfy.supported_models

    if nextdit_config.family_of_unet_config(unet_config) == nextdit_config.ZIMAGE:
        return comfy.supported_models.ZImage(unet_config)
    return comfy.supported_models.Lumina2(unet_config)


def build_nextdit(state_dict, unet_config=None, dtype=None, fp8_optimizations=False, scaled_fp8=None):
    """ComfyUI ``ModelPatcher`` around a ``model_base.Lumina2`` holding ``state_dict``.

    Args:
        state_dict: ComfyUI NextDiT keys (see ``nextdit_keys.diffusers_to_comfy``). The dict is not
            modified; its tensors become the model's weights where they already have the weight
            dtype (no copy), so do not modify them in place afterwards.
        unet_config: from ``nextdit_config``; None infers it from the tensor shapes.
        dtype: weight dtype (fp8 included); None keeps the dtype the tensors hold, or, for a
            scaled-fp8 state dict, lets ComfyUI pick it as its UNETLoader does. Compute falls back
            to a manual cast where the load device cannot run it (ComfyUI's ``unet_manual_cast``).
        fp8_optimizations: ComfyUI's ``fp8_optimizations`` (UNETLoader's ``fp8_e4m3fn_fast``).
        scaled_fp8: the ``scaled_fp8`` marker tensor of a pre-quantized file (popped from the file's
            keys); ``state_dict`` then holds ``<linear>.scale_weight`` (and maybe ``.scale_input``).

    Raises ValueError when keys are missing or unexpected or a shape disagrees with unet_config.
    """
    import comfy.model_management as mm
    import comfy.model_patcher

    weights_only, scales = fp8.split_scales(state_dict) if scaled_fp8 is not None else (state_dict, {})
    if unet_config is None:
        unet_config = nextdit_config.unet_config_from_state_dict(weights_only)
    nextdit_config.validate_unet_config(unet_config, weights_only)

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    model_config = _model_config(unet_config)
    scaled = fp8.marker_settings(scaled_fp8)
    if scaled is not None:
        linear_weight_dtype, scaled_optimizations = scaled
        fp8.check_scales(
            weights_only, scales, nextdit_config.linear_modules(unet_config), linear_weight_dtype
        )
        # what comfy.model_detection does when it finds the marker
        model_config.scaled_fp8 = linear_weight_dtype
        model_config.optimizations["fp8"] = scaled_optimizations
        parameters = sum(t.numel() for t in weights_only.values())
        unet_dtype = dtype or mm.unet_dtype(
            model_params=parameters, supported_dtypes=list(model_config.supported_inference_dtypes)
        )
    else:
        unet_dtype = dtype or majority_float_dtype((t.dtype, t.numel()) for t in state_dict.values())
    if unet_dtype is None:
        raise ValueError("state_dict: holds no floating-point tensors")
    problem = fp8.storage_problem(model_config.scaled_fp8 or unet_dtype, load_device)
    if problem:
        raise ValueError(f"weights in fp8 cannot be loaded here: {problem}")
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    if fp8_optimizations:
        model_config.optimizations["fp8"] = True

    # ComfyUI allocates the weights uninitialised (never touched, so they take no memory). Assigning
    # our tensors in their place, in the dtype ComfyUI allocated, keeps one copy of the model.
    model = model_config.get_model(state_dict, "")
    allocated = model.diffusion_model.state_dict()
    # A scale the file does not hold keeps the 1 ComfyUI's scaled layers start with (check_scales
    # made sure no fp8 weight lacks its scale); one ComfyUI's layers do not hold is dropped, as it does.
    weights = {
        key: tensor.to(allocated[key].dtype).reshape(allocated[key].shape)
        for key, tensor in state_dict.items()
        if key in allocated
    }
    weights.update(
        {key: allocated[key] for key in allocated.keys() - weights.keys() if key.endswith(fp8.SCALE_SUFFIXES)}
    )
    try:
        model.diffusion_model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:  # validated above, so only a dtype/device surprise lands here
        raise ValueError(f"state_dict: ComfyUI's NextDiT refused the weights: {error}") from error
    del weights, allocated
    model = model.to(offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def build_nextdit_from_diffusers(
    diffusers_state_dict, diffusers_config=None, dtype=None, consume=False, fp8_optimizations=False
):
    """Convert diffusers transformer weights (+ optional config.json dict) and build the ComfyUI model.

    With a config the architecture is read from it and checked against the tensors; without one it
    is inferred from the tensor shapes. ``consume`` empties ``diffusers_state_dict`` while converting
    (see ``nextdit_keys.diffusers_to_comfy``), for loaders that own it.
    """
    family = nextdit_keys.detect_diffusers_family(diffusers_state_dict)
    state_dict = nextdit_keys.diffusers_to_comfy(diffusers_state_dict, family=family, consume=consume)
    unet_config = None
    if diffusers_config is not None:
        unet_config = nextdit_config.unet_config_from_diffusers_config(diffusers_config)
        if nextdit_config.family_of_unet_config(unet_config) != family:
            raise ValueError(
                f"config: describes a {nextdit_config.family_of_unet_config(unet_config)} model but the weights are {family}"
            )
    return build_nextdit(state_dict, unet_config, dtype=dtype, fp8_optimizations=fp8_optimizations)
