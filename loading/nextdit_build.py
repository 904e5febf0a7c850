"""Build a ComfyUI Lumina-2 / Z-Image model (+ ModelPatcher) of any size from ComfyUI-named weights.

ComfyUI's own loader (``comfy.sd.load_diffusion_model_state_dict``) detects NextDiT settings from two
hard-coded hidden sizes (2304, 3840) and loads non-strictly. Here the settings come from
``models.nextdit_config`` and the same ComfyUI pieces are used: ``supported_models.Lumina2`` /
``ZImage`` as the model config, its ``get_model``, ``model_management`` devices and dtypes, and
``ModelPatcher`` -- but the weights must match exactly.
"""

from . import nextdit_config, nextdit_keys
from .safetensors_io import majority_float_dtype


def _model_config(unet_config):
    import comfy.supported_models

    if nextdit_config.family_of_unet_config(unet_config) == nextdit_config.ZIMAGE:
        return comfy.supported_models.ZImage(unet_config)
    return comfy.supported_models.Lumina2(unet_config)


def build_nextdit(state_dict, unet_config=None, dtype=None):
    """ComfyUI ``ModelPatcher`` around a ``model_base.Lumina2`` holding ``state_dict``.

    Args:
        state_dict: ComfyUI NextDiT keys (see ``nextdit_keys.diffusers_to_comfy``). The dict is not
            modified; its tensors become the model's weights where they already have the weight
            dtype (no copy), so do not modify them in place afterwards.
        unet_config: from ``nextdit_config``; None infers it from the tensor shapes.
        dtype: weight dtype; None keeps the dtype the tensors hold. Compute falls back to a manual
            cast where the load device cannot run it (ComfyUI's ``unet_manual_cast``).

    Raises ValueError when keys are missing or unexpected or a shape disagrees with unet_config.
    """
    import comfy.model_management as mm
    import comfy.model_patcher

    if unet_config is None:
        unet_config = nextdit_config.unet_config_from_state_dict(state_dict)
    nextdit_config.validate_unet_config(unet_config, state_dict)

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    unet_dtype = dtype or majority_float_dtype((t.dtype, t.numel()) for t in state_dict.values())
    if unet_dtype is None:
        raise ValueError("state_dict: holds no floating-point tensors")
    model_config = _model_config(unet_config)
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)

    # ComfyUI allocates the weights uninitialised (never touched, so they take no memory). Assigning
    # our tensors in their place, in the dtype ComfyUI allocated, keeps one copy of the model.
    model = model_config.get_model(state_dict, "")
    allocated = model.diffusion_model.state_dict()
    weights = {key: tensor.to(allocated[key].dtype) for key, tensor in state_dict.items()}
    try:
        model.diffusion_model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:  # validated above, so only a dtype/device surprise lands here
        raise ValueError(f"state_dict: ComfyUI's NextDiT refused the weights: {error}") from error
    del weights, allocated
    model = model.to(offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def build_nextdit_from_diffusers(diffusers_state_dict, diffusers_config=None, dtype=None, consume=False):
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
    return build_nextdit(state_dict, unet_config, dtype=dtype)
