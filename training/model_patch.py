"""The training clone of a ComfyUI MODEL: every change goes through ModelPatcher extension points.

* ``model_sampling`` object patch: a subclass of the model's own sampling whose ``calculate_denoised``
  returns the raw model output. For a CONST (flow) model that output IS the velocity v = eps - x0
  (NextDiT returns ``-x`` so that ``denoised = x - sigma * output``), so ``apply_model`` gives v
  exactly, with no division by sigma.
* ``<linear>.forward`` object patches: the LoRA branch (training/lora.py).
* ``layers.N.forward`` object patches: non-reentrant gradient checkpointing per block.
* weight wrappers (identity): ComfyUI copies a weight before calling wrappers. Only added when the
  weights are inference tensors (a model loaded inside ComfyUI's executor runs under
  torch.inference_mode), which autograd cannot save for backward.

Object patches live only while the clone is loaded; ``release`` unloads it, restoring the modules.
"""

from __future__ import annotations

import copy

import torch
import torch.utils.checkpoint

from .lora import LoraAdapter, LoraForward

_VELOCITY_CLASSES: dict[type, type] = {}


def velocity_model_sampling(model_sampling):
    """A copy of ``model_sampling`` whose calculate_denoised returns the model output (the velocity)."""
    import comfy.model_sampling

    if not isinstance(model_sampling, comfy.model_sampling.CONST):
        raise ValueError(
            f"model: {type(model_sampling).__name__} is not a flow-matching (CONST) model; the trainer "
            "trains velocity models such as Lumina-Image-2.0 and Z-Image"
        )
    base = type(model_sampling)
    if base not in _VELOCITY_CLASSES:

        def calculate_denoised(self, sigma, model_output, model_input):
            return model_output

        _VELOCITY_CLASSES[base] = type(
            f"VelocityOutput{base.__name__}", (base,), {"calculate_denoised": calculate_denoised}
        )
    patched = copy.copy(model_sampling)
    patched.__class__ = _VELOCITY_CLASSES[base]
    return patched


class CheckpointedForward:
    """Object patch for ``<block>.forward``: recompute the block's activations during backward."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward
        if not torch.is_grad_enabled():
            return forward(self.module, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, self.module, *args, use_reentrant=False, **kwargs)


def writable_weight(weight: torch.Tensor) -> torch.Tensor:
    """Weight wrapper: ComfyUI's cast makes a normal (non-inference) copy whenever a wrapper exists."""
    return weight


def has_inference_weights(module: torch.nn.Module) -> bool:
    return any(p.is_inference() for p in module.parameters())


def build_training_patcher(
    model,
    adapters: dict[str, LoraAdapter],
    *,
    compute_dtype: torch.dtype | None,
    gradient_checkpointing: bool,
):
    """A clone of ``model`` that predicts velocities and carries the LoRA adapters."""
    patcher = model.clone()
    diffusion_model = patcher.model.diffusion_model
    if compute_dtype is not None:
        patcher.set_model_compute_dtype(compute_dtype)
    patcher.add_object_patch(
        "model_sampling", velocity_model_sampling(patcher.get_model_object("model_sampling"))
    )
    for name, adapter in adapters.items():
        patcher.add_object_patch(
            f"diffusion_model.{name}.forward", LoraForward(diffusion_model.get_submodule(name), adapter)
        )
    if gradient_checkpointing:
        for prefix in ("layers", "noise_refiner", "context_refiner"):
            for index, block in enumerate(getattr(diffusion_model, prefix, [])):
                patcher.add_object_patch(
                    f"diffusion_model.{prefix}.{index}.forward", CheckpointedForward(block)
                )
    if has_inference_weights(diffusion_model):
        for name, module in diffusion_model.named_modules():
            if hasattr(module, "comfy_cast_weights") and getattr(module, "weight", None) is not None:
                patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", writable_weight)
    return patcher


def _patch_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _patch_tensors(item)]
    if hasattr(value, "weights"):  # comfy.weight_adapter adapters keep their tensors in .weights
        return _patch_tensors(value.weights)
    return []


def model_fingerprint(patcher) -> str:
    """Identity of the weights the LoRA trains on: the base weights (ComfyUI's shared backup holds them
    while a clone has patched them in place) plus the patches (LoRAs) of this MODEL."""
    from .cache import state_dict_fingerprint, tensor_sample_bytes

    prefix = "diffusion_model."
    base = {}
    for key, value in patcher.model.diffusion_model.state_dict().items():
        saved = patcher.backup.get(prefix + key)
        base[key] = saved.weight if saved is not None else value
    patches = []
    for key in sorted(patcher.patches):
        for entry in patcher.patches[key]:
            tensors = _patch_tensors(entry[1])
            digest = [tensor_sample_bytes(t).hex()[:64] for t in tensors]
            patches.append((key, float(entry[0]), float(entry[2]), [tuple(t.shape) for t in tensors], digest))
    return state_dict_fingerprint(base, patches)


def load_for_training(patcher, blocks_to_swap: int = 0) -> None:
    """Load through ComfyUI's model management; ``blocks_to_swap`` main blocks' worth of weights are then
    moved back to the offload device and streamed per layer by ComfyUI's low-VRAM casting."""
    import comfy.model_management as mm

    # Training needs the activations' memory too: like TrainLoraNode, free everything else first.
    mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    patcher.model.diffusion_model.requires_grad_(False)
    if blocks_to_swap > 0:
        layers = patcher.model.diffusion_model.layers
        per_block = sum(p.numel() * p.element_size() for p in layers[0].parameters())
        freed = patcher.partially_unload(
            patcher.offload_device, memory_to_free=per_block * min(blocks_to_swap, len(layers))
        )
        return freed
    return 0


def release(patcher) -> None:
    """Unload the training clone: its object patches (LoRA forwards, checkpointing) leave the shared modules."""
    import comfy.model_management as mm

    for index in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[index]
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(index)
    if patcher.object_patches_backup:
        patcher.unpatch_model(patcher.offload_device)
    for module in patcher.model.diffusion_model.modules():
        functions = getattr(module, "weight_function", None)
        if functions and writable_weight in functions:
            module.weight_function = [f for f in functions if f is not writable_weight]
